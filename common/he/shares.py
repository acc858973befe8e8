"""Threshold key folders: one owner-only share per key holder, the public side for everyone.

A holder's folder (a device's ``keys`` folder, or ``RUN/keys/holders/<client>`` in a simulation)::

    share.json        0o600  the holder's Shamir share S_j, its index, the holders, the threshold,
                             the parameter set, the collective key's fingerprint, a SHA-256 digest
    decryptions.json  0o600  the slots this holder has decrypted (one decryption per slot)

The public folder (``RUN/keys`` or ``fedrec keys ceremony --out``), which the server and every
sender load::

    server.ctx    the collective public context (no secret key anywhere)
    fingerprint   its SHA-256
    params.json   the parameter set
    ceremony.json the ceremony's id, seed of ``a``, holders, threshold, and each holder's share
                  digest (its commitment): a share file that does not match is refused

:func:`common.he.keys.load_server_context` reads the public folder as it reads a single-key one.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts

from common.he.keys import FINGERPRINT, PARAMS, SERVER_CONTEXT, KeyDirError, fingerprint_of
from common.he.params import HEParams
from common.he.threshold import KeyShare
from common.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "CEREMONY_FILE",
    "SHARE_FILE",
    "Transcript",
    "check_transcript",
    "is_threshold",
    "load_share",
    "load_transcript",
    "save_share",
    "write_public",
    "write_public_context",
]

logger = logging.getLogger(__name__)

SHARE_FILE = "share.json"
CEREMONY_FILE = "ceremony.json"
_FORMAT = 1
_FILE_MODE = 0o600
_DIR_MODE = 0o700


@dataclass(frozen=True)
class Transcript:
    """The public record of a ceremony (``ceremony.json``)."""

    ceremony_id: str
    seed: str
    """Hex seed of the common polynomial."""
    holders: tuple[int, ...]
    threshold: int
    fingerprint: str
    commitments: dict[int, str]
    """Each holder's :meth:`KeyShare.digest`."""
    nodes: dict[int, int] | None = None
    """Holder index to Flower node id, when the ceremony ran over Flower."""
    clients: dict[int, int] | None = None
    """Holder index to client id (the device registry's key), when the ceremony ran over
    Flower."""
    plan_digest: str | None = None
    """Digest of the ceremony's plan, which every holder's signatures bind."""
    signatures: dict[int, str] | None = None
    """Each holder's signature of its finish statement (the key and its commitment)."""

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "format": _FORMAT,
            "scheme": "threshold-ckks",
            "ceremony_id": self.ceremony_id,
            "seed": self.seed,
            "holders": list(self.holders),
            "threshold": self.threshold,
            "fingerprint": self.fingerprint,
            "commitments": {str(k): v for k, v in sorted(self.commitments.items())},
        }
        if self.nodes is not None:
            out["nodes"] = {str(k): v for k, v in sorted(self.nodes.items())}
        if self.clients is not None:
            out["clients"] = {str(k): v for k, v in sorted(self.clients.items())}
        if self.plan_digest is not None:
            out["plan_digest"] = self.plan_digest
        if self.signatures is not None:
            out["signatures"] = {str(k): v for k, v in sorted(self.signatures.items())}
        return out

    @classmethod
    def from_json(cls, raw: object, *, where: str) -> Transcript:
        if not isinstance(raw, dict):
            raise KeyDirError(f"{where}: the ceremony record must be a JSON object")
        try:
            if raw.get("format") != _FORMAT:
                raise KeyDirError(f"{where}: ceremony format {raw.get('format')}, expected 1")
            nodes, clients = raw.get("nodes"), raw.get("clients")
            signatures = raw.get("signatures")
            return cls(
                ceremony_id=str(raw["ceremony_id"]),
                seed=str(raw["seed"]),
                holders=tuple(int(j) for j in raw["holders"]),
                threshold=int(raw["threshold"]),
                fingerprint=str(raw["fingerprint"]),
                commitments={int(k): str(v) for k, v in raw["commitments"].items()},
                nodes=None if nodes is None else {int(k): int(v) for k, v in nodes.items()},
                clients=None if clients is None else {int(k): int(v) for k, v in clients.items()},
                plan_digest=None if raw.get("plan_digest") is None else str(raw["plan_digest"]),
                signatures=None
                if signatures is None
                else {int(k): str(v) for k, v in signatures.items()},
            )
        except KeyDirError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise KeyDirError(f"{where}: malformed ceremony record ({err})") from None


def check_transcript(
    transcript: Transcript, *, fingerprint: str, registry: Mapping[str, str]
) -> None:
    """Raise :class:`KeyDirError` unless every holder of the ceremony signed this key.

    What a sender checks before it encrypts under a collective key it was handed: each
    holder's finish statement (the plan's digest, its index, the key's fingerprint, its share's
    commitment) signed by the registered key of the client the ceremony names for it. A server
    that handed out a key of its own would need every holder's device key.
    """
    if transcript.fingerprint != fingerprint:
        raise KeyDirError(
            f"the ceremony made key {transcript.fingerprint[:16]}..., not {fingerprint[:16]}..."
        )
    if transcript.plan_digest is None or transcript.signatures is None or not transcript.clients:
        raise KeyDirError("the ceremony record carries no holder signatures")
    from common.he.statements import finish_statement
    from common.privacy.signing import verify_signature

    for index in transcript.holders:
        client = transcript.clients.get(index)
        key = None if client is None else registry.get(str(client))
        statement = finish_statement(
            transcript.plan_digest, index, fingerprint, transcript.commitments.get(index, "")
        )
        signature = transcript.signatures.get(index, "")
        if key is None or not verify_signature(key, signature, statement):
            raise KeyDirError(
                f"holder {index} (client {client}) did not sign key {fingerprint[:16]}..."
            )


