"""A simulation's data, prepared once by the operator and read by the simulated parties.

In a simulation every virtual device's history comes from one data set. The runner splits it
(Liang et al. 2018), assigns training users to clients (:mod:`common.run.partition`) and writes:

- ``RUN_DIR/data/clients.npz``: the training rows and which client holds which rows; each
  simulated ClientApp reads only its own client's rows from it;
- ``RUN_DIR/data/eval.npz``: held-out validation and test users (fold-in / held-out) and the
  item ids, read by the ServerApp for evaluation.
- ``RUN_DIR/data/cleaning.json``: what cleaning dropped from the data file and why (bad rows
  by reason with their first ``file:line``, see :mod:`common.data.cleaning`).
- ``RUN_DIR/data/users.json``: the protected attributes the data set gives its users (gender,
  age, occupation) for the training rows, in ``clients.npz`` row order, and for the held-out
  users. A simulated client reads only its own rows' (it trains an on-device adversary with
  them, ``[fairness]``); the server reads only the held-out users', to measure the model per
  user group. A real device knows its own attributes; none of them is ever sent.

A real device (``fedrec client join``) has no such file: it reads its own history instead.

Nothing is written until the data is read, split, partitioned and checked against the config
(:func:`build_run_data`, :func:`common.run.config.check_run_data`): a refused run leaves no run
folder, or an existing one untouched. ``data/`` holds every client's rows, so the run folder
and ``data/`` are owner-only (0700) and the files in ``data/`` 0600.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from common.config import to_toml
from common.data import Dataset, Split, load_dataset, split_strong_generalization
from common.data.stats import cleaning_record
from common.errors import ConfigError
from common.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from common.run.config import Partition, RunConfig, check_fairness, check_run_data
from common.run.partition import ClientPartition, partition_users

__all__ = [
    "DATA_FILE_MODE",
    "PROTECTED_ATTRIBUTES",
    "RUN_DIR_MODE",
    "ClientShard",
    "EvalData",
    "PreparedRun",
    "RunData",
    "build_run_data",
    "drop_client_rows",
    "load_client_shard",
    "load_eval_data",
    "load_user_attributes",
    "n_clients_of",
    "prepare_run_data",
    "write_run_folder",
]

logger = logging.getLogger(__name__)

RUN_DIR_MODE = 0o700
"""Permissions of a run folder and its ``data/``: they hold every client's rows."""
DATA_FILE_MODE = 0o600
"""Permissions of the files in ``RUN_DIR/data``."""
PROTECTED_ATTRIBUTES = ("gender", "age", "occupation")
"""The user attributes a run keeps (``data/users.json``), when the data set gives them."""


@dataclass(frozen=True)
class PreparedRun:
    """What :func:`prepare_run_data` wrote, in numbers."""

    n_clients: int
    n_train_users: int
    n_items: int
    dataset: dict[str, str]


@dataclass(frozen=True)
class EvalData:
    """Held-out users for server-side evaluation, and the model's item catalogue."""

    item_ids: list[str]
    item_titles: list[str]
    validation_foldin: sp.csr_matrix
    validation_holdout: sp.csr_matrix
    test_foldin: sp.csr_matrix
    test_holdout: sp.csr_matrix
    dataset: dict[str, str]
    item_genres: list[list[str]] = field(default_factory=list)
    """Genres of each item (``[]`` per item when unknown); empty for a folder written before
    genres were kept."""
    validation_attributes: dict[str, np.ndarray] = field(default_factory=dict)
    """Attribute name -> ``(U_va,)`` str of the validation users, ``''`` unknown."""
    test_attributes: dict[str, np.ndarray] = field(default_factory=dict)
    """Attribute name -> ``(U_te,)`` str of the test users, row-aligned with ``test_foldin``."""


@dataclass(frozen=True)
class ClientShard:
    """One client's own interactions: ``(n_users, n_items)`` binary rows."""

    client_id: int
    rows: sp.csr_matrix
    label: str
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    """Attribute name -> ``(n_users,)`` str of this client's own users, ``''`` unknown."""

    @property
    def n_users(self) -> int:
        """Users this client holds."""
        return int(self.rows.shape[0])


