"""Pictures and an offline HTML page for a finished (or partial) federated run.

(Over 400 lines: one self-contained page, its plots, tables and inline CSS, in one module.)

Reads ``RUN_DIR/results.json`` and writes ``metrics.png``, ``cost.png``, ``epsilon.png`` (when the
run tracked a privacy budget) and ``report.html`` next to it. The HTML page is one self-contained
file: the pictures are embedded as base64 ``data:`` URIs and the CSS is inline, so it opens
offline and can be mailed around.

Plots are drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas directly, so no global
``pyplot`` state is touched and the module is safe to call from any thread or test.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.errors import FedrecError
from common.io import atomic_write_bytes, atomic_write_text

__all__ = ["load_results", "plot_cost", "plot_epsilon", "plot_metrics", "write_report"]

logger = logging.getLogger(__name__)

MISSING = "–"
"""Shown in tables for a value the run did not record (e.g. a round without evaluation)."""

_BYTES_PER_MB = 1e6  # decimal megabytes, as network traffic is usually counted
_HE_PHASES = ("he_encrypt_seconds", "he_aggregate_seconds", "he_decrypt_seconds")
_DPI = 110


# --------------------------------------------------------------------------------------- input


def load_results(run_dir: Path) -> dict[str, Any]:
    """Read and minimally check ``run_dir/results.json``.

    Parameters
    ----------
    run_dir:
        Folder of one federated run.

    Returns
    -------
    dict
        The parsed results, with at least a ``rounds`` list of objects.

    Raises
    ------
    FedrecError
        One line naming the file, if it is missing, not valid JSON or lacks a ``rounds`` list.
    """
    path = Path(run_dir) / "results.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FedrecError(f"{path}: not found (has the run written any rounds yet?)") from None
    except OSError as err:
        raise FedrecError(f"{path}: cannot read: {err.strerror}") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as err:
        raise FedrecError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(results, dict):
        raise FedrecError(f"{path}: expected a JSON object at the top level")
    rounds = results.get("rounds")
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        raise FedrecError(f"{path}: expected 'rounds' to be a list of objects")
    return results


def _rounds(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-round records; an absent list counts as no rounds yet."""
    return list(results.get("rounds") or [])


def _round_number(record: dict[str, Any], index: int) -> int:
    """``record["round"]``, falling back to the 1-based position for older files."""
    value = record.get("round")
    return int(value) if isinstance(value, int | float) else index + 1


def _series(results: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    """Rounds and values of ``key`` for the rounds that recorded a number for it."""
    xs: list[int] = []
    ys: list[float] = []
    for i, record in enumerate(_rounds(results)):
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            xs.append(_round_number(record, i))
            ys.append(float(value))
    return xs, ys


def _reference(results: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Label and test metrics of the centralized reference, or ``None`` if the run has none."""
    ref = results.get("reference")
    if not isinstance(ref, dict):
        return None
    test = ref.get("test")
    return str(ref.get("label", "centralized reference")), test if isinstance(test, dict) else {}


def _final_test(results: dict[str, Any]) -> dict[str, Any]:
    """Final test metrics; empty for a partial run that has not reached the end."""
    final = results.get("final")
    test = final.get("test") if isinstance(final, dict) else None
    return test if isinstance(test, dict) else {}


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else ``None``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


# --------------------------------------------------------------------------------------- plots


def _figure(n_panels: int) -> Figure:
    """A figure with room for ``n_panels`` panels side by side."""
    fig = Figure(figsize=(5.2 * n_panels, 3.9), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    """Render ``fig`` as PNG in memory, then write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())
    logger.info("wrote %s", path)


def plot_metrics(results: dict[str, Any], path: Path) -> None:
    """Plot test NDCG@100 and Recall@20 per round against the centralized reference.

    Parameters
    ----------
    results:
        Parsed ``results.json``.
    path:
        Where to write the PNG (``metrics.png``).

    Notes
    -----
    Only rounds with a server evaluation are drawn. The reference, if present, is a dashed
    horizontal line. A mean client-side NDCG@100 (``client_ndcg@100``) is added when recorded.
    """
    fig = _figure(2)
    reference = _reference(results)
    panels = (("ndcg@100", "NDCG@100"), ("recall@20", "Recall@20"))
    for ax, (key, title) in zip(fig.subplots(1, 2), panels, strict=True):
        xs, ys = _series(results, key)
        if xs:
            ax.plot(xs, ys, marker="o", label="federated (server test)")
        if key == "ndcg@100":
            cx, cy = _series(results, "client_ndcg@100")
            if cx:
                ax.plot(cx, cy, marker=".", linestyle=":", label="clients (mean)")
        if reference is not None:
            label, ref_test = reference
            ref_value = _number(ref_test.get(key))
            if ref_value is not None:
                ax.axhline(ref_value, color="0.3", linestyle="--", label=label)
        if not xs:
            ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")  # fmt: skip
        ax.set_title(f"Test {title}")
        ax.set_xlabel("round")
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize="small")
    _save(fig, path)


