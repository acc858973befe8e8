"""Group re-weighting of the local loss: the weights per client, batched == exact, and the API."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from client.local import LocalData, compute_update, group_weights
from common.config import parse, to_toml
from common.data import synthesize
from common.errors import ConfigError
from common.model import build_model, vae_loss
from common.privacy import privatize_update
from common.rounds import split_seed, train_seed
from common.run.config import FairnessConfig, RunConfig, load_run_config, run_model_config
from common.run.folder import load_client_shard, n_clients_of, write_run_folder
from common.training import train_epochs, weighted_vae_loss
from simulations.cohort_batch import client_train_rows, client_user_weights, cohort_update_sum
from simulations.fastsim import ClientEngine, _local_data, run_inprocess
from simulations.sweep_fairness import table

REWEIGHT = ["fairness.reweight={F = 2.5, M = 1.0}"]
ADVERSARY = ["fairness.adversary=gender", "fairness.adversary_hidden=5"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny per-user run whose users have a gender (one in six unknown)."""
    folder = tmp_path_factory.mktemp("tiny-reweight")
    csv = synthesize(60, 40, seed=3, out_dir=folder)
    lines = (folder / "users.csv").read_text().splitlines()
    genders = ["F", "M", "M", "F", "M", ""]
    rows = [f"{line},{genders[i % 6]}" for i, line in enumerate(lines[1:])]
    (folder / "users.csv").write_text("\n".join([f"{lines[0]},gender", *rows]) + "\n")
    path = folder / "tiny.toml"
    settings = [
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
    path.write_text("\n".join(settings) + "\n")
    return path


def _prepared(tiny: Path, run_dir: Path, sets: list[str]) -> RunConfig:
    cfg = load_run_config(tiny, sets)
    write_run_folder(cfg, run_dir)
    return cfg


# ----------------------------------------------------------------------------- the config


def test_reweight_table_is_parsed_sorted_and_round_trips() -> None:
    cfg = load_run_config(None, ["fairness.reweight={M = 1, F = 2.0}"])

    assert cfg.fairness.reweight == (("F", 2.0), ("M", 1.0))
    assert cfg.fairness.group_weights == {"F": 2.0, "M": 1.0}
    assert cfg.fairness.reweight_attribute == "gender"
    again = parse(RunConfig, tomllib.loads(to_toml(cfg)))  # config.toml's way
    assert again.fairness == cfg.fairness
    assert FairnessConfig().reweight == () and FairnessConfig().group_weights == {}


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ("fairness.reweight={F = 0.0}", "finite and > 0"),
        ("fairness.reweight={F = -1.0}", "finite and > 0"),
        ("fairness.reweight={f = 2.0}", "classes ['f']"),
        ("fairness.reweight={F = true}", "must be a number"),
        ("fairness.reweight=2.0", "must be a table"),
        ("fairness.reweight_attribute=height", "reweight_attribute must be one of"),
    ],
)
def test_bad_reweight_tables_are_refused_naming_the_key(item: str, words: str) -> None:
    with pytest.raises(ConfigError, match=r"fairness\.reweight") as err:
        load_run_config(None, [item])

    assert words in str(err.value)


# ----------------------------------------------------------------------------- the weights


def test_group_weights_follow_each_users_class() -> None:
    fairness = FairnessConfig(reweight={"F": 2.0})
    attributes = {"gender": np.array(["F", "M", "", "F"])}

    weights = group_weights(fairness, attributes, 4)

    assert weights is not None and weights.dtype == np.float32
    assert weights.tolist() == [2.0, 1.0, 1.0, 2.0]  # M not in the table, '' unknown: 1
    assert group_weights(FairnessConfig(), attributes, 4) is None
    assert group_weights(fairness, {}, 3) is not None  # a device without a profile: all 1
    assert group_weights(fairness, {}, 3).tolist() == [1.0, 1.0, 1.0]  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="values for 5 users"):
        group_weights(fairness, attributes, 5)


def test_client_user_weights_are_each_clients_own(tiny: Path, tmp_path: Path) -> None:
    cfg = _prepared(tiny, tmp_path, REWEIGHT)
    clients = list(range(n_clients_of(tmp_path)))

    weights = client_user_weights(tmp_path, clients, cfg.fairness)

    assert weights is not None
    for c in clients:
        shard = load_client_shard(tmp_path, c)
        own = group_weights(cfg.fairness, shard.attributes, shard.n_users)
        assert own is not None and own.tolist() == [weights[c]], c
    assert set(weights.tolist()) == {1.0, 2.5}
    assert client_user_weights(tmp_path, clients, load_run_config(tiny, []).fairness) is None


