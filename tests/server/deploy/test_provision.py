"""The server's run folder for a deployment: catalogue and sizes, no client rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from common.data import synthesize
from common.errors import ConfigError
from common.run.config import load_run_config
from common.run.folder import client_sizes, load_client_shard, n_clients_of
from server.deploy.provision import prepare_deployment


def test_prepare_exports_device_histories_and_keeps_only_sizes(tmp_path: Path) -> None:
    # Prepare
    data = synthesize(60, 30, seed=1, out_dir=tmp_path / "synth")
    sets = [f"data.dataset={data}", "data.partition=silos", "data.n_silos=3"]
    cfg = load_run_config(None, [*sets, "data.n_heldout_users=6"])

    # Execute
    done = prepare_deployment(cfg, tmp_path / "run", export_dir=tmp_path / "devices")

    # Assert: one history per client, in the data set's item ids, holding that client's rows
    assert done.n_clients == 3 == n_clients_of(done.run_dir)
    item_ids = json.loads((done.run_dir / "data" / "items.json").read_text())["item_ids"]
    sizes = client_sizes(done.run_dir)
    for k, path in enumerate(done.histories):
        rows = list(csv.DictReader(path.open()))
        assert {r["item"] for r in rows} <= set(item_ids)
        assert len({r["user"] for r in rows}) == sizes[k]
    # ...and the server's copy has the sizes without the rows
    assert sum(sizes) == 60 - 12
    assert load_client_shard(done.run_dir, 0).rows.nnz == 0
    with np.load(done.run_dir / "data" / "clients.npz") as z:
        assert z["train_indices"].size == 0
    assert (done.run_dir / "config.toml").is_file()


def test_prepare_refuses_a_config_with_a_noise_seed(tmp_path: Path) -> None:
    data = synthesize(60, 30, seed=1, out_dir=tmp_path / "synth")
    sets = [f"data.dataset={data}", "privacy.mode=client", "privacy.noise_multiplier=1.0"]
    cfg = load_run_config(None, [*sets, "privacy.noise_seed=3", "data.n_heldout_users=6"])

    with pytest.raises(ConfigError, match=r"noise_seed = 3 .* a deployment refuses it"):
        prepare_deployment(cfg, tmp_path / "run", export_dir=tmp_path / "devices")

    assert not (tmp_path / "run").exists() and not (tmp_path / "devices").exists()
