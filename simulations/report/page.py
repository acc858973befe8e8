"""The report's offline HTML page, section by section (see :mod:`simulations.report`).

(Over 400 lines: one function per section of one page, in page order.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from common.io import atomic_write_text
from simulations.report.fairness import fairness_section
from simulations.report.markup import _CSS, _digits, _e, _fmt, _fmt_mb, _img, _ratio, _table
from simulations.report.plots import plot_cost, plot_epsilon, plot_metrics
from simulations.report.privacy import _privacy_section
from simulations.report.results import (
    _METRICS,
    MISSING,
    _comparison,
    _dict,
    _number,
    _releases,
    _rounds,
    _series,
    _warm_only,
    _warm_start,
    load_results,
)

__all__ = ["write_report"]

logger = logging.getLogger(__name__)


_SHORT = {
    "warm": "warm start",
    "popularity": "popularity",
    "ease": "EASE",
    "reference": "central",
}


def _baselines_section(results: dict[str, Any]) -> str:
    """``#baselines``: the headline sentence and the comparison table."""
    models = _comparison(results)
    federated = models[0]
    fed_ndcg = federated.test.get("ndcg@100")
    what = "federated NDCG@100 (warm start only)" if _warm_only(results) else "federated NDCG@100"
    parts = [f'{_e(what)} <span class="figure">{_e(_fmt(_number(fed_ndcg)))}</span>']
    for model in models[1:]:
        if model.key == "warm":  # in the table; the headline keeps the baselines
            continue
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
    if any(model.key == "warm" for model in models):
        note += (
            " The warm start only row is the model the warm start's two DP releases gave, "
            "before the first training round (see the warm start section)."
        )
    elif _warm_only(results):
        note += (
            " The run has no training rounds: the federated model is the warm start's, made "
            "from its two DP releases alone."
        )
    return (
        '<section id="baselines"><h2>Test quality against the baselines</h2>'
        f'{headline}{table}<p class="note">{_e(note)}</p></section>'
    )


# --------------------------------------------------------------------------------- warm start

_RELEASE_LABELS = {"popularity": "item popularity", "cooccurrence": "item co-occurrence"}


def _release_values(warm: dict[str, Any]) -> dict[str, int | None]:
    """Values each client sends per release: ``K (K + 1) / 2`` for the co-occurrence over the
    vocabulary of ``K`` items, the rest of ``values_per_client`` (one per item) for the
    popularity."""
    size = _number(warm.get("vocabulary_size"))
    total = _number(warm.get("values_per_client"))
    cooccurrence = None if size is None else int(size) * (int(size) + 1) // 2
    popularity = None if total is None or cooccurrence is None else int(total) - cooccurrence
    return {"popularity": popularity, "cooccurrence": cooccurrence}


def _clients_text(records: list[dict[str, Any]], population: Any) -> str:
    """Who took part in the releases: ``all N clients`` where every release had them all."""
    counts = {_number(r.get("participated")) for r in records}
    invited = {_number(r.get("invited")) for r in records} | {_number(population)}
    invited.discard(None)
    if len(counts) == 1 and None not in counts and len(invited) == 1 and counts == invited:
        return f"all {_fmt(int(counts.pop() or 0))} clients"
    parts = [
        f"{_fmt(r.get('participated'))} of {_fmt(r.get('invited'))}" for r in records
    ]  # fmt: skip
    return "respectively " + ", ".join(parts) + " clients"


