"""Local training that goes non-finite sends nothing: the client replies with the reason, the
server counts it as a failed client, and the round goes on."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from client.dp_mod import make_client_dp_mod
from client.local import LocalData, compute_update, nonfinite_reason, split_local
from common.data import synthesize
from common.model import ModelConfig, build_model
from common.protocol import (
    DIVERGED,
    DIVERGED_REASON,
    Divergence,
    ExampleDPConfig,
    is_divergence,
)
from common.run.config import (
    ClientConfig,
    RunConfig,
    Sampling,
    ServerConfig,
    ServerOptimizer,
    load_run_config,
)
from common.run.folder import load_eval_data, write_run_folder
from common.training import clip_grad_norm, train_epochs
from server.optimizer import ServerOpt
from server.strategy import FedRecStrategy
from simulations.fastsim import ClientEngine, run_inprocess

pytestmark = pytest.mark.usefixtures("task_identity")

N_ITEMS = 30
MODEL = ModelConfig(n_items=N_ITEMS, dims=(8, 4), dropout=0.0, anneal_steps=10)


def _rows(n_users: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_users, N_ITEMS)) < 0.3).astype(np.float32)
    dense[:, 0] = 1.0  # no empty row
    return sp.csr_matrix(dense)


def _data(n_users: int) -> LocalData:
    rows = _rows(n_users)
    return LocalData(train=rows, foldin=rows, holdout=sp.csr_matrix(rows.shape, dtype=np.float32))


def _state() -> dict[str, torch.Tensor]:
    model = build_model(MODEL, generator=torch.Generator().manual_seed(0))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _with_logvar(state: dict[str, torch.Tensor], logvar: float) -> dict[str, torch.Tensor]:
    """``state`` with the encoder's log-variance head biased to ``logvar``."""
    key = [k for k in state if k.startswith("encoder.") and k.endswith(".bias")][-1]
    d = state[key].shape[0] // 2
    bias = state[key].clone()
    bias[d:] = logvar
    return {**state, key: bias}


def _overflowing_state() -> dict[str, torch.Tensor]:
    """Weights whose log-variance is 100: exp(logvar) overflows float32, the KL term is inf."""
    return _with_logvar(_state(), 100.0)


# --------------------------------------------------------------------------- compute_update


def test_an_infinite_loss_is_not_sent_but_reported() -> None:
    update = compute_update(
        _overflowing_state(),
        _data(6),
        model_config=MODEL,
        client=ClientConfig(lr=0.1, batch_size=3),
        beta=0.2,
        seed=0,
    )

    assert update.diverged == "loss is inf at update 0"
    assert update.delta == {} and update.weight == 0.0
    assert update.num_examples == 6 and math.isnan(update.mean_loss)


def test_nan_weights_are_reported_as_a_nan_loss() -> None:
    state = _state()
    state["decoder.0.weight"] = torch.full_like(state["decoder.0.weight"], float("nan"))

    update = compute_update(
        state, _data(4), model_config=MODEL, client=ClientConfig(), beta=0.1, seed=0
    )

    assert update.diverged == "loss is nan at update 0"


def test_a_step_that_overflows_after_the_last_loss_is_caught_in_the_update() -> None:
    # one step: at log-variance 44 the loss (~1e19) is finite, its gradient times 1e30 is not
    update = compute_update(
        _with_logvar(_state(), 44.0),
        _data(2),
        model_config=MODEL,
        client=ClientConfig(lr=1e30, batch_size=2),
        beta=0.1,
        seed=0,
    )

    assert update.diverged is not None
    assert update.diverged.startswith("update is not finite (")
    assert update.delta == {}


def test_a_finite_update_is_unchanged() -> None:
    update = compute_update(
        _state(), _data(4), model_config=MODEL, client=ClientConfig(lr=0.01), beta=0.1, seed=0
    )

    assert update.diverged is None and update.weight == 4.0
    assert nonfinite_reason(update.delta) is None
    assert set(update.delta) == set(_state())


