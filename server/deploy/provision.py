"""What an operator prepares before a deployed run: the server's run folder, and demo devices.

``fedrec deploy prepare`` writes the run folder the ServerApp reads (``run-dir``), from a run
config, the same way a simulation does (:func:`common.run.folder.write_run_folder`), and then
empties the training rows from it: in a deployment the devices hold their histories, and the
server keeps only public metadata:

- ``config.toml``: the resolved run config (sent to the devices with every message);
- ``data/items.json``: the catalogue, the item ids of the model's columns (sent likewise);
- ``data/eval.npz``: held-out validation and test users, the operator's own evaluation data;
- ``data/clients.npz``: how many clients there are and how many users each holds (the
  population N and the silo sizes that privacy is planned with), without their rows.

For a demo or a test, ``--export-clients DIR`` first writes each client's training rows as the
history file of a device (``DIR/device-K/history.csv``, ``user,item`` in the data set's own
ids): what ``fedrec client join --data`` reads on that device.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError
from common.io import atomic_write_text
from common.run.config import RunConfig
from common.run.folder import drop_client_rows, load_client_shard, n_clients_of, write_run_folder

__all__ = ["Provisioned", "check_deployable", "export_client_histories", "prepare_deployment"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Provisioned:
    """What :func:`prepare_deployment` wrote."""

    run_dir: Path
    n_clients: int
    n_items: int
    histories: list[Path]
    """One history file per client (empty unless exported)."""


def check_deployable(cfg: RunConfig) -> None:
    """Refuse a config that only a simulation may run: one with ``privacy.noise_seed``.

    Raises
    ------
    ConfigError
        If ``privacy.noise_seed`` is set (seeded DP noise is not private; devices refuse it).
    """
    if cfg.privacy.noise_seed is not None:
        raise ConfigError(
            f"privacy.noise_seed = {cfg.privacy.noise_seed} makes the DP noise predictable "
            "(simulations only); a deployment refuses it: remove it from the config"
        )


def export_client_histories(run_dir: Path, out_dir: Path) -> list[Path]:
    """Write client K's training rows to ``out_dir/device-K/history.csv`` (``user,item``).

    Users are named ``K-ROW`` (their row in the client); items keep the data set's ids, so a
    device maps them onto the catalogue exactly as it would map its own history.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    item_ids = json.loads((run_dir / "data" / "items.json").read_text())["item_ids"]
    paths = []
    for client in range(n_clients_of(run_dir)):
        rows = load_client_shard(run_dir, client).rows.tocsr()  # (n_users, n_items)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["user", "item"])
        for user in range(rows.shape[0]):
            for col in rows.indices[rows.indptr[user] : rows.indptr[user + 1]]:
                writer.writerow([f"{client}-{user}", item_ids[int(col)]])
        path = out_dir / f"device-{client}" / "history.csv"
        atomic_write_text(path, buf.getvalue())
        paths.append(path)
    return paths


def prepare_deployment(
    cfg: RunConfig,
    run_dir: Path,
    *,
    cache_dir: Path | None = None,
    export_dir: Path | None = None,
) -> Provisioned:
    """Write the server's run folder for a deployed run (see the module docstring).

    Parameters
    ----------
    cfg:
        The run config; its data set gives the catalogue, the held-out users and the
        partition's sizes.
    run_dir:
        The run folder (absolute path recommended: it is the run config's ``run-dir``).
    cache_dir:
        Data cache (``$FEDREC_DATA``).
    export_dir:
        If given, also write each client's rows there as a device history file.

    Raises
    ------
    ConfigError
        If the config sets ``privacy.noise_seed`` (:func:`check_deployable`).
    """
    check_deployable(cfg)
    run_dir = Path(run_dir).resolve()
    prepared = write_run_folder(cfg, run_dir, cache_dir=cache_dir)
    histories = export_client_histories(run_dir, export_dir) if export_dir is not None else []
    drop_client_rows(run_dir)
    logger.info(
        "prepared %s: %d clients, %d items (client rows not kept)",
        run_dir,
        prepared.n_clients,
        prepared.n_items,
    )
    return Provisioned(
        run_dir=run_dir,
        n_clients=prepared.n_clients,
        n_items=prepared.n_items,
        histories=histories,
    )
