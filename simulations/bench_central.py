"""Centralized reference numbers over several split seeds (issue targets for ML-100K).

Runs Mult-VAE (two sizes), Mult-DAE, EASE and popularity on the same splits and prints test
NDCG@100 / Recall@20 / Recall@50 as mean and standard deviation over the seeds, plus the gap
between Mult-VAE and EASE::

    python -m simulations.bench_central --dataset ml-100k --seeds 0 1 2 --out runs/bench-central
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from common.io import atomic_write_json
from simulations.central import CentralConfig, RecommenderKind, run_central

logger = logging.getLogger(__name__)

VARIANTS: dict[str, CentralConfig] = {
    "multvae [600,200]": CentralConfig(model=RecommenderKind.MULTVAE, dims=(600, 200)),
    "multvae [200,64]": CentralConfig(model=RecommenderKind.MULTVAE, dims=(200, 64)),
    "multdae [600,200]": CentralConfig(
        model=RecommenderKind.MULTDAE, dims=(600, 200), weight_decay=0.02
    ),
    "ease": CentralConfig(model=RecommenderKind.EASE),
    "popularity": CentralConfig(model=RecommenderKind.POPULARITY),
}
METRICS = ("ndcg@100", "recall@20", "recall@50")


def run(dataset: str, seeds: list[int], out: Path, epochs: int | None) -> dict[str, dict]:
    """Run every variant on every seed; returns {variant: {metric: [per-seed values]}}."""
    results: dict[str, dict] = {}
    console = Console(stderr=True)
    for name, base in VARIANTS.items():
        per_metric: dict[str, list[float]] = {m: [] for m in METRICS}
        seconds: list[float] = []
        for seed in seeds:
            cfg = replace(base, dataset=dataset, seed=seed)
            if epochs is not None:
                cfg = replace(cfg, epochs=epochs)
            slug = name.replace(" ", "").replace("[", "-").replace("]", "").replace(",", "-")
            with console.status(f"{name} seed {seed}"):
                res = run_central(cfg, out / f"{slug}-seed{seed}")
            for m in METRICS:
                per_metric[m].append(res.test[m])
            seconds.append(res.seconds)
        results[name] = {**per_metric, "seconds": seconds}
    return results


def main() -> None:
    """Command-line entry: run, print the table, write ``OUT/summary.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="cap epochs (smoke runs)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-central"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = run(args.dataset, args.seeds, args.out, args.epochs)
    table = Table(title=f"test metrics on {args.dataset}, seeds {args.seeds} (mean ± std)")
    table.add_column("model")
    for m in (*METRICS, "train s"):
        table.add_column(m, justify="right")
    for name, r in results.items():
        cells = [f"{np.mean(r[m]):.4f} ± {np.std(r[m]):.4f}" for m in METRICS]
        table.add_row(name, *cells, f"{np.mean(r['seconds']):.1f}")
    console = Console()
    console.print(table)
    vae = np.mean(results["multvae [600,200]"]["ndcg@100"])
    ease = np.mean(results["ease"]["ndcg@100"])
    console.print(f"Mult-VAE - EASE test NDCG@100: {vae - ease:+.4f}")
    atomic_write_json(
        args.out / "summary.json",
        {"dataset": args.dataset, "seeds": args.seeds, "results": results},
    )


if __name__ == "__main__":
    main()