@dataclass(frozen=True)
class RunData:
    """A data set split and partitioned for a run and checked against its config; not written.

    What :func:`build_run_data` returns and :func:`prepare_run_data` writes.
    """

    dataset: Dataset
    split: Split
    partition: ClientPartition

    @property
    def n_clients(self) -> int:
        """Clients of the partition."""
        return int(self.partition.n_clients)


def _owner_only(folder: Path) -> None:
    """Make ``folder`` (made if missing) readable by its owner only."""
    folder.mkdir(parents=True, exist_ok=True, mode=RUN_DIR_MODE)
    try:
        os.chmod(folder, RUN_DIR_MODE)
    except PermissionError:  # a folder of someone else's that we may write into
        logger.warning("%s: cannot make it owner-only (chmod 700): not its owner", folder)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buf.getvalue(), mode=DATA_FILE_MODE)


def _csr_arrays(prefix: str, m: sp.csr_matrix) -> dict[str, np.ndarray]:
    m = sp.csr_matrix(m)
    return {
        f"{prefix}_indptr": m.indptr.astype(np.int64),
        f"{prefix}_indices": m.indices.astype(np.int32),
        f"{prefix}_shape": np.asarray(m.shape, dtype=np.int64),
    }


def _csr_from(z: np.lib.npyio.NpzFile, prefix: str) -> sp.csr_matrix:
    indices = z[f"{prefix}_indices"]
    shape = tuple(int(s) for s in z[f"{prefix}_shape"])
    data = np.ones(len(indices), dtype=np.float32)
    return sp.csr_matrix((data, indices, z[f"{prefix}_indptr"]), shape=shape)


def _partition(cfg: RunConfig, ds: Dataset, split: Split) -> ClientPartition:
    data = cfg.data
    attribute = None
    if data.partition is Partition.SILOS and data.silo_attribute:
        feature = ds.user_features.get(data.silo_attribute)
        if feature is None:
            known = ", ".join(sorted(ds.user_features)) or "none"
            raise ConfigError(
                f"data.silo_attribute {data.silo_attribute!r} is not a user attribute of "
                f"{ds.name} (known: {known})",
                key="data.silo_attribute",
            )
        row_of = {u: i for i, u in enumerate(ds.user_ids.tolist())}
        attribute = np.asarray([feature[row_of[u]] for u in split.train_users.tolist()])
    genres = [ds.item_genres[c] for c in split.item_index.tolist()]
    return partition_users(
        split.train,
        data.partition,
        seed=cfg.seed,
        n_silos=data.n_silos,
        user_attribute=attribute,
        attribute_name=data.silo_attribute,
        item_genres=genres if data.partition is Partition.DIRICHLET else None,
        alpha=data.dirichlet_alpha,
        user_labels=split.train_users,
        max_clients=cfg.simulation.max_clients,
    )


def build_run_data(cfg: RunConfig, *, cache_dir: Path | None = None) -> RunData:
    """Read, split and partition ``cfg.data.dataset``, checking ``cfg`` against it; writes nothing.

    Raises
    ------
    ConfigError
        For a value the data does not allow (:func:`common.run.config.check_run_data`), with its
        ``key``; :func:`common.config.locate_error` adds the file line or ``--set`` that gave it.
    """
    ds = load_dataset(
        cfg.data.dataset,
        cache_dir=cache_dir,
        min_rating=cfg.data.min_rating,
        strict=cfg.data.strict,
    )
    check_run_data(cfg, n_users=ds.n_users)
    check_fairness(cfg, [a for a in PROTECTED_ATTRIBUTES if a in ds.user_features])
    split = split_strong_generalization(ds, seed=cfg.seed, n_heldout_users=cfg.data.n_heldout_users)
    part = _partition(cfg, ds, split)
    check_run_data(cfg, n_users=ds.n_users, n_clients=part.n_clients)
    return RunData(dataset=ds, split=split, partition=part)


