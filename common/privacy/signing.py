"""Ed25519 signatures on the privacy ledger: the server signs every line, devices co-sign.

(Over 400 lines: keys, signatures and co-signatures of the ledger are one scheme.)

The hash chain (:mod:`common.privacy.ledger`) shows that a ledger was edited, but anyone can
rewrite a whole ledger consistently and hash it again. Signatures tie the lines to keys:

- **The server** signs every line with its ledger key (``RUN_DIR/signing/server.key``, PKCS#8 PEM,
  owner-only 0600, made when the ledger is created). The header carries the public key
  (``server_key``, 64 hex digits, ``signature_scheme: "ed25519"``); every line carries
  ``signatures.server``: the signature of :func:`common.privacy.ledger.signed_body`, the
  canonical JSON of the line without its ``signatures`` field (``prev`` included, so a
  signature also covers the history before the line). A rewrite then needs the server's key.
- **The decryption committee** co-signs the rounds it released (encrypted runs). A member knows
  the round, how many updates the sum it decrypted holds, the sum's bytes and the DP mechanism
  announced to it, so it signs a :func:`committee_statement` of exactly those
  (``round``, ``contributors``, ``sum_sha256``, ``noise_multiplier``, ``clip``,
  ``sample_rate``, ``expected_participants``, ``delta``, ``run_id`` and the server's ledger
  key ``server_key``, so that a ledger signed again with another key loses them) with its own
  device key
  and returns it with its decryption. The server puts the co-signatures in the round's line
  (``signatures.committee``); the auditor checks each against the line and the registered device
  keys. A rewrite of a co-signed round then needs device keys as well.
- **Device keys.** A simulated client's key is derived from the run's device seed
  (``RUN_DIR/signing/devices.seed``, 0600) and its client id (:func:`simulated_device_key`);
  the operator registers the public keys in ``RUN_DIR/signing/devices.json``
  (:func:`register_simulated_devices`). A device keeps an Ed25519 key in its key folder
  (``device-signing.key``, :func:`load_or_create_signing_key`) and the operator registers its
  public key in the same file.

Limit: in a simulation one machine holds every key (the server's and the devices' seed), so
signatures there show the mechanism works, not that the parties are separate.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import DataError
from common.io import atomic_write_bytes, atomic_write_json
from common.privacy.ledger import canonical_json

__all__ = [
    "COSIGNATURE_RECORD",
    "COSIGN_REQUEST_RECORD",
    "DEVICE_KEY_FILE",
    "DEVICE_REGISTRY_FILE",
    "DEVICE_SEED_FILE",
    "MECHANISM_FIELDS",
    "SERVER_KEY_FILE",
    "SIGNATURE_SCHEME",
    "SIGNING_DIR",
    "STATEMENT_FIELDS",
    "Cosignature",
    "Ed25519Signer",
    "committee_statement",
    "cosign_request",
    "cosignature_problem",
    "load_or_create_signing_key",
    "load_signing_key",
    "public_key_hex",
    "read_device_registry",
    "register_device",
    "register_simulated_devices",
    "server_signer",
    "simulated_device_key",
    "statement_from_request",
    "sum_digest",
    "verify_signature",
]

SIGNATURE_SCHEME = "ed25519"
"""The header's ``signature_scheme``."""
SIGNING_DIR = "signing"
"""Folder of the run's signing keys, inside the run folder."""
SERVER_KEY_FILE = "server.key"
"""The server's ledger key in :data:`SIGNING_DIR` (owner-only)."""
DEVICE_SEED_FILE = "devices.seed"
"""The seed the simulated clients derive their keys from, in :data:`SIGNING_DIR` (owner-only)."""
DEVICE_REGISTRY_FILE = "devices.json"
"""The registered device public keys, in :data:`SIGNING_DIR`: ``{"format": 1, "keys": {id:
hex}}``."""
DEVICE_KEY_FILE = "device-signing.key"
"""A device's own key in its key folder (owner-only)."""

