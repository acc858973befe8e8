"""``fedrec client join`` and ``fedrec recommend``: what they refuse before doing anything."""

from __future__ import annotations

import argparse
from pathlib import Path

from client.cli import add_client_commands
from common.cli import run_handler


def _fedrec(argv: list[str]) -> int:
    """``fedrec ARGV`` with only the device commands registered."""
    parser = argparse.ArgumentParser(prog="fedrec")
    add_client_commands(parser.add_subparsers(required=True))
    return run_handler(parser.parse_args(argv))


def test_join_refuses_missing_files_before_starting_anything(tmp_path: Path) -> None:
    code = _fedrec(
        [
            "client", "join", "--superlink", "127.0.0.1:9093",
            "--data", str(tmp_path / "missing.csv"),
            "--ca", str(tmp_path / "ca.crt"), "--auth-key", str(tmp_path / "key"),
        ]
    )  # fmt: skip
    assert code == 2
    assert not (tmp_path / "missing.csv.fedrec-node").exists()


def test_recommend_without_a_model_file_is_one_error_line(tmp_path: Path) -> None:
    argv = ["recommend", "--model", str(tmp_path / "model.pt"), "--history", "50,181"]
    assert _fedrec(argv) == 2