def _warm_section(results: dict[str, Any]) -> str:
    """``#warm-start``: how the model was initialized, and its releases; empty without one."""
    warm = _warm_start(results)
    if not warm:
        return ""
    releases = _releases(results)
    test = _number(_dict(warm.get("test")).get("ndcg@100"))
    validation = _number(warm.get("validation_ndcg@100"))
    rank = warm.get("rank")
    chosen = (
        f"rank k = {_fmt(rank)} (output scale {_fmt_z(warm.get('scale'))}, popularity weight "
        f"α = {_fmt_z(warm.get('alpha'))}) was chosen on the validation users"
        + ("" if validation is None else f" (validation NDCG@100 {validation:.4f})")
    )
    if rank == 0:
        chosen += ": the co-occurrence was mostly noise, so the model is the DP popularity list"
    before = (
        "the run has no training rounds, so this is the final model"
        if _warm_only(results)
        else "federated DP training started from it"
    )
    text = (
        f"The model was initialized from {len(releases) or 2} DP releases that "
        f"{_clients_text(releases, results.get('population'))} took part in (sample rate 1): "
        "the item popularity, then the item co-occurrence over a vocabulary of "
        f"{_fmt(warm.get('vocabulary_size'))} items (the DP popularity's top items). The "
        f"spectral model's {chosen}. Its test NDCG@100 before any round: "
        f"{_fmt(test)}; {before}."
    )
    values = _release_values(warm)
    rows = [
        [
            _RELEASE_LABELS.get(str(r.get("release")), str(r.get("release"))),
            f"{_fmt(r.get('participated'))} of {_fmt(r.get('invited'))}",
            _fmt_z(r.get("noise_multiplier")),
            _fmt_z(r.get("effective_noise_multiplier")),
            _fmt(values.get(str(r.get("release")))),
            _epsilon_text(r),
        ]
        for r in releases
    ]
    header = ["release", "clients", "z", "effective z", "values per client", "ε after it"]
    table = _table(header, rows, key_column=True, attrs='id="warm-releases"')
    total = warm.get("values_per_client")
    note = (
        f"Each client sent {_fmt(total)} values in all, each release clipped to L2 norm "
        f"{_fmt(_number(releases[0].get('clip')), 2) if releases else MISSING} and summed "
        "with a fixed denominator; ε composes over the releases (and the rounds after them)."
    )
    return (
        '<section id="warm-start"><h2>Warm start</h2>'
        f'<p id="warm-start-text">{_e(text)}</p>{table}<p class="note">{_e(note)}</p></section>'
    )


def _fmt_z(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else f"{number:.4g}"


def _epsilon_text(record: dict[str, Any]) -> str:
    """A ledger record's epsilon with its accountant, e.g. ``7.942 (PRV)``."""
    epsilon = _number(record.get("epsilon"))
    if epsilon is None:
        return MISSING
    accountant = record.get("epsilon_accountant")
    return f"{epsilon:.3f}" + (f" ({str(accountant).upper()})" if accountant else "")


# ---------------------------------------------------------------------------------------- run


def _run_section(results: dict[str, Any]) -> str:
    """``#run``: rounds, wall time and traffic."""
    wall = _number(results.get("wall_seconds"))
    planned = _dict(results.get("config")).get("rounds")
    done = len(_rounds(results))
    if _warm_only(results):
        rounds_text = "none: warm start only (0 rounds planned)"
    else:
        rounds_text = f"{done:,} of {_fmt(planned)}"
        if _warm_start(results):
            rounds_text += f", after the warm start's {len(_releases(results)) or 2} releases"
    rows = [
        ("rounds", rounds_text),
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
        text = (
            "no training rounds: the run is the warm start alone"
            if _warm_only(results)
            else "no round has finished yet"
        )
        return f'<section id="rounds"><h2>Rounds</h2><p>{text}</p></section>'
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


def _plots(results: dict[str, Any], run_dir: Path) -> list[str]:
    """Write the PNGs next to ``results.json``; their ``<img>`` elements."""
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
    return images


def write_report(run_dir: Path) -> Path:
    """Write the plots and a self-contained ``report.html`` for one run folder.

    Parameters
    ----------
    run_dir:
        Folder holding ``results.json``; the PNGs and the page are written next to it (no PNG
        for a warm start alone, a run with no training rounds). Its ``ledger.jsonl``, when
        present, is audited for the privacy box.

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

    if _warm_only(results):  # nothing per round to draw
        images = [
            '<p class="note" id="no-plots">No plots: the run has no training rounds (warm '
            "start only); its releases and their ε are in the warm start section.</p>"
        ]
    else:
        images = _plots(results, run_dir)

    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>fedrec report: {_e(name)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{_e(name)} <small>{_e(run_dir)}</small></h1>",
            _baselines_section(results),
            _warm_section(results),
            _privacy_section(results, run_dir),
            _run_section(results),
            '<section id="plots"><h2>Plots</h2>',
            *images,
            "</section>",
            fairness_section(results, run_dir),
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