def plot_epsilon(results: dict[str, Any], path: Path) -> bool:
    """Plot the privacy budget spent so far (epsilon) per round, if the run tracked it.

    Parameters
    ----------
    results:
        Parsed ``results.json``.
    path:
        Where to write the PNG (``epsilon.png``).

    Returns
    -------
    bool
        ``True`` if a round recorded ``epsilon`` and the file was written, else ``False``.
    """
    xs, ys = _series(results, "epsilon")
    if not xs:
        return False
    fig = _figure(1)
    ax = fig.subplots()
    rdp_x, rdp_y = _series(results, "epsilon_rdp")
    if rdp_x:
        # per-round claims are RDP; the final round also carries the tighter PRV epsilon
        ax.plot(rdp_x, rdp_y, marker="o", markersize=3, color="tab:red", label="RDP, per round")
        ax.plot(
            xs[-1:],
            ys[-1:],
            marker="*",
            markersize=12,
            ls="none",
            color="tab:blue",
            label=f"PRV, final: {ys[-1]:.3g}",
        )
        ax.legend()
    else:
        ax.plot(xs, ys, marker="o", markersize=3, color="tab:red")
    ax.set_title("Privacy budget spent")
    ax.set_xlabel("round")
    ax.set_ylabel("ε (cumulative)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
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


# ---------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h1 small { color: #666; font-weight: normal; font-size: 0.6em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.k { text-align: left; font-weight: 600; }
.scroll { max-height: 30em; overflow: auto; display: inline-block; }
.scroll th { position: sticky; top: 0; }
img { max-width: 100%; display: block; margin: 0.5em 0 1em; }
pre { background: #f7f7f7; padding: 1em; overflow: auto; font-size: 0.85em; }
"""


def _fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell; ``None`` or absent shows as :data:`MISSING`."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _fmt_mb(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else f"{number / _BYTES_PER_MB:.2f}"


# Known per-round columns, in display order: (key, header, formatter).
_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("round", "round", _fmt),
    ("sampled", "sampled", _fmt),
    ("returned", "returned", _fmt),
    ("failed", "failed", _fmt),
    ("dropped", "dropped", _fmt),
    ("ndcg@100", "NDCG@100", _fmt),
    ("recall@20", "Recall@20", _fmt),
    ("client_ndcg@100", "client NDCG@100", _fmt),
    ("epsilon", "ε", lambda v: _fmt(v, 3)),
    ("seconds", "seconds", lambda v: _fmt(v, 2)),
    ("bytes_up", "MB up", _fmt_mb),
    ("bytes_down", "MB down", _fmt_mb),
    ("he_encrypt_seconds", "HE encrypt s", lambda v: _fmt(v, 3)),
    ("he_aggregate_seconds", "HE aggregate s", lambda v: _fmt(v, 3)),
    ("he_decrypt_seconds", "HE decrypt s", lambda v: _fmt(v, 3)),
)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, key_column: bool) -> str:
    """An HTML table; every cell is escaped here."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = [
            f'<td class="k">{html.escape(c)}</td>' if key_column and j == 0 else
            f"<td>{html.escape(c)}</td>"
            for j, c in enumerate(row)
        ]  # fmt: skip
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _summary_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs of the summary table."""
    final = _final_test(results)
    reference = _reference(results)
    ref_test = reference[1] if reference is not None else {}
    rounds = _rounds(results)
    rows = [
        ("final test NDCG@100", _fmt(_number(final.get("ndcg@100")))),
        ("final test Recall@20", _fmt(_number(final.get("recall@20")))),
        ("final test Recall@50", _fmt(_number(final.get("recall@50")))),
    ]
    if reference is not None:
        rows.append(("reference", reference[0]))
        rows.append(("reference NDCG@100", _fmt(_number(ref_test.get("ndcg@100")))))
        rows.append(("reference Recall@20", _fmt(_number(ref_test.get("recall@20")))))
        fed, central = _number(final.get("ndcg@100")), _number(ref_test.get("ndcg@100"))
        ratio = f"{fed / central:.1%}" if fed is not None and central else MISSING
        rows.append(("NDCG@100 federated / central", ratio))
    wall = _number(results.get("wall_seconds"))
    rows += [
        ("rounds", _fmt(len(rounds))),
        ("wall time", MISSING if wall is None else f"{wall:,.1f} s ({wall / 60:.1f} min)"),
        ("total MB up", _fmt_mb(sum(_series(results, "bytes_up")[1]))),
        ("total MB down", _fmt_mb(sum(_series(results, "bytes_down")[1]))),
    ]
    eps = _series(results, "epsilon")[1]
    if eps:
        rows.append(("final ε", f"{eps[-1]:.3f}"))
    return rows


def _round_table(results: dict[str, Any]) -> str:
    """All rounds, with the known columns present in the data first and any others after."""
    rounds = _rounds(results)
    present = {key for record in rounds for key in record}
    columns = [c for c in _COLUMNS if c[0] in present]
    known = {c[0] for c in _COLUMNS}
    extra = sorted(present - known)
    columns += [(key, key, _fmt) for key in extra]
    rows = [[fmt(record.get(key)) for key, _, fmt in columns] for record in rounds]
    return _table([header for _, header, _ in columns], rows, key_column=False)


def _img(path: Path, alt: str) -> str:
    """An ``<img>`` with the PNG at ``path`` embedded as a base64 data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_report(run_dir: Path) -> Path:
    """Write the plots and a self-contained ``report.html`` for one run folder.

    Parameters
    ----------
    run_dir:
        Folder holding ``results.json``; the PNGs and the page are written next to it.

    Returns
    -------
    Path
        Path of ``report.html``.

    Raises
    ------
    FedrecError
        If ``results.json`` is missing or invalid (see :func:`load_results`).
    """
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    raw_config = results.get("config")
    config: dict[str, Any] = raw_config if isinstance(raw_config, dict) else {}
    name = str(config.get("name") or run_dir.name)

    images = []
    plot_metrics(results, run_dir / "metrics.png")
    images.append(_img(run_dir / "metrics.png", "test NDCG@100 and Recall@20 per round"))
    if plot_epsilon(results, run_dir / "epsilon.png"):
        images.append(_img(run_dir / "epsilon.png", "privacy budget per round"))
    plot_cost(results, run_dir / "cost.png")
    images.append(_img(run_dir / "cost.png", "time and traffic per round"))

    config_dump = json.dumps(config, indent=2, sort_keys=True, default=str)
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>fedrec report: {html.escape(name)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(name)} <small>{html.escape(str(run_dir))}</small></h1>",
            "<h2>Summary</h2>",
            _table(["", "value"], _summary_rows(results), key_column=True),
            "<h2>Plots</h2>",
            *images,
            "<h2>Rounds</h2>",
            f'<div class="scroll">{_round_table(results)}</div>',
            "<h2>Configuration</h2>",
            f"<pre>{html.escape(config_dump)}</pre>",
            "</body></html>",
            "",
        ]
    )
    report = run_dir / "report.html"
    atomic_write_text(report, page)
    logger.info("wrote %s", report)
    return report
