"""Every run config value is checked when the config is read, and what needs the data right after
the data is read, before anything is written into the run folder."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from common.data import synthesize
from common.errors import ConfigError
from common.run.config import check_run_data, expected_cohort_floor, load_run_config
from common.run.folder import DATA_FILE_MODE, RUN_DIR_MODE, write_run_folder
from simulations.cli import main
from simulations.runner import prepare_run

# ------------------------------------------------------------------------- at parse time


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("model.dims=[]", "model: dims must be a non-empty list of positive layer sizes, got []"),
        ("model.dims=[0]", "dims must be a non-empty list of positive layer sizes, got [0]"),
        ("model.dims=[-5, 8]", "dims must be a non-empty list of positive layer sizes, got [-5"),
        ("model.dropout=1.5", "model: dropout must be in [0, 1), got 1.5"),
        ("model.dropout=-0.1", "model: dropout must be in [0, 1), got -0.1"),
        ("model.beta_cap=-1", "model: beta_cap must be a finite number >= 0"),
        ("model.anneal_steps=0", "model: anneal_steps must be >= 1, got 0"),
        ("model.kind=transformer", "model: kind must be one of ['multvae', 'multdae']"),
        ("data.n_heldout_users=0", "data: n_heldout_users must be >= 1, got 0"),
        ("data.dataset=''", "data: dataset must name ml-100k or a data file or folder"),
        ("data.client_holdout_fraction=1", "client_holdout_fraction must be in [0, 1)"),
        ("data.client_holdout_fraction=-0.1", "client_holdout_fraction must be in [0, 1)"),
        ("client.max_grad_norm=0", "client: max_grad_norm must be a finite number > 0"),
        ("server.tau=0", "server: tau must be a finite number > 0"),
        ("simulation.num_cpus_per_client=0", "num_cpus_per_client must be a finite number > 0"),
        ("simulation.num_cpus_per_client=-1", "num_cpus_per_client must be a finite number > 0"),
        ("simulation.max_clients=0", "simulation: max_clients must be >= 1, got 0"),
        ("simulation.fail_clients=[-1]", "simulation: fail_clients must hold client ids >= 0"),
        ("reference_epochs=0", "reference_epochs must be >= 1, got 0"),
    ],
)
def test_a_bad_value_is_refused_when_the_config_is_read(item: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(None, [item])

    message = str(info.value)
    assert message.startswith(f"--set {item}: "), message  # names the override
    assert needle in message
    assert "\n" not in message


def test_no_client_holdout_is_accepted_and_holds_nothing_out() -> None:
    from client.local import split_local

    cfg = load_run_config(None, ["data.client_holdout_fraction=0"])
    assert cfg.data.client_holdout_fraction == 0.0
    rows = sp.csr_matrix(np.ones((3, 12), dtype=np.float32))

    local = split_local(rows, fraction=cfg.data.client_holdout_fraction, seed=0)

    assert local.holdout.nnz == 0 and (local.train != rows).nnz == 0  # every item trains
    assert split_local(rows, fraction=0.25, seed=0).holdout.nnz == 3 * 3  # 0.25 of 12 each


def test_a_bad_value_in_a_file_names_the_file_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('name = "x"\n\n[model]\nkind = "transformer"\ndims = [16, 8]\n')

    with pytest.raises(ConfigError) as info:
        load_run_config(cfg)

    assert str(info.value).startswith(f"{cfg}:4: model: kind must be one of")


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (
            ["server.sampling=fixed", "server.clients_per_round=3", "server.min_clients=4"],
            "server.min_clients = 4 can never be met: a round invites server.clients_per_round = 3",
        ),
        (
            [
                "server.sampling=fixed",
                "server.clients_per_round=3",
                "encryption.enabled=true",
                "encryption.mode=single-key",
                "encryption.committee_size=4",
            ],
            "encryption.committee_size = 4 can never be met",
        ),
    ],
)
def test_values_that_cannot_be_met_together_are_refused(sets: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_run_config(None, sets)


def test_an_empty_config_file_is_an_error(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n\n"):
        cfg = tmp_path / "empty.toml"
        cfg.write_text(text)

        with pytest.raises(ConfigError) as info:
            load_run_config(cfg)

        assert str(info.value) == f"{cfg}: empty config file"


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    cfg = tmp_path / "bom.toml"
    cfg.write_bytes('\ufeffname = "bom"\nrounds = 3\n[model]\ndims = [16, 8]\n'.encode())

    loaded = load_run_config(cfg)

    assert loaded.name == "bom" and loaded.rounds == 3 and loaded.model.dims == (16, 8)


def test_a_bom_file_still_names_the_line_of_a_bad_value(tmp_path: Path) -> None:
    cfg = tmp_path / "bom.toml"
    cfg.write_bytes("\ufeffrounds = 0\n".encode())

    with pytest.raises(ConfigError) as info:
        load_run_config(cfg)

    assert str(info.value).startswith(f"{cfg}:1: ")


# ---------------------------------------------------------------------- against the data


def test_heldout_users_must_leave_training_users() -> None:
    cfg = load_run_config(None, ["data.n_heldout_users=1000"])

    with pytest.raises(ConfigError) as info:
        check_run_data(cfg, n_users=938)

    assert info.value.key == "data.n_heldout_users"
    assert "data.n_heldout_users = 1000 leaves no training users" in str(info.value)
    assert "938 users" in str(info.value) and "at most 468" in str(info.value)


def test_the_default_heldout_users_on_a_tiny_data_set_is_refused() -> None:
    cfg = load_run_config(None, [])

    with pytest.raises(ConfigError, match=r"data\.n_heldout_users is not set and its default"):
        check_run_data(cfg, n_users=60)


def test_min_clients_above_the_population_is_refused() -> None:
    cfg = load_run_config(None, ["data.n_heldout_users=8", "server.min_clients=45"])

    with pytest.raises(ConfigError) as info:
        check_run_data(cfg, n_users=60, n_clients=44)

    assert info.value.key == "server.min_clients"
    assert "server.min_clients = 45 exceeds the 44 clients" in str(info.value)


def test_a_committee_larger_than_a_low_cohort_is_refused() -> None:
    # the probe: 44 clients at q = 0.5, committee 50: every round was discarded, epsilon spent
    sets = [
        "data.n_heldout_users=8",
        "server.sample_rate=0.5",
        "encryption.enabled=true",
        "encryption.mode=single-key",
        "encryption.committee_size=50",
    ]
    cfg = load_run_config(None, sets)

    with pytest.raises(ConfigError) as info:
        check_run_data(cfg, n_users=60, n_clients=44)

    message = str(info.value)
    assert info.value.key == "encryption.committee_size"
    assert message.startswith("encryption.committee_size = 50 exceeds the participants of a round")
    assert "Binomial(44, 0.5)" in message and "2.5% of rounds" in message


def test_a_committee_the_cohort_meets_passes() -> None:
    cfg = load_run_config(None, ["encryption.enabled=true", "encryption.committee_size=2"])
    check_run_data(cfg, n_users=938, n_clients=738)  # q = 0.1: about 57 at the 2.5% quantile

    floor = expected_cohort_floor(cfg.server, 738)

    assert 50 < floor < 74


def test_a_contributor_floor_above_a_low_cohort_is_refused() -> None:
    # threshold mode: 44 clients at q = 0.5 put about 15 in a low round; holders would refuse
    cfg = load_run_config(
        None,
        [
            "data.n_heldout_users=8",
            "server.sample_rate=0.5",
            "encryption.enabled=true",
            "encryption.min_contributors=30",
        ],
    )

    with pytest.raises(ConfigError) as info:
        check_run_data(cfg, n_users=60, n_clients=44)

    assert info.value.key == "encryption.min_contributors"
    assert "the key holders would refuse to decrypt" in str(info.value)
    # the same floor passes when every client answers (a warm start alone: rounds = 0)
    alone = load_run_config(
        None,
        [
            "data.n_heldout_users=8",
            "rounds=0",
            "warm_start.enabled=true",
            "warm_start.share=1.0",
            "encryption.enabled=true",
            "encryption.min_contributors=30",
        ],
    )
    check_run_data(alone, n_users=60, n_clients=44)


def test_more_key_holders_than_clients_is_refused() -> None:
    cfg = load_run_config(None, ["encryption.enabled=true", "encryption.key_holders=7"])

    with pytest.raises(ConfigError, match=r"encryption\.key_holders = 7 exceeds the 6 clients"):
        check_run_data(cfg, n_users=938, n_clients=6)


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["encryption.key_holders=4", "encryption.threshold=2"], "more than half of key_holders"),
        (["encryption.key_holders=3", "encryption.threshold=4"], "more than half of key_holders"),
        (["encryption.key_holders=1"], "key_holders must be >= 2"),
        (["encryption.min_contributors=1"], "min_contributors must be >= 2"),
        (["encryption.mode='shared'"], "encryption.mode must be 'threshold' or 'single-key'"),
    ],
)
def test_threshold_settings_that_cannot_work_are_refused(sets: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_run_config(None, ["encryption.enabled=true", *sets])


def test_the_default_threshold_is_a_majority() -> None:
    for holders, expected in ((2, 2), (3, 2), (4, 3), (5, 3), (9, 5)):
        cfg = load_run_config(None, [f"encryption.key_holders={holders}"])
        assert cfg.encryption.decryption_threshold == expected
        assert cfg.encryption.mode == "threshold"


def test_more_silos_than_training_users_is_refused() -> None:
    cfg = load_run_config(
        None, ["data.n_heldout_users=8", "data.partition=silos", "data.n_silos=50"]
    )

    with pytest.raises(ConfigError, match=r"data\.n_silos = 50 exceeds the 44 training users"):
        check_run_data(cfg, n_users=60)


# ------------------------------------------------------------- nothing written if refused


@pytest.fixture(scope="module")
def synth_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(60, 40, seed=3, out_dir=tmp_path_factory.mktemp("synth"))


def _tiny(synth_csv: Path, *sets: str) -> list[str]:
    return [f"data.dataset={str(synth_csv)!r}", "model.dims=[16, 8]", *sets]


@pytest.mark.parametrize(
    "sets",
    [
        ["data.n_heldout_users=1000"],
        ["data.n_heldout_users=8", "server.min_clients=100"],
        [
            "data.n_heldout_users=8",
            "server.sample_rate=0.5",
            "encryption.enabled=true",
            "encryption.mode=single-key",
            "encryption.committee_size=50",
        ],
        [
            "data.n_heldout_users=8",
            "server.sample_rate=0.5",
            "encryption.enabled=true",
            "encryption.min_contributors=40",
        ],
    ],
)
def test_a_run_refused_by_its_data_writes_nothing(
    tmp_path: Path, synth_csv: Path, sets: list[str]
) -> None:
    cfg = load_run_config(None, _tiny(synth_csv, *sets))
    fresh = tmp_path / "fresh"
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")

    for run_dir in (fresh, existing):
        with pytest.raises(ConfigError):
            prepare_run(cfg, run_dir, force=True)

    assert not fresh.exists()  # no empty run folder
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]  # untouched


def test_a_missing_data_file_leaves_no_run_folder(tmp_path: Path) -> None:
    cfg = load_run_config(None, [f"data.dataset={str(tmp_path / 'nope.csv')!r}"])

    with pytest.raises(Exception):  # noqa: B017 - the data layer's own error
        write_run_folder(cfg, tmp_path / "run")

    assert not (tmp_path / "run").exists()


def test_the_run_folder_and_its_client_rows_are_owner_only(tmp_path: Path, synth_csv: Path) -> None:
    cfg = load_run_config(None, _tiny(synth_csv, "data.n_heldout_users=8"))
    run_dir = tmp_path / "run"

    write_run_folder(cfg, run_dir)

    def mode(path: Path) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(run_dir) == RUN_DIR_MODE == 0o700
    assert mode(run_dir / "data") == 0o700
    files = sorted((run_dir / "data").iterdir())
    assert "clients.npz" in [f.name for f in files]
    for f in files:
        assert mode(f) == DATA_FILE_MODE == 0o600, f.name


def test_an_existing_run_folder_is_made_owner_only(tmp_path: Path, synth_csv: Path) -> None:
    cfg = load_run_config(None, _tiny(synth_csv, "data.n_heldout_users=8"))
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o755)
    os.chmod(run_dir, 0o755)

    write_run_folder(cfg, run_dir)

    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700


# --------------------------------------------------------------------------------- the CLI


def _simulate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["simulate", *argv])
    return code, capsys.readouterr().err


def test_a_value_the_data_refuses_names_its_set_item(
    tmp_path: Path, synth_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = [arg for s in _tiny(synth_csv, "data.n_heldout_users=1000") for arg in ("--set", s)]

    code, err = _simulate(capsys, "--out", str(tmp_path / "run"), *sets)

    assert code == 2
    line = " ".join(err.split())  # rich may wrap the line on a narrow terminal
    assert "fedrec: error: --set data.n_heldout_users=1000: data.n_heldout_users = 1000" in line
    assert not (tmp_path / "run").exists()


def test_a_value_the_data_refuses_names_its_file_line(
    tmp_path: Path, synth_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'rounds = 2\n[data]\ndataset = "{synth_csv}"\nn_heldout_users = 8\n'
        "[server]\nmin_clients = 100\n[model]\ndims = [16, 8]\n"
    )

    code, err = _simulate(capsys, "--config", str(cfg), "--out", str(tmp_path / "run"))

    assert code == 2
    assert f"fedrec: error: {cfg}:6: server.min_clients = 100 exceeds" in " ".join(err.split())


@pytest.mark.parametrize(
    "extra",
    [["--set", "rounds=3"], ["--config", "simulations/configs/ml100k.toml"]],
)
def test_resume_refuses_set_and_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("rounds = 2\n")

    code, err = _simulate(capsys, "--resume", str(run_dir), *extra)

    assert code == 2
    assert (
        "--resume continues a run with its own config.toml; --set/--config are not applied"
        in " ".join(err.split())
    )
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.toml"]


def test_an_empty_config_file_stops_simulate(tmp_path: Path) -> None:
    cfg = tmp_path / "empty.toml"
    cfg.write_text("")

    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(cfg), "--out",
         str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip

    assert proc.returncode == 2
    assert f"{cfg}: empty config file" in proc.stderr
    assert not (tmp_path / "run").exists()
