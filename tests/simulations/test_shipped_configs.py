"""Every shipped config trains stably for a few rounds, with privacy on and off.

Each config's own model, client and server settings run three rounds on its data (ML-100K, or a
synthetic stand-in for a data set that is not shipped) without Flower: privacy off and
client-level DP through the in-process engine's exact client engine (each client a real
:func:`client.local.compute_update`, so a diverging client is counted as failed), DP-SGD silos
through :func:`client.dpsgd.dpsgd_update` and the server's own aggregation. A round must apply
its update and no client may go non-finite. Encryption is left out (the sum is the same up to
CKKS noise).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from common import rounds
from common.data import synthesize
from common.errors import FedrecError
from common.model import anneal_beta, build_model
from common.privacy import plan_privacy
from common.rounds import split_seed
from common.run.config import Partition, PrivacyMode, RunConfig, load_run_config
from common.run.folder import client_sizes, load_client_shard, load_eval_data, write_run_folder
from server.aggregation import apply_sum_inplace
from server.optimizer import cosine_lr_scale, make_server_optimizer
from simulations.fastsim import ClientEngine, run_inprocess

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_LOCAL = ROOT / "server" / "deploy" / "configs" / "local.toml"
CONFIGS = [*sorted((ROOT / "simulations" / "configs").glob("*.toml")), DEPLOY_LOCAL]
ROUNDS = 3
PER_USER_CLIENTS = 150
"""Per-user configs run on their first 150 clients (``simulation.max_clients``): a handful a
round at their sampling rate."""
SLOW = {"ml100k-plain.toml", "ml100k-silos.toml", "ml100k-silos-dpsgd.toml"}
"""[200, 64] models trained on all of ML-100K's silos or with many local steps: several seconds
each on a shared core."""


def _id(path: Path) -> str:
    return f"{path.parent.parent.name}/{path.name}"


@pytest.fixture(scope="module")
def ml100k() -> str:
    """``ml-100k`` when it is cached or can be fetched; else the tests that need it skip."""
    from common.data import load_dataset

    try:
        load_dataset("ml-100k")
    except (FedrecError, OSError) as err:  # pragma: no cover - offline without a cache
        pytest.skip(f"ML-100K is not available: {err}")
    return "ml-100k"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for a data set a config names but the repository does not ship, its users
    given a gender (for a config that trains the gender adversary)."""
    path = synthesize(1200, 400, seed=5, out_dir=tmp_path_factory.mktemp("synth"))
    users = (path.parent / "users.csv").read_text().splitlines()
    rows = [f"{line},{'FM'[k % 2]}" for k, line in enumerate(users[1:])]
    (path.parent / "users.csv").write_text("\n".join([users[0] + ",gender", *rows]) + "\n")
    return path


def _warm_alone(path: Path) -> bool:
    """Whether ``path`` ships the warm start alone (``rounds = 0``, ``warm_start.share = 1``)."""
    cfg = load_run_config(path, [])
    return cfg.warm_start.enabled and cfg.rounds == 0


WARM_ALONE = [path for path in CONFIGS if _warm_alone(path)]
"""The configs that run the DP warm start alone."""


def _variant(
    path: Path, privacy: str, ml100k: str, synthetic: Path, *, rounds: int = ROUNDS
) -> RunConfig:
    """``path``'s config for a short test: privacy ``off`` or ``on`` (its own DP mode, else
    client-level DP), ``rounds`` rounds, no encryption, z = 1 instead of a calibration.

    A warm start alone (``rounds = 0``) gets ``ROUNDS`` fine-tuning rounds on half the budget
    (``warm_start.share = 0.5``), its model and client settings trained from the warm start;
    with ``rounds = 0`` it runs as shipped. A warm start keeps its target epsilon (the
    releases are calibrated for it), so z is then calibrated too.
    """
    sets = [f"rounds={rounds}", f"eval_every={max(rounds, 1)}", "reference=false"]
    sets.append("encryption.enabled=false")
    if path == DEPLOY_LOCAL:
        sets.append("data.n_silos=2")  # `fedrec deploy local --clients 2`, where it diverged
    if rounds > 0 and _warm_alone(path):
        sets.append("warm_start.share=0.5")
    cfg = load_run_config(path, sets)
    if cfg.data.partition is Partition.PER_USER:
        cfg = replace(cfg, simulation=replace(cfg.simulation, max_clients=PER_USER_CLIENTS))
    if cfg.data.dataset != "ml-100k":
        # a data set that is not shipped: synthetic users, enough of them sampled per round
        data = replace(cfg.data, dataset=str(synthetic), n_heldout_users=100)
        server = replace(cfg.server, sample_rate=max(cfg.server.sample_rate, 0.05))
        cfg = replace(cfg, data=data, server=server)
    if privacy == "off":
        return replace(cfg, privacy=replace(cfg.privacy, mode=PrivacyMode.OFF))
    if cfg.warm_start.enabled:
        return cfg  # its own client-level DP at its target epsilon
    mode = cfg.privacy.mode if cfg.privacy.mode is not PrivacyMode.OFF else PrivacyMode.CLIENT
    dp = replace(cfg.privacy, mode=mode, noise_multiplier=1.0, target_epsilon=None)
    return replace(cfg, privacy=dp)


