"""Child process of ``fedrec simulate``: runs Flower's simulation engine on the Ray backend.

It makes the call that Flower's own ``flwr-simulation`` process makes for ``flwr run`` on a local
simulation (``flwr.simulation.app`` -> ``_run_simulation``), with fedrec's ServerApp and
ClientApp components from ``[tool.flwr.app.components]`` and a run config that points at the run
folder. The public ``run_simulation`` is deprecated in Flower 1.42 and ignores the run config,
and ``flwr run`` adds a detached SuperLink and an app install per run, hence this direct call
(pinned to ``flwr==1.42.0``; a test runs it end to end).

Ray: without an address the backend starts a local Ray of its own (``address="local"``, so a
``RAY_ADDRESS`` in the environment does not redirect it), which dies with this process's group.
With an address (``fedrec simulate --ray-address``, ``simulation.ray_address``) it connects to that
existing cluster as one more driver: no resources are declared (Ray refuses ``num_cpus`` then),
the ClientApp actors run in the cluster's raylets, and ``ray.shutdown`` at the end (Flower's
backend, and this module's ``finally`` for early failures) frees them; Ray also frees them when
this driver dies (the job's actors share its fate). The cluster itself keeps running.

Parent death: ``fedrec simulate`` names itself in ``FEDREC_WORKER_PARENT``, and this process
dies with it (:func:`common.processes.die_with_parent`: the kernel's parent-death signal on
Linux, a watchdog thread polling the parent pid everywhere), stopping its whole process group,
Ray's GCS, raylet and actors included. It also inherits the run folder's lock
(``FEDREC_RUN_LOCK_FD``, :class:`common.run.owner.RunLock`) and keeps it open for its whole life,
so a worker that is still stopping counts as the folder's live writer and no resume can append
to the ledger beside it.

Usage: ``python -m simulations.worker RUN_DIR NUM_NODES NUM_CPUS_PER_CLIENT [RAY_ADDRESS]``
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "APP_DIR",
    "LOCK_FD_ENV",
    "PARENT_ENV",
    "PDEATHSIG_ENV",
    "backend_config",
    "is_external",
    "main",
]

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]
"""Folder whose ``pyproject.toml`` declares the Flower app (the project root)."""

PARENT_ENV = "FEDREC_WORKER_PARENT"
"""Environment variable: the pid of the ``fedrec simulate`` process this worker dies with."""
PDEATHSIG_ENV = "FEDREC_WORKER_PDEATHSIG"
"""Environment variable: ``1`` when the parent started this worker from a thread that lives as
long as it does, so that the kernel's parent-death signal (which follows the thread) is safe."""
LOCK_FD_ENV = "FEDREC_RUN_LOCK_FD"
"""Environment variable: the inherited file descriptor of the run folder's lock."""


def _guard() -> None:
    """Die with the parent named in the environment; keep the inherited run lock to ourselves.

    Both variables are removed from the environment, so Ray's processes do not see them. A
    worker started by hand (no parent named) runs unguarded.
    """
    from common.processes import die_with_parent

    lock_fd = os.environ.pop(LOCK_FD_ENV, None)
    if lock_fd is not None:
        os.set_inheritable(int(lock_fd), False)  # held here; Ray's processes must not get it
    parent = os.environ.pop(PARENT_ENV, None)
    pdeathsig = os.environ.pop(PDEATHSIG_ENV, "0") == "1"
    if parent is not None:
        die_with_parent(int(parent), pdeathsig=pdeathsig)


def _record_node_partitions(run_dir: Path) -> None:
    """Write Flower's node id -> partition mapping to ``RUN_DIR/data/nodes.json``.

    Flower draws simulated node ids from ``os.urandom``; the ServerApp orders nodes by
    partition instead, so a seed samples the same clients (and sums them in the same order)
    in every run.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    from common.io import atomic_write_json

    register = vce_api._register_node_info_stores
    (run_dir / "data" / "nodes.json").unlink(missing_ok=True)  # node ids are new every run

    def recording(nodes_mapping: dict[int, int], run: Any, app_dir: str | None = None) -> Any:
        atomic_write_json(
            run_dir / "data" / "nodes.json",
            {str(n): p for n, p in nodes_mapping.items()},
            mode=0o600,  # like every file in data/ (common.run.folder.DATA_FILE_MODE)
        )
        return register(nodes_mapping, run, app_dir)

    vce_api._register_node_info_stores = recording


def is_external(ray_address: str | None) -> bool:
    """Whether ``ray_address`` names an existing cluster (``None`` and ``"local"`` do not)."""
    return ray_address is not None and ray_address != "local"


def backend_config(cpus_per_client: float, ray_address: str | None = None) -> dict[str, Any]:
    """Flower's Ray backend config: ``init_args`` go to ``ray.init`` as they are.

    A local Ray gets every CPU of this machine; on an existing cluster (``ray_address``) the
    cluster's nodes declare their own resources and the actor pool is sized from them.
    """
    init_args: dict[str, Any] = {
        "logging_level": "ERROR",
        "log_to_driver": True,
        "include_dashboard": False,
    }
    if is_external(ray_address):
        init_args["address"] = ray_address
    else:
        init_args["address"] = "local"
        init_args["num_cpus"] = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": init_args,
    }


def _shutdown_ray() -> None:
    """Disconnect this driver (a no-op when Flower's backend already did, or never connected)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run(
    run_dir: Path, num_nodes: int, cpus_per_client: float, ray_address: str | None = None
) -> None:
    """Run the simulation of ``run_dir`` with ``num_nodes`` virtual SuperNodes.

    ``ray_address`` names an existing Ray cluster to run on; ``None`` starts a local Ray.
    """
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # as flwr-simulation does
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir, get_project_config
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from simulations import vce_patch

    overrides: dict[str, bool | float | int | str] = {
        "run-dir": str(run_dir.resolve()),
        "expected-nodes": num_nodes,
    }
    components = get_project_config(APP_DIR)["tool"]["flwr"]["app"]["components"]
    run_config = get_fused_config_from_dir(APP_DIR, overrides)
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = overrides  # becomes each ClientApp context's run_config
    TaskIdentity.task_id = run.primary_task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    server_context = Context(
        run_id=run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=run_config,
    )
    if num_nodes >= vce_patch.MIN_NODES:
        vce_patch.apply()
    _record_node_partitions(run_dir.resolve())
    backend = backend_config(cpus_per_client, ray_address)
    if is_external(ray_address):
        logger.info(
            "Ray: connecting to the existing cluster at %s (it keeps running after this run)",
            ray_address,
        )
    else:
        logger.info("Ray: starting a local Ray with %s CPUs", backend["init_args"]["num_cpus"])
    try:
        _run_simulation(
            num_supernodes=num_nodes,
            exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
            server_app_attr=components["serverapp"],
            client_app_attr=components["clientapp"],
            app_dir=str(APP_DIR),
            is_app=True,
            run=run,
            server_app_context=server_context,
            backend_name="ray",
            backend_config=backend,
            verbose_logging=False,
        )
    finally:
        _shutdown_ray()


def main() -> None:
    """Entry point of the child process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _guard()
    run_dir, num_nodes, cpus = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    ray_address = sys.argv[4] if len(sys.argv) > 4 else None
    run(run_dir, num_nodes, cpus, ray_address)


if __name__ == "__main__":
    main()
