"""Throughput of federated rounds: client updates per second and where an update's time goes.

Runs the given config through the real Flower simulation for a few rounds (no evaluation until
the last) and prints, from the run's own per-round records:

- client updates per second (rounds 2.. only: round 1 includes Ray and actor start-up);
- the per-update split measured inside the ClientApp: deserialize, train, serialize;
- the same update computed in-process without Flower, as the ceiling on one core.

    python -m simulations.bench_federated --config simulations/configs/ml100k-plain.toml --rounds 8
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from client.local import compute_update, split_local
from common.model import build_model
from common.run.config import load_run_config, run_model_config
from common.run.folder import load_client_shard, load_eval_data

logger = logging.getLogger(__name__)


def in_process_updates(run_dir: Path, n: int) -> float:
    """Client updates per second computed directly (no Flower, no serialization), one core,
    after a short warm-up."""
    cfg = load_run_config(run_dir / "config.toml")
    data = load_eval_data(run_dir)
    model_cfg = run_model_config(cfg, len(data.item_ids))
    state = build_model(model_cfg).state_dict()
    shards = [load_client_shard(run_dir, c) for c in range(n)]
    local = [
        split_local(s.rows, fraction=cfg.data.client_holdout_fraction, seed=c)
        for c, s in enumerate(shards)
    ]
    for c, d in enumerate(local[:3]):  # warm-up: first calls build the model and allocate
        compute_update(state, d, model_config=model_cfg, client=cfg.client, beta=0.1, seed=c)
    start = time.perf_counter()
    for c, d in enumerate(local):
        compute_update(state, d, model_config=model_cfg, client=cfg.client, beta=0.1, seed=c)
    return n / (time.perf_counter() - start)


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", type=Path, default=Path("simulations/configs/ml100k-plain.toml")
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: temporary)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="fedrec-bench-"))
    sets = [f"rounds={args.rounds}", f"eval_every={args.rounds}", "reference=false", *args.set]
    cmd = [
        sys.executable,
        "-m",
        "simulations.cli",
        "simulate",
        "--config",
        str(args.config),
        "--out",
        str(out),
        "--force",
    ]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True)
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    steady = [r for r in rounds[1:-1]] or rounds[1:]
    updates = sum(r["returned"] for r in steady)
    seconds = sum(r["seconds"] for r in steady)

    def per_update_ms(key: str) -> float:
        return 1000 * float(np.mean([r.get(key, 0.0) for r in steady]))

    ceiling = in_process_updates(out, 30)
    table = Table(title=f"federated throughput: {args.config.name} ({', '.join(sets)})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("rounds measured (2..N-1)", str(len(steady)))
    table.add_row("client updates / s (Flower simulation, 2 cores)", f"{updates / seconds:.1f}")
    table.add_row("round wall time per update, ms", f"{1000 * seconds / updates:.1f}")
    table.add_row("  deserialize, ms/update", f"{per_update_ms('deserialize_seconds'):.2f}")
    table.add_row("  train, ms/update", f"{per_update_ms('train_seconds'):.2f}")
    table.add_row("  serialize, ms/update", f"{per_update_ms('serialize_seconds'):.2f}")
    table.add_row("in-process updates / s (no Flower, 1 core)", f"{ceiling:.1f}")
    table.add_row(
        "MB down / MB up per update",
        f"{sum(r['bytes_down'] for r in steady) / updates / 1e6:.2f} / "
        f"{sum(r['bytes_up'] for r in steady) / updates / 1e6:.2f}",
    )
    Console().print(table)


if __name__ == "__main__":
    main()