# ----------------------------------------------------------------------------- the loss


def test_weighted_loss_is_the_mean_of_weighted_user_terms() -> None:
    model_cfg = load_run_config(None, ADVERSARY).fairness.model_config(
        run_model_config(load_run_config(None, []), 12)
    )
    model = build_model(model_cfg, generator=torch.Generator().manual_seed(0))
    model.eval()
    x = (torch.rand(3, 12, generator=torch.Generator().manual_seed(1)) > 0.6).float()  # (3, 12)
    labels = torch.tensor([0, 1, -1])
    output = model(x)

    def term(i: int) -> torch.Tensor:  # vae_loss of row i alone is its per-user term
        one = type(output)(*(None if t is None else t[i : i + 1] for t in output))
        return vae_loss(one, x[i : i + 1], beta=0.3, labels=labels[i : i + 1])

    w = torch.tensor([2.0, 1.0, 0.5])

    got = weighted_vae_loss(output, x, w, beta=0.3, labels=labels)

    expected = (2.0 * term(0) + term(1) + 0.5 * term(2)) / 3
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    ones = weighted_vae_loss(output, x, torch.ones(3), beta=0.3, labels=labels)
    assert float(ones) == pytest.approx(float(vae_loss(output, x, beta=0.3, labels=labels)))


def test_train_epochs_refuses_bad_user_weights() -> None:
    model_cfg = run_model_config(load_run_config(None, []), 12)
    model = build_model(model_cfg)
    data = (np.random.default_rng(0).random((4, 12)) > 0.5).astype(np.float32)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)

    for bad, words in [(np.ones(3), "shape"), (np.array([1.0, 0.0, 1.0, 1.0]), "> 0")]:
        with pytest.raises(ValueError, match=words):
            train_epochs(
                model, data, epochs=1, batch_size=2, optimizer=sgd, beta_schedule=None,
                user_weights=bad.astype(np.float32),
            )  # fmt: skip


