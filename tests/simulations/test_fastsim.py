"""The in-process engine runs the rounds a Flower run of fedrec runs (tiny synthetic data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.local import compute_update
from common.data import synthesize
from common.model import build_model
from common.privacy import privatize_update
from common.privacy.audit import AuditStatus, render, verify_ledger
from common.rounds import split_seed, train_seed
from common.run.config import RunConfig, load_run_config
from common.run.folder import n_clients_of, write_run_folder
from server.strategy import sample_cohort
from simulations.cohort_batch import client_train_rows, cohort_update_sum
from simulations.fastsim import ClientEngine, _local_data, run_inprocess

FEDREC = [sys.executable, "-m", "simulations.cli"]
METRICS = ("ndcg@100", "recall@20", "recall@50", "coverage@20")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny per-user run config (the one of tests/simulations/test_simulate.py)."""
    folder = tmp_path_factory.mktemp("tiny")
    csv = synthesize(60, 40, seed=3, out_dir=folder)
    path = folder / "tiny.toml"
    path.write_text(
        "\n".join(
            [
                'name = "tiny"',
                "rounds = 3",
                "eval_every = 1",
                "reference = false",
                "[data]",
                f'dataset = "{csv}"',
                "n_heldout_users = 8",
                "[model]",
                "dims = [16, 8]",
                "[server]",
                "sample_rate = 0.5",
                "lr = 0.01",
                "round_timeout = 120",
            ]
        )
        + "\n"
    )
    return path


def _prepared(tiny: Path, run_dir: Path, sets: list[str] | None = None) -> RunConfig:
    cfg = load_run_config(tiny, sets or [])
    write_run_folder(cfg, run_dir)
    return cfg


def test_batched_rows_are_split_locals_training_rows(tiny: Path, tmp_path: Path) -> None:
    cfg = _prepared(tiny, tmp_path)
    clients = list(range(n_clients_of(tmp_path)))
    fraction = cfg.data.client_holdout_fraction

    rows = client_train_rows(
        tmp_path, clients, fraction=fraction, split_seeds=[split_seed(cfg.seed, c) for c in clients]
    )

    for c in clients:
        local = _local_data(str(tmp_path), c, fraction, split_seed(cfg.seed, c))
        assert sorted(rows[c].indices) == sorted(local.train.indices), c


@pytest.mark.parametrize("clip", [None, 0.05])
def test_cohort_sum_equals_the_sum_of_compute_updates(
    tiny: Path, tmp_path: Path, clip: float | None
) -> None:
    """Batched one-step SGD (with ghost-norm clipping) == per-client compute_update (+ clip)."""
    cfg = _prepared(tiny, tmp_path, ["client.lr=0.5"])
    model_cfg = cfg.model.to_model_config(40)
    init = build_model(model_cfg, generator=torch.Generator().manual_seed(1))
    weights = {k: v.detach().numpy().copy() for k, v in init.state_dict().items()}
    cohort = [0, 3, 4, 9, 17, 30]
    seeds = [train_seed(cfg.seed, 5, c) for c in cohort]
    fraction = cfg.data.client_holdout_fraction
    expected = {k: np.zeros(v.shape) for k, v in weights.items()}
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    for c, seed in zip(cohort, seeds, strict=True):
        local = _local_data(str(tmp_path), c, fraction, split_seed(cfg.seed, c))
        update = compute_update(
            state, local, model_config=model_cfg, client=cfg.client, beta=0.1, seed=seed
        )
        private = privatize_update(
            update.delta,
            weight=update.weight,
            clip=clip or 1e9,
            noise_std=0.0,
            denominator=1.0,
            rng=np.random.default_rng(0),
        )
        for k in expected:
            expected[k] += private[k]

    rows = client_train_rows(
        tmp_path, cohort, fraction=fraction, split_seeds=[split_seed(cfg.seed, c) for c in cohort]
    )
    total, norms = cohort_update_sum(
        weights, model_cfg, rows, seeds, beta=0.1, lr=cfg.client.lr, clip=clip
    )

    if clip is not None:
        assert np.all(norms > clip)  # every client was clipped: the clip path is exercised
    for k in expected:
        np.testing.assert_allclose(total[k], expected[k], atol=2e-6, rtol=1e-4, err_msg=k)


