"""Privacy-utility sweep over population sizes: test NDCG@100 against epsilon, one line each.

Called by :mod:`simulations.sweep_privacy` with ``--populations`` or ``--engine inprocess``.
A population of N is the first N clients of the config's partition (``simulation.max_clients``),
so every population shares the held-out test users and the item catalogue and differs only in
how many clients train: with a fixed sample rate q the cohort m = qN grows with N, while z for
a target epsilon barely moves (it depends on q, the rounds and delta = 1/N^1.1), so the noise on
the averaged update, zC/m, shrinks as the population grows.

Each point is one run: by default from the in-process engine (:mod:`simulations.fastsim`, the
same per-round algorithm as a Flower run, without Flower; results say ``"engine":
"inprocess"``), or a full ``fedrec simulate`` with ``--engine flower``. Each population also gets
the popularity baseline fitted on its own clients' rows. Writes ``OUT/sweep.json``,
``OUT/sweep.csv`` and ``OUT/privacy_utility.png``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from rich.console import Console
from rich.table import Table

from common.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from common.metrics import evaluate
from common.run.config import load_run_config
from common.run.folder import load_eval_data, n_clients_of, write_run_folder
from simulations.baselines import Popularity
from simulations.cohort_batch import population_rows
from simulations.fastsim import ENGINE_NAME, ClientEngine, run_inprocess

__all__ = ["FlowerPoint", "plot_populations", "popularity_ndcg", "run_scale_sweep"]

logger = logging.getLogger(__name__)

FlowerPoint = Callable[[Path, Path, float, list[str]], dict[str, Any]]
"""Runs one ``fedrec simulate`` point: (config, run folder, epsilon, --set overrides)."""

NOTE_INPROCESS = (
    "points come from the in-process engine (simulations.fastsim): the per-round algorithm of "
    "a Flower run of fedrec (Poisson cohorts, client clip + noise share + fixed denominator, "
    "server optimizer, PRV/RDP accounting with the effective noise multiplier), run without "
    "Flower"
)


def _slug(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def _privacy_sets(epsilon: float) -> list[str]:
    if math.isinf(epsilon):
        return ["privacy.mode=off"]
    return ["privacy.mode=client", f"privacy.target_epsilon={epsilon}"]


def popularity_ndcg(run_dir: Path) -> float:
    """Test NDCG@100 of item popularity counted over the prepared run's clients' rows."""
    data = load_eval_data(run_dir)
    model = Popularity().fit(population_rows(run_dir))
    return float(evaluate(model.score, data.test_foldin, data.test_holdout)["ndcg@100"])


def _inprocess_point(
    config: Path, sets: list[str], data_dir: Path, out: Path, epsilon: float
) -> dict[str, Any]:
    cfg = load_run_config(config, [*sets, *_privacy_sets(epsilon)])
    result = run_inprocess(cfg, data_dir, out=out, engine=ClientEngine.AUTO)
    point: dict[str, Any] = {
        **result.final["test"],
        "engine": ENGINE_NAME,
        "client_engine": result.client_engine.value,
        "wall_seconds": round(result.wall_seconds, 1),
    }
    if "privacy" in result.final:
        privacy = result.final["privacy"]
        for key in ("epsilon", "epsilon_rdp", "noise_multiplier", "delta", "clip"):
            point[key] = privacy[key]
    return point


def run_scale_sweep(
    *,
    config: Path,
    sets: list[str],
    epsilons: Sequence[float],
    populations: Sequence[int | None],
    engine: str,
    out: Path,
    flower_point: FlowerPoint | None = None,
) -> dict[str, Any]:
    """Run every (population, epsilon) point; write and return the sweep.

    ``populations`` entries of ``None`` keep the config's own population. ``engine`` is
    ``"inprocess"`` or ``"flower"`` (which needs ``flower_point``).
    """
    if engine not in (ENGINE_NAME, "flower"):
        raise ValueError(f"engine must be 'inprocess' or 'flower', got {engine!r}")
    if engine == "flower" and flower_point is None:
        raise ValueError("engine 'flower' needs flower_point")
    groups = []
    for size in populations:
        pop_sets = [*sets] + ([] if size is None else [f"simulation.max_clients={size}"])
        pop_dir = out / ("pop-config" if size is None else f"pop-{size}")
        cfg = load_run_config(config, pop_sets)
        started = time.perf_counter()
        points = []
        if engine == ENGINE_NAME:
            write_run_folder(cfg, pop_dir)
            data_dir = pop_dir
        for eps in epsilons:
            point_dir = pop_dir / f"eps-{_slug(eps)}"
            if engine == ENGINE_NAME:
                point = _inprocess_point(config, pop_sets, pop_dir, point_dir, eps)
            else:
                assert flower_point is not None
                point = {**flower_point(config, point_dir, eps, pop_sets), "engine": "flower"}
                data_dir = point_dir
            point["target_epsilon"] = None if math.isinf(eps) else eps
            points.append(point)
            logger.warning(
                "population %s, target epsilon %s: NDCG@100 %.4f (%.0f s)",
                size,
                _slug(eps),
                point["ndcg@100"],
                point.get("wall_seconds") or 0,
            )
        population = n_clients_of(data_dir)
        groups.append(
            {
                "population": population,
                "sample_rate": cfg.server.sample_rate,
                "expected_participants": cfg.server.sample_rate * population,
                "default_delta": population**-1.1,
                "popularity_ndcg@100": popularity_ndcg(data_dir),
                "points": points,
                "wall_seconds": round(time.perf_counter() - started, 1),
            }
        )
    base = load_run_config(config, sets)
    sweep: dict[str, Any] = {
        "engine": engine,
        "note": NOTE_INPROCESS if engine == ENGINE_NAME else "points are fedrec simulate runs",
        "config": str(config),
        "sets": sets,
        "rounds": base.rounds,
        "epsilons": [None if math.isinf(e) else e for e in epsilons],
        "populations": groups,
    }
    _write(sweep, out, title=f"{base.name}: privacy vs utility by population")
    return sweep


def _write(sweep: dict[str, Any], out: Path, *, title: str) -> None:
    atomic_write_json(out / "sweep.json", sweep)
    rows = [
        {
            "population": g["population"],
            "expected_participants": g["expected_participants"],
            "popularity_ndcg@100": g["popularity_ndcg@100"],
            **p,
        }
        for g in sweep["populations"]
        for p in g["points"]
    ]
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "sweep.csv", buf.getvalue())
    plot_populations(sweep, title, out / "privacy_utility.png")
    _print_table(sweep, title)


def plot_populations(sweep: dict[str, Any], title: str, path: Path) -> None:
    """NDCG@100 against epsilon (log axis), one line per population; no DP and popularity as
    dashed and dotted horizontal lines of the population's colour."""
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, group in enumerate(sweep["populations"]):
        color = f"C{i}"
        finite = [p for p in group["points"] if p["target_epsilon"] is not None]
        label = f"N = {group['population']:,} (m ≈ {group['expected_participants']:,.0f})"
        ax.plot(
            [p["epsilon"] for p in finite],
            [p["ndcg@100"] for p in finite],
            "o-",
            color=color,
            label=label,
        )
        for p in group["points"]:
            if p["target_epsilon"] is None:
                ax.axhline(p["ndcg@100"], ls="--", color=color, lw=1)
        ax.axhline(group["popularity_ndcg@100"], ls=":", color=color, lw=1)
    ax.plot([], [], "k--", lw=1, label="no DP (ε = ∞)")
    ax.plot([], [], "k:", lw=1, label="popularity")
    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _pos: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("ε (PRV, after all rounds)")
    ax.set_ylabel("test NDCG@100")
    engine = "in-process engine" if sweep["engine"] == ENGINE_NAME else "Flower"
    ax.set_title(f"{title}\n({sweep['rounds']} rounds, {engine})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _print_table(sweep: dict[str, Any], title: str) -> None:
    table = Table(title=f"{title} (engine: {sweep['engine']})")
    columns = ("N", "m", "target ε", "ε (PRV)", "z", "NDCG@100", "Recall@20", "popularity")
    for col in (*columns, "wall s"):
        table.add_column(col, justify="right")
    for g in sweep["populations"]:
        for p in g["points"]:
            target = p["target_epsilon"]
            table.add_row(
                f"{g['population']:,}",
                f"{g['expected_participants']:.0f}",
                "inf" if target is None else f"{target:g}",
                f"{p['epsilon']:.3g}" if "epsilon" in p else "inf",
                f"{p['noise_multiplier']:.3g}" if "noise_multiplier" in p else "0",
                f"{p['ndcg@100']:.4f}",
                f"{p['recall@20']:.4f}",
                f"{g['popularity_ndcg@100']:.4f}",
                f"{p.get('wall_seconds') or 0:.0f}",
            )
    Console(width=120).print(table)
