"""``fedrec client join`` and ``fedrec recommend``: what they refuse before doing anything."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from client.cli import add_client_commands
from common.checkpoint import Checkpoint, save_checkpoint
from common.cli import run_handler
from common.model import ModelConfig, ModelKind, build_model


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


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mult-VAE checkpoint over the items 1..6."""
    cfg = ModelConfig(kind=ModelKind.MULTVAE, n_items=6, dims=(4, 2))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    ids = [str(i) for i in range(1, 7)]
    save_checkpoint(
        path,
        Checkpoint(
            model_config=cfg.to_dict(),
            state_dict=build_model(cfg).state_dict(),
            item_ids=ids,
            item_titles=[f"item {i}" for i in ids],
            dataset={"name": "tiny", "sha256": "0" * 64},
        ),
    )
    return path


@pytest.mark.parametrize("history", ["nope.csv", "history.TXT", "some/folder/items"])
def test_recommend_with_a_missing_history_file_is_an_error(
    model_file: Path, history: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: the spec looks like a path, so it is not read as a list of ids
    code = _fedrec(["recommend", "--model", str(model_file), "--history", history])

    # Assert
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fedrec: error: {Path(history)}: no such history file"


def test_recommend_with_no_known_item_is_an_error(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _fedrec(["recommend", "--model", str(model_file), "--history", "99999,abc"])

    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fedrec: error: the model knows none of the 2 history item ids")
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.out == ""  # no table for an empty history


def test_recommend_skips_some_unknown_ids_with_a_warning(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["recommend", "--model", str(model_file), "--history", "1,2,abc", "-k", "3"]
    code = _fedrec([*argv, "--json"])

    assert code == 0
    captured = capsys.readouterr()
    assert "skipped 1 unknown item ids: abc" in captured.err
    payload = json.loads(captured.out)
    assert len(payload["items"]) == 3 and {"1", "2"}.isdisjoint(
        item["item_id"] for item in payload["items"]
    )


def test_recommend_names_the_model_under_the_table(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: a checkpoint saved without provenance metadata
    code = _fedrec(["recommend", "--model", str(model_file), "--history", "1,2", "-k", "2"])

    # Assert
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].strip() == "top 2 for a history of 2 items"
    assert lines[-1] == "model: provenance not recorded"


@pytest.mark.parametrize("k", ["0", "-1", "ten"])
def test_recommend_checks_k_as_an_argument(
    model_file: Path, k: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: argparse refuses it (exit 2, usage), no ValueError traceback
    with pytest.raises(SystemExit) as info:
        _fedrec(["recommend", "--model", str(model_file), "--history", "1", "-k", k])

    # Assert
    assert info.value.code == 2
    assert "argument -k: expected an integer >= 1" in capsys.readouterr().err
