"""Seeds are set in one place."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's legacy and torch's global generators.

    Code that needs its own stream takes an explicit ``np.random.Generator`` or
    ``torch.Generator`` derived from the same seed; this covers the rest (weight init).
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