def _dpsgd_rounds(cfg: RunConfig, run_dir: Path) -> list[float]:
    """``ROUNDS`` rounds of DP-SGD silos and the server's weighted mean; the silos' mean losses.

    Raises if a silo's DP-SGD loss or update goes non-finite (``dpsgd_update`` raises on a
    non-finite loss).
    """
    from client.dpsgd import DPSGDConfig, dpsgd_update
    from client.local import nonfinite_reason, split_local

    plan = plan_privacy(cfg, len(client_sizes(run_dir)), silo_sizes=client_sizes(run_dir))
    assert plan is not None
    data = load_eval_data(run_dir)
    model_cfg = cfg.model.to_model_config(len(data.item_ids))
    init = build_model(model_cfg, generator=torch.Generator().manual_seed(cfg.seed))
    weights = {k: v.detach().numpy().copy() for k, v in init.state_dict().items()}
    optimizer = make_server_optimizer(cfg.server)
    dp_cfg = DPSGDConfig(
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.clip,
        lr=cfg.client.lr,
        batch_size=cfg.client.batch_size,
        epochs=cfg.client.local_epochs,
    )
    losses = []
    for rnd in range(1, ROUNDS + 1):
        beta = anneal_beta(rnd, cap=cfg.model.beta_cap, total_steps=cfg.model.anneal_steps)
        state = {k: torch.from_numpy(v) for k, v in weights.items()}
        total: dict[str, np.ndarray] = {
            k: np.zeros(v.shape, np.float64) for k, v in weights.items()
        }
        weight = 0.0
        for cid in range(len(client_sizes(run_dir))):
            rows = load_client_shard(run_dir, cid).rows
            local = split_local(
                rows, fraction=cfg.data.client_holdout_fraction, seed=split_seed(cfg.seed, cid)
            )
            result = dpsgd_update(
                state,
                local.train,
                model_config=model_cfg,
                cfg=dp_cfg,
                beta=beta,
                seed=rnd * 97 + cid,
            )
            assert nonfinite_reason(result.delta) is None, (rnd, cid)
            assert math.isfinite(result.mean_loss), (rnd, cid)
            losses.append(result.mean_loss)
            for k, v in result.delta.items():
                total[k] += local.n_users * v
            weight += local.n_users
        apply_sum_inplace(
            weights,
            total,
            denominator=weight,
            optimizer=optimizer,
            lr_scale=cosine_lr_scale(
                rnd, rounds=cfg.rounds, final_fraction=cfg.server.lr_final_fraction
            ),
        )
    final = rounds.test_metrics(model_cfg, weights, data)
    assert all(math.isfinite(v) for v in final.values()), final
    return losses


def _slow(path: Path, privacy: str) -> bool:
    """:data:`SLOW` configs, and DP-SGD on deploy local's two silos of 369 users."""
    return path.name in SLOW or (path == DEPLOY_LOCAL and privacy == "on")


