"""The ``fedrec`` console script: every layer's commands in one parser, ``python -m`` too."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

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
