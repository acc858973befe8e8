"""A device's part in the threshold scheme: key holder (ceremony, decryption) and sender (tags).

Key holders (docs/design.md, "Threshold decryption") answer three kinds of messages:

- ``query.keygen`` (:func:`handle_keygen`): the ceremony's start, deal and finish steps
  (:mod:`common.he.ceremony`); the pending state and then the share live in the holder's own
  folder, owner-only.
- ``query.threshold`` (:func:`handle_threshold`): ``commit`` fixes a slot's sum (by digest) and
  its signed contributor list and draws the check seed; ``decrypt`` receives the sum and the
  senders' tags, checks them (:mod:`common.he.tags`) and only then returns its flooded partial
  decryption, signed and bound to the slot, the sum, the contributors and the committee. A holder
  decrypts each slot once, refuses a list of fewer distinct registered senders than its own
  floor, and stops when its share's decryption budget is spent.

Every sender answers ``query.tag`` (:func:`handle_tag`): the server hands its own upload's second
halves back (with its first halves' digests), the sender checks they are the upload it signed
(:func:`sign_upload` kept the digest) and signs its tags under each holder's seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

from common.errors import FedrecError
from common.he import ServerKeys, sum_from_record
from common.he.ceremony import (
    CeremonyPlan,
    HolderState,
    exchange_statement,
    holder_deal,
    holder_finish,
    holder_start,
)
from common.he.shares import load_share, save_share, write_public_context
from common.he.statements import (
    contributors_digest,
    finish_statement,
    partial_statement,
    seed_statement,
    tags_statement,
    upload_statement,
)
from common.he.tags import (
    chunks_digest,
    halves_of,
    new_seed,
    split_upload,
    sum_tags,
    tags_of,
    tags_of_halves,
    upload_digest,
)
from common.he.threshold import ThresholdError, plan_flood, public_context, ring_of
from common.io import atomic_write_bytes, atomic_write_json
from common.privacy.signing import verify_signature
from common.protocol import HE_SLOT, HE_SUM_RECORD, THRESHOLD_RECORD

__all__ = [
    "DECRYPTIONS_FILE",
    "PENDING_FILE",
    "Holder",
    "ThresholdRefusedError",
    "handle_keygen",
    "handle_tag",
    "handle_threshold",
    "sign_upload",
]

logger = logging.getLogger(__name__)

PENDING_FILE = "ceremony.pending"
"""A holder's state between the ceremony's steps (secret, owner-only; removed at the end)."""
DECRYPTIONS_FILE = "decryptions.json"
"""The slots a holder committed to and decrypted, and its decryptions so far (owner-only)."""
UPLOADS_STATE = "fedrec-he-uploads"
"""``context.state`` record of a sender's signed upload digests, by slot."""


class ThresholdRefusedError(FedrecError):
    """A holder or sender refuses a request (the reason goes back as the message's error)."""


@dataclass(frozen=True)
class Holder:
    """Who this node is, for the threshold scheme."""

    folder: Path
    """Where its share (and pending ceremony state) lives."""
    client: int
    """Its client id: the registry's key for its public key."""
    signing_key: Ed25519PrivateKey
    registry: Mapping[str, str]
    """Registered device public keys, by client id."""
    min_contributors: int
    """Its own floor: it never decrypts a sum of fewer distinct registered senders."""
    max_decryptions: int
    """Ciphertexts its share may decrypt in all (the flood is sized for it)."""


def _sign(key: Ed25519PrivateKey, message: bytes) -> str:
    return key.sign(message).hex()


def _config(msg: Message) -> ConfigRecord:
    record = msg.content.config_records.get(THRESHOLD_RECORD)
    if record is None:
        raise ThresholdRefusedError(f"the request has no {THRESHOLD_RECORD!r} record")
    return record