def test_nonfinite_reason_names_the_tensor() -> None:
    delta = {"a": np.zeros(3, np.float32), "b": np.array([1.0, np.inf], np.float32)}

    assert nonfinite_reason(delta) == "update is not finite (inf in b)"
    assert nonfinite_reason({"c": np.array([np.nan])}) == "update is not finite (nan in c)"


# ------------------------------------------------------------------------ gradient clipping


def test_clip_grad_norm_scales_down_to_the_bound() -> None:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad = torch.tensor([3.0, 0.0])
    params[1].grad = torch.tensor([4.0])

    norm = clip_grad_norm(params, 1.0)

    assert norm == pytest.approx(5.0)
    clipped = torch.cat([p.grad for p in params if p.grad is not None])
    assert float(torch.linalg.vector_norm(clipped)) == pytest.approx(1.0, rel=1e-4)
    assert clip_grad_norm(params, 10.0) == pytest.approx(1.0, rel=1e-4)  # under: unchanged


@pytest.mark.parametrize("max_norm", [None, 0.01])
def test_max_grad_norm_bounds_each_step(max_norm: float | None) -> None:
    model = build_model(MODEL, generator=torch.Generator().manual_seed(0))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    train_epochs(
        model,
        _rows(5),
        epochs=1,
        batch_size=5,
        optimizer=optimizer,
        beta_schedule=None,
        generator=torch.Generator().manual_seed(0),
        max_grad_norm=max_norm,
    )

    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = float(torch.linalg.vector_norm(after - before))
    if max_norm is None:
        assert moved > 0.1  # the unclipped step of a multinomial loss summed over items
    else:
        assert moved <= max_norm * (1 + 1e-4)


# ----------------------------------------------------------------------- the reply protocol


def test_divergence_reply_round_trip() -> None:
    content = Divergence("loss is inf at update 2").to_content()

    metrics = content.metric_records["metrics"]
    assert metrics[DIVERGED] == 1 and metrics["weight"] == 0.0
    assert content.config_records["config"][DIVERGED_REASON] == "loss is inf at update 2"
    assert "arrays" not in content.array_records
    assert is_divergence(metrics)
    assert Divergence.read(content).reason == "loss is inf at update 2"
    assert not is_divergence(MetricRecord({"weight": 1.0}))
    assert Divergence("x" * 1000).to_content().config_records["config"][DIVERGED_REASON] == (
        "x" * 200
    )


def _train_message(arrays: ArrayRecord, config: ConfigRecord) -> Message:
    return Message(
        RecordDict({"arrays": arrays, "config": config}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )


def test_the_dp_mod_passes_a_divergence_through() -> None:
    config = ConfigRecord(
        {
            "server-round": 1,
            "dp-clip": 1.0,
            "dp-noise-multiplier": 1.0,
            "dp-noise-std": 0.5,
            "dp-denominator": 4.0,
            "dp-sample-rate": 0.1,
            "dp-delta": 1e-4,
        }
    )
    msg = _train_message(ArrayRecord([np.zeros(2, dtype=np.float32)]), config)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})

    def diverging(m: Message, c: Context) -> Message:
        return Message(Divergence("loss is inf at update 2").to_content(), reply_to=m)

    reply = make_client_dp_mod(lambda _c: None)(msg, context, diverging)

    assert is_divergence(reply.content.metric_records["metrics"])
    assert Divergence.read(reply.content).reason == "loss is inf at update 2"


@pytest.fixture(scope="module")
def synth_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(60, 40, seed=3, out_dir=tmp_path_factory.mktemp("synth"))


def _diverging_run(synth_csv: Path, run_dir: Path, *sets: str) -> RunConfig:
    """A tiny per-user run whose clients' SGD steps at lr 1e38 overflow (3 local epochs)."""
    cfg = load_run_config(
        None,
        [
            f"data.dataset={str(synth_csv)!r}",
            "data.n_heldout_users=8",
            "model.dims=[16, 8]",
            "client.lr=1e38",
            "client.local_epochs=3",
            "server.sample_rate=0.5",
            "rounds=2",
            *sets,
        ],
    )
    write_run_folder(cfg, run_dir)
    return cfg


