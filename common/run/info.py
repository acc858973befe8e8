"""What a device learns about a run from the server's messages: its config and its catalogue.

A simulated client reads ``RUN_DIR/config.toml`` and ``RUN_DIR/data/``; a device cannot, the run
folder lives with the server. So in a deployment every train and evaluate message carries, in
its ``config`` record, two public values next to the round's settings:

- ``fedrec-run-config``: the resolved run config as TOML text (model shape, local training,
  privacy settings; a few kilobytes);
- ``fedrec-item-ids``: the original item id of each input and output column of the global
  model (the public catalogue: 1,413 ids for ML-100K; 8.4 kB with the config).

A device maps its own history onto those columns (:mod:`client.store`); nothing about the
device goes the other way. Sending both with every message keeps devices stateless: one that
joins late, restarts or misses rounds needs nothing else, at a cost well under 1% of the model
a message carries anyway (0.3% for ML-100K with a [200, 64] Mult-VAE).
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping, Sequence

from flwr.app.typing import ConfigRecordValues

from common.config import parse, to_toml
from common.protocol import ITEM_IDS_KEY, RUN_CONFIG_KEY  # defined with the other wire keys
from common.run.config import RunConfig

__all__ = ["ITEM_IDS_KEY", "RUN_CONFIG_KEY", "RunInfo", "read_run_info", "run_info_config"]

RunInfo = tuple[RunConfig, tuple[str, ...]]
"""The run config and the catalogue, as a device reads them from a message."""


def run_info_config(cfg: RunConfig, item_ids: Sequence[str]) -> dict[str, ConfigRecordValues]:
    """The config-record entries that tell a device the run's config and catalogue."""
    return {RUN_CONFIG_KEY: to_toml(cfg), ITEM_IDS_KEY: [str(i) for i in item_ids]}


@functools.lru_cache(maxsize=4)
def _parse_run_config(text: str) -> RunConfig:
    return parse(RunConfig, tomllib.loads(text))


def read_run_info(config: Mapping[str, object]) -> RunInfo | None:
    """The run config and catalogue in a message's config record; None when it has neither.

    Raises
    ------
    ValueError
        If only one of the two is there, or either is malformed.
    """
    text = config.get(RUN_CONFIG_KEY)
    ids = config.get(ITEM_IDS_KEY)
    if text is None and ids is None:
        return None
    if not isinstance(text, str) or not isinstance(ids, list) or not ids:
        raise ValueError(
            f"a message must carry both {RUN_CONFIG_KEY!r} (TOML text) and {ITEM_IDS_KEY!r} "
            "(a non-empty list of item ids)"
        )
    return _parse_run_config(text), tuple(str(i) for i in ids)
