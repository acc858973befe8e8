"""Privacy-utility sweep of the warm-started Mult-VAE over several data sets, in process.

For each data set (its config in ``simulations/configs``), one run folder is prepared and every
point runs on it with the in-process engine (:func:`simulations.fastsim.run_inprocess`), so all
points and baselines are scored on the same held-out test users:

- each target epsilon: the DP warm start with the whole budget (``warm_start.share = 1``,
  ``rounds = 0``), user-level DP, delta 1/N^1.1;
- ``inf``: the same warm start without noise (DP off);
- the federated Mult-VAE without DP and without warm start (``--federated-rounds`` rounds of the
  config's training from the seed's random initialisation), the non-private federated
  reference;
- popularity and EASE on the same split (:func:`simulations.baselines.baselines_on_split`).

Every point also reports test NDCG@100 per user group (gender, age, occupation where the data set
has them, activity quartile) and the largest gap between two groups
(:func:`simulations.fairness.group_gaps`; DP is known to cost minority groups more, Bagdasaryan
et al. 2019); ``OUT/sweep.md`` adds a table of the gaps.

Writes ``OUT/sweep.json``, ``OUT/sweep.md`` (the table) and ``OUT/privacy_utility.png``::

    python -m simulations.sweep_privacy --datasets ml-100k ml-1m pinterest-20 \\
        --epsilons 1 2 4 8 inf --out runs/sweep-datasets
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from common.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from common.run.config import load_run_config
from common.run.folder import load_eval_data, write_run_folder
from simulations.baselines import baselines_on_split
from simulations.fairness import group_gaps
from simulations.fastsim import run_inprocess

__all__ = ["DATASET_CONFIGS", "run_dataset_sweep"]

logger = logging.getLogger(__name__)

_CONFIGS = Path(__file__).parent / "configs"
DATASET_CONFIGS = {
    "ml-100k": _CONFIGS / "ml100k.toml",
    "ml-1m": _CONFIGS / "ml1m.toml",
    "pinterest-20": _CONFIGS / "pinterest20.toml",
}
"""The config each data set's points start from (in-process: encryption is switched off)."""

_COMMON = ["encryption.enabled=false", "reference=false"]


def _point_sets(epsilon: float) -> list[str]:
    warm = ["warm_start.enabled=true", "warm_start.share=1", "rounds=0"]
    if math.isinf(epsilon):
        return [*warm, "privacy.mode=off"]
    return [*warm, "privacy.mode=client", f"privacy.target_epsilon={epsilon:g}"]