def is_threshold(keydir: Path) -> bool:
    """Whether a key folder holds a threshold key (a ``ceremony.json``)."""
    return (Path(keydir) / CEREMONY_FILE).exists()


def write_public(
    keydir: Path, *, context: ts.Context, params: HEParams, transcript: Transcript
) -> None:
    """Write the public folder of a ceremony (module docstring), atomically, file by file."""
    keydir = Path(keydir)
    if context.has_secret_key():
        raise KeyDirError("a threshold public folder never holds a secret key")
    fingerprint = fingerprint_of(context)
    if fingerprint != transcript.fingerprint:
        raise KeyDirError("the ceremony's fingerprint does not match the public context")
    keydir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(keydir, _DIR_MODE)
    public = context.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    atomic_write_text(keydir / PARAMS, json.dumps(params.to_json(), indent=2) + "\n", mode=0o644)
    atomic_write_bytes(keydir / SERVER_CONTEXT, public, mode=0o644)
    atomic_write_text(
        keydir / CEREMONY_FILE, json.dumps(transcript.to_json(), indent=2) + "\n", mode=0o644
    )
    atomic_write_text(keydir / FINGERPRINT, fingerprint + "\n", mode=0o644)
    logger.info(
        "wrote threshold public key %s (%d-of-%d) to %s",
        fingerprint[:16],
        transcript.threshold,
        len(transcript.holders),
        keydir,
    )


def write_public_context(folder: Path, *, context: ts.Context, params: HEParams) -> None:
    """A holder's copy of the collective public context (``server.ctx``, ``fingerprint``,
    ``params.json``), which it computed itself in the ceremony's last step."""
    folder = Path(folder)
    folder.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    if context.has_secret_key():
        raise KeyDirError("a public context never holds a secret key")
    public = context.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    atomic_write_text(folder / PARAMS, json.dumps(params.to_json(), indent=2) + "\n", mode=0o644)
    atomic_write_bytes(folder / SERVER_CONTEXT, public, mode=0o644)
    atomic_write_text(folder / FINGERPRINT, fingerprint_of(context) + "\n", mode=0o644)


def load_transcript(keydir: Path) -> Transcript:
    """``ceremony.json`` of a public folder; :class:`KeyDirError` if missing or malformed."""
    path = Path(keydir) / CEREMONY_FILE
    try:
        raw = json.loads(path.read_text())
    except OSError as err:
        raise KeyDirError(f"{path}: cannot read ({err.strerror})") from None
    except ValueError as err:
        raise KeyDirError(f"{path}: not JSON ({err})") from None
    return Transcript.from_json(raw, where=str(path))


def save_share(folder: Path, share: KeyShare, *, ceremony_id: str) -> Path:
    """Write ``folder/share.json`` owner-only (the folder made ``0o700``); returns its path."""
    folder = Path(folder)
    folder.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(folder, _DIR_MODE)
    body = {
        "format": _FORMAT,
        "kind": "fedrec-threshold-share",
        "ceremony_id": ceremony_id,
        "index": share.index,
        "holders": list(share.holders),
        "threshold": share.threshold,
        "params": share.params.to_json(),
        "fingerprint": share.fingerprint,
        "shape": list(share.residues.shape),
        "residues": base64.b64encode(share.residues.astype("<u8").tobytes()).decode(),
        "digest": share.digest(),
    }
    path = folder / SHARE_FILE
    atomic_write_text(path, json.dumps(body) + "\n", mode=_FILE_MODE)
    return path


def load_share(folder: Path, *, transcript: Transcript | None = None) -> KeyShare:
    """A holder's share, with every check.

    Raises
    ------
    KeyDirError
        The file is missing, malformed, readable by others, its residues do not match its own
        digest (corrupted or tampered with), or, given the ceremony's ``transcript``, it belongs
        to another key or its digest is not the holder's commitment.
    """
    path = Path(folder) / SHARE_FILE
    try:
        mode = path.stat().st_mode & 0o777
        raw = json.loads(path.read_text())
    except OSError as err:
        raise KeyDirError(f"{path}: cannot read ({err.strerror})") from None
    except ValueError as err:
        raise KeyDirError(f"{path}: not JSON ({err})") from None
    if mode & 0o077:
        raise KeyDirError(f"{path}: a key share must be readable by its owner only (mode {mode:o})")
    try:
        if raw.get("kind") != "fedrec-threshold-share" or raw.get("format") != _FORMAT:
            raise KeyDirError(f"{path}: not a fedrec threshold key share (format 1)")
        residues = np.frombuffer(base64.b64decode(raw["residues"]), dtype="<u8")
        share = KeyShare(
            index=int(raw["index"]),
            holders=tuple(int(j) for j in raw["holders"]),
            threshold=int(raw["threshold"]),
            params=HEParams.from_json(raw["params"]),
            fingerprint=str(raw["fingerprint"]),
            residues=residues.reshape(tuple(raw["shape"])).astype(np.uint64),
        )
        stated = str(raw["digest"])
    except KeyDirError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise KeyDirError(f"{path}: malformed key share ({err})") from None
    if share.digest() != stated:
        raise KeyDirError(f"{path}: the share does not match its digest (corrupted or tampered)")
    if transcript is not None:
        if share.fingerprint != transcript.fingerprint:
            raise KeyDirError(f"{path}: a share of key {share.fingerprint[:16]}..., not this one")
        if transcript.commitments.get(share.index) != stated:
            raise KeyDirError(
                f"{path}: holder {share.index}'s share is not the one committed in the ceremony"
            )
    return share