def test_unit_weights_change_nothing(tiny: Path, tmp_path: Path) -> None:
    """Weights of 1 give the update of no weights, bit for bit (the default path is vae_loss)."""
    cfg = _prepared(tiny, tmp_path, [])
    model_cfg = run_model_config(cfg, 40)
    state = build_model(model_cfg, generator=torch.Generator().manual_seed(1)).state_dict()
    shard = load_client_shard(tmp_path, 0)
    local = LocalData(train=shard.rows, foldin=shard.rows, holdout=shard.rows)

    def update(user_weights: np.ndarray | None) -> dict[str, np.ndarray]:
        return compute_update(
            state,
            local,
            model_config=model_cfg,
            client=cfg.client,
            beta=0.1,
            seed=4,
            user_weights=user_weights,
        ).delta

    plain = update(None)
    ones = update(np.ones(local.n_users, np.float32))

    for k in plain:
        np.testing.assert_allclose(ones[k], plain[k], rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- the engines


@pytest.mark.parametrize("adversary", [False, True])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_cohort_sum_with_reweighting_equals_compute_updates(
    tiny: Path, tmp_path: Path, clip: float | None, adversary: bool
) -> None:
    """Batched one-step SGD with user weights == per-client compute_update with them."""
    sets = [*REWEIGHT, "client.lr=0.5", *(ADVERSARY if adversary else [])]
    cfg = _prepared(tiny, tmp_path, sets)
    model_cfg = run_model_config(cfg, 40)
    init = build_model(model_cfg, generator=torch.Generator().manual_seed(1))
    weights = {k: v.detach().numpy().copy() for k, v in init.state_dict().items()}
    cohort = [0, 3, 4, 9, 17, 30, 31]
    seeds = [train_seed(cfg.seed, 5, c) for c in cohort]
    fraction = cfg.data.client_holdout_fraction
    user_weights = client_user_weights(tmp_path, cohort, cfg.fairness)
    assert user_weights is not None and set(user_weights.tolist()) == {1.0, 2.5}
    expected = {k: np.zeros(v.shape) for k, v in weights.items()}
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    labels = None
    if adversary:
        from simulations.cohort_batch import client_labels

        labels = client_labels(tmp_path, cohort, cfg.fairness)
    for i, (c, seed) in enumerate(zip(cohort, seeds, strict=True)):
        local = _local_data(str(tmp_path), c, fraction, split_seed(cfg.seed, c))
        update = compute_update(
            state,
            local,
            model_config=model_cfg,
            client=cfg.client,
            beta=0.1,
            seed=seed,
            labels=None if labels is None else labels[i : i + 1],
            user_weights=user_weights[i : i + 1],
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

    total, _ = cohort_update_sum(
        weights,
        model_cfg,
        rows,
        seeds,
        beta=0.1,
        lr=cfg.client.lr,
        clip=clip,
        labels=labels,
        user_weights=user_weights,
    )
    unweighted, _ = cohort_update_sum(
        weights, model_cfg, rows, seeds, beta=0.1, lr=cfg.client.lr, clip=clip, labels=labels
    )

    for k in expected:
        np.testing.assert_allclose(total[k], expected[k], atol=2e-6, rtol=1e-4, err_msg=k)
    change = np.abs(total["decoder.1.weight"] - unweighted["decoder.1.weight"]).max()
    if clip is None:
        assert change > 1e-6
    else:  # every delta is clipped to norm C: a weight scales a delta that clipping rescales
        assert change < 1e-6


def test_exact_and_batched_engines_agree_with_reweighting(tiny: Path, tmp_path: Path) -> None:
    cfg = _prepared(tiny, tmp_path, REWEIGHT)

    exact = run_inprocess(cfg, tmp_path, out=tmp_path / "exact", engine=ClientEngine.EXACT)
    batched = run_inprocess(cfg, tmp_path, out=tmp_path / "batched", engine=ClientEngine.AUTO)
    plain = run_inprocess(
        load_run_config(tiny, []), tmp_path, out=tmp_path / "plain", engine=ClientEngine.AUTO
    )

    assert batched.client_engine is ClientEngine.BATCHED
    for k in ("ndcg@100", "recall@20"):
        assert batched.final["test"][k] == pytest.approx(exact.final["test"][k], abs=1e-4)
    assert batched.final["test"]["ndcg@100"] != plain.final["test"]["ndcg@100"]


@pytest.mark.slow
def test_a_flower_run_reweights_as_the_inprocess_engines(tiny: Path, tmp_path: Path) -> None:
    """Through Flower (``client/app.py`` reads each shard's gender): the in-process metrics."""
    config = tmp_path / "reweight.toml"
    config.write_text(tiny.read_text() + "[fairness]\nreweight = {F = 2.5, M = 1.0}\n")
    run_dir = tmp_path / "flower"
    argv = ["simulate", "--config", str(config), "--out", str(run_dir)]

    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr[-2000:]
    flower = json.loads((run_dir / "results.json").read_text())
    cfg = load_run_config(run_dir / "config.toml")  # the table survives the run folder
    assert cfg.fairness.group_weights == {"F": 2.5, "M": 1.0}
    ours = run_inprocess(cfg, run_dir, out=tmp_path / "ours", engine=ClientEngine.AUTO)
    for theirs, mine in zip(flower["rounds"], ours.rounds, strict=True):
        assert mine["ndcg@100"] == pytest.approx(theirs["ndcg@100"], abs=1e-4)
    assert ours.final["test"]["ndcg@100"] == pytest.approx(
        flower["final"]["test"]["ndcg@100"], abs=1e-4
    )


def test_the_sweep_table_names_the_reweighting() -> None:
    gap = {"m_minus_f": 0.01, "groups": {"F": {"n": 3}, "M": {"n": 5}}}
    point = {
        "adversary_weight": 0.0,
        "fairness": {"reweight": [["F", 2.0], ["M", 1.0]], "reweight_attribute": "gender"},
        "test": {"ndcg@100": 0.3},
        "gender_gap": gap,
        "gender_gap_validation_and_test": gap,
        "attacker": {"auc": 0.8, "chance": {"mean": 0.5, "p95": 0.55}},
        "head_auc": None,
    }

    text = table({"datasets": {"ml-1m": {"points": [point]}}})

    assert "| ml-1m | 0 | reweight gender F2 M1 | 0.3000 |" in text


def test_reweighting_by_an_attribute_the_data_lacks_or_under_dpsgd_is_refused() -> None:
    from common.errors import ConfigError
    from common.run.config import check_fairness, load_run_config

    cfg = load_run_config(None, ["fairness.reweight={F = 2.0, M = 1.0}"])
    with pytest.raises(ConfigError, match=r"fairness\.reweight_attribute = 'gender'"):
        check_fairness(cfg, ["age"])
    check_fairness(cfg, ["gender"])  # the data has it: accepted
    dpsgd = ["privacy.mode=example", "privacy.target_epsilon=4"]
    with pytest.raises(ConfigError, match=r"fairness\.reweight is not supported"):
        load_run_config(None, ["fairness.reweight={F = 2.0, M = 1.0}", *dpsgd])