STATEMENT_FIELDS = (
    "type",
    "run_id",
    "server_key",
    "round",
    "contributors",
    "sum_sha256",
    "noise_multiplier",
    "clip",
    "sample_rate",
    "expected_participants",
    "delta",
)
"""The fields of a committee member's statement (:func:`committee_statement`)."""

COSIGN_REQUEST_RECORD = "fedrec-cosign"
"""Config record of a decrypt request asking the member to co-sign (:func:`cosign_request`)."""
COSIGNATURE_RECORD = "fedrec-cosignature"
"""Config record of a decrypt reply holding the member's co-signature
(:meth:`Cosignature.to_wire`)."""

MECHANISM_FIELDS = ("noise_multiplier", "clip", "sample_rate", "expected_participants", "delta")
"""The DP mechanism a committee statement names, as announced with the round."""

_REGISTRY_FORMAT = 1
_REL_TOL = 1e-9


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key as 64 lowercase hex digits."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def verify_signature(public_key: str, signature: str, message: bytes) -> bool:
    """Whether ``signature`` (hex) is ``public_key``'s (hex) Ed25519 signature of ``message``;
    a malformed key or signature is simply not valid."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key))
        key.verify(bytes.fromhex(signature), message)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True)
class Ed25519Signer:
    """Signs ledger lines (:class:`common.privacy.ledger.LineSigner`) with an Ed25519 key."""

    key: Ed25519PrivateKey

    @property
    def scheme(self) -> str:
        """:data:`SIGNATURE_SCHEME`."""
        return SIGNATURE_SCHEME

    @property
    def public_key(self) -> str:
        """The public key, hex (the header's ``server_key``)."""
        return public_key_hex(self.key)

    def sign(self, message: bytes) -> str:
        """The hex Ed25519 signature of ``message``."""
        return self.key.sign(message).hex()


# ---------------------------------------------------------------------------------- key files


def _write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never overwrite a key
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_owner_only(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise DataError(
            f"the key file is readable by others (mode {mode:o}); chmod 600 it", path=path
        )


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read an owner-only Ed25519 private key (PKCS#8 PEM).

    Raises
    ------
    DataError
        If the file is missing, readable by group or others, or not an Ed25519 key.
    """
    path = Path(path)
    try:
        _check_owner_only(path)
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read the signing key: {err.strerror or err}", path=path) from err
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise DataError(f"not a PEM private key: {err}", path=path) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise DataError("not an Ed25519 key", path=path)
    return key


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The key at ``path``, made there (owner-only 0600, folder 0700) if there is none."""
    path = Path(path)
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # made by another process meanwhile
            _write_private_key(path, Ed25519PrivateKey.generate())
    return load_signing_key(path)


def server_signer(run_dir: Path) -> Ed25519Signer:
    """The server's ledger signer: ``RUN_DIR/signing/server.key``, made on first use."""
    return Ed25519Signer(load_or_create_signing_key(Path(run_dir) / SIGNING_DIR / SERVER_KEY_FILE))


# ------------------------------------------------------------------------------ device keys


def simulated_device_key(seed: bytes, client_id: int) -> Ed25519PrivateKey:
    """Simulated client ``client_id``'s key: SHA-256 of a label, the run's seed and the id."""
    material = hashlib.sha256(
        b"fedrec device signing key\x00" + seed + b"\x00" + str(client_id).encode()
    )
    return Ed25519PrivateKey.from_private_bytes(material.digest())


def register_simulated_devices(run_dir: Path, n_clients: int) -> Path:
    """Make the run's device seed (once) and register clients ``0..n_clients-1``'s public keys.

    The operator's step in a simulation: the seed file is owner-only; the registry
    (``RUN_DIR/signing/devices.json``) is public. Returns the registry's path.
    """
    folder = Path(run_dir) / SIGNING_DIR
    seed_path = folder / DEVICE_SEED_FILE
    if not seed_path.exists():
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(seed_path, os.urandom(32), mode=0o600)
    seed = read_device_seed(Path(run_dir))
    assert seed is not None
    keys = {str(i): public_key_hex(simulated_device_key(seed, i)) for i in range(n_clients)}
    registry = folder / DEVICE_REGISTRY_FILE
    atomic_write_json(
        registry, {"format": _REGISTRY_FORMAT, "scheme": SIGNATURE_SCHEME, "keys": keys}
    )
    return registry


def register_device(run_dir: Path, device_id: int, public_key: str) -> Path:
    """Add (or replace) one device's public key in the run's registry; returns its path.

    The operator's step in a deployment, once the device's id is known (``fedrec client join``
    makes the device's key, ``device-signing.key``, in its key folder).
    """
    folder = Path(run_dir) / SIGNING_DIR
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    registry = folder / DEVICE_REGISTRY_FILE
    keys = read_device_registry(registry) if registry.exists() else {}
    keys[str(device_id)] = public_key
    atomic_write_json(
        registry, {"format": _REGISTRY_FORMAT, "scheme": SIGNATURE_SCHEME, "keys": keys}
    )
    return registry


def read_device_seed(run_dir: Path) -> bytes | None:
    """The run's device seed, or ``None`` when the run has none (an older run folder)."""
    path = Path(run_dir) / SIGNING_DIR / DEVICE_SEED_FILE
    if not path.exists():
        return None
    _check_owner_only(path)
    return path.read_bytes()


def read_device_registry(path: Path) -> dict[str, str]:
    """The registered device public keys: ``{device id: hex key}``.

    Raises
    ------
    DataError
        If the file cannot be read or is not a registry.
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the device key registry: {err}", path=path) from err
    if not isinstance(payload, dict) or payload.get("format") != _REGISTRY_FORMAT:
        raise DataError("not a device key registry (format 1)", path=path)
    keys = payload.get("keys")
    if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
        raise DataError("the registry's keys must map device ids to hex keys", path=path)
    return {str(k): v for k, v in keys.items()}


# ------------------------------------------------------------------- committee co-signatures


def committee_statement(
    *,
    run_id: str,
    server_key: str,
    server_round: int,
    contributors: int,
    sum_sha256: str,
    noise_multiplier: float,
    clip: float,
    sample_rate: float,
    expected_participants: float,
    delta: float,
) -> dict[str, Any]:
    """What a committee member signs about the round it decrypted (:data:`STATEMENT_FIELDS`)."""
    return {
        "type": "committee",
        "run_id": run_id,
        "server_key": server_key,
        "round": server_round,
        "contributors": contributors,
        "sum_sha256": sum_sha256,
        "noise_multiplier": noise_multiplier,
        "clip": clip,
        "sample_rate": sample_rate,
        "expected_participants": expected_participants,
        "delta": delta,
    }


def sum_digest(fingerprint: str, n_updates: int, chunks: Sequence[bytes]) -> str:
    """SHA-256 hex of an encrypted sum as the committee received it: the key fingerprint, the
    number of updates and every ciphertext chunk (each length-prefixed)."""
    h = hashlib.sha256(b"fedrec encrypted sum\x00")
    h.update(fingerprint.encode("ascii") + b"\x00" + str(n_updates).encode("ascii") + b"\x00")
    for chunk in chunks:
        h.update(len(chunk).to_bytes(8, "big"))
        h.update(chunk)
    return h.hexdigest()


def cosign_request(
    *, run_id: str, server_key: str, mechanism: Mapping[str, float]
) -> dict[str, str | float]:
    """What the server adds to a decrypt request (:data:`COSIGN_REQUEST_RECORD`): the run, its
    ledger key and the round's announced mechanism (:data:`MECHANISM_FIELDS`)."""
    return {
        "run_id": run_id,
        "server_key": server_key,
        **{name: float(mechanism[name]) for name in MECHANISM_FIELDS},
    }


def statement_from_request(
    request: Mapping[str, Any], *, server_round: int, contributors: int, sum_sha256: str
) -> dict[str, Any] | None:
    """The statement a member signs for a :func:`cosign_request` (``None`` if malformed)."""
    run_id, server_key = request.get("run_id"), request.get("server_key")
    if not (isinstance(run_id, str) and isinstance(server_key, str)):
        return None
    mechanism: dict[str, float] = {}
    for name in MECHANISM_FIELDS:
        value = request.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        mechanism[name] = float(value)
    return committee_statement(
        run_id=run_id,
        server_key=server_key,
        server_round=server_round,
        contributors=contributors,
        sum_sha256=sum_sha256,
        **mechanism,
    )


@dataclass(frozen=True)
class Cosignature:
    """A committee member's signed statement, as the round's line carries it."""

    key: str
    """The member's public key (hex)."""
    statement: dict[str, Any]
    signature: str

    @classmethod
    def make(cls, key: Ed25519PrivateKey, statement: Mapping[str, Any]) -> Cosignature:
        """Sign ``statement`` (its canonical JSON) with ``key``."""
        body = dict(statement)
        return cls(public_key_hex(key), body, key.sign(canonical_json(body)).hex())

    def to_record(self) -> dict[str, Any]:
        """The JSON form in ``signatures.committee``."""
        return {"key": self.key, "statement": dict(self.statement), "signature": self.signature}

    def to_wire(self) -> dict[str, str]:
        """The flat form a decrypt reply carries (:data:`COSIGNATURE_RECORD`)."""
        statement = canonical_json(self.statement).decode("utf-8")
        return {"key": self.key, "statement": statement, "signature": self.signature}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any] | None) -> Cosignature | None:
        """Read :meth:`to_wire`'s form; ``None`` when absent or malformed."""
        if wire is None or not isinstance(wire.get("statement"), str):
            return None
        try:
            statement = json.loads(wire["statement"])
        except ValueError:
            return None
        return cls.from_record({**wire, "statement": statement})

    @classmethod
    def from_record(cls, record: Any) -> Cosignature | None:
        """Read the JSON form; ``None`` when it is malformed."""
        if not isinstance(record, Mapping):
            return None
        key, statement, signature = (record.get(k) for k in ("key", "statement", "signature"))
        if not (
            isinstance(key, str) and isinstance(signature, str) and isinstance(statement, dict)
        ):
            return None
        return cls(key, statement, signature)

    def valid(self) -> bool:
        """Whether the signature is the key's over the statement."""
        try:
            body = canonical_json(self.statement)
        except (TypeError, ValueError):
            return False
        return verify_signature(self.key, self.signature, body)


def cosignature_problem(
    cosignature: Cosignature,
    *,
    line: Mapping[str, Any],
    run_id: str,
    server_key: str,
    delta: float,
) -> str | None:
    """What is wrong with a round line's co-signature, in one line, or ``None``: it must be
    valid and state the line's round, participant count and mechanism, and the run, server key
    and delta of the header."""
    if not cosignature.valid():
        return "its signature does not verify"
    s = cosignature.statement
    if set(s) != set(STATEMENT_FIELDS) or s["type"] != "committee":
        return "its statement does not have the committee statement's fields"
    if s["run_id"] != run_id:
        return f"it is for run {s['run_id']!r}, not {run_id!r}"
    if s["server_key"] != server_key:
        return "it names another server key than the header's (the ledger was signed again)"
    if s["round"] != line.get("round"):
        return f"it is for round {s['round']!r}"
    if s["contributors"] != line.get("participated"):
        return (
            f"it states {s['contributors']!r} contributors, the line {line.get('participated')!r}"
        )
    expected = {
        "noise_multiplier": line.get("noise_multiplier"),
        "clip": line.get("clip"),
        "sample_rate": line.get("sample_rate"),
        "expected_participants": line.get("expected_participants"),
        "delta": delta,
    }
    for name, value in expected.items():
        stated = s[name]
        if not (
            isinstance(stated, int | float)
            and isinstance(value, int | float)
            and math.isclose(stated, value, rel_tol=_REL_TOL)
        ):
            return f"it states {name} {stated!r}, the ledger {value!r}"
    return None
