"""TLS certificates and SuperNode authentication keys for a networked deployment.

Pure Python (the ``cryptography`` package, a dependency of ``flwr`` 1.42), so that no
``openssl`` or ``ssh-keygen`` binary is needed. Three kinds of files, in the formats that
Flower 1.42 reads:

- a certificate authority: ``ca.key`` / ``ca.crt`` (PEM). SuperNodes and the ``flwr`` CLI
  trust the SuperLink through ``ca.crt`` (``--root-certificates`` / ``root-certificates``);
  ``flower-superlink`` also wants it as ``--ssl-ca-certfile``.
- the SuperLink's server certificate: ``server.key`` / ``server.crt`` (PEM), signed by the CA,
  with subject alternative names for the host name it is reached by plus ``localhost`` and
  ``127.0.0.1`` (the SuperLink's own ServerApp runtime and the local ``flwr`` CLI connect
  over loopback). Given to ``flower-superlink --ssl-certfile/--ssl-keyfile``.
- one SuperNode identity per device: ``NAME`` (private key, OpenSSH format, which is what
  ``flower-supernode --auth-supernode-private-key`` loads with ``load_ssh_private_key``) and
  ``NAME.pub`` (OpenSSH public key line, what ``flwr supernode register`` loads with
  ``load_ssh_public_key``). ECDSA on NIST P-384: Flower accepts NIST curves only.

Private keys are written atomically with mode ``0o600``; certificates and public keys with
the umask's mode.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.io import atomic_write_bytes

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "CertificateAuthority",
    "NodeKeys",
    "ServerCertificate",
    "make_ca",
    "make_node_keys",
    "make_server_cert",
]

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "server.key"
SERVER_CERT = "server.crt"

_CURVE = ec.SECP384R1
_PRIVATE_MODE = 0o600


@dataclass(frozen=True)
class CertificateAuthority:
    """Paths of a CA written by :func:`make_ca`."""

    key: Path
    """PEM (PKCS#8) private key of the CA, mode 0600. Keep it with the operator."""
    cert: Path
    """PEM self-signed CA certificate, handed to every SuperNode and CLI."""


@dataclass(frozen=True)
class ServerCertificate:
    """Paths of a SuperLink server certificate written by :func:`make_server_cert`."""

    key: Path
    """PEM (PKCS#8) private key of the SuperLink, mode 0600."""
    cert: Path
    """PEM certificate signed by the CA."""
    ca_cert: Path
    """The CA certificate that signed it (``--ssl-ca-certfile``)."""


@dataclass(frozen=True)
class NodeKeys:
    """Paths of one SuperNode's authentication key pair written by :func:`make_node_keys`."""

    private_key: Path
    """OpenSSH private key (``--auth-supernode-private-key``), mode 0600."""
    public_key: Path
    """OpenSSH public key line (``flwr supernode register``)."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _check_days(days: float) -> None:
    if not math.isfinite(days) or days <= 0:
        raise ValueError(f"days must be a finite number > 0, got {days!r}")


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write_bytes(path, pem, mode=_PRIVATE_MODE)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    atomic_write_bytes(path, cert.public_bytes(serialization.Encoding.PEM))


def make_ca(
    out_dir: Path, *, common_name: str = "fedrec CA", days: float = 365.0
) -> CertificateAuthority:
    """Create a self-signed certificate authority in ``out_dir``.

    Parameters
    ----------
    out_dir:
        Folder for ``ca.key`` and ``ca.crt``; created if needed. Existing files are replaced.
    common_name:
        Subject common name of the CA certificate.
    days:
        Validity from now, in days (> 0; default 365).

    Returns
    -------
    CertificateAuthority
        The paths written.
    """
    _check_days(days)
    out_dir = Path(out_dir)
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now() - datetime.timedelta(minutes=5)  # tolerate small clock skew
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    ca = CertificateAuthority(key=out_dir / CA_KEY, cert=out_dir / CA_CERT)
    _write_private_key(ca.key, key)
    _write_cert(ca.cert, cert)
    return ca


def _san_entries(host: str, extra: tuple[str, ...]) -> list[x509.GeneralName]:
    """DNS names and IP addresses for the subject alternative name, without duplicates."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for entry in (host, *extra, "localhost", "127.0.0.1"):
        if not entry or entry in seen:
            continue
        seen.add(entry)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            names.append(x509.DNSName(entry))
    return names


def make_server_cert(
    out_dir: Path,
    *,
    host: str,
    extra_names: tuple[str, ...] = (),
    ca_dir: Path | None = None,
    days: float = 365.0,
) -> ServerCertificate:
    """Create the SuperLink's TLS key and certificate, signed by the CA in ``ca_dir``.

    Parameters
    ----------
    out_dir:
        Folder for ``server.key`` and ``server.crt``; created if needed.
    host:
        Host name or IP address the SuperNodes use to reach the SuperLink (``--superlink``).
        Non-empty. ``localhost`` and ``127.0.0.1`` are always added to the names.
    extra_names:
        More DNS names or IP addresses for the subject alternative name.
    ca_dir:
        Folder holding ``ca.key`` and ``ca.crt`` from :func:`make_ca`; default ``out_dir``.
    days:
        Validity from now, in days (> 0; default 365).

    Returns
    -------
    ServerCertificate
        The paths written, and the CA certificate's path.

    Raises
    ------
    ValueError
        If ``host`` is empty or ``days`` is not a positive number.
    FileNotFoundError
        If the CA files are missing.
    """
    if not host or not host.strip():
        raise ValueError("host must be a non-empty host name or IP address")
    _check_days(days)
    out_dir = Path(out_dir)
    ca_dir = out_dir if ca_dir is None else Path(ca_dir)
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_dir / CA_KEY}: not an EC private key")
    ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())

    key = ec.generate_private_key(_CURVE())
    start = _now() - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(start + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(_san_entries(host.strip(), extra_names)), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    server = ServerCertificate(
        key=out_dir / SERVER_KEY, cert=out_dir / SERVER_CERT, ca_cert=ca_dir / CA_CERT
    )
    _write_private_key(server.key, key)
    _write_cert(server.cert, cert)
    return server


def make_node_keys(out_dir: Path, name: str) -> NodeKeys:
    """Create one SuperNode's ECDSA P-384 authentication key pair, in OpenSSH formats.

    Parameters
    ----------
    out_dir:
        Folder for the two files; created if needed.
    name:
        File name of the private key (the public key gets ``.pub`` appended); a plain name,
        no path separators. Also the public key's comment.

    Returns
    -------
    NodeKeys
        The paths written.
    """
    if not name or "/" in name or name in {".", ".."}:
        raise ValueError(f"name must be a plain file name, got {name!r}")
    out_dir = Path(out_dir)
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    keys = NodeKeys(private_key=out_dir / name, public_key=out_dir / f"{name}.pub")
    atomic_write_bytes(keys.private_key, private, mode=_PRIVATE_MODE)
    atomic_write_bytes(keys.public_key, public + f" {name}\n".encode())
    return keys
