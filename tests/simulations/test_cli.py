"""The ``fedrec`` console script: every layer's commands in one parser, ``python -m`` too."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.cli import HelpFormatter
from common.errors import FedrecError
from simulations.central import CentralConfig, CentralResult
from simulations.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_help_lists_every_layers_commands_in_order() -> None:
    assert _commands(build_parser()) == [
        "data",
        "train-central",
        "simulate",
        "audit",
        "keys",
        "bench",
        "report",
        "recommend",
        "client",
        "deploy",
    ]


def test_audit_holds_the_ledger_check_and_the_empirical_audit() -> None:
    # Execute
    parser = build_parser()
    verify = parser.parse_args(["audit", "verify", "RUN"])
    empirical = parser.parse_args(["audit", "empirical", "--config", "CFG.toml"])

    # Assert: verify needs only common/, the canary audit runs simulations
    assert verify.handler.__module__ == "common.cli"
    assert empirical.handler.__module__ == "simulations.cli"


def test_main_returns_the_commands_exit_code(tmp_path: Path) -> None:
    assert main(["audit", "verify", str(tmp_path)]) == 2


def test_module_runs_as_the_console_script() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "audit", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "verify" in done.stdout
    assert "empirical" in done.stdout


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedrec {importlib.metadata.version('fedrec')}"


def test_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for line in ("0    ok", "1    verification failed", "2    bad input or usage", "4    internal"):
        assert line in text


def test_every_option_of_every_command_has_help_and_shows_its_default() -> None:
    # Execute
    parsers = list(_parsers(build_parser()))
    silent = [
        f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
        for p in parsers
        for a in p._actions
        if not a.help and not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    ]
    recommend = next(p for p in parsers if p.prog == "fedrec recommend").format_help()

    # Assert
    assert silent == []
    assert all(p.formatter_class is HelpFormatter for p in parsers)
    assert "(default: 10)" in recommend


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["simulate", "-v"], 1),
        (["simulate", "-vv"], 2),
        (["-v", "simulate", "--verbose"], 2),
        (["bench", "he", "-v"], 1),
    ],
)
def test_verbose_is_accepted_after_the_subcommand(argv: list[str], verbose: int) -> None:
    assert build_parser().parse_args(argv).verbose == verbose


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["recommend", "--model", "m.pt", "--history", "1", "-k", "0"])
    assert info.value.code == 2


def test_an_internal_error_exits_4_not_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a bug inside the audit
    (tmp_path / "ledger.jsonl").write_text("{}\n")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise KeyError("oops")

    monkeypatch.setattr("common.privacy.audit.verify_ledger", broken)

    # Execute
    code = main(["audit", "verify", str(tmp_path)])

    # Assert: 1 means "verification failed", so a crash is 4, in one line
    assert code == 4
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "fedrec: internal error: KeyError: 'oops'; run with -vv for the traceback"
    )
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ train-central


def _fake_central(seen: list[CentralConfig]) -> Any:
    def run_central(cfg: CentralConfig, out_dir: Path, *, on_epoch: Any = None) -> CentralResult:
        seen.append(cfg)
        for epoch in (1, 2):
            on_epoch(epoch, cfg.epochs, {"loss": 10.0 / epoch, "ndcg@100": 0.1, "best": 0.1})
        metrics = {"ndcg@100": 0.1, "recall@20": 0.2}
        return CentralResult(validation=metrics, test=metrics, best_epoch=1, seconds=0.1)

    return run_central


def test_train_central_takes_run_config_keys_and_warns_on_flat_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    seen: list[CentralConfig] = []
    monkeypatch.setattr("simulations.central.run_central", _fake_central(seen))
    argv = ["train-central", "--out", str(tmp_path), "--epochs", "2"]

    # Execute: model.dims as in `simulate --set model.dims=...`; then the old flat key
    dotted = main([*argv, "--set", "model.dims=[32,8]", "--set", "model.dropout=0.1"])
    dotted_err = capsys.readouterr().err
    flat = main([*argv, "--set", "dims=[16,4]"])
    flat_err = capsys.readouterr().err

    # Assert
    assert dotted == 0 and seen[0].dims == (32, 8) and seen[0].dropout == 0.1
    assert "deprecated" not in dotted_err
    assert flat == 0 and seen[1].dims == (16, 4)
    assert "--set dims=... is deprecated, use --set model.dims=..." in " ".join(flat_err.split())


def test_train_central_names_a_bad_dotted_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train-central", "--out", str(tmp_path), "--set", "model.dimz=[8]"])

    assert code == 2
    assert "did you mean 'model.dims'?" in capsys.readouterr().err


def test_train_central_checks_the_data_set_before_the_progress_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train-central", "--out", str(tmp_path / "run"), "--dataset", "/nope"])

    assert code == 2
    err = capsys.readouterr().err
    assert err.strip() == "fedrec: error: /nope: no such file or folder"
    assert "epoch" not in err


def test_train_central_off_a_terminal_prints_one_line_per_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    monkeypatch.setattr("simulations.central.run_central", _fake_central([]))

    # Execute (stderr is no terminal under capsys)
    assert main(["train-central", "--out", str(tmp_path), "--epochs", "2"]) == 0

    # Assert
    lines = capsys.readouterr().err.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2
    assert re.fullmatch(
        r"epoch 2/2: loss 5\.00, val NDCG@100 0\.1000 \(best 0\.1000\), \d+\.\d s", epochs[1]
    )


# ----------------------------------------------------------------------------------- simulate


def _fake_simulation(monkeypatch: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    """``simulate`` without data or Flower: it replays ``events``, then stops with an error."""

    def prepare_run(
        cfg: Any, run_dir: Path, *, cache_dir: Path | None = None, force: bool = False
    ) -> int:
        run_dir.mkdir(parents=True, exist_ok=True)
        return 10

    def simulate(run_dir: Path, n_clients: int, cfg: Any, **kwargs: Any) -> None:
        for event in events:
            kwargs["on_event"](event)
        raise FedrecError("stopped by the test")

    monkeypatch.setattr("simulations.runner.prepare_run", prepare_run)
    monkeypatch.setattr("simulations.runner.simulate", simulate)
    monkeypatch.setattr("common.run.folder.client_sizes", lambda run_dir: [1] * 10)


def test_simulate_off_a_terminal_prints_one_line_per_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    round_1 = {"event": "round", "round": 1, "sampled": 10, "returned": 9, "failed": 1}
    round_1 |= {"dropped": 0, "refused": 0, "ndcg@100": None, "seconds": 2.5}
    round_2 = {**round_1, "round": 2, "failed": 0, "ndcg@100": 0.1234, "epsilon": 1.2}
    round_2 |= {"epsilon_rdp": 1.5, "epsilon_prv": 1.2}  # the last round names both
    events = [
        {"event": "start", "rounds": 2, "resumed_after": 0},
        {"event": "nodes", "registered": 10},
        round_1,
        round_2,
    ]
    _fake_simulation(monkeypatch, events)

    # Execute
    code = main(["simulate", "--out", str(tmp_path / "run"), "--set", "rounds=2"])

    # Assert: plain lines on stderr, where the log is, and the error that stopped it
    assert code == 2
    lines = capsys.readouterr().err.splitlines()
    assert "round 1/2: 9/10 returned, 1 failed, 2.5 s" in lines
    assert "round 2/2: 9/10 returned, NDCG@100 0.1234, epsilon 1.5 (RDP), 1.2 (PRV), 2.5 s" in lines
    assert "10 nodes registered" in lines
    assert f"per-round log: {tmp_path / 'run' / 'simulation.log'}" in lines
    assert lines[-1] == "fedrec: error: stopped by the test"


def test_simulate_without_config_says_it_uses_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_simulation(monkeypatch, [])

    assert main(["simulate", "--out", str(tmp_path / "run")]) == 2

    err = " ".join(capsys.readouterr().err.split())
    assert (
        "no --config: using the built-in defaults (ml-100k, per-user clients, 50 rounds, "
        "privacy off, encryption off" in err
    )
