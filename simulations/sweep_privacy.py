"""Privacy-utility sweep: test NDCG@100 at several epsilon targets, one federated run each.

Each point is a full ``fedrec simulate`` run with user-level DP-FedAvg calibrated to the target
epsilon (delta = 1/N^1.1 by default), plus one run with DP off (epsilon = inf) and the
popularity baseline on the same split for reference. Writes ``OUT/sweep.json``, ``OUT/sweep.csv``
and ``OUT/privacy_utility.png``::

    python -m simulations.sweep_privacy --config simulations/configs/ml100k-plain.toml \\
        --epsilons 1 2 4 8 inf --out runs/sweep-ml100k --set rounds=60

With ``--populations N ...`` (or ``--engine inprocess``) the sweep runs every epsilon for each
population size (the first N clients of the partition) and draws one line per population
(:mod:`simulations.sweep_scale`). ``--engine inprocess`` computes the points with the in-process
engine (:mod:`simulations.fastsim`: the same per-round algorithm as a Flower run, without
Flower; the outputs say ``"engine": "inprocess"``), which affords 100,000 clients::

    python -m simulations.sweep_privacy --config simulations/configs/synthetic-scale.toml \\
        --engine inprocess --populations 1000 10000 100000 --epsilons 1 2 4 8 inf \\
        --set rounds=100 --set server.sample_rate=0.01 --out runs/sweep-scale
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from common.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from common.run.config import load_run_config
from simulations.central import CentralConfig, RecommenderKind, run_central

logger = logging.getLogger(__name__)


def _run_point(config: Path, out: Path, epsilon: float, sets: list[str]) -> dict[str, Any]:
    privacy = (
        ["privacy.mode=off"]
        if math.isinf(epsilon)
        else ["privacy.mode=client", f"privacy.target_epsilon={epsilon}"]
    )
    cmd = [
        sys.executable,
        "-m",
        "simulations.cli",
        "simulate",
        "--config",
        str(config),
        "--out",
        str(out),
        "--force",
        "--set",
        "reference=false",
    ]
    for s in [*sets, *privacy]:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True)
    results = json.loads((out / "results.json").read_text())
    point = {
        "target_epsilon": epsilon,
        **results["final"]["test"],
        "wall_seconds": results.get("wall_seconds"),
    }
    if "privacy" in results["final"]:
        point["epsilon"] = results["final"]["privacy"]["epsilon"]
        point["noise_multiplier"] = results["final"]["privacy"]["noise_multiplier"]
    return point


def plot(points: list[dict[str, Any]], popularity: float, title: str, path: Path) -> None:
    """NDCG@100 against epsilon (log axis), DP off and popularity as horizontal lines."""
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = [p for p in points if math.isfinite(p["target_epsilon"])]
    ax.plot(
        [p["epsilon"] for p in finite],
        [p["ndcg@100"] for p in finite],
        "o-",
        label="user-level DP-FedAvg",
    )
    for p in points:
        if math.isinf(p["target_epsilon"]):
            ax.axhline(p["ndcg@100"], ls="--", color="tab:green", label="no DP (ε = ∞)")
    ax.axhline(popularity, ls=":", color="tab:gray", label="popularity")
    ax.set_xscale("log")
    ax.set_xlabel("ε (PRV, after all rounds)")
    ax.set_ylabel("test NDCG@100")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def main() -> None:
    """Run the sweep and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", type=Path, default=Path("simulations/configs/ml100k-plain.toml")
    )
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1, 2, 4, 8, math.inf])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument(
        "--engine",
        choices=["flower", "inprocess"],
        default="flower",
        help="run each point with fedrec simulate (flower) or simulations.fastsim (inprocess)",
    )
    parser.add_argument(
        "--populations",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="population sizes (first N clients); one line per population",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (inprocess)")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        metavar="NAME",
        help="sweep the DP warm start in process on these data sets (ml-100k ml-1m "
        "pinterest-20), each from its config in simulations/configs (simulations.sweep_warm)",
    )
    parser.add_argument(
        "--federated-rounds",
        type=int,
        default=40,
        help="rounds of the non-private federated reference of --datasets",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per DP point of --datasets (mean ± std)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.datasets:
        from simulations.sweep_warm import DATASET_CONFIGS, print_table, run_dataset_sweep

        unknown = [d for d in args.datasets if d not in DATASET_CONFIGS]
        if unknown:
            parser.error(f"unknown data set(s) {unknown}; choose from {sorted(DATASET_CONFIGS)}")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print_table(
            run_dataset_sweep(
                datasets=args.datasets,
                epsilons=args.epsilons,
                out=args.out,
                sets=args.set,
                federated_rounds=args.federated_rounds,
                repeats=args.repeats,
            )
        )
        return
    if args.engine == "inprocess" or args.populations:
        from simulations.sweep_scale import run_scale_sweep

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        run_scale_sweep(
            config=args.config,
            sets=args.set,
            epsilons=args.epsilons,
            populations=args.populations or [None],
            engine=args.engine,
            out=args.out,
            flower_point=_run_point,
        )
        return
    cfg = load_run_config(args.config, args.set)
    points = []
    for eps in args.epsilons:
        slug = "inf" if math.isinf(eps) else f"{eps:g}"
        points.append(_run_point(args.config, args.out / f"eps-{slug}", eps, args.set))
    pop = run_central(
        CentralConfig(
            dataset=cfg.data.dataset,
            model=RecommenderKind.POPULARITY,
            seed=cfg.seed,
            min_rating=cfg.data.min_rating,
            n_heldout_users=cfg.data.n_heldout_users,
        ),
        args.out / "popularity",
    ).test["ndcg@100"]
    atomic_write_json(
        args.out / "sweep.json",
        {
            "config": str(args.config),
            "sets": args.set,
            "points": points,
            "popularity_ndcg@100": pop,
        },
    )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=sorted({k for p in points for k in p}))
    writer.writeheader()
    writer.writerows(points)
    atomic_write_text(args.out / "sweep.csv", buf.getvalue())
    plot(points, pop, f"{cfg.name}: privacy vs utility", args.out / "privacy_utility.png")
    table = Table(title=f"{cfg.name}: test metrics by privacy target ({', '.join(args.set)})")
    for col in ("target ε", "ε (PRV)", "z", "NDCG@100", "Recall@20", "wall s"):
        table.add_column(col, justify="right")
    for p in points:
        table.add_row(
            f"{p['target_epsilon']:g}",
            f"{p.get('epsilon', math.inf):.3g}",
            f"{p.get('noise_multiplier', 0):.3g}",
            f"{p['ndcg@100']:.4f}",
            f"{p['recall@20']:.4f}",
            f"{p.get('wall_seconds') or 0:.0f}",
        )
    table.add_row("popularity", "", "", f"{pop:.4f}", "", "")
    Console().print(table)


if __name__ == "__main__":
    main()
