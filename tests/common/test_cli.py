"""The shared CLI plumbing (:func:`run_handler`, ``--set``) and the commands of ``common/``."""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import pytest

from common.cli import (
    CommandParser,
    ExitCode,
    Handler,
    add_common_commands,
    add_set_option,
    positive_int,
    run_handler,
)
from common.errors import FedrecError
from common.privacy.ledger import LedgerWriter


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
    assert _fedrec(["data", "fetch", "no-such-set", "--cache-dir", str(tmp_path)]) == 2


def _crashes(args: argparse.Namespace) -> int:
    raise RuntimeError("something broke\nsecond line")


def test_an_unexpected_error_is_one_internal_error_line_and_exit_4(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute
    code = run_handler(argparse.Namespace(handler=_crashes, verbose=0))

    # Assert: not 1 (that is "audit failed"), no traceback
    assert code == ExitCode.INTERNAL == 4
    err = capsys.readouterr().err.strip()
    assert err == (
        "fedrec: internal error: RuntimeError: something broke; run with -vv for the traceback"
    )


def test_vv_shows_the_traceback_of_an_internal_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_handler(argparse.Namespace(handler=_crashes, verbose=2)) == 4
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "fedrec: internal error: RuntimeError: something broke" in err


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(2, "No such file or directory", "/nope/x"),
        FileExistsError(17, "File exists", "/nope/x"),
        PermissionError(13, "Permission denied", "/nope/x"),
        NotADirectoryError(20, "Not a directory", "/nope/x"),
    ],
)
def test_a_path_error_is_one_line_naming_the_path_and_exit_2(
    error: OSError, capsys: pytest.CaptureFixture[str]
) -> None:
    def handler(args: argparse.Namespace) -> int:
        raise error

    assert run_handler(argparse.Namespace(handler=handler)) == 2
    assert capsys.readouterr().err.strip() == f"fedrec: error: /nope/x: {error.strerror}"


def test_keys_init_where_no_folder_can_be_made_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: --out below a file, and --out that is a file
    afile = tmp_path / "afile"
    afile.write_text("x")

    # Execute
    below = _fedrec(["keys", "init", "--out", str(afile / "keys")])
    below_err = capsys.readouterr().err
    onto = _fedrec(["keys", "init", "--out", str(afile)])
    onto_err = capsys.readouterr().err

    # Assert: one line naming the path, exit 2, no traceback
    assert below == 2 and below_err.startswith(f"fedrec: error: {afile}")
    assert onto == 2 and onto_err.startswith(f"fedrec: error: {afile}: File exists")
    assert "Traceback" not in below_err + onto_err


def test_data_stats_prints_short_numbers_and_the_whole_sha256(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    assert _fedrec(["data", "synth", "--users", "60", "--items", "40", "--out", str(tmp_path)]) == 0
    path = capsys.readouterr().out.strip()

    # Execute
    assert _fedrec(["data", "stats", path]) == 0
    text = capsys.readouterr().out

    # Assert: the digest uncut on a line of its own; no float noise like 108.40000000000009
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert f"sha256 {digest}" in text.splitlines()
    assert "…" not in text
    assert not re.search(r"\d\.\d{7,}", text)


def _ledger(run_dir: Path) -> Path:
    """A finished ledger of one round that released nothing (epsilon 0: no PRV cost)."""
    writer = LedgerWriter.create(
        run_dir / "ledger.jsonl",
        {
            "run_id": "cli-test",
            "code_version": "0",
            "config": {  # what the auditor checks the round against
                "rounds": 1,
                "server": {"sample_rate": 0.05},
                "privacy": {"mode": "client", "noise_multiplier": 1.1, "delta": 1e-4},
            },
            "population": 100,
            "delta": 1e-4,
            "mode": "client",
        },
    )
    writer.append_round(
        {
            "round": 1,
            "sample_rate": 0.05,
            "invited": 3,
            "participated": 0,
            "expected_participants": 5.0,
            "clip": 1.0,
            "noise_multiplier": 1.1,
            "effective_noise_multiplier": 1.1,
            "steps": 1,
            "epsilon": 0.0,
            "epsilon_rdp": 0.0,
            "released": False,
        }
    )
    writer.close(epsilon=0.0, epsilon_rdp=0.0)
    return run_dir / "ledger.jsonl"


def test_audit_verify_off_a_terminal_says_what_it_is_doing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    _ledger(tmp_path)

    # Execute (stderr is not a terminal under capsys)
    code = _fedrec(["audit", "verify", str(tmp_path)])

    # Assert: plain lines for the slow steps, the verdict on stdout
    assert code == 0
    captured = capsys.readouterr()
    assert "recomputing the PRV epsilon of 1 round" in captured.err
    assert captured.out.startswith("VERIFIED")


def _parser() -> CommandParser:
    parser = CommandParser(prog="fedrec")
    parser.set_defaults(verbose=0)
    add_common_commands(parser.add_subparsers(required=True))
    return parser


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["audit", "verify", "RUN"], 0),
        (["-v", "audit", "verify", "RUN"], 1),
        (["audit", "verify", "RUN", "-v"], 1),
        (["audit", "verify", "RUN", "-vv"], 2),
        (["-v", "audit", "verify", "RUN", "--verbose"], 2),
        (["-v", "audit", "-v", "verify", "RUN", "-v"], 3),
    ],
)
def test_verbose_counts_before_and_after_the_subcommand(argv: list[str], verbose: int) -> None:
    assert _parser().parse_args(argv).verbose == verbose


def test_subcommand_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["data", "stats", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ratings >= this are positives (default: 4.0)" in text
    assert "counts, density, quantiles" in text  # the command's help is its description


@pytest.mark.parametrize("text", ["0", "-3", "x"])
def test_positive_int_refuses_what_is_not_at_least_1(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        positive_int(text)
    assert positive_int("1") == 1


def test_export_split_of_a_small_data_set_is_a_usage_error_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from common.data import synthesize

    data = synthesize(60, 40, seed=3, out_dir=tmp_path)
    out = tmp_path / "split"
    assert _fedrec(["data", "export-split", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--n-heldout-users" in err and "internal error" not in err
    assert (
        _fedrec(["data", "export-split", str(data), "--out", str(out), "--n-heldout-users", "8"])
        == 0
    )
    assert (out / "test_holdout.csv").is_file()
