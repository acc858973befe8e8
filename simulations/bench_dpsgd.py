"""Step-time overhead of DP-SGD (Opacus) over plain SGD on the Mult-VAE, per grad_sample_mode.

A silo of synthetic users (binary rows, about 4% density) at ML-100K size; each step trains on the
same fixed batch so that only the per-step cost differs. Prints ms per step (median over the timed
steps, after warm-up) for plain SGD and for each :class:`client.dpsgd.GradSampleMode`, and the
ratio DP / plain (target: at most 3x). A mode that fails is skipped with the reason::

    python -m simulations.bench_dpsgd              # ML-100K size, 20 timed steps
    python -m simulations.bench_dpsgd --tiny       # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from client.dpsgd import DPSGDConfig, GradSampleMode, make_dp_training
from common.model import ModelConfig, build_model, vae_loss

logger = logging.getLogger(__name__)

TARGET_RATIO = 3.0
"""Largest acceptable DP-SGD / plain step-time ratio."""


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and timing of the benchmark."""

    n_items: int = 1413
    """Catalogue size (ML-100K after the usual filtering)."""
    dims: tuple[tuple[int, ...], ...] = ((600, 200), (200, 64))
    """Mult-VAE hidden and latent widths to time, one table block each."""
    n_users: int = 700
    """Users in the silo (the privacy units)."""
    density: float = 0.04
    """Fraction of ones in the synthetic rows."""
    batch_size: int = 64
    """Rows per timed step (and the expected Poisson batch size of the DP loader)."""
    warmup: int = 3
    """Untimed steps before timing."""
    steps: int = 20
    """Timed steps; the median is reported."""
    seed: int = 0
    """Seed of the data, the model initialisation, dropout and DP noise (the one seed here)."""


TINY = BenchConfig(n_items=30, dims=((8, 4),), n_users=40, batch_size=8, warmup=1, steps=3)


def _median_ms(step: Callable[[], None], *, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _plain_ms(model_config: ModelConfig, x: torch.Tensor, cfg: BenchConfig) -> float:
    model = build_model(model_config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = vae_loss(model(x), x, beta=0.2)
        loss.backward()
        optimizer.step()

    return _median_ms(step, warmup=cfg.warmup, steps=cfg.steps)


def _dp_ms(
    model_config: ModelConfig,
    data: torch.Tensor,
    x: torch.Tensor,
    cfg: BenchConfig,
    mode: GradSampleMode,
) -> float:
    dp = DPSGDConfig(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        batch_size=cfg.batch_size,
        epochs=1,
        lr=1e-3,
        grad_sample_mode=mode,
    )
    training = make_dp_training(
        build_model(model_config),
        data,
        cfg=dp,
        sampling_generator=torch.Generator().manual_seed(cfg.seed),
        noise_generator=torch.Generator().manual_seed(cfg.seed + 1),
    )

    def step() -> None:
        training.step(x, beta=0.2)

    return _median_ms(step, warmup=cfg.warmup, steps=cfg.steps)


def run(cfg: BenchConfig) -> Table:
    """Time plain and DP-SGD steps for every architecture and mode; returns the table."""
    torch.set_num_threads(1)  # stable numbers, and what a silo shares with other work
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    rows = (rng.random((cfg.n_users, cfg.n_items)) < cfg.density).astype(np.float32)
    data = torch.from_numpy(rows)  # (n_users, n_items)
    x = data[: cfg.batch_size]  # (B, n_items), the same batch for every step
    table = Table(
        title=f"DP-SGD step time: {cfg.n_users} users x {cfg.n_items} items, "
        f"batch {cfg.batch_size}, median of {cfg.steps} steps, 1 thread"
    )
    for column in ("dims", "training", "ms / step", "DP / plain", f"<= {TARGET_RATIO:g}x"):
        table.add_column(column)
    for dims in cfg.dims:
        model_config = ModelConfig(n_items=cfg.n_items, dims=dims)
        label = "-".join(str(d) for d in (cfg.n_items, *dims))
        plain = _plain_ms(model_config, x, cfg)
        table.add_row(label, "plain SGD", f"{plain:.1f}", "1.00", "")
        for mode in GradSampleMode:
            try:
                ms = _dp_ms(model_config, data, x, cfg, mode)
            except Exception as err:  # report and go on: one broken mode must not hide the rest
                logger.warning("mode %s failed: %r", mode.value, err)
                why = f"skipped: {type(err).__name__}: {err}"[:80]
                table.add_row(label, f"DP {mode.value}", "failed", "", why)
                continue
            ratio = ms / plain
            ok = "yes" if ratio <= TARGET_RATIO else "NO"
            table.add_row(label, f"DP {mode.value}", f"{ms:.1f}", f"{ratio:.2f}", ok)
    return table


def main() -> None:
    """Command-line entry: parse flags, run, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--steps", type=int, help="timed steps (default 20)")
    parser.add_argument("--batch-size", type=int, help="rows per step (default 64)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = TINY if args.tiny else BenchConfig()
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    if args.batch_size is not None:
        cfg = replace(cfg, batch_size=args.batch_size)
    Console().print(run(cfg))


if __name__ == "__main__":
    main()