def test_exact_and_batched_engines_agree_without_dp(tiny: Path, tmp_path: Path) -> None:
    cfg = _prepared(tiny, tmp_path)

    exact = run_inprocess(cfg, tmp_path, out=tmp_path / "exact", engine=ClientEngine.EXACT)
    batched = run_inprocess(cfg, tmp_path, out=tmp_path / "batched", engine=ClientEngine.AUTO)

    assert batched.client_engine is ClientEngine.BATCHED
    assert [r["sampled"] for r in exact.rounds] == [r["sampled"] for r in batched.rounds]
    for k in METRICS:
        assert batched.final["test"][k] == pytest.approx(exact.final["test"][k], abs=1e-4)
    saved = json.loads((tmp_path / "batched" / "results.json").read_text())
    assert saved["engine"] == "inprocess" and saved["client_engine"] == "batched"


def test_dp_run_stays_within_target_and_its_ledger_verifies(tiny: Path, tmp_path: Path) -> None:
    cfg = _prepared(tiny, tmp_path, ["privacy.mode=client", "privacy.target_epsilon=4"])

    result = run_inprocess(cfg, tmp_path, noise_seed=0)

    privacy = result.final["privacy"]
    assert 0 < privacy["epsilon"] <= 4.0
    assert privacy["epsilon"] <= privacy["epsilon_rdp"]
    assert privacy["delta"] == pytest.approx(n_clients_of(tmp_path) ** -1.1)
    participated = [r["participated"] for r in result.rounds]
    assert participated == [r["sampled"] for r in result.rounds]
    report = verify_ledger(tmp_path, budget=4.0)
    assert report.status is AuditStatus.VERIFIED, report.reason


@pytest.mark.parametrize("engine", [ClientEngine.EXACT, ClientEngine.BATCHED])
def test_noise_seed_repeats_a_dp_run_and_the_ledger_says_so(
    tiny: Path, tmp_path: Path, engine: ClientEngine
) -> None:
    # Prepare: DP on, noise seeded through the config (privacy.noise_seed)
    sets = ["privacy.mode=client", "privacy.noise_multiplier=1.0", "privacy.noise_seed=7"]
    cfg = _prepared(tiny, tmp_path, sets)

    # Execute: twice with seed 7, once with seed 8 (the argument overrides the config's)
    first = run_inprocess(cfg, tmp_path, out=tmp_path / "a", engine=engine)
    again = run_inprocess(cfg, tmp_path, out=tmp_path / "b", engine=engine)
    other = run_inprocess(cfg, tmp_path, out=tmp_path / "c", engine=engine, noise_seed=8)

    # Assert: the same seed gives the same numbers, round by round; another seed others
    def numbers(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rounds]

    assert numbers(first.rounds) == numbers(again.rounds) and first.final == again.final
    assert [r["sampled"] for r in other.rounds] == [r["sampled"] for r in first.rounds]
    assert other.final["test"]["ndcg@100"] != first.final["test"]["ndcg@100"]
    # ...the ledger header records the seed, and the audit verifies with a warning
    for out, seed in ((tmp_path / "a", 7), (tmp_path / "c", 8)):
        header = json.loads((out / "ledger.jsonl").read_text().splitlines()[0])
        assert header["noise"] == "seeded, not private" and header["noise_seed"] == seed
        assert header["config"]["privacy"]["noise_seed"] == seed
        report = verify_ledger(out)
        assert report.status is AuditStatus.VERIFIED, report.reason
        warning = f"WARNING: noise seeded (privacy.noise_seed = {seed}): a repeatable simulation"
        assert render(report).splitlines()[1].startswith(warning)


