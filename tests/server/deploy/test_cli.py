"""``fedrec deploy certs`` / ``node-key`` and the checks ``fedrec deploy local`` makes first."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from common.cli import run_handler
from server.deploy.cli import DEFAULT_LOCAL_CONFIG, add_deploy_commands


def _fedrec(argv: list[str]) -> int:
    """``fedrec ARGV`` with only the deploy commands registered."""
    parser = argparse.ArgumentParser(prog="fedrec")
    add_deploy_commands(parser.add_subparsers(required=True))
    return run_handler(parser.parse_args(argv))


def test_certs_and_node_key_write_what_flower_reads(tmp_path: Path) -> None:
    # Execute
    assert _fedrec(["deploy", "certs", "--out", str(tmp_path), "--host", "fl.example.org"]) == 0
    assert _fedrec(["deploy", "node-key", "--out", str(tmp_path), "--name", "phone-1"]) == 0

    # Assert: the server certificate names the host; the public key is an OpenSSH line
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in names.get_values_for_type(x509.DNSName)
    load_ssh_public_key((tmp_path / "phone-1.pub").read_bytes())
    assert (tmp_path / "phone-1").stat().st_mode & 0o077 == 0  # private key: owner only


def test_deploy_local_needs_two_clients() -> None:
    assert _fedrec(["deploy", "local", "--clients", "1"]) == 2


def test_deploy_local_refuses_a_noise_seed_before_starting_anything(tmp_path: Path) -> None:
    sets = ["--set", "privacy.mode=off", "--set", "privacy.noise_seed=1"]
    assert _fedrec(["deploy", "local", "--out", str(tmp_path / "w"), *sets]) == 2
    assert not (tmp_path / "w").exists()


def test_register_refuses_an_address_without_a_port(tmp_path: Path) -> None:
    argv = ["deploy", "register", str(tmp_path / "k.pub"), "--superlink", "fl.example.org"]
    assert _fedrec([*argv, "--ca", str(tmp_path / "ca.crt")]) == 2


def test_deploy_local_defaults_to_the_shipped_config() -> None:
    # Prepare
    from common.run.config import load_run_config

    # Execute
    cfg = load_run_config(DEFAULT_LOCAL_CONFIG, [])

    # Assert: the config lies next to the package (package data), silos, example-level DP
    assert DEFAULT_LOCAL_CONFIG.parent.parent.name == "deploy"
    assert cfg.data.partition.value == "silos"
    assert cfg.privacy.mode.value == "example"


def test_deploy_run_that_does_not_complete_is_an_error_not_a_failed_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a SuperLink whose run ends "failed"
    (tmp_path / "config.toml").write_text("rounds = 1\n")

    class Operator:
        def __init__(self, home: Path, *, address: str, ca_cert: Path) -> None:
            pass

        def run_app(self, app: Path, run_config: dict[str, str], *, timeout: float) -> Any:
            log = tmp_path / "serverapp.log"
            return SimpleNamespace(
                run_id=7, status="failed", seconds=1.0, log_path=log, completed=False
            )

    monkeypatch.setattr("server.deploy.operator.Operator", Operator)
    argv = ["deploy", "run", "--superlink", "127.0.0.1:9093", "--ca", str(tmp_path / "ca.crt")]

    # Execute
    code = _fedrec([*argv, "--run-dir", str(tmp_path)])

    # Assert: exit code 1 is kept for "verification failed"
    assert code == 2
    assert capsys.readouterr().err.startswith("fedrec: error: run 7 did not complete (failed)")


def test_deploy_local_checks_rounds_as_an_argument() -> None:
    with pytest.raises(SystemExit) as info:
        _fedrec(["deploy", "local", "--rounds", "0"])
    assert info.value.code == 2
