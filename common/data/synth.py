"""Synthetic implicit-feedback data for scale tests: latent-factor users, power-law popularity.

Each user belongs to one of ``n_groups`` clusters; its factor is the cluster centre plus noise.
Item popularity follows Zipf's law, ``p_j ∝ (rank_j)^-s``. A user's items are drawn without
replacement with probability proportional to ``p_j * exp(<u, v_j> / temperature)`` using the
Gumbel-top-k trick (Kool, van Hoof and Welling 2019, "Stochastic Beams and Where to Find Them",
eq. 5): the k largest of ``log w_j + Gumbel noise`` are a weighted sample of size k without
replacement. Interaction counts per user are ``min_interactions`` plus a log-normal draw, so they
are heavy-tailed. Everything is vectorized over blocks of users.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from common.io import atomic_write_text

__all__ = ["synthesize"]

logger = logging.getLogger(__name__)

_BLOCK_CELLS = 1 << 22  # users per block * n_items: about 32 MiB of float64 scores


def _counts(
    rng: np.random.Generator, n_users: int, n_items: int, minimum: int, median: float, maximum: int
) -> np.ndarray:
    """``(n_users,)`` interactions per user: ``minimum`` + log-normal(median - minimum, sigma 1)."""
    extra = rng.lognormal(mean=math.log(max(median - minimum, 1.0)), sigma=1.0, size=n_users)
    return np.clip(minimum + np.floor(extra).astype(np.int64), minimum, min(maximum, n_items))


def synthesize(
    n_users: int,
    n_items: int,
    *,
    seed: int = 0,
    out_dir: Path,
    dim: int = 16,
    n_groups: int = 8,
    zipf_exponent: float = 1.0,
    temperature: float = 1.0,
    min_interactions: int = 5,
    median_interactions: float = 20.0,
    max_interactions: int = 1000,
) -> Path:
    """Write ``out_dir/interactions.csv`` (``user,item,rating,timestamp``) and ``users.csv``.

    Parameters
    ----------
    n_users, n_items:
        Sizes; ids are ``1..n_users`` and ``1..n_items``.
    seed:
        Seeds one ``np.random.default_rng``; the same seed writes the same bytes.
    out_dir:
        Output folder (created). Files are written atomically.
    dim:
        Latent factor dimension.
    n_groups:
        User clusters; ``users.csv`` records each user's cluster as column ``group``.
    zipf_exponent:
        Popularity exponent s > 0 (about 1 for MovieLens-like data).
    temperature:
        Scales the affinity ``<u, v>``; larger means popularity dominates. > 0.
    min_interactions, median_interactions, max_interactions:
        Per-user interaction counts: at least ``min_interactions`` (>= 1), median about
        ``median_interactions``, at most ``min(max_interactions, n_items)``.

    Returns
    -------
    Path
        ``out_dir/interactions.csv``; every row has rating 5 (a positive), readable by
        :func:`common.data.load_dataset`.
    """
    if n_users < 1 or n_items < 1:
        raise ValueError(f"n_users and n_items must be >= 1, got {n_users}, {n_items}")
    if not 1 <= min_interactions <= min(max_interactions, n_items):
        raise ValueError(
            f"min_interactions must be in [1, min(max_interactions, n_items)], "
            f"got {min_interactions}"
        )
    for name, value in (("zipf_exponent", zipf_exponent), ("temperature", temperature)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    if dim < 1 or n_groups < 1:
        raise ValueError(f"dim and n_groups must be >= 1, got {dim}, {n_groups}")
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, dim))  # (G, d)
    groups = rng.integers(n_groups, size=n_users)  # (U,)
    users = (centres[groups] + 0.5 * rng.normal(size=(n_users, dim))) / math.sqrt(dim)  # (U, d)
    items = rng.normal(size=(n_items, dim))  # (I, d)
    rank = rng.permutation(n_items) + 1  # popularity rank of each item id
    log_pop = -zipf_exponent * np.log(rank)  # (I,)
    counts = _counts(rng, n_users, n_items, min_interactions, median_interactions, max_interactions)

    block = max(1, _BLOCK_CELLS // n_items)
    user_parts: list[np.ndarray] = []
    item_parts: list[np.ndarray] = []
    for start in range(0, n_users, block):
        stop = min(n_users, start + block)
        k = counts[start:stop]  # (B,)
        scores = log_pop + users[start:stop] @ items.T / temperature  # (B, I)
        scores += rng.gumbel(size=scores.shape)
        kmax = int(k.max())
        top = np.argpartition(-scores, kmax - 1, axis=1)[:, :kmax]  # (B, kmax) unordered
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        top = np.take_along_axis(top, order, axis=1)  # (B, kmax) best first
        taken = np.arange(kmax) < k[:, None]  # (B, kmax)
        user_parts.append(np.repeat(np.arange(start, stop), k))
        item_parts.append(top[taken])
    user_col = np.concatenate(user_parts) + 1
    item_col = np.concatenate(item_parts) + 1
    times = 1_000_000_000 + rng.integers(0, 10**8, size=user_col.size)

    out_dir = Path(out_dir)
    lines = map("{},{},5,{}".format, user_col.tolist(), item_col.tolist(), times.tolist())
    path = out_dir / "interactions.csv"
    atomic_write_text(path, "user,item,rating,timestamp\n" + "\n".join(lines) + "\n")
    user_lines = map("{},g{}".format, range(1, n_users + 1), groups.tolist())
    atomic_write_text(out_dir / "users.csv", "user,group\n" + "\n".join(user_lines) + "\n")
    logger.info(
        "synthesized %d users x %d items, %d interactions into %s",
        n_users,
        n_items,
        user_col.size,
        path,
    )
    return path
