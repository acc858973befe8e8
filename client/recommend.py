"""On-device recommendation: score one user's history with a checkpoint, locally.

Nothing leaves the device here: the history is read from a local file (or the command line), the
model runs on the device, and only the ranked list is returned to the caller.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import Checkpoint, load_checkpoint
from common.errors import DataError
from common.model import ModelConfig, build_model

__all__ = ["RecommendResult", "Recommendation", "parse_history", "recommend"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recommendation:
    """One recommended item."""

    item_id: str
    title: str
    score: float


@dataclass(frozen=True)
class RecommendResult:
    """The ranked items and the history ids the model does not know (skipped, not fatal)."""

    items: list[Recommendation]
    unknown_ids: list[str]
    known_history: int


_FILE_SUFFIXES = (".csv", ".txt", ".tsv", ".inter")
"""A history spec ending so names a file, never a list of ids."""


def parse_history(spec: str) -> list[str]:
    """Read a history given as a file path or as comma-separated item ids.

    A file may hold one id per line, or be a CSV with an ``item_id`` (or ``item``) column, such as
    a device's own interaction file (``user,item[,rating][,timestamp]``, the item in column 2).

    Raises
    ------
    DataError
        If ``spec`` looks like a path (it holds a path separator or ends in ``.csv``/``.txt``)
        but names no file, or holds no id.
    """
    path = Path(spec)
    if path.is_file():
        return _read_history_file(path)
    if _looks_like_path(spec):
        what = "a folder, not a history file" if path.is_dir() else "no such history file"
        raise DataError(what, path=path)
    ids = [tok.strip() for tok in spec.split(",") if tok.strip()]
    if not ids:
        raise DataError(f"history {spec!r} is neither a file nor a list of item ids")
    return ids


def _looks_like_path(spec: str) -> bool:
    separators = {"/", os.sep, *([os.altsep] if os.altsep else [])}
    return any(sep in spec for sep in separators) or spec.lower().endswith(_FILE_SUFFIXES)


def _read_history_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError("not a UTF-8 text file", path=path) from None
    if "\x00" in text:
        raise DataError("binary data in a history file", path=path)
    rows = [row for row in csv.reader(text.splitlines()) if row and any(c.strip() for c in row)]
    if not rows:
        raise DataError("empty history file", path=path)
    header = [c.strip().lower() for c in rows[0]]
    col = 0
    body = rows
    for name in ("item_id", "item", "itemid", "movieid"):
        if name in header:
            col = header.index(name)
            body = rows[1:]
            break
    else:
        if len(header) > 1:
            col = 1  # user,item[,rating][,timestamp]
    out = []
    for lineno, row in enumerate(body, start=len(rows) - len(body) + 1):
        if col >= len(row):
            raise DataError(f"expected an item id in column {col + 1}", path=path, line=lineno)
        out.append(row[col].strip())
    return out


def recommend(checkpoint: Checkpoint | Path, history: list[str], *, k: int = 10) -> RecommendResult:
    """Rank the items of ``checkpoint`` for a user whose history is ``history``.

    Parameters
    ----------
    checkpoint:
        A loaded checkpoint or the path of ``model.pt``.
    history:
        Original item ids the user interacted with. Unknown ids are reported and skipped.
    k:
        How many items to return (history items are never recommended).
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    column = {item: i for i, item in enumerate(ckpt.item_ids)}
    known = [column[h] for h in history if h in column]
    unknown = [h for h in history if h not in column]
    if unknown:
        logger.info("skipping %d item ids the model does not know", len(unknown))
    model = build_model(ModelConfig.from_dict(ckpt.model_config))
    model.load_state_dict(ckpt.state_dict)
    model.eval()
    n_items = len(ckpt.item_ids)
    x = torch.zeros(1, n_items)  # (1, n_items)
    x[0, known] = 1.0
    with torch.no_grad():
        scores = model(x).logits[0].numpy().astype(np.float64)  # (n_items,)
    scores[known] = -np.inf
    k = min(k, n_items - len(set(known)))
    top = np.argpartition(-scores, k - 1)[:k] if k > 0 else np.array([], dtype=int)
    top = top[np.argsort(-scores[top], kind="stable")]
    items = [Recommendation(ckpt.item_ids[i], ckpt.item_titles[i], float(scores[i])) for i in top]
    return RecommendResult(items=items, unknown_ids=unknown, known_history=len(set(known)))
