"""Model checkpoints that carry everything a device needs to recommend on its own.

A ``model.pt`` holds the model config, the weights, the item-id mapping (column -> original id),
item titles and the data set's name and SHA-256, so ``fedrec recommend`` needs nothing else.
It is loaded with ``torch.load(weights_only=True)``: only tensors and plain containers, no code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.errors import FedrecError
from common.io import atomic_write_bytes

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = 1
"""Version of the checkpoint layout; bumped when a field changes meaning."""


@dataclass(frozen=True)
class Checkpoint:
    """What ``model.pt`` holds.

    Attributes
    ----------
    model_config:
        ``ModelConfig.to_dict()`` of the network.
    state_dict:
        The network's weights.
    item_ids:
        Original item id of each output column, ``(n_items,)``.
    item_titles:
        Title of each column's item (``""`` where unknown).
    dataset:
        ``{"name": ..., "sha256": ...}`` of the data the model was trained on.
    metadata:
        Free-form provenance (run id, round, seed, metrics).
    """

    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    item_ids: list[str]
    item_titles: list[str]
    dataset: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically."""
    if len(ckpt.item_ids) != len(ckpt.item_titles):
        raise ValueError("item_titles must have one entry per item id")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": ckpt.model_config,
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "item_ids": list(ckpt.item_ids),
        "item_titles": list(ckpt.item_titles),
        "dataset": dict(ckpt.dataset),
        "metadata": ckpt.metadata,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    FedrecError
        If the file is missing, not a fedrec checkpoint, or of an unknown format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FedrecError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise FedrecError(f"{path}: not a fedrec checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise FedrecError(f"{path}: not a fedrec checkpoint")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise FedrecError(
            f"{path}: checkpoint format {payload['format']} is not supported "
            f"(this fedrec reads format {CHECKPOINT_FORMAT})"
        )
    return Checkpoint(
        model_config=payload["model_config"],
        state_dict=payload["state_dict"],
        item_ids=list(payload["item_ids"]),
        item_titles=list(payload["item_titles"]),
        dataset=dict(payload["dataset"]),
        metadata=dict(payload.get("metadata", {})),
    )