def _run(config: Path, run_dir: Path, out: Path, sets: list[str]) -> dict[str, Any]:
    cfg = load_run_config(config, [*_COMMON, *sets])
    start = time.perf_counter()
    result = run_inprocess(cfg, run_dir, out=out)
    point: dict[str, Any] = {
        "ndcg@100": result.final["test"]["ndcg@100"],
        "recall@20": result.final["test"]["recall@20"],
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    privacy = result.final.get("privacy")
    if privacy is not None:
        point["epsilon"] = privacy["epsilon"]
        point["noise_multiplier"] = privacy["noise_multiplier"]
    if (out / "model.pt").is_file():
        point["groups"] = group_gaps(out / "model.pt", load_eval_data(run_dir))
    return point


def _mean_groups(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per attribute, each group's NDCG@100 averaged over the runs, and the largest gap between
    those means (over the groups large enough to count, as in each run); each run's own gap
    beside it."""
    out: dict[str, Any] = {}
    for name in runs[0].get("groups") or {}:
        entries = [r["groups"][name] for r in runs if name in (r.get("groups") or {})]
        groups = {
            g: float(np.mean([e["groups"][g] for e in entries if g in e["groups"]]))
            for g in entries[0]["groups"]
        }
        counted = [g for g in entries[0]["counted"] if g in groups]
        high = max(counted, key=lambda g: groups[g])
        low = min(counted, key=lambda g: groups[g])
        out[name] = {
            "groups": groups,
            "gap": groups[high] - groups[low],
            "gap_runs": [e["gap"] for e in entries],
            "high": high,
            "low": low,
        }
    return out


def _mean_point(runs: list[dict[str, Any]]) -> dict[str, Any]:
    values = np.array([r["ndcg@100"] for r in runs])
    point = {
        **runs[0],
        "ndcg@100": float(values.mean()),
        "recall@20": float(np.mean([r["recall@20"] for r in runs])),
    }
    point["ndcg@100_std"] = float(values.std(ddof=1)) if len(runs) > 1 else 0.0
    point["ndcg@100_runs"] = [float(v) for v in values]
    if "epsilon" in runs[0]:
        point["epsilon"] = max(r["epsilon"] for r in runs)
    if runs[0].get("groups"):
        point["groups"] = _mean_groups(runs)
    return point


def run_dataset_sweep(
    *,
    datasets: list[str],
    epsilons: list[float],
    out: Path,
    sets: list[str],
    federated_rounds: int,
    repeats: int = 1,
) -> dict[str, Any]:
    """Run the sweep (see the module docstring) and return what ``OUT/sweep.json`` holds.

    Each DP point runs ``repeats`` times (fresh noise from OS entropy each time); the point is
    their mean, with the standard deviation and every run's NDCG@100 beside it."""
    results: dict[str, Any] = {"engine": "inprocess", "sets": sets, "datasets": {}}
    with Progress(transient=True) as progress:
        task = progress.add_task("sweep", total=len(datasets) * (len(epsilons) + 2))
        for name in datasets:
            config = DATASET_CONFIGS[name]
            base = load_run_config(config, [*_COMMON, *sets])
            run_dir = out / name / "run"
            progress.update(task, description=f"{name}: preparing the split")
            write_run_folder(base, run_dir)
            progress.update(task, description=f"{name}: popularity and EASE")
            baselines = baselines_on_split(run_dir)
            progress.advance(task)
            entry: dict[str, Any] = {"config": str(config), "baselines": baselines, "points": []}
            for eps in epsilons:
                progress.update(task, description=f"{name}: epsilon {eps:g}")
                slug = "inf" if math.isinf(eps) else f"{eps:g}"
                runs = [
                    _run(
                        config,
                        run_dir,
                        out / name / f"eps-{slug}" / f"run-{r}",
                        [*sets, *_point_sets(eps)],
                    )
                    for r in range(1 if math.isinf(eps) else repeats)
                ]
                point = _mean_point(runs)
                entry["points"].append({"target_epsilon": eps, **point})
                logger.info("%s epsilon %s: %s", name, slug, point)
                progress.advance(task)
            progress.update(task, description=f"{name}: federated Mult-VAE without DP")
            entry["federated_no_dp"] = _run(
                config,
                run_dir,
                out / name / "federated-no-dp",
                [
                    *sets,
                    "privacy.mode=off",
                    "warm_start.enabled=false",
                    f"rounds={federated_rounds}",
                ],
            )
            progress.advance(task)
            results["datasets"][name] = entry
            atomic_write_json(out / "sweep.json", results)
    atomic_write_text(out / "sweep.md", markdown_table(results))
    plot(results, out / "privacy_utility.png")
    return results


def _eps_label(eps: float) -> str:
    return "no DP" if math.isinf(eps) else f"ε {eps:g}"


def markdown_table(results: dict[str, Any]) -> str:
    """Test NDCG@100 per data set (rows) and point (columns), baselines beside."""
    datasets = results["datasets"]
    epsilons = [p["target_epsilon"] for p in next(iter(datasets.values()))["points"]]
    head = ["data", *[f"warm start, {_eps_label(e)}" for e in epsilons]]
    head += ["federated, no DP", "popularity", "EASE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in datasets.items():
        cells = [name]
        for p in entry["points"]:
            spent = f" (ε {p['epsilon']:.2f})" if "epsilon" in p else ""
            spread = f" ± {p['ndcg@100_std']:.4f}" if p.get("ndcg@100_std") else ""
            cells.append(f"{p['ndcg@100']:.4f}{spread}{spent}")
        cells.append(f"{entry['federated_no_dp']['ndcg@100']:.4f}")
        b = entry["baselines"] or {}
        for key in ("popularity", "ease"):
            cells.append(f"{b[key]['test']['ndcg@100']:.4f}" if key in b else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + gap_table(results)


def gap_table(results: dict[str, Any]) -> str:
    """The largest test NDCG@100 gap between two user groups, per data set, attribute and point
    (best group > worst group); empty when no point measured groups."""
    blocks: list[str] = []
    for name, entry in results["datasets"].items():
        points = [(_eps_label(p["target_epsilon"]), p) for p in entry["points"]]
        points.append(("federated, no DP", entry.get("federated_no_dp") or {}))
        attributes = list(entry["points"][0].get("groups") or {}) if entry["points"] else []
        if not attributes:
            continue
        head = ["data", "attribute", *[label for label, _ in points]]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for attribute in attributes:
            cells = [name, attribute]
            for _, p in points:
                g = (p.get("groups") or {}).get(attribute)
                cells.append(f"{g['gap']:.4f} ({g['high']} > {g['low']})" if g else "-")
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    if not blocks:
        return ""
    return "\nLargest test NDCG@100 gap between user groups\n\n" + "\n\n".join(blocks) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """One panel per data set: NDCG@100 against epsilon, references as horizontal lines."""
    datasets = results["datasets"]
    fig = Figure(figsize=(4.2 * len(datasets), 3.6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, entry) in enumerate(datasets.items()):
        ax = fig.add_subplot(1, len(datasets), i + 1)
        finite = [p for p in entry["points"] if math.isfinite(p["target_epsilon"])]
        ax.errorbar(
            [p["epsilon"] for p in finite],
            [p["ndcg@100"] for p in finite],
            yerr=[p.get("ndcg@100_std", 0.0) for p in finite],
            fmt="o-",
            capsize=3,
            label="DP warm start",
        )
        for p in entry["points"]:
            if math.isinf(p["target_epsilon"]):
                ax.axhline(p["ndcg@100"], ls="--", color="tab:green", label="warm start, no DP")
        ax.axhline(
            entry["federated_no_dp"]["ndcg@100"],
            ls="-.",
            color="tab:purple",
            label="federated, no DP",
        )
        b = entry["baselines"] or {}
        if "popularity" in b:
            ax.axhline(
                b["popularity"]["test"]["ndcg@100"], ls=":", color="tab:gray", label="popularity"
            )
        if "ease" in b:
            ax.axhline(b["ease"]["test"]["ndcg@100"], ls=":", color="tab:red", label="EASE")
        ax.set_xscale("log")
        ticks = sorted({p["target_epsilon"] for p in finite})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("ε (PRV)")
        ax.set_ylabel("test NDCG@100")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def print_table(results: dict[str, Any]) -> None:
    """The sweep as a terminal table."""
    table = Table(title="test NDCG@100: DP warm start (in-process engine) and baselines")
    text = markdown_table(results).split("\n\n")[0].splitlines()  # the first table
    for col in text[0].strip("|").split("|"):
        table.add_column(col.strip(), justify="right")
    for line in text[2:]:
        table.add_row(*[c.strip() for c in line.strip("|").split("|")])
    Console().print(table)


def merge(paths: list[Path]) -> dict[str, Any]:
    """Several sweeps' ``sweep.json`` as one (their data sets side by side, in order)."""
    merged: dict[str, Any] = {"engine": "inprocess", "sets": [], "datasets": {}}
    for path in paths:
        part = json.loads(Path(path).read_text())
        merged["sets"] = sorted({*merged["sets"], *part.get("sets", [])})
        merged["datasets"].update(part["datasets"])
    return merged


def main() -> None:
    """``--merge A/sweep.json B/sweep.json --out DIR``: one table and one figure of sweeps run
    separately (``python -m simulations.sweep_privacy --datasets ...`` runs them)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--merge", type=Path, nargs="+", required=True, metavar="SWEEP_JSON")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = merge(args.merge)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "sweep.json", results)
    atomic_write_text(args.out / "sweep.md", markdown_table(results))
    plot(results, args.out / "privacy_utility.png")
    print_table(results)


if __name__ == "__main__":
    main()
