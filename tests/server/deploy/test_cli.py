"""``fedrec deploy certs`` / ``node-key`` and the checks ``fedrec deploy local`` makes first."""

from __future__ import annotations

import argparse
from pathlib import Path

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
