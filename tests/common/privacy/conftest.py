"""Shared fixtures of the privacy tests: a tiny warm-start run config on synthetic data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from common.data import synthesize


def _tiny_warm_config(
    folder: Path, *, name: str, sample_rate: float, privacy: list[str] | None = None
) -> Path:
    """A tiny per-user client-level DP run config with a warm start on synthetic data (60
    users, 40 items), two rounds; ``privacy``: extra lines of its ``[privacy]`` section."""
    csv = synthesize(60, 40, seed=3, out_dir=folder)
    path = folder / "tiny.toml"
    lines = [
        f'name = "{name}"',
        "rounds = 2",
        "eval_every = 2",
        "reference = false",
        "[data]",
        f'dataset = "{csv}"',
        "n_heldout_users = 8",
        "[model]",
        "dims = [16, 8]",
        "[server]",
        f"sample_rate = {sample_rate}",
        "lr = 0.01",
        "[privacy]",
        'mode = "client"',
        *(privacy or []),
        "[warm_start]",
        "enabled = true",
        "min_vocabulary = 5",
        "max_vocabulary = 20",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_warm_config() -> Callable[..., Path]:
    """The factory :func:`_tiny_warm_config`."""
    return _tiny_warm_config
