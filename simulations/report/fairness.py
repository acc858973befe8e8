"""How a run's fairness (``results.json``'s ``fairness``) is shown: terminal tables, HTML, plots.

``fedrec report fairness RUN`` prints :func:`fairness_tables`; the report's "Fairness" section is
:func:`fairness_section` with the figures of :func:`plot_fairness` (per-group NDCG@100 with
intervals, and the re-ranking trade-off curves).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.markup import escape
from rich.table import Table

from common.fairness.groups import GAP_MIN_USERS
from common.io import atomic_write_bytes
from simulations.report.markup import _e, _fmt, _img, _table

__all__ = [
    "adversary_text",
    "fairness_section",
    "fairness_summary",
    "fairness_tables",
    "plot_fairness",
]

logger = logging.getLogger(__name__)

MODEL_ORDER = ("federated", "centralized", "ease", "popularity")
"""Models in the order every table lists them."""

ITEM_COLUMNS = (
    ("coverage@20", "coverage@20"),
    ("coverage@100", "coverage@100"),
    ("gini@20", "Gini of exposure@20"),
    ("popularity@20", "mean popularity@20"),
    ("long_tail@20", "long-tail share@20"),
)
GENRE_COLUMNS = (
    ("diversity@20", "genre diversity@20"),
    ("miscalibration@20", "miscalibration@20 (KL)"),
)
ATTRIBUTES = ("gender", "age", "occupation", "activity")


def _models(fairness: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    models = fairness.get("models") or {}
    return [(k, models[k]) for k in MODEL_ORDER if models.get(k)]


def _num(value: Any, digits: int = 4) -> str:
    return "–" if value is None else f"{float(value):.{digits}f}"


def _interval(entry: dict[str, Any] | None, digits: int = 4) -> str:
    """``mean [lo, hi]`` of a group or gap entry."""
    if not entry:
        return "–"
    value = entry.get("mean", entry.get("value"))
    ci = entry.get("ci") or [None, None]
    return f"{_num(value, digits)} [{_num(ci[0], 3)}, {_num(ci[1], 3)}]"


def _gap_text(gap: dict[str, Any] | None) -> str:
    if not gap:
        return "–"
    return f"{_interval(gap)} ({gap.get('high')} − {gap.get('low')})"


def _attributes(fairness: dict[str, Any]) -> list[str]:
    groups = fairness.get("groups") or {}
    return [a for a in ATTRIBUTES if len(groups.get(a) or {}) >= 2]


def adversary_text(fairness: dict[str, Any]) -> str:
    """One sentence on what the run did against attribute leakage, and where the before/after
    comparison comes from."""
    adv = fairness.get("adversary")
    compare = (
        "python -m simulations.sweep_fairness trains the same model with and without the "
        "adversary and reports the AUC before and after with its NDCG@100 cost."
    )
    if not adv:
        return "This run trained no adversary ([fairness] adversary is off). " + compare
    knobs = ", ".join(
        f"{k.removeprefix('adversary_')} {adv[k]}" for k in sorted(adv) if k != "adversary"
    )
    return (
        f"The federated model was trained with an on-device {adv['adversary']} adversary "
        f"({knobs}); the centralized reference without one. " + compare
    )


def fairness_summary(fairness: dict[str, Any]) -> Table:
    """One compact table for the end of a run: per model, the largest NDCG@100 gap of each
    attribute that has one, coverage, exposure, long tail, miscalibration and the attacker's
    gender AUC (``fedrec report fairness RUN`` has the groups and intervals)."""
    models = _models(fairness)

    def gap_of(m: dict[str, Any], attribute: str) -> dict[str, Any]:
        ndcg = (m.get("users") or {}).get("ndcg@100") or {}
        return (ndcg.get(attribute) or {}).get("gap") or {}

    attributes = [a for a in _attributes(fairness) if any(gap_of(m, a) for _, m in models)]
    table = Table(title="fairness on the test users (fedrec report fairness RUN: the detail)")
    table.add_column("model")
    for a in attributes:
        table.add_column(f"gap {a}", justify="right")
    for col in ("cov@20", "Gini@20", "tail@20", "KL@20", "AUC gender"):
        table.add_column(col, justify="right")
    for _, m in models:
        items, genres = m.get("items") or {}, m.get("genres") or {}
        auc = ((m.get("attacker") or {}).get("gender") or {}).get("auc")
        table.add_row(
            str(m.get("label")),
            *[_num(gap_of(m, a).get("value"), 3) for a in attributes],
            _num(items.get("coverage@20"), 3),
            _num(items.get("gini@20"), 3),
            _num(items.get("long_tail@20"), 3),
            _num(genres.get("miscalibration@20"), 3),
            _num(auc, 3),
        )
    return table


def fairness_tables(fairness: dict[str, Any], *, metric: str = "ndcg@100") -> list[Table]:
    """Terminal tables: ``metric`` per group of each attribute (one table each, a column per
    model, the largest gap last), then the catalogue and genre measures, then the attacker's
    AUC, then the calibrated re-ranking trade-off."""
    tables: list[Table] = []
    models = _models(fairness)
    sizes = fairness.get("groups") or {}
    for attribute in _attributes(fairness):
        table = Table(
            title=f"{metric} per {attribute} group, test users (mean [95% bootstrap interval])"
        )
        table.add_column(attribute)
        table.add_column("users", justify="right")
        for _, m in models:
            table.add_column(str(m.get("label")), justify="right")
        per_model = [
            ((m.get("users") or {}).get(metric) or {}).get(attribute) or {} for _, m in models
        ]
        for group, n in (sizes.get(attribute) or {}).items():
            cells = [_interval((t.get("groups") or {}).get(group)) for t in per_model]
            table.add_row(str(group), str(n), *cells)
        table.add_row("largest gap", "", *[_gap_text(t.get("gap")) for t in per_model])
        tables.append(table)
    table = Table(title="catalogue and genres: what each model recommends (top 20 unless named)")
    table.add_column("model")
    columns = list(ITEM_COLUMNS) + list(GENRE_COLUMNS)
    for _, name in columns:
        table.add_column(name, justify="right")
    for _, m in models:
        items, genres = m.get("items") or {}, m.get("genres") or {}
        cells = [_num(items.get(k)) for k, _ in ITEM_COLUMNS]
        cells += [_num(genres.get(k)) for k, _ in GENRE_COLUMNS]
        table.add_row(str(m.get("label")), *cells)
    tables.append(table)
    attackers = [(m.get("label"), m.get("attacker") or {}) for _, m in models if m.get("attacker")]
    if attackers:
        names = sorted({a for _, att in attackers for a in att})
        table = Table(
            title="attacker AUC: recovering an attribute from the latent code (0.5 = chance)"
        )
        table.add_column("model")
        for a in names:
            table.add_column(a, justify="right")
        for label, att in attackers:
            table.add_row(str(label), *[_num((att.get(a) or {}).get("auc"), 3) for a in names])
        table.caption = escape(adversary_text(fairness))
        tables.append(table)
    for kind, curve in (fairness.get("rerank") or {}).items():
        if not curve:
            continue
        table = Table(title=f"re-ranking the federated model's lists: {kind}")
        for col in ("λ", "NDCG@100", "NDCG@20", "miscalibration@20", "genre diversity@20"):
            table.add_column(col, justify="right")
        for point in curve:
            table.add_row(
                f"{point['lam']:g}",
                _num(point.get("ndcg@100")),
                _num(point.get("ndcg@20")),
                _num(point.get("miscalibration@20")),
                _num(point.get("diversity@20")),
            )
        tables.append(table)
    return tables


def _figure(n_panels: int) -> Figure:
    fig = Figure(figsize=(5.2 * n_panels, 3.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())
    logger.info("wrote %s", path)


def plot_fairness(fairness: dict[str, Any], run_dir: Path) -> list[tuple[Path, str]]:
    """Write ``fairness.png`` (NDCG@100 per group of at least
    :data:`~common.fairness.groups.GAP_MIN_USERS` test users, with intervals, a panel per
    attribute with two such groups or more) and
    ``rerank.png`` (the trade-off curves); the written paths with their captions."""
    written: list[tuple[Path, str]] = []
    sizes = fairness.get("groups") or {}
    # the groups large enough to count in the largest gap; smaller ones are in the tables
    shown = {
        a: [g for g, n in (sizes.get(a) or {}).items() if n >= GAP_MIN_USERS]
        for a in _attributes(fairness)
    }
    attributes = [a for a, groups in shown.items() if len(groups) >= 2]
    models = _models(fairness)
    if attributes and models:
        fig = _figure(len(attributes))
        axes = fig.subplots(1, len(attributes), squeeze=False)[0]
        for ax, attribute in zip(axes, attributes, strict=True):
            groups = shown[attribute]
            width = 0.8 / len(models)
            for j, (_, m) in enumerate(models):
                table = ((m.get("users") or {}).get("ndcg@100") or {}).get(attribute) or {}
                entries = (table.get("groups") or {}) if table else {}
                xs, ys, lo, hi = [], [], [], []
                for i, g in enumerate(groups):
                    e = entries.get(g)
                    if not e:
                        continue
                    xs.append(i + (j - (len(models) - 1) / 2) * width)
                    ys.append(e["mean"])
                    lo.append(e["mean"] - e["ci"][0])
                    hi.append(e["ci"][1] - e["mean"])
                ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=2, label=str(m.get("label")))
            ax.set_xticks(range(len(groups)), groups, rotation=45 if len(groups) > 4 else 0)
            ax.set_title(f"NDCG@100 by {attribute}")
            ax.grid(axis="y", alpha=0.3)
        handles, names = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncols=len(models), fontsize="small")
        path = Path(run_dir) / "fairness.png"
        _save(fig, path)
        written.append(
            (
                path,
                f"Test NDCG@100 per user group of at least {GAP_MIN_USERS} test users, with 95% "
                "bootstrap intervals",
            )
        )
    curves = {k: c for k, c in (fairness.get("rerank") or {}).items() if c}
    if curves:
        fig = _figure(2)
        ax_cal, ax_div = fig.subplots(1, 2)
        for kind, curve in curves.items():
            ndcg = [p["ndcg@100"] for p in curve]
            ax_cal.plot([p["miscalibration@20"] for p in curve], ndcg, "o-", label=kind)
            ax_div.plot([p["diversity@20"] for p in curve], ndcg, "o-", label=kind)
            for p in curve:
                ax_cal.annotate(f"{p['lam']:g}", (p["miscalibration@20"], p["ndcg@100"]))
        ax_cal.set_xlabel("miscalibration@20 (KL, lower is better)")
        ax_div.set_xlabel("genre diversity@20")
        for ax in (ax_cal, ax_div):
            ax.set_ylabel("NDCG@100")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        path = Path(run_dir) / "rerank.png"
        _save(fig, path)
        written.append((path, "Re-ranking trade-off: NDCG@100 against miscalibration, diversity"))
    return written


def _html(header: list[str], rows: list[list[Any]]) -> str:
    return _table(
        header,
        [[str(c) for c in row] for row in rows],
        key_column=True,
        text_columns=frozenset({0}),
    )


def fairness_section(results: dict[str, Any], run_dir: Path) -> str:
    """The report's "Fairness" section: the tables of :func:`fairness_tables` as HTML, plots."""
    fairness = results.get("fairness")
    if not fairness:
        return (
            '<section id="fairness"><h2>Fairness</h2><p class="note">Not measured for this run '
            "(run <code>fedrec report fairness RUN</code> to add it).</p></section>"
        )
    parts = ['<section id="fairness"><h2>Fairness, exposure and calibration</h2>']
    parts.append(
        f"<p>On the {fairness.get('test_users')} held-out test users; every interval is a 95% "
        "bootstrap interval; the largest gap is between the best and the worst group. "
        "Published anchors (not measured here): ML-1M gender NDCG@10 gaps of 0.016 to 0.038, "
        "males above females for every model (Boratto et al., ECIR 2022); Mult-VAE "
        "coverage@50 0.117 (Melchiorre et al. 2021).</p>"
    )
    models = _models(fairness)
    labels = [str(m.get("label")) for _, m in models]
    sizes = fairness.get("groups") or {}
    for metric in ("ndcg@100", "recall@20"):
        for attribute in _attributes(fairness):
            per_model = [
                ((m.get("users") or {}).get(metric) or {}).get(attribute) or {} for _, m in models
            ]
            rows = [
                [g, n, *[_interval((t.get("groups") or {}).get(g)) for t in per_model]]
                for g, n in (sizes.get(attribute) or {}).items()
            ]
            rows.append(["largest gap", "", *[_gap_text(t.get("gap")) for t in per_model]])
            parts.append(f"<h3>{_e(metric)} by {_e(attribute)}</h3>")
            parts.append(_html([attribute, "users", *labels], rows))
    header = ["model", *[n for _, n in ITEM_COLUMNS], *[n for _, n in GENRE_COLUMNS]]
    rows = []
    for _, m in models:
        items, genres = m.get("items") or {}, m.get("genres") or {}
        rows.append(
            [
                m.get("label"),
                *[_fmt(items.get(k)) for k, _ in ITEM_COLUMNS],
                *[_fmt(genres.get(k)) for k, _ in GENRE_COLUMNS],
            ]
        )
    parts.append("<h3>Catalogue and genres</h3>")
    parts.append(_html(header, rows))
    attackers = [(m.get("label"), m.get("attacker") or {}) for _, m in models if m.get("attacker")]
    if attackers:
        names = sorted({a for _, att in attackers for a in att})
        parts.append("<h3>Attacker AUC from the latent code (0.5 = chance)</h3>")
        parts.append(f'<p class="note">{_e(adversary_text(fairness))}</p>')
        parts.append(
            _html(
                ["model", *names],
                [
                    [label, *[_fmt((att.get(a) or {}).get("auc"), 3) for a in names]]
                    for label, att in attackers
                ],
            )
        )
    for kind, curve in (fairness.get("rerank") or {}).items():
        if curve:
            parts.append(f"<h3>Re-ranking the federated lists: {_e(kind)}</h3>")
            parts.append(
                _html(
                    ["λ", "NDCG@100", "NDCG@20", "miscalibration@20", "genre diversity@20"],
                    [
                        [
                            f"{p['lam']:g}",
                            _fmt(p.get("ndcg@100")),
                            _fmt(p.get("ndcg@20")),
                            _fmt(p.get("miscalibration@20")),
                            _fmt(p.get("diversity@20")),
                        ]
                        for p in curve
                    ],
                )
            )
    for path, caption in plot_fairness(fairness, run_dir):
        parts.append(_img(path, caption, f"plot-{path.stem}"))
    parts.append("</section>")
    return "\n".join(parts)
