"""On-device recommendation: score one user's history with a checkpoint, locally.

Nothing leaves the device here: the history is read from a local file (or the command line), the
model runs on the device, and only the ranked list is returned to the caller. Around the ranking:

- provenance: every result names the model it came from (run, round, ledger head, see
  :mod:`common.checkpoint`), so that a recommendation can be traced to a run's privacy ledger;
- explanations (:func:`explain`): the history items that drove each recommended item most,
  found by leaving each one out;
- re-ranking (:class:`common.fairness.rerank.RerankKind`): diversity by MMR over genres
  (Carbonell and Goldstein 1998) or calibration to the history's genre mix (Steck 2018), with
  :mod:`common.fairness.rerank`, of the model's best :data:`RERANK_CANDIDATES` items.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import Checkpoint, load_checkpoint, provenance_of
from common.errors import DataError
from common.fairness.genres import genre_matrix, genre_mix, miscalibration
from common.fairness.rerank import RerankKind, calibrated_rerank, mmr_rerank
from common.model import ModelConfig, MultDAE, MultVAE, build_model

__all__ = [
    "RERANK_CANDIDATES",
    "RERANK_LAMBDA",
    "RecommendResult",
    "Recommendation",
    "RerankReport",
    "explain",
    "parse_history",
    "provenance_line",
    "recommend",
]

logger = logging.getLogger(__name__)


RERANK_LAMBDA: dict[RerankKind, float] = {RerankKind.DIVERSITY: 0.7, RerankKind.CALIBRATED: 0.4}
"""Default ``lambda`` in [0, 1] of each re-ranker, in its paper's sense: MMR's weighs relevance
(1: the model's order, Carbonell and Goldstein 1998), calibration's weighs the KL term (0: the
model's order, Steck 2018). Chosen from the demo model's trade-off curves (docs/measurements.md,
"Fairness"): within about 1.5% of its NDCG@100, MMR at 0.7 raises genre diversity@20 from 0.72
to 0.80 and calibration at 0.4 lowers miscalibration@20 from 0.52 to 0.38."""

RERANK_CANDIDATES = 100
"""How many of the model's best items a re-ranker chooses from (at least ``k``)."""

_EXPLAIN_BATCH = 512  # rows per forward pass of explain(): (512, I) inputs at most


@dataclass(frozen=True)
class Recommendation:
    """One recommended item.

    Attributes
    ----------
    item_id, title:
        The item's original id and title (``""`` where unknown).
    score:
        The model's logit for the item (re-ranking changes the order, not the score).
    because:
        With explanations: the history items that drove it most, ``(item_id, share)`` with
        ``share`` in (0, 1], largest first (see :func:`explain`); else empty.
    """

    item_id: str
    title: str
    score: float
    because: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class RerankReport:
    """What re-ranking did to the list's genres.

    Attributes
    ----------
    kind, lam:
        The re-ranker and its trade-off ``lambda``.
    history_mix, list_mix:
        Genre -> share of the history's and of the re-ranked list's genre distribution
        (largest first, genres with a share of 0 left out).
    kl_before, kl_after:
        Miscalibration ``KL(p || q~)`` (Steck 2018, eqs. 3-4; ``p`` the history's mix, ``q``
        the list's, :func:`common.fairness.genres.miscalibration`) of the model's top k and of
        the re-ranked list, nats; ``None`` when the history has no genres.
    """

    kind: RerankKind
    lam: float
    history_mix: dict[str, float]
    list_mix: dict[str, float]
    kl_before: float | None
    kl_after: float | None


@dataclass(frozen=True)
class RecommendResult:
    """The ranked items and the history ids the model does not know (skipped, not fatal).

    Attributes
    ----------
    provenance:
        The model's :data:`common.checkpoint.PROVENANCE_KEYS` (``run_id``, ``round``,
        ``ledger_head``); ``{}`` for a checkpoint that does not record them.
    rerank:
        What re-ranking did; ``None`` without re-ranking.
    """

    items: list[Recommendation]
    unknown_ids: list[str]
    known_history: int
    provenance: dict[str, Any] = field(default_factory=dict)
    rerank: RerankReport | None = None


_FILE_SUFFIXES = (".csv", ".txt", ".tsv", ".inter")
"""A history spec ending so names a file, never a list of ids."""


def parse_history(spec: str) -> list[str]:
    """Read a history given as a file path or as comma-separated item ids.

    A file may hold one id per line, or be a CSV with an ``item_id`` (or ``item``) column, such as
    a device's own interaction file (``user,item[,rating][,timestamp]``, the item in column 2).

    Raises
    ------
    DataError
        If ``spec`` looks like a path (it holds a path separator or ends in ``.csv``/``.txt``)
        but names no file, or holds no id.
    """
    path = Path(spec)
    if path.is_file():
        return _read_history_file(path)
    if _looks_like_path(spec):
        what = "a folder, not a history file" if path.is_dir() else "no such history file"
        raise DataError(what, path=path)
    ids = [tok.strip() for tok in spec.split(",") if tok.strip()]
    if not ids:
        raise DataError(f"history {spec!r} is neither a file nor a list of item ids")
    return ids


def _looks_like_path(spec: str) -> bool:
    separators = {"/", os.sep, *([os.altsep] if os.altsep else [])}
    return any(sep in spec for sep in separators) or spec.lower().endswith(_FILE_SUFFIXES)


def _read_history_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError("not a UTF-8 text file", path=path) from None
    if "\x00" in text:
        raise DataError("binary data in a history file", path=path)
    rows = [row for row in csv.reader(text.splitlines()) if row and any(c.strip() for c in row)]
    if not rows:
        raise DataError("empty history file", path=path)
    header = [c.strip().lower() for c in rows[0]]
    col = 0
    body = rows
    for name in ("item_id", "item", "itemid", "movieid"):
        if name in header:
            col = header.index(name)
            body = rows[1:]
            break
    else:
        if len(header) > 1:
            col = 1  # user,item[,rating][,timestamp]
    out = []
    for lineno, row in enumerate(body, start=len(rows) - len(body) + 1):
        if col >= len(row):
            raise DataError(f"expected an item id in column {col + 1}", path=path, line=lineno)
        out.append(row[col].strip())
    return out


def provenance_line(provenance: dict[str, Any]) -> str:
    """``model: run R, round N, ledger <first 16 hex>`` (or ``no ledger (privacy off)``) for a
    result's :attr:`RecommendResult.provenance`; ``model: provenance not recorded`` for ``{}``."""
    if not provenance:
        return "model: provenance not recorded"
    rnd = provenance.get("round")
    head = provenance.get("ledger_head")
    return ", ".join(
        [
            f"model: run {provenance.get('run_id')}",
            "trained centrally" if rnd is None else f"round {rnd}",
            "no ledger (privacy off)" if not head else f"ledger {str(head)[:16]}",
        ]
    )


def recommend(
    checkpoint: Checkpoint | Path,
    history: list[str],
    *,
    k: int = 10,
    rerank: RerankKind | None = None,
    rerank_lambda: float | None = None,
    explain_top: int = 0,
) -> RecommendResult:
    """Rank the items of ``checkpoint`` for a user whose history is ``history``.

    Parameters
    ----------
    checkpoint:
        A loaded checkpoint or the path of ``model.pt``.
    history:
        Original item ids the user interacted with. Unknown ids are reported and skipped.
    k:
        How many items to return (history items are never recommended).
    rerank:
        Re-rank the model's best :data:`RERANK_CANDIDATES` items for diversity or calibration
        (:class:`common.fairness.rerank.RerankKind`); ``None`` (default): the model's order.
        Needs the checkpoint's item genres.
    rerank_lambda:
        The re-ranker's ``lambda`` in [0, 1], in its own sense (see :data:`RERANK_LAMBDA`);
        ``None`` (default): :data:`RERANK_LAMBDA`.
    explain_top:
        Name this many history items that drove each recommendation (:func:`explain`);
        0 (default): no explanations.

    Raises
    ------
    ValueError
        If ``k`` < 1, ``explain_top`` < 0 or ``rerank_lambda`` is not in [0, 1].
    common.errors.DataError
        If ``rerank`` is asked of a checkpoint without item genres, or ``calibrated`` of a
        history whose items have none.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if explain_top < 0:
        raise ValueError(f"explain_top must be >= 0, got {explain_top}")
    if rerank_lambda is not None and not (
        math.isfinite(rerank_lambda) and 0.0 <= rerank_lambda <= 1.0
    ):
        raise ValueError(f"rerank_lambda must be in [0, 1], got {rerank_lambda}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if rerank is not None and not any(ckpt.item_genres):
        raise DataError("the model has no item genres; re-ranking needs them")
    column = {item: i for i, item in enumerate(ckpt.item_ids)}
    known = list(dict.fromkeys(column[h] for h in history if h in column))  # (|H|,) columns
    unknown = [h for h in history if h not in column]
    if unknown:
        logger.info("skipping %d item ids the model does not know", len(unknown))
    model = _load_model(ckpt)
    n_items = len(ckpt.item_ids)
    x = torch.zeros(1, n_items)  # (1, n_items)
    x[0, known] = 1.0
    with torch.no_grad():
        scores = model(x).logits[0].numpy().astype(np.float64)  # (n_items,)
    scores[known] = -np.inf
    k = min(k, n_items - len(known))
    top = _top_k(scores, k)
    report = None
    if rerank is not None and k > 0:
        lam = RERANK_LAMBDA[rerank] if rerank_lambda is None else rerank_lambda
        top, report = _rerank(ckpt, scores, known, top, kind=rerank, lam=lam)
    because: list[list[tuple[int, float]]] = [[] for _ in top]
    if explain_top > 0:
        because = explain(model, known, top.tolist(), top=explain_top)
    items = [
        Recommendation(
            ckpt.item_ids[i],
            ckpt.item_titles[i],
            float(scores[i]),
            because=[(ckpt.item_ids[h], share) for h, share in why],
        )
        for i, why in zip(top.tolist(), because, strict=True)
    ]
    return RecommendResult(
        items=items,
        unknown_ids=unknown,
        known_history=len(known),
        provenance=provenance_of(ckpt),
        rerank=report,
    )


def _load_model(ckpt: Checkpoint) -> nn.Module:
    model = build_model(ModelConfig.from_dict(ckpt.model_config))
    model.load_state_dict(ckpt.state_dict)
    model.eval()
    return model


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Columns of the ``k`` largest ``scores``, largest first (ties: lower column first)."""
    return np.argsort(-scores, kind="stable")[: max(k, 0)]


def _rerank(
    ckpt: Checkpoint,
    scores: np.ndarray,
    known: list[int],
    top: np.ndarray,
    *,
    kind: RerankKind,
    lam: float,
) -> tuple[np.ndarray, RerankReport]:
    """Re-rank the model's best :data:`RERANK_CANDIDATES` (history ``-inf`` in ``scores``) into
    a list as long as ``top`` (the model's own top k), and report the genre mixes."""
    genre_mat, genres = genre_matrix(ckpt.item_genres)  # (I, G), G names
    k = len(top)
    history_mix = genre_mix(np.asarray([known], dtype=np.int64), genre_mat)[0]  # (G,)
    if kind is RerankKind.CALIBRATED and not history_mix.sum() > 0:
        raise DataError("none of the history's items has a genre; calibrated re-ranking needs some")
    candidates = max(RERANK_CANDIDATES, k)
    if kind is RerankKind.DIVERSITY:
        ranked = mmr_rerank(scores, genre_mat, k=k, lam=lam, candidates=candidates)
    else:
        ranked = calibrated_rerank(
            scores, history_mix, genre_mat, k=k, lam=lam, candidates=candidates
        )
    ranked = np.asarray(ranked, dtype=np.int64)  # (k,)
    kl_before = kl_after = None
    if history_mix.sum() > 0:
        history = np.zeros((2, len(ckpt.item_ids)))  # (2, I): the history once per list
        history[:, known] = 1.0
        kl = miscalibration(sp.csr_matrix(history), np.stack([top, ranked]), genre_mat)  # (2,)
        kl_before, kl_after = float(kl[0]), float(kl[1])
    list_mix = genre_mix(ranked[None, :], genre_mat)[0]  # (G,)
    report = RerankReport(
        kind=kind,
        lam=lam,
        history_mix=_named_mix(history_mix, genres),
        list_mix=_named_mix(list_mix, genres),
        kl_before=kl_before,
        kl_after=kl_after,
    )
    logger.info(
        "re-ranked (%s, lambda %.2f): miscalibration %s -> %s", kind.value, lam, kl_before, kl_after
    )
    return ranked, report


def _named_mix(mix: np.ndarray, genres: list[str]) -> dict[str, float]:
    """Genre -> share, largest first (ties: by name), zero shares left out."""
    order = sorted(range(len(genres)), key=lambda g: (-mix[g], genres[g]))
    return {genres[g]: float(mix[g]) for g in order if mix[g] > 0}


def explain(
    model: nn.Module, history_columns: Sequence[int], items: Sequence[int], *, top: int = 3
) -> list[list[tuple[int, float]]]:
    """For each of ``items``, the history items that drove its score most, with their share.

    Leave-one-out on the model (in evaluation mode, batched forward passes): with ``H`` the
    history and ``log p_j(S)`` the model's log-softmax output for item ``j`` given the items
    ``S``, history item ``i`` drove ``j`` by ``drop_i = log p_j(H) - log p_j(H \\ {i})``.
    The log-softmax, not the logit, so that a change of the normaliser (``i`` lifting other
    items) counts. ``share_i = max(drop_i, 0) / sum_h max(drop_h, 0)``. A history of one item
    gives that item a share of 1; an item no history item lifts gets an empty list.

    Parameters
    ----------
    model:
        A Mult-VAE or Mult-DAE (:func:`common.model.build_model`); its training mode is kept.
    history_columns:
        The history's item columns (duplicates count once).
    items:
        The columns to explain, e.g. the recommended ones.
    top:
        How many history items to name per item, at most.

    Returns
    -------
    list[list[tuple[int, float]]]
        Per item of ``items``: up to ``top`` pairs ``(history column, share)``, share in (0, 1],
        largest first (ties: earlier in the history first).

    Raises
    ------
    ValueError
        If ``top`` < 1 or a column is outside the model's catalogue.
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if not isinstance(model, MultVAE | MultDAE):
        raise TypeError(f"model must be a MultVAE or MultDAE, got {type(model).__name__}")
    n_items = model.config.n_items
    hist = list(dict.fromkeys(int(c) for c in history_columns))
    cols = [int(j) for j in items]
    if any(not 0 <= c < n_items for c in [*hist, *cols]):
        raise ValueError(f"history_columns and items must be columns in [0, {n_items})")
    if len(hist) <= 1:  # nothing to compare with: the one item drove everything
        return [[(hist[0], 1.0)] if hist else [] for _ in cols]
    x = torch.zeros(len(hist) + 1, n_items)  # (1 + |H|, I): the full history, then one row
    x[:, hist] = 1.0  # per history item left out
    x[torch.arange(1, len(hist) + 1), hist] = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # in batches of rows only to bound memory for long histories
            logp = torch.cat(
                [
                    F.log_softmax(model(batch).logits.to(torch.float64), dim=1)[:, cols]
                    for batch in torch.split(x, _EXPLAIN_BATCH)
                ]
            )  # (1 + |H|, J)
    finally:
        model.train(was_training)
    drops = (logp[0] - logp[1:]).clamp(min=0.0).numpy()  # (|H|, J)
    totals = drops.sum(axis=0)  # (J,)
    out: list[list[tuple[int, float]]] = []
    for j in range(len(cols)):
        if not totals[j] > 0.0:
            out.append([])
            continue
        shares = drops[:, j] / totals[j]  # (|H|,)
        order = np.argsort(-shares, kind="stable")[:top]
        out.append([(hist[h], float(shares[h])) for h in order.tolist() if shares[h] > 0.0])
    return out
