"""``fedrec deploy certs`` / ``node-key`` and the checks ``fedrec client join`` makes first."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from common.cli import main


def test_certs_and_node_key_write_what_flower_reads(tmp_path: Path) -> None:
    # Execute
    assert main(["deploy", "certs", "--out", str(tmp_path), "--host", "fl.example.org"]) == 0
    assert main(["deploy", "node-key", "--out", str(tmp_path), "--name", "phone-1"]) == 0

    # Assert: the server certificate names the host; the public key is an OpenSSH line
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in names.get_values_for_type(x509.DNSName)
    load_ssh_public_key((tmp_path / "phone-1.pub").read_bytes())
    assert (tmp_path / "phone-1").stat().st_mode & 0o077 == 0  # private key: owner only


def test_join_refuses_missing_files_before_starting_anything(tmp_path: Path) -> None:
    code = main(
        [
            "client", "join", "--superlink", "127.0.0.1:9093",
            "--data", str(tmp_path / "missing.csv"),
            "--ca", str(tmp_path / "ca.crt"), "--auth-key", str(tmp_path / "key"),
        ]
    )  # fmt: skip
    assert code == 2
    assert not (tmp_path / "missing.csv.fedrec-node").exists()


def test_deploy_local_needs_two_clients() -> None:
    assert main(["deploy", "local", "--clients", "1"]) == 2
