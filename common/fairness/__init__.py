"""Responsible recommendations: what a model does per user group and to the catalogue.

- :mod:`common.fairness.groups`: user groups (gender, age bucket, occupation, activity
  quartile), percentile-bootstrap intervals and per-group tables with the largest gap;
- :mod:`common.fairness.exposure`: what the lists do to the catalogue (coverage, Gini,
  popularity, long tail);
- :mod:`common.fairness.genres`: genre diversity and miscalibration (Steck 2018);
- :mod:`common.fairness.metrics`: :func:`assess`, all of the above for one model;
- :mod:`common.fairness.rerank`: diversity (MMR) and calibrated re-ranking of one user's list;
- :mod:`common.fairness.attacker`: how well a protected attribute can be recovered from the
  latent code (an attacker's AUC).
"""

from common.fairness.attacker import (
    attacker_auc,
    attribute_classes,
    attribute_labels,
    latent_codes,
    mann_whitney_auc,
)
from common.fairness.exposure import (
    coverage,
    exposure_gini,
    gini,
    long_tail_mask,
    long_tail_share,
    mean_popularity,
)
from common.fairness.genres import genre_matrix, genre_mix, intra_list_diversity, miscalibration
from common.fairness.groups import (
    AGE_BUCKETS,
    ATTRIBUTES,
    GAP_MIN_USERS,
    GapStats,
    GroupStats,
    GroupTable,
    activity_quartiles,
    age_bucket,
    bootstrap_ci,
    group_order,
    group_table,
    user_groups,
)
from common.fairness.metrics import (
    COVERAGE_KS,
    LIST_K,
    NDCG_K,
    RECALL_K,
    assess,
    per_user_metrics,
)
from common.fairness.rerank import (
    RerankKind,
    calibrated_rerank,
    mmr_rerank,
    rerank_batch,
    tradeoff_curve,
)

__all__ = [
    "AGE_BUCKETS",
    "ATTRIBUTES",
    "COVERAGE_KS",
    "GAP_MIN_USERS",
    "LIST_K",
    "NDCG_K",
    "RECALL_K",
    "GapStats",
    "GroupStats",
    "GroupTable",
    "RerankKind",
    "activity_quartiles",
    "age_bucket",
    "assess",
    "attacker_auc",
    "attribute_classes",
    "attribute_labels",
    "bootstrap_ci",
    "calibrated_rerank",
    "coverage",
    "exposure_gini",
    "genre_matrix",
    "genre_mix",
    "gini",
    "group_order",
    "group_table",
    "intra_list_diversity",
    "latent_codes",
    "long_tail_mask",
    "long_tail_share",
    "mann_whitney_auc",
    "mean_popularity",
    "miscalibration",
    "mmr_rerank",
    "per_user_metrics",
    "rerank_batch",
    "tradeoff_curve",
    "user_groups",
]
