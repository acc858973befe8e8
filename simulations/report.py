"""Pictures and an offline HTML page for a finished (or partial) federated run.

(Over 400 lines: one self-contained page, its plots, tables and inline CSS, in one module.)

Reads ``RUN_DIR/results.json`` (and ``RUN_DIR/ledger.jsonl`` when the run kept one) and writes
``metrics.png``, ``cost.png``, ``epsilon.png`` (when the run tracked a privacy budget) and
``report.html`` next to it. The HTML page is one self-contained file: the pictures are embedded
as base64 ``data:`` URIs and the CSS is inline, so it opens offline and can be mailed around.

The page, top to bottom, with the element ids tests and readers can rely on:

- ``#baselines``: the headline, federated test NDCG@100 beside the popularity and EASE baselines
  and the centralized reference (all on the run's held-out test users), with ratios;
- ``#privacy``: the privacy box: mode, target and spent epsilon (PRV, with RDP beside it),
  delta, noise multiplier, clip, sample rate, population, rounds and the verdict of
  :func:`common.privacy.audit.verify_ledger` on the run's ledger;
- ``#run``: rounds, wall time and traffic; ``#plots``: the three PNGs;
- ``#rounds``: every round in a scrolling table with a sticky header;
- ``#config``: the run configuration as dotted keys and values;
- ``#provenance``: package versions and the git commit that produced the run.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.errors import FedrecError
from common.io import atomic_write_bytes, atomic_write_text
from common.privacy import participation_factor
from common.privacy.audit import AuditStatus, verify_ledger
from common.privacy.ledger import LEDGER_FILENAME, read_ledger

__all__ = [
    "epsilon_figure",
    "load_results",
    "plot_cost",
    "plot_epsilon",
    "plot_metrics",
    "write_report",
]

logger = logging.getLogger(__name__)

MISSING = "–"
"""Shown in tables for a value the run did not record (e.g. a round without evaluation)."""

_BYTES_PER_MB = 1e6  # decimal megabytes, as network traffic is usually counted
_HE_PHASES = ("he_encrypt_seconds", "he_aggregate_seconds", "he_decrypt_seconds")
_METRICS = (
    ("ndcg@100", "NDCG@100"),
    ("recall@20", "Recall@20"),
    ("recall@50", "Recall@50"),
    ("coverage@20", "Coverage@20"),
)
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


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty dict (absent or malformed sections)."""
    return value if isinstance(value, dict) else {}