def prepare_run_data(
    cfg: RunConfig,
    run_dir: Path,
    *,
    cache_dir: Path | None = None,
    data: RunData | None = None,
) -> PreparedRun:
    """Write ``RUN_DIR/data/*`` (owner-only) of ``data``, else of :func:`build_run_data`."""
    if data is None:
        data = build_run_data(cfg, cache_dir=cache_dir)
    ds, split, part = data.dataset, data.split, data.partition
    data_dir = Path(run_dir) / "data"
    _owner_only(data_dir)
    title_of = dict(zip(ds.item_ids.tolist(), ds.item_titles.tolist(), strict=True))
    item_ids = [str(i) for i in split.item_ids.tolist()]
    _save_npz(
        data_dir / "clients.npz",
        **_csr_arrays("train", split.train),
        offsets=part.offsets,
        rows=part.rows,
    )
    atomic_write_json(data_dir / "client_labels.json", list(part.labels), mode=DATA_FILE_MODE)
    _save_npz(
        data_dir / "eval.npz",
        **_csr_arrays("validation_foldin", split.validation_foldin),
        **_csr_arrays("validation_holdout", split.validation_holdout),
        **_csr_arrays("test_foldin", split.test_foldin),
        **_csr_arrays("test_holdout", split.test_holdout),
    )
    meta = {
        "item_ids": item_ids,
        "item_titles": [title_of.get(i, "") for i in item_ids],
        "item_genres": [list(ds.item_genres[c]) for c in split.item_index.tolist()],
        "dataset": {"name": ds.name, "sha256": ds.sha256},
    }
    atomic_write_json(data_dir / "items.json", meta, mode=DATA_FILE_MODE)
    atomic_write_json(data_dir / "cleaning.json", cleaning_record(ds), mode=DATA_FILE_MODE)
    atomic_write_json(data_dir / "users.json", _user_attributes(ds, split), mode=DATA_FILE_MODE)
    _users_json.cache_clear()
    logger.info(
        "prepared %d clients from %d training users, %d items",
        part.n_clients,
        split.train.shape[0],
        split.train.shape[1],
    )
    return PreparedRun(
        n_clients=part.n_clients,
        n_train_users=int(split.train.shape[0]),
        n_items=int(split.train.shape[1]),
        dataset={"name": ds.name, "sha256": ds.sha256},
    )


def _user_attributes(ds: Dataset, split: Split) -> dict[str, dict[str, list[str]]]:
    """:data:`PROTECTED_ATTRIBUTES` of the training rows and of the held-out users."""
    row_of = {u: i for i, u in enumerate(ds.user_ids.tolist())}
    names = [a for a in PROTECTED_ATTRIBUTES if a in ds.user_features]
    out: dict[str, dict[str, list[str]]] = {}
    for part, users in (
        ("train", split.train_users),
        ("validation", split.validation_users),
        ("test", split.test_users),
    ):
        rows = [row_of[u] for u in users.tolist()]
        out[part] = {a: ds.user_features[a][rows].tolist() for a in names}
    return out


@lru_cache(maxsize=4)
def _users_json(path: str) -> dict[str, dict[str, np.ndarray]]:
    file = Path(path)
    if not file.is_file():  # a folder written before attributes were kept
        return {}
    raw = json.loads(file.read_text())
    return {
        part: {a: np.asarray(v, dtype=str) for a, v in attrs.items()} for part, attrs in raw.items()
    }


def load_user_attributes(run_dir: Path, part: str) -> dict[str, np.ndarray]:
    """Attribute name -> ``(n,)`` str of ``part`` (``train``, ``validation`` or ``test``) users.

    Training rows are in ``clients.npz`` row order. Empty when the data set has no user file.
    """
    return dict(_users_json(str(Path(run_dir) / "data" / "users.json")).get(part, {}))


