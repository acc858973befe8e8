"""The byte strings the parties of the threshold scheme sign (Ed25519 device keys).

Each names its purpose first, so a signature on one can never be replayed as another, and binds
the run's decryption slot (``run/round`` or ``run/release``) and the key's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

__all__ = [
    "contributors_digest",
    "finish_statement",
    "partial_statement",
    "seed_statement",
    "slot_name",
    "tags_statement",
    "upload_statement",
]


def slot_name(run_id: str, server_round: int, release: str | None) -> str:
    """The decryption slot of a round or a warm-start release: a holder decrypts it once."""
    kind = f"release-{release}" if release else "round"
    return f"{run_id}/{kind}/{server_round}"


def upload_statement(fingerprint: str, slot: str, client: int, digest: str) -> bytes:
    """A sender's word on its upload: this digest is my ciphertext for this slot."""
    return f"fedrec-upload\x00{fingerprint}\x00{slot}\x00{client}\x00{digest}".encode()


def contributors_digest(entries: Sequence[tuple[int, str]]) -> str:
    """SHA-256 of a contributor list ``[(client, upload digest), ...]`` (sorted by client)."""
    text = json.dumps(sorted([int(c), str(d)] for c, d in entries), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def seed_statement(fingerprint: str, slot: str, index: int, sum_digest: str, seed: str) -> bytes:
    """A holder's commitment: for this slot I fixed this sum and drew this check seed."""
    return f"fedrec-seed\x00{fingerprint}\x00{slot}\x00{index}\x00{sum_digest}\x00{seed}".encode()


def tags_statement(
    fingerprint: str, slot: str, client: int, digest: str, holder: int, tags: Sequence[int]
) -> bytes:
    """A sender's tags of its own upload under one holder's seed."""
    values = ",".join(str(int(t)) for t in tags)
    return (
        f"fedrec-tags\x00{fingerprint}\x00{slot}\x00{client}\x00{digest}\x00{holder}\x00{values}"
    ).encode()


def partial_statement(
    fingerprint: str,
    slot: str,
    index: int,
    sum_digest: str,
    contributors: str,
    committee: Sequence[int],
    partial_digest: str,
) -> bytes:
    """A holder's partial decryption, bound to the sum, the slot, the contributors and the
    committee it was made for."""
    members = ",".join(str(j) for j in sorted(committee))
    return (
        f"fedrec-partial\x00{fingerprint}\x00{slot}\x00{index}\x00{sum_digest}\x00{contributors}"
        f"\x00{members}\x00{partial_digest}"
    ).encode()


def finish_statement(plan_digest: str, index: int, fingerprint: str, share_digest: str) -> bytes:
    """A holder's word at the end of the ceremony (whose plan it names by digest): this key,
    and my share's commitment. Senders check a threshold of these before they encrypt."""
    return (
        f"fedrec-ceremony-finish\x00{plan_digest}\x00{index}\x00{fingerprint}\x00{share_digest}"
    ).encode()
