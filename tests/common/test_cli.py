"""The shared CLI plumbing (:func:`run_handler`, ``--set``) and the commands of ``common/``."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from common.cli import Handler, add_common_commands, add_set_option, run_handler
from common.errors import FedrecError


def _fedrec(argv: list[str]) -> int:
    """``fedrec ARGV`` with only the commands of common/ registered."""
    parser = argparse.ArgumentParser(prog="fedrec")
    add_common_commands(parser.add_subparsers(required=True))
    return run_handler(parser.parse_args(argv))


def _raises(args: argparse.Namespace) -> int:
    raise FedrecError("no such thing")


def _interrupted(args: argparse.Namespace) -> int:
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("handler", "code"), [(lambda args: 3, 3), (_raises, 2), (_interrupted, 130)]
)
def test_run_handler_maps_errors_to_exit_codes(handler: Handler, code: int) -> None:
    assert run_handler(argparse.Namespace(handler=handler)) == code


def test_run_handler_prints_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    run_handler(argparse.Namespace(handler=_raises))
    assert capsys.readouterr().err.strip() == "fedrec: error: no such thing"


def test_set_option_collects_every_override() -> None:
    # Prepare
    parser = argparse.ArgumentParser()
    add_set_option(parser, "e.g. --set rounds=3")

    # Execute
    args = parser.parse_args(["--set", "rounds=3", "--set", "privacy.mode=off"])

    # Assert
    assert args.set == ["rounds=3", "privacy.mode=off"]
    assert parser.parse_args([]).set == []


def test_common_commands_return_the_audit_group() -> None:
    # Prepare
    parser = argparse.ArgumentParser(prog="fedrec")
    audit = add_common_commands(parser.add_subparsers(required=True))

    # Execute: another layer adds its own audit
    audit.add_parser("other").set_defaults(handler=lambda args: 0)

    # Assert
    assert run_handler(parser.parse_args(["audit", "other"])) == 0


def test_audit_verify_without_a_ledger_is_an_error(tmp_path: Path) -> None:
    assert _fedrec(["audit", "verify", str(tmp_path)]) == 2


def test_data_fetch_refuses_an_unknown_data_set(tmp_path: Path) -> None:
    assert _fedrec(["data", "fetch", "ml-1m", "--cache-dir", str(tmp_path)]) == 2
