"""Model checkpoints that carry everything a device needs to recommend on its own.

A ``model.pt`` holds the model config, the weights, the item-id mapping (column -> original id),
item titles and genres and the data set's name and SHA-256, so ``fedrec recommend`` needs nothing
else. It is loaded with ``torch.load(weights_only=True)``: only tensors and plain containers, no
code.

Provenance. ``metadata`` names the model it holds (:func:`model_provenance`): ``run_id``, the
name of the run folder, which is also the ``run_id`` of the run's privacy ledger header
(:mod:`common.privacy.ledger`) and of its co-signed HE statements; ``round``, the last round whose
update was applied (0: only the warm start set the weights; ``None``: trained centrally, not in
rounds); and ``ledger_head``, the SHA-256 of the ledger's last line (the ``prev`` its next line
would carry) when the run has one (privacy on), else ``None``. Together they trace a
recommendation to one model of one run and, through the hash chain, to its privacy record.
Checkpoints written before this carry none of them (:func:`provenance_of` returns ``{}``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.errors import FedrecError
from common.io import atomic_write_bytes

__all__ = [
    "CHECKPOINT_FORMAT",
    "PROVENANCE_KEYS",
    "Checkpoint",
    "ledger_head",
    "load_checkpoint",
    "model_provenance",
    "provenance_of",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 1
"""Version of the checkpoint layout; bumped when a field changes meaning (not when one is added
with a default, as ``item_genres`` was: older files still load)."""

PROVENANCE_KEYS = ("run_id", "round", "ledger_head")
"""The ``metadata`` entries that name the model (module docstring, "Provenance")."""


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
        Free-form provenance: :data:`PROVENANCE_KEYS` (see :func:`model_provenance`), the
        trainer, seed and metrics.
    item_genres:
        Genres of each column's item, ``(n_items,)`` lists (``[]`` for an item without genres);
        an empty list when the checkpoint records none (older files, data without genres).
    """

    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    item_ids: list[str]
    item_titles: list[str]
    dataset: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)
    item_genres: list[list[str]] = field(default_factory=list)


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically.

    Raises
    ------
    ValueError
        If ``item_titles``, or a non-empty ``item_genres``, has not one entry per item id.
    """
    if len(ckpt.item_ids) != len(ckpt.item_titles):
        raise ValueError("item_titles must have one entry per item id")
    if ckpt.item_genres and len(ckpt.item_genres) != len(ckpt.item_ids):
        raise ValueError("item_genres must be empty or have one entry per item id")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": ckpt.model_config,
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "item_ids": list(ckpt.item_ids),
        "item_titles": list(ckpt.item_titles),
        "dataset": dict(ckpt.dataset),
        "metadata": ckpt.metadata,
        "item_genres": [[str(g) for g in genres] for genres in ckpt.item_genres],
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
        item_genres=[list(genres) for genres in payload.get("item_genres", [])],
    )


def model_provenance(*, run_id: str, last_round: int | None, ledger: Path | None) -> dict[str, Any]:
    """The ``metadata`` entries that name a run's model (module docstring, "Provenance").

    Parameters
    ----------
    run_id:
        The run folder's name (the ledger header's ``run_id``).
    last_round:
        Recorded as ``round``: the last round whose update was applied; 0 when only the warm
        start set the weights, ``None`` for a model not trained in rounds (centrally).
    ledger:
        The run's ``ledger.jsonl`` (privacy on), read for :func:`ledger_head`; ``None`` or a
        missing file: no ledger (privacy off).

    Raises
    ------
    ValueError
        If ``run_id`` is empty or ``last_round`` negative.
    common.errors.DataError
        If the ledger exists but cannot be read (see :func:`ledger_head`).
    """
    if not run_id:
        raise ValueError("run_id must be a non-empty string")
    if last_round is not None and last_round < 0:
        raise ValueError(f"last_round must be >= 0 or None, got {last_round}")
    head = None if ledger is None or not Path(ledger).exists() else ledger_head(Path(ledger))
    return {"run_id": run_id, "round": last_round, "ledger_head": head}


def ledger_head(path: Path) -> str:
    """The chain hash of the ledger's last line: SHA-256 hex of its bytes, what the next line's
    ``prev`` would be (:meth:`common.privacy.ledger.LedgerLine.sha256`).

    Raises
    ------
    common.errors.DataError
        If the ledger cannot be read, is empty or ends in an incomplete line.
    """
    # imported here: a device loading a checkpoint to recommend never needs the privacy package
    from common.privacy.ledger import read_ledger_lines

    return read_ledger_lines(Path(path))[-1].sha256


def provenance_of(ckpt: Checkpoint) -> dict[str, Any]:
    """``ckpt``'s :data:`PROVENANCE_KEYS` entries; ``{}`` for a checkpoint that records none
    (written before fedrec recorded provenance, or by a trainer that does not)."""
    if "run_id" not in ckpt.metadata:
        return {}
    return {key: ckpt.metadata.get(key) for key in PROVENANCE_KEYS}
