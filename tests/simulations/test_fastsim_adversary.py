"""On-device adversarial debiasing in the in-process engine: batched == exact, labels per client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from client.local import adversary_labels, compute_update
from common.data import synthesize
from common.model import build_model
from common.privacy import privatize_update
from common.rounds import split_seed, train_seed
from common.run.config import RunConfig, load_run_config, run_model_config
from common.run.folder import load_client_shard, n_clients_of, write_run_folder
from simulations.cohort_batch import client_labels, client_train_rows, cohort_update_sum
from simulations.fastsim import ClientEngine, _local_data, run_inprocess

ADVERSARY = [
    "fairness.adversary=gender",
    "fairness.adversary_weight=2",
    "fairness.adversary_hidden=5",
    "fairness.adversary_speed=3",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny per-user run whose users have a gender (one in six unknown)."""
    folder = tmp_path_factory.mktemp("tiny-fair")
    csv = synthesize(60, 40, seed=3, out_dir=folder)
    lines = (folder / "users.csv").read_text().splitlines()
    genders = ["F", "M", "M", "F", "M", ""]
    rows = [f"{line},{genders[i % 6]}" for i, line in enumerate(lines[1:])]
    (folder / "users.csv").write_text("\n".join([f"{lines[0]},gender", *rows]) + "\n")
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


def _prepared(tiny: Path, run_dir: Path, sets: list[str]) -> RunConfig:
    cfg = load_run_config(tiny, sets)
    write_run_folder(cfg, run_dir)
    return cfg


def test_client_labels_are_each_clients_own_attribute(tiny: Path, tmp_path: Path) -> None:
    cfg = _prepared(tiny, tmp_path, ADVERSARY)
    clients = list(range(n_clients_of(tmp_path)))

    labels = client_labels(tmp_path, clients, cfg.fairness)

    assert labels is not None
    for c in clients:
        shard = load_client_shard(tmp_path, c)
        own = adversary_labels(cfg.fairness, shard.attributes, shard.n_users)
        assert own is not None and own.tolist() == [labels[c]], c
    assert set(labels.tolist()) == {-1, 0, 1}  # unknowns are kept as -1
    assert client_labels(tmp_path, clients, load_run_config(tiny, []).fairness) is None


VARIANTS = {
    "one-head": [],
    "heads": ["fairness.adversary_heads=3"],
    "confuse-balanced": [
        "fairness.adversary_heads=2",
        "fairness.adversary_objective=confuse",
        "fairness.adversary_balance=true",
    ],
    "linear-confuse": ["fairness.adversary_hidden=0", "fairness.adversary_objective=confuse"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("clip", [None, 0.05])
def test_cohort_sum_with_adversary_equals_compute_updates(
    tiny: Path, tmp_path: Path, clip: float | None, variant: str
) -> None:
    """Batched one-step SGD with the adversary heads == per-client compute_update with labels."""
    cfg = _prepared(tiny, tmp_path, [*ADVERSARY, "client.lr=0.5", *VARIANTS[variant]])
    model_cfg = run_model_config(cfg, 40)
    init = build_model(model_cfg, generator=torch.Generator().manual_seed(1))
    weights = {k: v.detach().numpy().copy() for k, v in init.state_dict().items()}
    cohort = [0, 3, 4, 9, 17, 30, 31]
    seeds = [train_seed(cfg.seed, 5, c) for c in cohort]
    fraction = cfg.data.client_holdout_fraction
    labels = client_labels(tmp_path, cohort, cfg.fairness)
    assert labels is not None and set(labels.tolist()) == {-1, 0, 1}
    expected = {k: np.zeros(v.shape) for k, v in weights.items()}
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    for c, seed, label in zip(cohort, seeds, labels, strict=True):
        local = _local_data(str(tmp_path), c, fraction, split_seed(cfg.seed, c))
        update = compute_update(
            state,
            local,
            model_config=model_cfg,
            client=cfg.client,
            beta=0.1,
            seed=seed,
            labels=np.array([label]),
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
        weights, model_cfg, rows, seeds, beta=0.1, lr=cfg.client.lr, clip=clip, labels=labels
    )

    assert set(total) == set(weights)  # the head is part of the update
    last = "adversary.0" if cfg.fairness.adversary_hidden == 0 else "adversary.1"
    if cfg.fairness.adversary_heads > 1:
        last = f"adversary.{cfg.fairness.adversary_heads - 1}.{last[-1]}"
    assert np.abs(total[f"{last}.weight"]).max() > 0
    if clip is not None:
        assert np.all(norms > clip)
    for k in expected:
        np.testing.assert_allclose(total[k], expected[k], atol=2e-6, rtol=1e-4, err_msg=k)


def test_the_reversal_changes_the_encoders_update(tiny: Path, tmp_path: Path) -> None:
    """Known labels move the encoder differently from unknown ones; the decoder not at all."""
    cfg = _prepared(tiny, tmp_path, ADVERSARY)
    model_cfg = run_model_config(cfg, 40)
    init = build_model(model_cfg, generator=torch.Generator().manual_seed(1))
    weights = {k: v.detach().numpy().copy() for k, v in init.state_dict().items()}
    cohort = [0, 1, 2, 3]
    seeds = [train_seed(cfg.seed, 1, c) for c in cohort]
    rows = client_train_rows(tmp_path, cohort, fraction=0.2, split_seeds=[1, 2, 3, 4])

    def total(labels: np.ndarray) -> dict[str, np.ndarray]:
        out, _ = cohort_update_sum(
            weights, model_cfg, rows, seeds, beta=0.1, lr=0.5, clip=None, labels=labels
        )
        return out

    known, unknown = total(np.array([0, 1, 1, 0])), total(np.full(4, -1))

    assert np.abs(known["encoder.1.weight"] - unknown["encoder.1.weight"]).max() > 1e-6
    np.testing.assert_array_equal(known["decoder.0.weight"], unknown["decoder.0.weight"])
    assert np.abs(unknown["adversary.0.weight"]).max() == 0.0


def test_exact_and_batched_engines_agree_with_the_adversary(tiny: Path, tmp_path: Path) -> None:
    cfg = _prepared(tiny, tmp_path, ADVERSARY)

    exact = run_inprocess(cfg, tmp_path, out=tmp_path / "exact", engine=ClientEngine.EXACT)
    batched = run_inprocess(cfg, tmp_path, out=tmp_path / "batched", engine=ClientEngine.AUTO)
    plain = run_inprocess(
        load_run_config(tiny, []), tmp_path, out=tmp_path / "plain", engine=ClientEngine.AUTO
    )

    assert batched.client_engine is ClientEngine.BATCHED
    for k in ("ndcg@100", "recall@20"):
        assert batched.final["test"][k] == pytest.approx(exact.final["test"][k], abs=1e-4)
    assert batched.final["test"]["ndcg@100"] != plain.final["test"]["ndcg@100"]


def test_fairness_sweep_runs_at_a_tiny_size(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "simulations.sweep_fairness",
        "--config",
        str(tiny),
        "--weights",
        "0",
        "2",
        "--rounds",
        "2",
        "--permutations",
        "2",
        "--out",
        str(out),
    ]

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)

    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "fairness.json").read_text())
    points = result["datasets"]["tiny"]["points"]
    assert [p["adversary_weight"] for p in points] == [0.0, 2.0]
    for p in points:
        assert 0.0 <= p["test"]["ndcg@100"] <= 1.0
        assert set(p["gender_gap"]["groups"]) <= {"F", "M"}
    assert "attacker AUC" in done.stdout