@pytest.mark.parametrize(
    ("path", "privacy"),
    [
        pytest.param(
            path,
            privacy,
            id=f"{_id(path)}-privacy-{privacy}",
            marks=[pytest.mark.slow] if _slow(path, privacy) else [],
        )
        for path in CONFIGS
        for privacy in ("off", "on")
    ],
)
def test_a_shipped_config_trains_without_a_nonfinite_loss(
    path: Path, privacy: str, ml100k: str, synthetic: Path, tmp_path: Path
) -> None:
    cfg = _variant(path, privacy, ml100k, synthetic)
    write_run_folder(cfg, tmp_path)

    if cfg.privacy.mode is PrivacyMode.EXAMPLE:
        losses = _dpsgd_rounds(cfg, tmp_path)
        assert len(losses) == ROUNDS * len(client_sizes(tmp_path))
        return
    result = run_inprocess(cfg, tmp_path, engine=ClientEngine.EXACT)

    for r in result.rounds:
        assert r["failed"] == 0, r  # a client whose training went non-finite is a failure
        assert r["applied"], r
    final = result.final["test"]
    assert all(math.isfinite(v) for v in final.values()), final
    assert final["ndcg@100"] > 0


@pytest.mark.parametrize("path", WARM_ALONE, ids=[_id(p) for p in WARM_ALONE])
def test_a_shipped_warm_start_alone_runs_as_shipped_within_its_target(
    path: Path, ml100k: str, synthetic: Path, tmp_path: Path
) -> None:
    # Prepare: the config as shipped (rounds 0), without encryption, on its first clients
    cfg = _variant(path, "on", ml100k, synthetic, rounds=0)
    assert cfg.rounds == 0 and cfg.warm_start.share == 1.0
    assert cfg.privacy.mode is PrivacyMode.CLIENT and cfg.privacy.target_epsilon is not None
    assert cfg.data.client_holdout_fraction == 0.0  # no local evaluation without rounds
    write_run_folder(cfg, tmp_path)

    # Execute
    result = run_inprocess(cfg, tmp_path, engine=ClientEngine.EXACT)

    # Assert: no round, the warm-started model is the run's, both releases within the target
    assert result.rounds == []
    final = result.final["test"]
    assert all(math.isfinite(v) for v in final.values()), final
    assert final["ndcg@100"] > 0
    privacy = result.final["privacy"]
    target = cfg.privacy.target_epsilon
    assert 0.97 * target <= privacy["epsilon"] <= target
    zs = privacy["release_noise_multipliers"]
    assert list(zs) == ["popularity", "cooccurrence"]
    p = cfg.warm_start.popularity_share
    assert zs["popularity"] / zs["cooccurrence"] == pytest.approx(math.sqrt((1 - p) / p))
    equivalent = 1 / math.sqrt(sum(1 / z**2 for z in zs.values()))
    assert privacy["noise_multiplier"] == pytest.approx(equivalent)


def test_every_shipped_config_is_covered() -> None:
    names = {p.name for p in CONFIGS}

    assert DEPLOY_LOCAL.is_file() and {"local.toml", "ml100k.toml"} <= names
    assert names >= SLOW  # a renamed config would silently lose its slow mark
    assert "ml100k.toml" in {p.name for p in WARM_ALONE}  # `make demo`: the warm start alone


def test_plain_sgd_at_the_dpsgd_learning_rate_needs_its_gradient_clipped(
    ml100k: str, tmp_path: Path
) -> None:
    # The cause of the deploy-local divergence: lr 0.5 is tuned for DP-SGD's clipped gradients;
    # plain SGD at 0.5 without client.max_grad_norm went to an inf loss within a few updates.
    from client.local import compute_update, split_local

    sets = ["data.n_silos=2", "privacy.mode=off", "encryption.enabled=false"]
    cfg = load_run_config(DEPLOY_LOCAL, sets)
    assert cfg.data.partition is Partition.SILOS
    assert cfg.client.max_grad_norm is not None
    unclipped = replace(cfg.client, max_grad_norm=None)
    write_run_folder(cfg, tmp_path)
    model_cfg = cfg.model.to_model_config(len(load_eval_data(tmp_path).item_ids))
    init = build_model(model_cfg, generator=torch.Generator().manual_seed(cfg.seed))
    state = {k: v.detach().clone() for k, v in init.state_dict().items()}
    local = split_local(load_client_shard(tmp_path, 0).rows, fraction=0.2, seed=split_seed(0, 0))

    diverged = compute_update(
        state, local, model_config=model_cfg, client=unclipped, beta=0.01, seed=0
    )
    clipped = compute_update(
        state, local, model_config=model_cfg, client=cfg.client, beta=0.01, seed=0
    )

    assert diverged.diverged is not None and diverged.diverged.startswith("loss is ")
    assert clipped.diverged is None and math.isfinite(clipped.mean_loss)