def _rounds(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-round records; an absent list counts as no rounds yet."""
    return list(results.get("rounds") or [])


def _round_number(record: dict[str, Any], index: int) -> int:
    """``record["round"]``, falling back to the 1-based position for older files."""
    value = record.get("round")
    return int(value) if isinstance(value, int | float) else index + 1


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else ``None``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _series(results: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    """Rounds and values of ``key`` for the rounds that recorded a number for it."""
    xs: list[int] = []
    ys: list[float] = []
    for i, record in enumerate(_rounds(results)):
        value = _number(record.get(key))
        if value is not None:
            xs.append(_round_number(record, i))
            ys.append(value)
    return xs, ys


def _final_test(results: dict[str, Any]) -> dict[str, Any]:
    """Final test metrics; empty for a partial run that has not reached the end."""
    return _dict(_dict(results.get("final")).get("test"))


@dataclass(frozen=True)
class _Model:
    """One row of the comparison: a model's label and its test metrics on the run's users."""

    key: str
    label: str
    test: dict[str, Any]


_MODEL_NAMES = {"multvae": "Mult-VAE", "multdae": "Mult-DAE"}


def _comparison(results: dict[str, Any]) -> list[_Model]:
    """Federated first, then popularity, EASE and the centralized reference, where recorded."""
    config = _dict(results.get("config"))
    kind = _dict(config.get("model")).get("kind")
    label = f"federated {_MODEL_NAMES.get(str(kind), kind)}" if kind else "federated"
    models = [_Model("federated", label, _final_test(results))]
    baselines = _dict(results.get("baselines"))
    for key, default in (("popularity", "popularity"), ("ease", "EASE")):
        entry = _dict(baselines.get(key))
        if entry:
            models.append(_Model(key, str(entry.get("label", default)), _dict(entry.get("test"))))
    reference = results.get("reference")
    if isinstance(reference, dict):
        label = str(reference.get("label", "centralized reference"))
        models.append(_Model("reference", label, _dict(reference.get("test"))))
    return models


def _target_epsilon(results: dict[str, Any]) -> float | None:
    """The run's ``target_epsilon``: from ``final.privacy`` if recorded there, else the config."""
    privacy = _dict(_dict(results.get("final")).get("privacy"))
    target = _number(privacy.get("target_epsilon"))
    if target is None:
        target = _number(_dict(_dict(results.get("config")).get("privacy")).get("target_epsilon"))
    return target


def _epsilon_rdp_series(results: dict[str, Any]) -> tuple[list[int], list[float]]:
    """Per-round RDP epsilon; files from before ``epsilon_rdp`` fall back to ``epsilon``."""
    xs, ys = _series(results, "epsilon_rdp")
    return (xs, ys) if xs else _series(results, "epsilon")


def _epsilon_prv_series(results: dict[str, Any]) -> tuple[list[int], list[float]]:
    """The rounds that computed PRV (``epsilon_prv``, or ``ledger.epsilon_accountant == "prv"``)."""
    xs: list[int] = []
    ys: list[float] = []
    for i, record in enumerate(_rounds(results)):
        value = _number(record.get("epsilon_prv"))
        ledger = _dict(record.get("ledger"))
        if value is None and ledger.get("epsilon_accountant") == "prv":
            value = _number(ledger.get("epsilon"))
        if value is not None:
            xs.append(_round_number(record, i))
            ys.append(value)
    return xs, ys


def _tracks_epsilon(results: dict[str, Any]) -> bool:
    return bool(_epsilon_rdp_series(results)[0] or _epsilon_prv_series(results)[0])


# --------------------------------------------------------------------------------------- plots


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


_LINE_STYLES = {
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
    centralized reference, where recorded, are horizontal lines. A mean client-side NDCG@100
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
        one, as a dashed horizontal line, each named in the legend. ``None`` if no round
        recorded an epsilon.
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
    ax.set_title("Privacy budget spent")
    ax.set_xlabel("round")
    ax.set_ylabel("ε (cumulative)")
    top = max([*rdp_y, *prv_y, target or 0.0])
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


def _fmt(value: Any, digits: int = 4) -> str:
    """A value for a table cell; ``None`` or absent shows as :data:`MISSING`."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _digits(digits: int) -> Callable[[Any], str]:
    return lambda value: _fmt(value, digits)


def _fmt_mb(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else f"{number / _BYTES_PER_MB:,.2f}"


def _fmt_general(value: Any) -> str:
    """A number with 4 significant digits (z, q, C); other values as :func:`_fmt`."""
    number = _number(value)
    if number is None or isinstance(value, int):
        return _fmt(value)
    return f"{number:.4g}" if math.isfinite(number) else str(number)


def _ratio(numerator: Any, denominator: Any) -> str:
    num, den = _number(numerator), _number(denominator)
    return f"{num / den:.1%}" if num is not None and den else MISSING


# ---------------------------------------------------------------------------------- elements

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em;
       color: #222; }
h1 { font-size: 1.5em; overflow-wrap: anywhere; }
h1 small { color: #666; font-weight: normal; font-size: 0.6em; }
h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; white-space: nowrap; }
td.k, th.k { text-align: left; font-weight: 600; }
td.t, th.t { text-align: left; overflow-wrap: anywhere; }
.headline { font-size: 1.15em; line-height: 1.6; }
.headline .figure { font-size: 1.3em; font-weight: 700; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
.box { border: 1px solid #bbb; border-radius: 6px; padding: 0.2em 1em 0.6em; margin: 1em 0;
       background: #fcfcfc; }
.verdict { font-weight: 700; padding: 0.4em 0.6em; border-radius: 4px; display: inline-block; }
.verdict.verified { background: #e3f4e6; color: #17612a; }
.verdict.failed { background: #fbe3e3; color: #8a1313; }
.verdict.unfinished, .verdict.none { background: #fdf3d9; color: #6b4e00; }
.scroll { max-height: 32em; max-width: 100%; overflow: auto; border: 1px solid #ccc;
          margin: 0.5em 0 1em; }
.scroll table { margin: 0; border-style: hidden; }
.scroll thead th { position: sticky; top: 0; z-index: 1; box-shadow: 0 1px 0 #bbb; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0 1em; }
code { font-size: 0.95em; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    key_column: bool,
    attrs: str = "",
    text_columns: frozenset[int] = frozenset(),
) -> str:
    """An HTML table; every cell is escaped here. ``text_columns`` are left-aligned text."""
    head = "".join(
        f'<th class="k">{_e(h)}</th>' if key_column and j == 0 else
        f'<th class="t">{_e(h)}</th>' if j in text_columns else f"<th>{_e(h)}</th>"
        for j, h in enumerate(header)
    )  # fmt: skip
    body = []
    for row in rows:
        cells = []
        for j, c in enumerate(row):
            cls = "k" if key_column and j == 0 else "t" if j in text_columns else ""
            cells.append(f'<td class="{cls}">{_e(c)}</td>' if cls else f"<td>{_e(c)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    open_tag = f"<table {attrs}>" if attrs else "<table>"
    return f"{open_tag}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(path: Path, alt: str, element_id: str) -> str:
    """An ``<img>`` with the PNG at ``path`` embedded as a base64 data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img id="{element_id}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


# ---------------------------------------------------------------------------------- baselines


_SHORT = {"popularity": "popularity", "ease": "EASE", "reference": "central"}


def _baselines_section(results: dict[str, Any]) -> str:
    """``#baselines``: the headline sentence and the comparison table."""
    models = _comparison(results)
    federated = models[0]
    fed_ndcg = federated.test.get("ndcg@100")
    parts = [f'federated NDCG@100 <span class="figure">{_e(_fmt(_number(fed_ndcg)))}</span>']
    for model in models[1:]:
        value = _fmt(_number(model.test.get("ndcg@100")))
        ratio = _ratio(fed_ndcg, model.test.get("ndcg@100"))
        parts.append(
            f"{_e(model.label)} {_e(value)} (federated / {_e(_SHORT[model.key])} {_e(ratio)})"
        )
    headline = '<p class="headline">' + " · ".join(parts) + "</p>"
    header = ["model", *(title for _, title in _METRICS), "federated / model (NDCG@100)"]
    rows = [
        [
            model.label,
            *(_fmt(_number(model.test.get(key))) for key, _ in _METRICS),
            MISSING if model.key == "federated" else _ratio(fed_ndcg, model.test.get("ndcg@100")),
        ]
        for model in models
    ]
    table = _table(header, rows, key_column=True, attrs='id="comparison"')
    baselines = _dict(results.get("baselines"))
    split = _dict(baselines.get("split"))
    if baselines:
        ease = _dict(baselines.get("ease"))
        grid = ", ".join(_dict(ease.get("validation_ndcg@100")))
        note = (
            f"All rows are scored on the same {_fmt(split.get('test_users'))} held-out test "
            "users (strong generalization: 80% of each user's items folded in, the rest "
            "predicted). Popularity and EASE are centralized: they are fitted on the "
            f"{_fmt(split.get('train_users'))} training users' rows the clients hold, EASE's "
            f"λ picked on the {_fmt(split.get('validation_users'))} validation users from "
            f"[{grid}]."
        )
    else:
        note = (
            "Baselines: not recorded (the run has not finished, or its folder holds no "
            "training rows)."
        )
    return (
        '<section id="baselines"><h2>Test quality against the baselines</h2>'
        f'{headline}{table}<p class="note">{_e(note)}</p></section>'
    )


# ------------------------------------------------------------------------------------ privacy


@dataclass(frozen=True)
class _Audit:
    """The auditor's verdict on the run's ledger, for the privacy box."""

    verdict: str
    """``VERIFIED``, ``FAILED``, ``UNFINISHED`` or ``NOT CHECKED``."""
    reason: str
    warnings: tuple[str, ...] = ()
    """What the auditor flags without failing a check (e.g. seeded noise)."""


def _audit(run_dir: Path) -> _Audit | None:
    """:func:`verify_ledger` on ``RUN_DIR/ledger.jsonl``; ``None`` if the run kept no ledger."""
    path = run_dir / LEDGER_FILENAME
    if not path.exists():
        return None
    logger.info("auditing %s", path)
    try:
        report = verify_ledger(path)
    except Exception as err:  # the auditor must not take the report down with it
        logger.warning("%s: audit failed to run: %s", path, err)
        return _Audit("NOT CHECKED", f"the auditor could not run: {err}")
    warnings = tuple(str(w) for w in getattr(report, "warnings", ()))
    return _Audit(report.status.value.upper(), report.reason, warnings)


def _ledger_header(run_dir: Path) -> dict[str, Any]:
    """The header record of ``RUN_DIR/ledger.jsonl``; empty if absent or unreadable."""
    path = run_dir / LEDGER_FILENAME
    if not path.exists():
        return {}
    try:
        records = read_ledger(path)
    except (OSError, ValueError, FedrecError) as err:
        logger.warning("%s: cannot read the header: %s", path, err)
        return {}
    return next((r for r in records if r.get("type") == "header"), {})


def _privacy_facts(results: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """What the privacy box shows, from the most to the least authoritative source: the final
    summary, the last round's ledger record, the ledger header, the config."""
    config = _dict(_dict(results.get("config")).get("privacy"))
    header = _ledger_header(run_dir)
    rounds = _rounds(results)
    ledgers = [_dict(r.get("ledger")) for r in rounds]
    last = ledgers[-1] if ledgers else {}
    final = _dict(_dict(results.get("final")).get("privacy"))
    facts: dict[str, Any] = {
        "mode": final.get("mode") or header.get("mode") or config.get("mode"),
        "target": _target_epsilon(results),
        "delta": final.get("delta", header.get("delta")),
        "noise_multiplier": final.get("noise_multiplier", last.get("noise_multiplier")),
        "clip": final.get("clip", last.get("clip", config.get("clip"))),
        "sample_rate": final.get("sample_rate", last.get("sample_rate")),
        "steps_per_round": final.get("steps_per_round", last.get("steps")),
        "expected": last.get("expected_participants"),
        "population": header.get("population", results.get("population")),
        "quantile": config.get("participation_quantile"),
        "rounds": len(rounds),
        "planned_rounds": _dict(results.get("config")).get("rounds"),
        "charged": sum(1 for r in ledgers if r.get("released")),
        "finished": bool(final),
        "noise": header.get("noise"),
    }
    participated = [_number(r.get("participated")) for r in ledgers]
    counts = [p for p in participated if p is not None]
    facts["mean_participated"] = sum(counts) / len(counts) if counts else None
    z_eff = [z for z in (_number(r.get("effective_noise_multiplier")) for r in ledgers) if z]
    facts["z_eff"] = (min(z_eff), max(z_eff)) if z_eff else None
    rdp = _epsilon_rdp_series(results)[1]
    prv = _epsilon_prv_series(results)[1]
    if final:
        facts["spent"], facts["accountant"] = final.get("epsilon"), "PRV"
        facts["rdp"] = final.get("epsilon_rdp")
    elif prv:
        facts["spent"], facts["accountant"], facts["rdp"] = prv[-1], "PRV", rdp[-1] if rdp else None
    else:  # a partial run: only the RDP claims so far
        facts["spent"], facts["accountant"] = (rdp[-1] if rdp else None), "RDP, so far"
        facts["rdp"] = rdp[-1] if rdp else None
    return facts


def _why_below_target(facts: Mapping[str, Any]) -> str | None:
    """One sentence on why the run spent less than its target, or that it overshot."""
    target, spent = _number(facts["target"]), _number(facts["spent"])
    if target is None or spent is None or not facts["finished"]:
        return None
    if spent > target * (1 + 1e-9):
        return (
            f"The run spent more than its target (ε {spent:.3f} > {target:g}): a round had "
            "fewer participants than the calibration planned for, so it carried less noise."
        )
    if facts["mode"] == "client":
        n, q = _number(facts["population"]), _number(facts["sample_rate"])
        quantile = _number(facts["quantile"])
        if n is None or q is None or quantile is None:
            return None
        m = q * n
        factor = participation_factor(population=int(n), sample_rate=q, quantile=quantile)
        k = factor**2 * m
        mean = _number(facts["mean_participated"])
        seen = "" if mean is None else f" (this run averaged {mean:.1f})"
        return (
            f"Why less than the target is spent: the calibration plans for a low participation "
            f"quantile, a round with only k ≈ {k:.0f} of the m = {m:.1f} expected clients (the "
            f"{quantile:.1%} quantile of Binomial(N, q)), and scales z up by 1/√(k/m) = "
            f"{1 / factor:.3f}; rounds with more participants{seen} carry more noise than that "
            "floor and cost less, and z is rounded up within 1%."
        )
    return (
        "Why less than the target is spent: z is the smallest noise multiplier (within 1%) whose "
        "ε after all rounds stays at or below the target, and every round is charged the plan's "
        "bound (the smallest silo's sample rate, the largest silo's step count)."
    )


def _privacy_section(results: dict[str, Any], run_dir: Path) -> str:
    """``#privacy``: the privacy box."""
    facts = _privacy_facts(results, run_dir)
    mode = facts["mode"]
    audit = _audit(run_dir)
    if mode in (None, "off") and not _tracks_epsilon(results):
        verdict = (
            '<p class="verdict none">no privacy ledger: nothing to audit</p>'
            if audit is None
            else _verdict(audit)
        )
        return (
            '<section id="privacy" class="box"><h2>Privacy</h2>'
            '<p>Differential privacy is off (<code>privacy.mode = "off"</code>): the updates '
            "carry no noise and no privacy budget is tracked.</p>"
            f"{verdict}</section>"
        )
    unit = {"client": "clients", "example": "users"}.get(str(mode), "privacy units")
    described = {
        "client": "client-level DP-FedAvg (a privacy unit is one client)",
        "example": "example-level DP-SGD in silos (a privacy unit is one user)",
    }.get(str(mode), str(mode))
    spent = _number(facts["spent"])
    target = _number(facts["target"])
    spent_text = MISSING if spent is None else f"{spent:.3f} ({facts['accountant']})"
    if spent is not None and target:
        spent_text += f", {spent / target:.0%} of the target"
    z_eff = facts["z_eff"]
    encryption = _dict(_dict(results.get("config")).get("encryption")).get("enabled")
    encrypted: dict[Any, str] = {True: "on (CKKS, one key shared by the devices)", False: "off"}
    rows = [
        ("mode", described),
        ("encrypted aggregation", encrypted.get(encryption, MISSING)),
        *([("noise source", str(facts["noise"]))] if facts["noise"] is not None else []),
        ("target ε", MISSING if target is None else f"{target:g}"),
        ("ε spent", spent_text),
        ("ε RDP (cross-check)", _fmt(_number(facts["rdp"]), 3)),
        ("δ", _fmt_general(facts["delta"])),
        ("noise multiplier z", _fmt_general(facts["noise_multiplier"])),
        (
            "effective z per round",
            MISSING if z_eff is None else f"{z_eff[0]:.4g} – {z_eff[1]:.4g}",
        ),
        ("clip C", _fmt_general(facts["clip"])),
        ("sample rate q", _fmt_general(facts["sample_rate"])),
    ]
    if mode == "example":
        rows.append(("DP-SGD steps per round", _fmt(facts["steps_per_round"])))
    else:
        rows.append(("expected participants m = qN", _fmt_general(facts["expected"])))
        rows.append(("mean participants per round", _fmt(_number(facts["mean_participated"]), 1)))
    population = facts["population"]
    rows.append(("population N", MISSING if population is None else f"{_fmt(population)} {unit}"))
    planned = facts["planned_rounds"]
    rows.append(
        (
            "rounds",
            f"{facts['rounds']:,} of {_fmt(planned)} ({facts['charged']:,} charged)",
        )
    )
    if mode == "client" and target is not None:
        quantile = _number(facts["quantile"])
        planned_q = MISSING if quantile is None else f"{quantile:.1%} of Binomial(N, q)"
        rows.append(("calibrated for participation quantile", planned_q))
    table = _table(
        ["", "value"], rows, key_column=True, attrs='id="privacy-facts"',
        text_columns=frozenset({1}),
    )  # fmt: skip
    verdict = (
        '<p class="verdict none">audit: NO LEDGER (RUN_DIR/ledger.jsonl is missing)</p>'
        if audit is None
        else _verdict(audit)
    )
    why = _why_below_target(facts)
    explanation = "" if why is None else f'<p class="note" id="why-below-target">{_e(why)}</p>'
    return (
        f'<section id="privacy" class="box"><h2>Privacy</h2>{table}{verdict}{explanation}</section>'
    )


def _verdict(audit: _Audit) -> str:
    cls = {
        AuditStatus.VERIFIED.value.upper(): "verified",
        AuditStatus.FAILED.value.upper(): "failed",
        AuditStatus.UNFINISHED.value.upper(): "unfinished",
    }.get(audit.verdict, "none")
    warnings = "".join(
        f'<p class="verdict unfinished">warning: {_e(w)}</p>' for w in audit.warnings
    )
    return (
        f'<p class="verdict {cls}" id="audit">audit (fedrec audit verify): '
        f"{_e(audit.verdict)}: {_e(audit.reason)}</p>{warnings}"
    )


# ------------------------------------------------------------------------------- run summary


def _run_section(results: dict[str, Any]) -> str:
    """``#run``: rounds, wall time and traffic."""
    wall = _number(results.get("wall_seconds"))
    planned = _dict(results.get("config")).get("rounds")
    rows = [
        ("rounds", f"{len(_rounds(results)):,} of {_fmt(planned)}"),
        ("wall time", MISSING if wall is None else f"{wall:,.1f} s ({wall / 60:.1f} min)"),
        ("total MB up", _fmt_mb(sum(_series(results, "bytes_up")[1]))),
        ("total MB down", _fmt_mb(sum(_series(results, "bytes_down")[1]))),
    ]
    return f'<section id="run"><h2>Run</h2>{_table(["", "value"], rows, key_column=True)}</section>'


# ------------------------------------------------------------------------------------- rounds

_Column = tuple[str, str, Callable[[Any], str]]

# Known per-round columns, in display order: (key, header, formatter); one naming style.
_COLUMNS: tuple[_Column, ...] = (
    ("round", "Round", _fmt),
    ("sampled", "Sampled", _fmt),
    ("returned", "Returned", _fmt),
    ("failed", "Failed", _fmt),
    ("dropped", "Dropped", _fmt),
    ("refused", "Refused", _fmt),
    ("applied", "Applied", _fmt),
    ("discarded", "Discarded", _fmt),
    ("ndcg@100", "NDCG@100", _fmt),
    ("recall@20", "Recall@20", _fmt),
    ("client_ndcg@100", "Client NDCG@100", _fmt),
    ("epsilon_rdp", "ε RDP", _digits(3)),
    ("epsilon_prv", "ε PRV", _digits(3)),
    ("effective_noise_multiplier", "Effective z", _digits(3)),
    ("seconds", "Round (s)", _digits(2)),
    ("bytes_up", "Up (MB)", _fmt_mb),
    ("bytes_down", "Down (MB)", _fmt_mb),
    ("deserialize_seconds", "Deserialize (s)", _digits(3)),
    ("train_seconds", "Train (s)", _digits(3)),
    ("serialize_seconds", "Serialize (s)", _digits(3)),
    ("he_encrypt_seconds", "HE encrypt (s)", _digits(3)),
    ("he_aggregate_seconds", "HE aggregate (s)", _digits(3)),
    ("he_decrypt_seconds", "HE decrypt (s)", _digits(3)),
)

_HIDDEN = frozenset({"ledger", "participated"})
"""Round keys not shown: the ledger record (its numbers have columns of their own) and
``participated`` (the same count as ``returned``)."""


def _human(key: str) -> str:
    """``"foo_bar_seconds"`` -> ``"Foo bar (s)"``: an unknown column in the table's style."""
    words = key.replace("-", "_")
    unit = ""
    if words.endswith("_seconds"):
        words, unit = words.removesuffix("_seconds"), " (s)"
    text = words.replace("_", " ").strip() or key
    return text[0].upper() + text[1:] + unit


def _round_columns(rounds: Sequence[dict[str, Any]]) -> list[_Column]:
    """The columns with a value in some round: the known ones in order, then other scalars."""
    recorded = {k for r in rounds for k, v in r.items() if v is not None}
    columns = [c for c in _COLUMNS if c[0] in recorded]
    if "epsilon" in recorded and not {"epsilon_rdp", "epsilon_prv"} & recorded:
        columns.append(("epsilon", "ε", _digits(3)))  # a file from before the split columns
    known = {c[0] for c in _COLUMNS} | _HIDDEN | {"epsilon"}
    scalars = {
        k for r in rounds for k, v in r.items() if v is not None and not isinstance(v, dict | list)
    }
    columns += [(key, _human(key), _fmt) for key in sorted(scalars - known)]
    return columns


def _rounds_section(results: dict[str, Any]) -> str:
    """``#rounds``: every round in a scroll container with a sticky header."""
    rounds = _rounds(results)
    if not rounds:
        return '<section id="rounds"><h2>Rounds</h2><p>no round has finished yet</p></section>'
    columns = _round_columns(rounds)
    rows = [
        [fmt(None if isinstance(r.get(k), dict | list) else r.get(k)) for k, _, fmt in columns]
        for r in rounds
    ]
    table = _table([h for _, h, _ in columns], rows, key_column=False)
    return (
        f'<section id="rounds"><h2>Rounds ({len(rounds):,})</h2>'
        f'<div class="scroll">{table}</div></section>'
    )


# --------------------------------------------------------------------------- config, provenance


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``("a.b", 1)``, in the config's own key order."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def _config_value(value: Any) -> str:
    """A config value as TOML would spell it (strings bare, lists and empty tables as JSON)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, default=str)


def _config_section(results: dict[str, Any]) -> str:
    """``#config``: the run configuration as dotted keys and values."""
    config = _dict(results.get("config"))
    rows = [(key, _config_value(value)) for key, value in _flatten(config) if key]
    table = _table(
        ["key", "value"], rows, key_column=True, attrs='id="config-table"',
        text_columns=frozenset({1}),
    )  # fmt: skip
    return f'<section id="config"><h2>Configuration</h2>{table}</section>'


_PROVENANCE_LABELS = {
    "fedrec": "fedrec",
    "flower": "Flower (flwr)",
    "torch": "PyTorch",
    "opacus": "Opacus",
    "tenseal": "TenSEAL",
    "python": "Python",
    "git_commit": "git commit",
    "git_dirty": "uncommitted changes",
}


def _provenance_section(results: dict[str, Any]) -> str:
    """``#provenance``: versions and commit recorded with the run (or found now, if the run has
    not recorded them)."""
    recorded = _dict(results.get("provenance"))
    if recorded:
        info, note = recorded, "Recorded when the run finished."
    else:
        from simulations.runner import provenance

        info = provenance()
        note = "Not recorded with the run (it has not finished): read when this page was written."
    rows = [(_PROVENANCE_LABELS.get(key, _human(key)), _fmt(value)) for key, value in info.items()]
    table = _table(["", "value"], rows, key_column=True, text_columns=frozenset({1}))
    return (
        f'<section id="provenance"><h2>Provenance</h2>{table}'
        f'<p class="note">{_e(note)}</p></section>'
    )


# ----------------------------------------------------------------------------------------- page


def write_report(run_dir: Path) -> Path:
    """Write the plots and a self-contained ``report.html`` for one run folder.

    Parameters
    ----------
    run_dir:
        Folder holding ``results.json``; the PNGs and the page are written next to it. Its
        ``ledger.jsonl``, when present, is audited for the privacy box.

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
    config = _dict(results.get("config"))
    name = str(config.get("name") or run_dir.name)

    plot_metrics(results, run_dir / "metrics.png")
    images = [
        _img(
            run_dir / "metrics.png",
            "Test NDCG@100 and Recall@20 per round, with the baselines and the reference",
            "plot-metrics",
        )
    ]
    if plot_epsilon(results, run_dir / "epsilon.png"):
        images.append(
            _img(
                run_dir / "epsilon.png",
                "Privacy budget spent per round (RDP, PRV) against the target",
                "plot-epsilon",
            )
        )
    plot_cost(results, run_dir / "cost.png")
    images.append(_img(run_dir / "cost.png", "Time and traffic per round", "plot-cost"))

    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>fedrec report: {_e(name)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{_e(name)} <small>{_e(run_dir)}</small></h1>",
            _baselines_section(results),
            _privacy_section(results, run_dir),
            _run_section(results),
            '<section id="plots"><h2>Plots</h2>',
            *images,
            "</section>",
            _rounds_section(results),
            _config_section(results),
            _provenance_section(results),
            "</body></html>",
            "",
        ]
    )
    report = run_dir / "report.html"
    atomic_write_text(report, page)
    logger.info("wrote %s", report)
    return report
