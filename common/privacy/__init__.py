"""Differential privacy in one package: accounting, the mechanism, planning, ledger and audits.

- :mod:`.accounting`: the one RDP/PRV composition (Opacus) that the server, the clients, the
  in-process engine and the auditor all use; calibration of the noise multiplier.
- :mod:`.mechanism`: clip, noise and pre-scale an update (DP-FedAvg, McMahan et al. 2018).
- :mod:`.plan`: a run's resolved privacy parameters (:class:`DPPlan`).
- :mod:`.rounds`: what one round costs, as the typed ledger record of the round.
- :mod:`.ledger`: the hash-chained ledger file; :mod:`.signing`: its Ed25519 signatures and the
  committee's co-signatures; :mod:`.audit`: ``fedrec audit verify``, with the cross-checks
  against the run's config (:mod:`.crosscheck`) and a device's own record (:mod:`.device`).
- :mod:`.empirical`: the one-run canary audit's statistics (Steinke, Nasr and Jagielski 2023).

See docs/design.md, "Privacy accounting".
"""

from common.privacy.accounting import (
    PRV_EPS_ERROR,
    PRV_MAX_GRID_POINTS,
    AccountantKind,
    AggregatorView,
    MechanismStep,
    PrivacyAccountant,
    RdpTracker,
    client_epsilon_after,
    compute_epsilon,
    default_delta,
    gaussian_epsilon,
    merged_history,
)
from common.privacy.mechanism import (
    add_gaussian_noise_inplace,
    client_noise_std,
    clip_inplace,
    effective_noise_multiplier,
    l2_norm,
    privatize_update,
)
from common.privacy.plan import (
    MAX_NOISE_MULTIPLIER,
    DPPlan,
    calibrate_noise_multiplier,
    dpsgd_shape,
    participation_factor,
    plan_privacy,
)

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "PRV_EPS_ERROR",
    "PRV_MAX_GRID_POINTS",
    "AccountantKind",
    "AggregatorView",
    "DPPlan",
    "MechanismStep",
    "PrivacyAccountant",
    "RdpTracker",
    "add_gaussian_noise_inplace",
    "calibrate_noise_multiplier",
    "client_epsilon_after",
    "client_noise_std",
    "clip_inplace",
    "compute_epsilon",
    "default_delta",
    "dpsgd_shape",
    "effective_noise_multiplier",
    "gaussian_epsilon",
    "l2_norm",
    "merged_history",
    "participation_factor",
    "plan_privacy",
    "privatize_update",
]
