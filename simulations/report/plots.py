"""The report's pictures: test metrics, the privacy budget with its target, time and traffic.

Drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas directly, so no global
``pyplot`` state is touched and it is safe to call from any thread or test.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.io import atomic_write_bytes
from simulations.report.results import (
    _BYTES_PER_MB,
    _DPI,
    _HE_PHASES,
    _comparison,
    _epsilon_prv_series,
    _epsilon_rdp_series,
    _number,
    _release_epsilon,
    _releases,
    _round_number,
    _rounds,
    _series,
    _target_epsilon,
    _tracks_epsilon,
)

logger = logging.getLogger(__name__)

__all__ = ["epsilon_figure", "plot_cost", "plot_epsilon", "plot_metrics"]


def _figure(n_panels: int) -> Figure:
    """A figure with room for ``n_panels`` panels side by side."""
    fig = Figure(figsize=(5.2 * n_panels, 3.9), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    """Render ``fig`` as PNG in memory, then write it atomically (rounds on whole ticks)."""
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())
    logger.info("wrote %s", path)


_LINE_STYLES: dict[str, dict[str, Any]] = {
    "warm": {"color": "tab:purple", "linestyle": (0, (6, 2, 1, 2, 1, 2))},
    "popularity": {"color": "tab:gray", "linestyle": ":"},
    "ease": {"color": "tab:green", "linestyle": "-."},
    "reference": {"color": "0.3", "linestyle": "--"},
}


def plot_metrics(results: dict[str, Any], path: Path) -> None:
    """Plot test NDCG@100 and Recall@20 per round against the baselines and the reference.

    Parameters
    ----------
    results:
        Parsed ``results.json``.
    path:
        Where to write the PNG (``metrics.png``).

    Notes
    -----
    Only rounds with a server evaluation are drawn. The popularity and EASE baselines and the
    centralized reference, where recorded, are horizontal lines, and so is the warm start's model
    (before round 1) when the run began with one. A mean client-side NDCG@100
    (``client_ndcg@100``) is added when recorded.
    """
    fig = _figure(2)
    others = [m for m in _comparison(results) if m.key != "federated"]
    numbers = [_round_number(r, i) for i, r in enumerate(_rounds(results))]
    last_round = max([*numbers, 1])
    panels = (("ndcg@100", "NDCG@100"), ("recall@20", "Recall@20"))
    for ax, (key, title) in zip(fig.subplots(1, 2), panels, strict=True):
        xs, ys = _series(results, key)
        if xs:
            ax.plot(xs, ys, marker="o", label="federated (server test)")
        if key == "ndcg@100":
            cx, cy = _series(results, "client_ndcg@100")
            if cx:
                ax.plot(cx, cy, marker=".", linestyle=":", label="clients (mean)")
        for model in others:
            value = _number(model.test.get(key))
            if value is not None:
                ax.axhline(value, label=model.label, **_LINE_STYLES[model.key])
        if not xs:
            ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")  # fmt: skip
        ax.set_title(f"Test {title}")
        ax.set_xlabel("round")
        ax.set_xlim(0.5, last_round + 0.5)  # every round run, even if few were evaluated
        ax.set_ylabel(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
    _save(fig, path)


def epsilon_figure(results: dict[str, Any]) -> Figure | None:
    """The privacy budget spent so far (epsilon) per round against the target, if tracked.

    Parameters
    ----------
    results:
        Parsed ``results.json``.

    Returns
    -------
    Figure or None
        One panel: the RDP epsilon of every round as a line, the PRV epsilon (computed at the
        last round only; the reported one) as a star, and ``target_epsilon``, when the run has
        one, as a dashed horizontal line, each named in the legend; with a warm start, the
        epsilon after its releases (spent before round 1) as a horizontal line. ``None``
        if no round recorded an epsilon.
    """
    if not _tracks_epsilon(results):
        return None
    fig = _figure(1)
    ax = fig.subplots()
    rdp_x, rdp_y = _epsilon_rdp_series(results)
    prv_x, prv_y = _epsilon_prv_series(results)
    if rdp_x:
        ax.plot(rdp_x, rdp_y, marker="o", markersize=3, color="tab:red", label="RDP, per round")
    if prv_x:
        ax.plot(prv_x, prv_y, marker="*", markersize=12, ls="none", color="tab:blue",
                label=f"PRV (reported): {prv_y[-1]:.3g}")  # fmt: skip
    target = _target_epsilon(results)
    if target is not None:
        ax.axhline(target, color="0.3", linestyle="--", label=f"target ε = {target:g}")
    released = _release_epsilon(results)
    if released is not None:
        accountant = str(_releases(results)[-1].get("epsilon_accountant") or "rdp").upper()
        ax.axhline(released, label=f"after the warm start's releases ({accountant}): "
                   f"{released:.3g}", **_LINE_STYLES["warm"])  # fmt: skip
    ax.set_title("Privacy budget spent")
    ax.set_xlabel("round")
    ax.set_ylabel("ε (cumulative)")
    top = max([*rdp_y, *prv_y, target or 0.0, released or 0.0])
    ax.set_ylim(0, 1.1 * top if top > 0 else 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


def plot_epsilon(results: dict[str, Any], path: Path) -> bool:
    """Plot :func:`epsilon_figure` to ``path`` (``epsilon.png``) if the run tracked epsilon.

    Parameters
    ----------
    results:
        Parsed ``results.json``.
    path:
        Where to write the PNG.

    Returns
    -------
    bool
        ``True`` if a round recorded an epsilon and the file was written, else ``False``.
    """
    fig = epsilon_figure(results)
    if fig is None:
        return False
    _save(fig, path)
    return True


def plot_cost(results: dict[str, Any], path: Path) -> None:
    """Plot wall time and traffic per round, plus homomorphic-encryption time when recorded.

    Parameters
    ----------
    results:
        Parsed ``results.json``.
    path:
        Where to write the PNG (``cost.png``). Traffic is in decimal MB (10^6 bytes).
    """
    he_present = [k for k in _HE_PHASES if _series(results, k)[0]]
    fig = _figure(3 if he_present else 2)
    axes = fig.subplots(1, 3 if he_present else 2)

    xs, seconds = _series(results, "seconds")
    axes[0].bar(xs, seconds, color="tab:gray")
    axes[0].set_title("Time per round")
    axes[0].set_ylabel("seconds")

    for key, label in (
        ("bytes_up", "up (clients → server)"),
        ("bytes_down", "down (server → clients)"),
    ):
        bx, by = _series(results, key)
        if bx:
            axes[1].plot(bx, [b / _BYTES_PER_MB for b in by], marker=".", label=label)
    axes[1].set_title("Traffic per round")
    axes[1].set_ylabel("MB")
    # From zero, so a constant payload does not look like a swing; headroom keeps lines visible.
    top_mb = max(_series(results, "bytes_up")[1] + _series(results, "bytes_down")[1], default=0.0)
    axes[1].set_ylim(0, 1.15 * top_mb / _BYTES_PER_MB if top_mb > 0 else 1.0)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize="small")

    if he_present:
        rounds = [_round_number(r, i) for i, r in enumerate(_rounds(results))]
        bottom = [0.0] * len(rounds)
        for key in he_present:
            values = [_number(r.get(key)) or 0.0 for r in _rounds(results)]
            label = key.removeprefix("he_").removesuffix("_seconds")
            axes[2].bar(rounds, values, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        axes[2].set_title("Encryption time per round")
        axes[2].set_ylabel("seconds")
        # Headroom above the tallest stack keeps the one-row legend off the bars.
        axes[2].set_ylim(0, 1.3 * max(bottom) if max(bottom, default=0.0) > 0 else 1.0)
        axes[2].legend(loc="upper center", ncols=len(he_present), fontsize="small")

    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(True, alpha=0.3)
    _save(fig, path)


# ------------------------------------------------------------------------------ cell formats
