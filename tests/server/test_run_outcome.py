"""A run in which no round applied an update fails with the reasons, instead of reporting the
untrained model as its result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest
from flwr.app import Error, Message
from flwr.serverapp import Grid

from common.data import synthesize
from common.run.config import load_run_config
from common.run.folder import write_run_folder
from server.federation import NoUpdateAppliedError, no_update_reason, run_federation

if TYPE_CHECKING:
    from tests.server.conftest import FakeGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def test_no_update_reason_names_the_most_frequent_reasons() -> None:
    rounds = [
        {"round": 1, "sampled": 3, "returned": 0, "failed": 3, "applied": False},
        {"round": 2, "sampled": 2, "returned": 0, "failed": 2, "applied": False},
    ]
    reasons = [
        "node 11: client 0: injected failure",
        "node 12: diverged: loss is inf at update 2",
        "node 13: diverged: loss is inf at update 2",
        "node 11: client 0: injected failure",
        "node 12: diverged: loss is inf at update 2",
    ]

    text = no_update_reason(rounds, reasons)

    assert text == (
        "no round applied an update (2 rounds: 5 sampled, 0 returned, 5 failed): "
        "diverged: loss is inf at update 2 (x3); client 0: injected failure (x2)"
    )


def test_no_update_reason_is_none_when_a_round_applied() -> None:
    rounds = [{"round": 1, "applied": False}, {"round": 2, "applied": True}]

    assert no_update_reason(rounds, ["node 1: boom"]) is None


def test_no_update_reason_without_any_client() -> None:
    text = no_update_reason([{"round": 1, "sampled": 0, "returned": 0, "applied": False}], [])

    assert text is not None and text.endswith(": no client was sampled (server.sample_rate)")


def test_an_error_reply_is_summed_up_by_its_last_line() -> None:
    from server.strategy import _error_line

    flower = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException "
        "ClientAppException occurred. Message: Traceback (most recent call last):\n  File "
        '"/x/client/app.py", line 114, in train\nRuntimeError: client 3: injected failure\n\'>'
    )

    assert _error_line(flower) == "RuntimeError: client 3: injected failure"
    assert _error_line("boom") == "boom"
    assert _error_line("") == "error"
    assert len(_error_line("x" * 500)) == 200


@pytest.fixture(scope="module")
def synth_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(60, 40, seed=3, out_dir=tmp_path_factory.mktemp("synth"))


def test_a_run_where_every_client_fails_raises_with_the_reasons(
    tmp_path: Path, synth_csv: Path, fake_grid: type[FakeGrid]
) -> None:
    cfg = load_run_config(
        None,
        [
            f"data.dataset={str(synth_csv)!r}",
            "data.n_heldout_users=8",
            "data.partition=silos",
            "data.n_silos=3",
            "model.dims=[16, 8]",
            "server.sample_rate=1.0",
            "rounds=2",
            "eval_every=1",
            "reference=false",
        ],
    )
    write_run_folder(cfg, tmp_path)

    def replies(msgs: list[Message]) -> list[Message]:
        return [Message(Error(code=2, reason="device on fire"), reply_to=m) for m in msgs]

    grid = fake_grid(replies, nodes=[1, 2, 3])
    with pytest.raises(NoUpdateAppliedError) as info:
        run_federation(cast(Grid, grid), cfg, tmp_path, expected_nodes=3)

    message = str(info.value)
    assert message.startswith("no round applied an update (2 rounds: 6 sampled, 0 returned")
    assert "device on fire (x6)" in message
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["final"]["error"] == message
    assert not (tmp_path / "model.pt").exists()  # no checkpoint of the untrained model
    events = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["error"] == message


@pytest.mark.slow
def test_simulate_exits_2_when_no_round_applied(tmp_path: Path, synth_csv: Path) -> None:
    # every one of the 44 clients fails in every round: before, exit 0 and the untrained metrics
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        "\n".join(
            [
                'name = "all fail"',
                "rounds = 2",
                "eval_every = 1",
                "reference = false",
                "[data]",
                f'dataset = "{synth_csv}"',
                "n_heldout_users = 8",
                "[model]",
                "dims = [16, 8]",
                "[server]",
                "sample_rate = 0.2",
                "round_timeout = 120",
                "[simulation]",
                f"fail_clients = {list(range(44))}",
            ]
        )
        + "\n"
    )

    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(cfg), "--out",
         str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip

    assert proc.returncode == 2, proc.stderr[-2000:]
    line = " ".join(proc.stderr.split())
    assert "fedrec: error: no round applied an update (2 rounds:" in line
    assert "injected failure (simulation.fail_clients)" in line
    assert "test metrics" not in proc.stdout
