"""Speed-ups for Flower 1.42's simulation engine with very large populations.

Flower 1.42's in-process fleet (``vce_api``) checks every registered node for pending messages
every 0.1 s, and each check scans the whole message store: O(nodes x pending) per sweep, about
30 s of overhead per round at 100,000 nodes. It also re-parses ``pyproject.toml`` once per node
at start-up. :func:`apply` replaces those two private functions with versions that scan the
store once per sweep and parse the config once, keeping the same semantics (one message per node
per sweep, TTL checks). It is applied only to the exact Flower version it was written against.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from queue import Queue
from typing import Any

import flwr

__all__ = ["MIN_NODES", "PATCHED_FLWR_VERSION", "apply"]

logger = logging.getLogger(__name__)

PATCHED_FLWR_VERSION = "1.42.0"

MIN_NODES = 5000
"""Populations from this size on get the faster functions; smaller ones run Flower unchanged.

Below it the stock engine's overhead is under a second per round, and fedrec has seen one
round-1 stall with the replacement on a 60-node run that it could not reproduce: large runs
gain tens of seconds per round, small ones would gain nothing for that risk."""


def _add_messages_to_queue(
    state: Any, queue: Queue[Any], nodes_mapping: dict[int, int], f_stop: threading.Event
) -> None:
    """Move pending instructions to the backend queue, one per node per sweep."""
    while not f_stop.is_set():
        batch = []
        with state.lock:
            candidates = [
                mid
                for mid, m in state.message_ins_store.items()
                if m.metadata.delivered_at == "" and m.metadata.dst_node_id in nodes_mapping
            ]
            if candidates:
                from flwr.supercore.date import now

                state._check_stored_messages(set(candidates))  # drops expired (TTL) messages
                seen: set[int] = set()
                stamp = now().isoformat()
                for mid in candidates:
                    m = state.message_ins_store.get(mid)
                    if m is None or m.metadata.dst_node_id in seen:
                        continue
                    seen.add(m.metadata.dst_node_id)
                    m.metadata.delivered_at = stamp
                    batch.append(m)
        for m in batch:
            queue.put(m)
        f_stop.wait(0.1)


def _register_node_info_stores(
    nodes_mapping: dict[int, int], run: Any, app_dir: str | None = None
) -> dict[int, Any]:
    """Same stores as Flower's, with the app config parsed once instead of once per node."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config, get_fused_config_from_dir
    from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
    from flwr.compat.client.run_info_store import DeprecatedRunInfoStore, RunInfo

    if app_dir:
        cfg = get_fused_config_from_dir(Path(app_dir), run.override_config)
    else:
        cfg = get_fused_config(run)
    num_partitions = len(set(nodes_mapping.values()))
    stores = {}
    for node_id, pid in nodes_mapping.items():
        store = DeprecatedRunInfoStore(
            node_id=node_id,
            node_config={PARTITION_ID_KEY: pid, NUM_PARTITIONS_KEY: num_partitions},
        )
        store.run_infos[run.run_id] = RunInfo(
            initial_run_config=cfg,
            context=Context(
                run_id=run.run_id,
                node_id=node_id,
                node_config=store.node_config,
                state=RecordDict(),
                run_config=cfg.copy(),
            ),
        )
        stores[node_id] = store
    return stores


def apply() -> bool:
    """Install the faster functions; returns False (and changes nothing) on another Flower."""
    from flwr.server.superlink.fleet.vce import vce_api

    if flwr.__version__ != PATCHED_FLWR_VERSION or not (
        hasattr(vce_api, "add_messages_to_queue") and hasattr(vce_api, "_register_node_info_stores")
    ):
        logger.warning("Flower %s: large-population speed-ups not applied", flwr.__version__)
        return False
    vce_api.add_messages_to_queue = _add_messages_to_queue
    vce_api._register_node_info_stores = _register_node_info_stores
    return True