def test_the_client_app_replies_with_the_reason_instead_of_raising(
    tmp_path: Path, synth_csv: Path
) -> None:
    from client.app import app

    cfg = _diverging_run(synth_csv, tmp_path)
    n_items = len(load_eval_data(tmp_path).item_ids)
    model = build_model(cfg.model.to_model_config(n_items), generator=torch.Generator())
    state = _with_logvar({k: v.detach() for k, v in model.state_dict().items()}, 100.0)
    arrays = ArrayRecord(state)
    msg = _train_message(arrays, ConfigRecord({"server-round": 1, "beta": 0.01}))
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 3},
        state=RecordDict(),
        run_config={"run-dir": str(tmp_path)},
    )

    reply = app(msg, context)  # the whole ClientApp, its mods included

    assert not reply.has_error()
    assert is_divergence(reply.content.metric_records["metrics"])
    assert Divergence.read(reply.content).reason == "loss is inf at update 0"
    assert "arrays" not in reply.content.array_records


def test_a_dpsgd_silo_that_diverges_replies_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import client.app as client_app
    import client.dpsgd as dpsgd

    def exploding(*args: object, **kwargs: object) -> object:
        raise FloatingPointError("loss is nan at DP-SGD step 3")

    monkeypatch.setattr(dpsgd, "dpsgd_update", exploding)
    monkeypatch.setattr(client_app, "_budget", lambda _c: None)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    cfg = load_run_config(None, ["client.batch_size=2"])
    example_dp = ExampleDPConfig(
        clip=1.0, noise_multiplier=1.0, delta=1e-4, max_steps=10, max_sample_rate=0.5
    )
    data = split_local(_rows(4), fraction=0.2, seed=0)

    result = client_app._dpsgd_train(_state(), data, cfg, example_dp, context, beta=0.1)

    assert not isinstance(result, RecordDict)
    update, steps, _ = result
    assert update.diverged == "loss is nan at DP-SGD step 3" and steps == 0
    # the silo's own guard counts the round's planned steps: the rows were used
    assert context.state.config_records["fedrec-dpsgd"]["steps"] == 2


# ----------------------------------------------------------------------- the server counts


class _Grid:
    def __init__(self, replies: Callable[[list[Message]], list[Message]]) -> None:
        self.replies = replies

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float) -> list[Message]:
        return self.replies(list(messages))


def test_the_server_counts_a_divergence_as_failed_with_its_reason() -> None:
    server = ServerConfig(
        optimizer=ServerOptimizer.FEDAVG, lr=1.0, sampling=Sampling.POISSON, sample_rate=1.0
    )
    strategy = FedRecStrategy(
        server, ServerOpt(kind=server.optimizer, lr=1.0), seed=0, node_ids=[1, 2]
    )

    def replies(msgs: list[Message]) -> list[Message]:
        good = RecordDict(
            {
                "arrays": ArrayRecord([np.ones(2, dtype=np.float32)]),
                "metrics": MetricRecord({"weight": 1.0, "num-examples": 1, "loss": 3.0}),
            }
        )
        bad = Divergence("loss is inf at update 2").to_content()
        return [Message(good, reply_to=msgs[0]), Message(bad, reply_to=msgs[1])]

    result = strategy.train_round(
        cast(Grid, _Grid(replies)),
        1,
        ArrayRecord([np.zeros(2, dtype=np.float32)]),
        ConfigRecord({"server-round": 1}),
        timeout=1.0,
    )

    stats = result.stats
    assert (stats.invited, stats.returned, stats.failed) == (2, 1, 1)
    assert stats.applied
    assert stats.reasons == ["node 2: diverged: loss is inf at update 2"]


def test_the_in_process_engine_counts_diverged_clients_as_failed(
    tmp_path: Path, synth_csv: Path
) -> None:
    cfg = _diverging_run(synth_csv, tmp_path)

    result = run_inprocess(cfg, tmp_path, engine=ClientEngine.EXACT)

    for r in result.rounds:
        assert r["failed"] == r["sampled"] > 0 and r["returned"] == 0
        assert not r["applied"]
