"""The ServerApp's run folder: ``run-dir`` from the run config, refused in one line if unusable."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.app import resolve_run_dir


def test_an_absolute_run_dir_is_the_run_folder(tmp_path: Path) -> None:
    assert resolve_run_dir(str(tmp_path)) == tmp_path


def test_an_empty_run_dir_says_how_to_name_one() -> None:
    # Execute: pyproject's default, a bare `flwr run .`
    with pytest.raises(ValueError) as info:
        resolve_run_dir("")

    # Assert: one line saying what to pass, not "must be absolute, got '.'"
    message = str(info.value)
    assert message.startswith("run-dir is empty: name an absolute run folder")
    assert "--run-config" in message and "\n" not in message


def test_a_relative_run_dir_is_refused() -> None:
    with pytest.raises(ValueError, match="run-dir must be an absolute path"):
        resolve_run_dir("runs/r1")