def test_without_noise_seed_dp_noise_is_os_entropy(tiny: Path, tmp_path: Path) -> None:
    cfg = _prepared(tiny, tmp_path, ["privacy.mode=client", "privacy.noise_multiplier=1.0"])

    first = run_inprocess(cfg, tmp_path, out=tmp_path / "a", engine=ClientEngine.EXACT)
    again = run_inprocess(cfg, tmp_path, out=tmp_path / "b", engine=ClientEngine.EXACT)

    assert first.final["test"]["ndcg@100"] != again.final["test"]["ndcg@100"]
    header = json.loads((tmp_path / "a" / "ledger.jsonl").read_text().splitlines()[0])
    assert header["noise"] == "os-entropy" and header["noise_seed"] is None
    report = verify_ledger(tmp_path / "a")
    assert report.status is AuditStatus.VERIFIED and report.warnings == []


@pytest.mark.slow
def test_inprocess_reproduces_a_flower_run_without_dp(tiny: Path, tmp_path: Path) -> None:
    """Same seed, DP off: the same cohorts and the same test metrics as ``fedrec simulate``.

    Flower's records name how many clients a round sampled, not which: the cohorts are
    compared by size, and by the metrics after every round, which any different cohort would
    change. The in-process cohorts are also checked against the strategy's own sampler.
    """
    run_dir = tmp_path / "flower"
    proc = subprocess.run(
        [*FEDREC, "simulate", "--config", str(tiny), "--out", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    flower = json.loads((run_dir / "results.json").read_text())
    cfg = load_run_config(run_dir / "config.toml")
    population = n_clients_of(run_dir)

    for engine in (ClientEngine.EXACT, ClientEngine.BATCHED):
        ours = run_inprocess(cfg, run_dir, out=tmp_path / engine.value, engine=engine)

        for theirs, mine in zip(flower["rounds"], ours.rounds, strict=True):
            cohort = sample_cohort(
                list(range(population)),
                cfg.server,
                np.random.default_rng([cfg.seed, mine["round"]]),
            )
            assert mine["sampled"] == theirs["sampled"] == len(cohort)
            assert mine["returned"] == theirs["returned"]
            assert mine["ndcg@100"] == pytest.approx(theirs["ndcg@100"], abs=1e-4)
        for k in METRICS:
            assert ours.final["test"][k] == pytest.approx(flower["final"]["test"][k], abs=1e-4)


@pytest.mark.slow
def test_inprocess_reproduces_a_seeded_dp_flower_run(tiny: Path, tmp_path: Path) -> None:
    """DP on with ``privacy.noise_seed``: the Flower ClientApp and the exact engine draw each
    client's noise from the same (seed, round, client) stream, so every number agrees."""
    run_dir = tmp_path / "flower"
    sets = ["privacy.mode=client", "privacy.noise_multiplier=1.0", "privacy.noise_seed=7"]
    argv = ["simulate", "--config", str(tiny), "--out", str(run_dir)]
    for item in sets:
        argv += ["--set", item]
    proc = subprocess.run([*FEDREC, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    flower = json.loads((run_dir / "results.json").read_text())

    ours = run_inprocess(
        load_run_config(run_dir / "config.toml"),
        run_dir,
        out=tmp_path / "exact",
        engine=ClientEngine.EXACT,
    )

    for theirs, mine in zip(flower["rounds"], ours.rounds, strict=True):
        assert mine["sampled"] == theirs["sampled"]
        assert mine["ndcg@100"] == theirs["ndcg@100"]
    assert ours.final["test"] == flower["final"]["test"]


@pytest.mark.slow
def test_population_sweep_runs_at_a_tiny_size(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.sweep_privacy",
            "--config",
            str(tiny),
            "--engine",
            "inprocess",
            "--populations",
            "20",
            "40",
            "--epsilons",
            "4",
            "inf",
            "--set",
            "rounds=2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["engine"] == "inprocess"
    assert [p["population"] for p in sweep["populations"]] == [20, 40]
    for pop in sweep["populations"]:
        assert [pt["target_epsilon"] for pt in pop["points"]] == [4, None]
        assert 0 < pop["points"][0]["epsilon"] <= 4
        assert 0 <= pop["popularity_ndcg@100"] <= 1
    assert (out / "sweep.csv").read_text().count("\n") == 5
    assert (out / "privacy_utility.png").stat().st_size > 0