@lru_cache(maxsize=4)
def _client_arrays(path: str) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, tuple[str, ...]]:
    with np.load(path) as z:
        train = _csr_from(z, "train")
        offsets, rows = z["offsets"], z["rows"]
    labels = tuple(json.loads((Path(path).parent / "client_labels.json").read_text()))
    return train, offsets, rows, labels


def load_client_shard(run_dir: Path, client_id: int) -> ClientShard:
    """Client ``client_id``'s rows (the file is read once per process and cached)."""
    train, offsets, rows, labels = _client_arrays(str(Path(run_dir) / "data" / "clients.npz"))
    n_clients = len(offsets) - 1
    if not 0 <= client_id < n_clients:
        raise ValueError(f"client_id {client_id} is outside 0..{n_clients - 1}")
    mine = rows[offsets[client_id] : offsets[client_id + 1]]
    attributes = {a: v[mine] for a, v in load_user_attributes(run_dir, "train").items()}
    return ClientShard(
        client_id=client_id, rows=train[mine], label=labels[client_id], attributes=attributes
    )


def client_sizes(run_dir: Path) -> list[int]:
    """Users per client of the prepared partition (public metadata: silo sizes)."""
    _, offsets, _, _ = _client_arrays(str(Path(run_dir) / "data" / "clients.npz"))
    return [int(n) for n in np.diff(offsets)]


def n_clients_of(run_dir: Path) -> int:
    """How many clients the prepared partition has."""
    _, offsets, _, _ = _client_arrays(str(Path(run_dir) / "data" / "clients.npz"))
    return len(offsets) - 1


def drop_client_rows(run_dir: Path) -> None:
    """Empty the training rows of ``clients.npz`` (and drop their attributes), keeping the
    partition's sizes.

    For a deployment: devices read their own histories, and the server keeps only the public
    metadata it plans privacy with (how many clients, how many users each).
    """
    path = Path(run_dir) / "data" / "clients.npz"
    with np.load(path) as z:
        shape = tuple(int(s) for s in z["train_shape"])
        offsets, rows = z["offsets"], z["rows"]
    empty = sp.csr_matrix(shape, dtype=np.float32)
    _save_npz(path, **_csr_arrays("train", empty), offsets=offsets, rows=rows)
    _client_arrays.cache_clear()
    users = path.parent / "users.json"
    if users.is_file():  # the devices' own attributes stay on the devices
        held_out = {k: v for k, v in json.loads(users.read_text()).items() if k != "train"}
        atomic_write_json(users, held_out, mode=DATA_FILE_MODE)
        _users_json.cache_clear()


def load_eval_data(run_dir: Path) -> EvalData:
    """Held-out users and item catalogue of a prepared run."""
    data_dir = Path(run_dir) / "data"
    meta = json.loads((data_dir / "items.json").read_text())
    with np.load(data_dir / "eval.npz") as z:
        parts = {
            name: _csr_from(z, name)
            for name in ("validation_foldin", "validation_holdout", "test_foldin", "test_holdout")
        }
    return EvalData(
        item_ids=list(meta["item_ids"]),
        item_titles=list(meta["item_titles"]),
        dataset=dict(meta["dataset"]),
        item_genres=[list(g) for g in meta.get("item_genres", [])],
        validation_attributes=load_user_attributes(run_dir, "validation"),
        test_attributes=load_user_attributes(run_dir, "test"),
        **parts,
    )


def write_run_folder(
    cfg: RunConfig,
    run_dir: Path,
    *,
    cache_dir: Path | None = None,
    data: RunData | None = None,
) -> PreparedRun:
    """Write ``RUN_DIR/data/*`` and the resolved ``RUN_DIR/config.toml`` (written last).

    The data (``data``, else :func:`build_run_data` of ``cfg``) is checked before the folder is
    made, so a refused run writes nothing; the folder is made owner-only (0700).
    """
    if data is None:
        data = build_run_data(cfg, cache_dir=cache_dir)
    run_dir = Path(run_dir)
    _owner_only(run_dir)
    prepared = prepare_run_data(cfg, run_dir, data=data)
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    return prepared