def _text(record: ConfigRecord, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ThresholdRefusedError(f"{key!r} must be a string")
    return value


def _int(record: ConfigRecord, key: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ThresholdRefusedError(f"{key!r} must be an integer")
    return value


def _blobs(record: ConfigRecord, key: str) -> list[bytes]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise ThresholdRefusedError(f"{key!r} must be a list of bytes")
    return [v for v in value if isinstance(v, bytes)]


def _json(record: ConfigRecord, key: str) -> Any:
    try:
        return json.loads(_text(record, key))
    except ValueError as err:
        raise ThresholdRefusedError(f"{key!r} is not JSON ({err})") from None


# ------------------------------------------------------------------------------- ceremony


def _verified_starts(
    plan: CeremonyPlan, starts: Any, holder: Holder, state: HolderState
) -> dict[int, dict[str, Any]]:
    """The start records of every holder, each signed by the registered key of the client the
    plan names for it; this holder's own entry must carry its own exchange key."""
    if not isinstance(starts, list):
        raise ThresholdRefusedError("'starts' must be a list")
    out: dict[int, dict[str, Any]] = {}
    for entry in starts:
        index, client = int(entry["index"]), int(entry["client"])
        if index in out:
            raise ThresholdRefusedError(f"two start records for holder {index}")
        if plan.client_of(index) is not None and plan.client_of(index) != client:
            raise ThresholdRefusedError(
                f"holder {index}'s start names client {client}, the plan {plan.client_of(index)}"
            )
        if index == state.index and (
            entry["exchange_key"] != state.exchange_public().hex() or client != holder.client
        ):
            raise ThresholdRefusedError(
                "this holder's own start record was replaced (another exchange key or client)"
            )
        key = holder.registry.get(str(client))
        statement = exchange_statement(
            plan, index, str(entry["share_sha256"]), bytes.fromhex(entry["exchange_key"])
        )
        if key is None or not verify_signature(key, entry["signature"], statement):
            raise ThresholdRefusedError(
                f"holder {index}'s exchange key is not signed by registered device {client}"
            )
        out[index] = entry
    if sorted(out) != list(plan.holders):
        raise ThresholdRefusedError(f"start records of holders {sorted(out)}, expected all")
    if len({int(e["client"]) for e in out.values()}) != len(out):
        raise ThresholdRefusedError("one client signs the start of two holders")
    return out


def handle_keygen(msg: Message, holder: Holder) -> RecordDict:
    """One ceremony step (module docstring); the reply's ``threshold`` record. A ``hello``
    before the ceremony tells the server which client this node is."""
    record = _config(msg)
    step = _text(record, "step")
    if step == "hello":
        return RecordDict({THRESHOLD_RECORD: ConfigRecord({"client": holder.client})})
    plan = CeremonyPlan.from_json(_text(record, "plan"))
    index = _int(record, "index")
    pending = holder.folder / PENDING_FILE
    reply = ConfigRecord()
    if plan.client_of(index) not in (None, holder.client):
        raise ThresholdRefusedError(
            f"the plan makes client {plan.client_of(index)} holder {index}; this is client "
            f"{holder.client}"
        )
    if step == "start":
        state, public_share, exchange = holder_start(plan, index)
        holder.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(pending, state.to_bytes(), mode=0o600)
        digest = hashlib.sha256(public_share).hexdigest()
        reply["public_share"] = public_share
        reply["share_sha256"] = digest
        reply["exchange_key"] = exchange.hex()
        reply["client"] = holder.client
        reply["signature"] = _sign(
            holder.signing_key, exchange_statement(plan, index, digest, exchange)
        )
        return RecordDict({THRESHOLD_RECORD: reply})
    state = _pending(pending, plan, index)
    starts = _verified_starts(plan, _json(record, "starts"), holder, state)
    exchange_keys = {j: bytes.fromhex(e["exchange_key"]) for j, e in starts.items()}
    if step == "deal":
        sealed = holder_deal(state, exchange_keys)
        reply["sealed"] = [sealed[j] for j in plan.holders]
        return RecordDict({THRESHOLD_RECORD: reply})
    if step != "finish":
        raise ThresholdRefusedError(f"unknown ceremony step {step!r}")
    publics = dict(zip(plan.holders, _blobs(record, "public_shares"), strict=True))
    for j, blob in publics.items():
        if hashlib.sha256(blob).hexdigest() != starts[j]["share_sha256"]:
            raise ThresholdRefusedError(f"holder {j}'s public share is not the one it signed")
    to_me = dict(zip(plan.holders, _blobs(record, "sealed"), strict=True))
    share, public_key = holder_finish(
        state, public_shares=publics, sealed=to_me, exchange_keys=exchange_keys
    )
    save_share(holder.folder, share, ceremony_id=plan.ceremony_id)
    write_public_context(
        holder.folder, context=public_context(plan.params, public_key), params=plan.params
    )
    atomic_write_json(holder.folder / DECRYPTIONS_FILE, {"decrypted": 0, "slots": {}}, mode=0o600)
    pending.unlink(missing_ok=True)
    reply["fingerprint"] = share.fingerprint
    reply["digest"] = share.digest()
    reply["signature"] = _sign(
        holder.signing_key,
        finish_statement(plan.digest(), index, share.fingerprint, share.digest()),
    )
    logger.info("key holder %d: ceremony %s done", index, plan.ceremony_id[:8])
    return RecordDict({THRESHOLD_RECORD: reply})


def _pending(path: Path, plan: CeremonyPlan, index: int) -> HolderState:
    try:
        state = HolderState.from_bytes(path.read_bytes())
    except OSError:
        raise ThresholdRefusedError(f"no pending ceremony state in {path.parent}") from None
    if state.plan != plan or state.index != index:
        raise ThresholdRefusedError("the pending ceremony state belongs to another ceremony")
    return state


# ------------------------------------------------------------------------------ decryption


def _ledger(folder: Path) -> dict[str, Any]:
    path = folder / DECRYPTIONS_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"decrypted": 0, "slots": {}}
    return data


def _verified_contributors(
    record: ConfigRecord, fingerprint: str, slot: str, holder: Holder, floor: int
) -> list[tuple[int, str]]:
    """The signed contributor list: distinct registered senders, at least ``floor``."""
    entries = _json(record, "contributors")
    if not isinstance(entries, list):
        raise ThresholdRefusedError("'contributors' must be a list")
    seen: dict[int, str] = {}
    for entry in entries:
        client, digest, signature = int(entry[0]), str(entry[1]), str(entry[2])
        key = holder.registry.get(str(client))
        if key is None:
            raise ThresholdRefusedError(f"contributor {client} is not a registered device")
        if client in seen:
            raise ThresholdRefusedError(f"contributor {client} is listed twice")
        if not verify_signature(
            key, signature, upload_statement(fingerprint, slot, client, digest)
        ):
            raise ThresholdRefusedError(f"contributor {client}'s upload is not signed by it")
        seen[client] = digest
    if len(set(seen.values())) != len(seen):
        raise ThresholdRefusedError("two contributors list the same upload")
    if len(seen) < floor:
        raise ThresholdRefusedError(
            f"a sum of {len(seen)} distinct senders; this holder decrypts no fewer than {floor}"
        )
    return sorted(seen.items())


def handle_threshold(
    msg: Message, holder: Holder, keys: ServerKeys, *, tamper: float = 0.0
) -> tuple[RecordDict, dict[str, Any] | None]:
    """A holder's commit or decrypt step (module docstring).

    Returns the reply content and, for a decrypt step, what the holder stated (slot, sum
    digest, contributors), for its own ledger. ``tamper`` (simulated faults only) shifts this
    holder's partial decryption so that the combination comes out wrong.
    """
    record = _config(msg)
    step = _text(record, "step")
    slot = _text(record, "slot")
    fingerprint = _text(record, "fingerprint")
    if fingerprint != keys.fingerprint:
        raise ThresholdRefusedError(
            f"the request names key {fingerprint[:16]}..., not this holder's"
        )
    share = load_share(holder.folder)
    if share.fingerprint != keys.fingerprint:
        raise ThresholdRefusedError("this holder's share belongs to another key")
    ledger = _ledger(holder.folder)
    past = ledger["slots"].get(slot)
    if past is not None and past.get("decrypted"):
        raise ThresholdRefusedError(f"slot {slot} was decrypted already: one decryption per slot")
    floor = max(holder.min_contributors, _int(record, "min_contributors"))
    contributors = _verified_contributors(record, fingerprint, slot, holder, floor)
    listed = contributors_digest(contributors)
    sum_digest = _text(record, "sum_digest")
    reply = ConfigRecord()
    if step == "commit":
        seed = new_seed().hex()
        ledger["slots"][slot] = {
            "sum": sum_digest,
            "contributors": listed,
            "seed": seed,
            "decrypted": False,
        }
        atomic_write_json(holder.folder / DECRYPTIONS_FILE, ledger, mode=0o600)
        reply["seed"] = seed
        reply["signature"] = _sign(
            holder.signing_key, seed_statement(fingerprint, slot, share.index, sum_digest, seed)
        )
        return RecordDict({THRESHOLD_RECORD: reply}), None
    if step != "decrypt":
        raise ThresholdRefusedError(f"unknown threshold step {step!r}")
    if past is None or past["sum"] != sum_digest or past["contributors"] != listed:
        raise ThresholdRefusedError(f"slot {slot}: not the sum and contributors this holder fixed")
    total = sum_from_record(msg.content.config_records[HE_SUM_RECORD])
    if chunks_digest(total.chunks) != sum_digest:
        raise ThresholdRefusedError("the sum is not the one whose digest this holder fixed")
    tags = _json(record, "tags")
    by_client = {int(t[0]): t for t in tags} if isinstance(tags, list) else {}
    senders = []
    for client, digest in contributors:
        entry = by_client.get(client)
        if entry is None:
            raise ThresholdRefusedError(f"no tags from contributor {client}")
        values = [int(v) for v in entry[1]]
        statement = tags_statement(fingerprint, slot, client, digest, share.index, values)
        if not verify_signature(holder.registry[str(client)], str(entry[2]), statement):
            raise ThresholdRefusedError(f"contributor {client}'s tags are not signed by it")
        senders.append(values)
    ring = ring_of(keys.params)
    if tags_of(ring, total.chunks, bytes.fromhex(past["seed"])) != sum_tags(ring, senders):
        raise ThresholdRefusedError(
            f"slot {slot}: the sum is not the sum of the listed senders' uploads (tag check)"
        )
    committee = [int(j) for j in _json(record, "committee")]
    chunks = len(total.chunks)
    if ledger["decrypted"] + chunks > holder.max_decryptions:
        raise ThresholdRefusedError(
            f"this share's decryption budget ({holder.max_decryptions} ciphertexts) is spent"
        )
    flood = plan_flood(
        keys.params,
        n_updates=len(contributors),
        parties=len(share.holders),
        members=len(committee),
        max_decryptions=holder.max_decryptions,
    )
    past["decrypted"] = True  # written before anything is released
    ledger["decrypted"] += chunks
    atomic_write_json(holder.folder / DECRYPTIONS_FILE, ledger, mode=0o600)
    try:
        partial = share.partial_decrypt(total.chunks, committee=committee, flood=flood.bits)
    except ThresholdError as err:
        raise ThresholdRefusedError(str(err)) from None
    if tamper:
        partial = [_tampered(p) for p in partial]
    reply["partial"] = partial
    reply["index"] = share.index
    reply["signature"] = _sign(
        holder.signing_key,
        partial_statement(
            fingerprint, slot, share.index, sum_digest, listed, committee, chunks_digest(partial)
        ),
    )
    stated = {"slot": slot, "sum_digest": sum_digest, "contributors": len(contributors)}
    return RecordDict({THRESHOLD_RECORD: reply}), stated


def _tampered(blob: bytes) -> bytes:
    """Fault injection (simulations): change one residue, keeping it below its prime."""
    data = bytearray(blob)
    data[0] = (data[0] + 1) % 256
    return bytes(data)


# ----------------------------------------------------------------------------------- senders


def sign_upload(
    context: Context,
    config: ConfigRecord,
    chunks: list[bytes],
    *,
    fingerprint: str,
    client: int,
    signing_key: Ed25519PrivateKey,
) -> ConfigRecord:
    """The sender's signed digest of its upload for the announced slot (kept in its state)."""
    slot = config.get(HE_SLOT)
    if not isinstance(slot, str):
        raise ThresholdRefusedError(f"the train config names no {HE_SLOT!r}")
    digest = upload_digest(*split_upload(chunks))
    state = context.state.config_records.get(UPLOADS_STATE, ConfigRecord())
    state[slot] = digest
    context.state.config_records[UPLOADS_STATE] = state
    return ConfigRecord(
        {
            "slot": slot,
            "client": client,
            "digest": digest,
            "signature": _sign(signing_key, upload_statement(fingerprint, slot, client, digest)),
        }
    )


def handle_tag(
    msg: Message,
    context: Context,
    keys: ServerKeys,
    *,
    client: int,
    signing_key: Ed25519PrivateKey,
) -> RecordDict:
    """Tag this sender's own upload under each holder's seed (module docstring)."""
    record = _config(msg)
    slot = _text(record, "slot")
    fingerprint = _text(record, "fingerprint")
    state = context.state.config_records.get(UPLOADS_STATE, ConfigRecord())
    digest = state.get(slot)
    if not isinstance(digest, str):
        raise ThresholdRefusedError(f"this sender made no upload for slot {slot}")
    firsts = _json(record, "firsts")
    seconds = _blobs(record, "seconds")
    if not isinstance(firsts, list) or upload_digest(firsts, seconds) != digest:
        raise ThresholdRefusedError(
            f"slot {slot}: the upload sent back is not the one this sender signed"
        )
    ring = ring_of(keys.params)
    try:
        halves = halves_of(ring, seconds)
    except ValueError as err:
        raise ThresholdRefusedError(f"slot {slot}: {err}") from None
    seeds = _json(record, "seeds")
    tags: dict[str, list[int]] = {}
    signatures: dict[str, str] = {}
    for holder, seed in dict(seeds).items():
        values = tags_of_halves(ring, halves, bytes.fromhex(seed))
        tags[str(holder)] = values
        signatures[str(holder)] = _sign(
            signing_key, tags_statement(fingerprint, slot, client, digest, int(holder), values)
        )
    reply = ConfigRecord(
        {
            "client": client,
            "tags": json.dumps(tags),
            "signatures": json.dumps(signatures),
        }
    )
    return RecordDict({THRESHOLD_RECORD: reply})
