"""Threshold mode on the server: the key ceremony among the holders, and checked decryptions.

The server holds the collective public context only, and relays (docs/design.md, "Threshold
decryption"):

- :func:`run_ceremony` runs the three steps of :mod:`common.he.ceremony` over Flower messages
  (``query.keygen``) with the key holders, and writes the public folder
  (:func:`common.he.shares.write_public`) once every holder reports the same key.
- :class:`ThresholdSum` is the :class:`server.aggregation.UpdateSum` of a threshold run. It
  checks each upload (format, the sender's signature on its digest, a registered sender), drops a
  repeated sender or ciphertext, and adds the rest. To release the sum it asks every holder to
  commit to the sum's digest and the signed contributor list (``query.threshold``, commit), hands
  each sender its upload's second halves back to tag them under the holders' seeds
  (``query.tag``), sends the sum
  and the tags to the committed holders (decrypt), and combines their partial decryptions
  (:func:`common.he.combine_sum`). Any holder's refusal, or fewer than ``threshold`` holders,
  discards the sum, with the reason.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common.he import CiphertextRejectedError, ServerKeys
from common.he.ceremony import CeremonyPlan, new_plan
from common.he.codec import combine_sum
from common.he.params import HEParams
from common.he.sealio import SealFormatError
from common.he.shares import Transcript, write_public
from common.he.statements import finish_statement, slot_name, upload_statement
from common.he.tags import chunks_digest, split_upload, upload_digest
from common.he.threshold import ThresholdError, public_context
from common.privacy.signing import (
    COSIGN_REQUEST_RECORD,
    verify_signature,
)
from common.protocol import (
    CONFIG_RECORD,
    HE_CEREMONY,
    HE_DECRYPT_SECONDS,
    HE_PUBLIC_CONTEXT,
    HE_RECORD,
    HE_REGISTRY,
    HE_SLOT,
    HE_SUM_RECORD,
    HE_UPLOAD_RECORD,
    KEYGEN_MESSAGE_TYPE,
    RELEASE,
    SERVER_ROUND,
    TAG_MESSAGE_TYPE,
    THRESHOLD_MESSAGE_TYPE,
    THRESHOLD_RECORD,
    RoundConfig,
)
from server.he import CommitteeSum

__all__ = ["CeremonyError", "HolderNode", "ThresholdSum", "run_ceremony"]

logger = logging.getLogger(__name__)


class CeremonyError(RuntimeError):
    """The key ceremony did not complete (a holder failed or disagreed)."""


@dataclass(frozen=True)
class HolderNode:
    """A key holder: its Shamir index, Flower node and client id."""

    index: int
    node: int
    client: int


def _send(
    grid: Grid,
    contents: Mapping[int, RecordDict],
    *,
    message_type: str,
    timeout: float,
    group: str,
) -> dict[int, Message]:
    """One message per node; the replies by source node."""
    messages = [
        Message(
            content,
            dst_node_id=node,
            message_type=message_type,
            ttl=timeout + 60.0,
            group_id=group,
        )
        for node, content in contents.items()
    ]
    replies = grid.send_and_receive(messages, timeout=timeout)
    return {reply.metadata.src_node_id: reply for reply in replies}


def _reply_record(reply: Message | None, what: str) -> ConfigRecord:
    if reply is None:
        raise CeremonyError(f"{what}: no reply")
    if reply.has_error():
        raise CeremonyError(f"{what}: {reply.error.reason}")
    record = reply.content.config_records.get(THRESHOLD_RECORD)
    if record is None:
        raise CeremonyError(f"{what}: the reply has no {THRESHOLD_RECORD!r} record")
    return record


def run_ceremony(
    grid: Grid,
    holders: list[HolderNode],
    *,
    params: HEParams,
    threshold: int,
    keydir: Path,
    registry: Mapping[str, str],
    timeout: float,
    relay_registry: bool = False,
) -> Transcript:
    """The key ceremony with ``holders`` (indices 1..n); writes ``keydir``'s public folder.

    A ``hello`` wave first asks each holder node which client it is (``holders`` is updated);
    the plan then names every holder's client, and each holder refuses a plan that names
    another client for it or a start record of its own that is not its own. Every start and
    finish signature binds the plan's digest and must be by the registered key of the client
    the plan names. ``relay_registry``: send the device registry with each request (devices
    have no run folder to read it from).

    Raises :class:`CeremonyError` naming the holder and step that failed.
    """
    if sorted(h.index for h in holders) != list(range(1, len(holders) + 1)):
        raise CeremonyError(f"holder indices {[h.index for h in holders]} are not 1..n")
    start = time.perf_counter()
    plan: CeremonyPlan | None = None

    def request(step: str, extra: Mapping[int, Mapping[str, object]]) -> dict[int, ConfigRecord]:
        contents = {}
        for h in holders:
            record = ConfigRecord({"step": step, "index": h.index})
            if plan is not None:
                record["plan"] = plan.to_json()
            if relay_registry:
                record["registry"] = json.dumps(dict(registry))
            for key, value in extra.get(h.index, {}).items():
                record[key] = value  # type: ignore[assignment]
            contents[h.node] = RecordDict({THRESHOLD_RECORD: record})
        replies = _send(
            grid,
            contents,
            message_type=KEYGEN_MESSAGE_TYPE,
            timeout=timeout,
            group=f"keygen-{step}",
        )
        return {
            h.index: _reply_record(replies.get(h.node), f"ceremony {step}, holder {h.index}")
            for h in holders
        }

    hello = request("hello", {})
    for i, h in enumerate(holders):
        client = hello[h.index].get("client")
        if not isinstance(client, int) or str(client) not in registry:
            raise CeremonyError(f"holder {h.index} answered as unregistered client {client!r}")
        holders[i] = HolderNode(index=h.index, node=h.node, client=client)
    plan = new_plan(
        params, holders=len(holders), threshold=threshold, clients=[h.client for h in holders]
    )
    started = request("start", {})
    starts = []
    for h in holders:
        reply = started[h.index]
        starts.append(
            {
                "index": h.index,
                "client": h.client,
                "share_sha256": reply["share_sha256"],
                "exchange_key": reply["exchange_key"],
                "signature": reply["signature"],
            }
        )
    starts_json = json.dumps(starts)
    dealt = request("deal", {h.index: {"starts": starts_json} for h in holders})
    publics = [started[j]["public_share"] for j in plan.holders]
    finish_extra: dict[int, dict[str, object]] = {}
    for h in holders:
        sealed = [list(dealt[i]["sealed"])[h.index - 1] for i in plan.holders]  # type: ignore[arg-type]
        finish_extra[h.index] = {"starts": starts_json, "public_shares": publics, "sealed": sealed}
    finished = request("finish", finish_extra)
    fingerprints = {str(finished[j]["fingerprint"]) for j in plan.holders}
    if len(fingerprints) != 1:
        raise CeremonyError("the holders computed different collective keys; ceremony void")
    fingerprint = fingerprints.pop()
    commitments: dict[int, str] = {}
    signatures: dict[int, str] = {}
    for h in holders:
        reply = finished[h.index]
        statement = finish_statement(plan.digest(), h.index, fingerprint, str(reply["digest"]))
        key = registry.get(str(h.client))
        if key is None or not verify_signature(key, str(reply["signature"]), statement):
            raise CeremonyError(f"holder {h.index}'s finish is not signed by device {h.client}")
        commitments[h.index] = str(reply["digest"])
        signatures[h.index] = str(reply["signature"])
    context = _public_context_of(plan, publics)
    transcript = Transcript(
        ceremony_id=plan.ceremony_id,
        seed=plan.seed.hex(),
        holders=plan.holders,
        threshold=threshold,
        fingerprint=fingerprint,
        commitments=commitments,
        nodes={h.index: h.node for h in holders},
        clients={h.index: h.client for h in holders},
        plan_digest=plan.digest(),
        signatures=signatures,
    )
    write_public(keydir, context=context, params=params, transcript=transcript)
    logger.info(
        "key ceremony %s: %d-of-%d key %s in %.1f s",
        plan.ceremony_id[:8],
        threshold,
        len(holders),
        fingerprint[:16],
        time.perf_counter() - start,
    )
    return transcript


def _public_context_of(plan: CeremonyPlan, publics: Sequence[object]) -> object:
    from common.he.threshold import collective_public_key, common_polynomial, ring_of

    ring = ring_of(plan.params)
    shares = [
        np.frombuffer(p, dtype="<u8").reshape(len(ring.key_primes), ring.degree).astype(np.uint64)
        for p in publics
        if isinstance(p, bytes)
    ]
    key = collective_public_key(ring, common_polynomial(ring, plan.seed), shares)
    return public_context(plan.params, key)


def _tag_reply(
    record: ConfigRecord, committee: Sequence[int], client: int
) -> tuple[dict[str, list[int]], dict[str, str]]:
    """A sender's tags and signatures for every committed holder, or :class:`CeremonyError`."""
    try:
        tags = json.loads(str(record["tags"]))
        signatures = json.loads(str(record["signatures"]))
        for j in committee:
            values, signature = tags[str(j)], signatures[str(j)]
            if not (isinstance(values, list) and all(isinstance(v, int) for v in values)):
                raise TypeError("tags must be integers")
            if not isinstance(signature, str):
                raise TypeError("a signature must be a string")
    except (KeyError, TypeError, ValueError) as err:
        raise CeremonyError(f"tags of sender {client}: malformed or incomplete ({err})") from None
    return tags, signatures


@dataclass
class _Upload:
    node: int
    client: int
    digest: str
    signature: str
    firsts: list[str]
    """Digests of the chunks' first halves (:func:`common.he.tags.split_upload`)."""
    seconds: list[bytes]
    """The chunks' second halves: all the tags read, handed back to the sender."""


class ThresholdSum(CommitteeSum):
    """Adds signed encrypted uploads; a threshold of key holders decrypts the checked sum.

    Parameters
    ----------
    keys:
        The collective public context.
    grid:
        Where the holders' and senders' requests go.
    holders:
        The key holders (their Shamir indices, nodes and clients).
    threshold:
        Partial decryptions needed.
    registry:
        Registered device public keys by client id (the senders' and holders').
    min_contributors:
        Fewest distinct senders of a sum the server asks the holders to decrypt; each holder
        enforces its own floor too.
    timeout:
        Seconds per wave of messages.
    run_id:
        Names the slots (a holder decrypts each once).
    server_key:
        The server's ledger key: with it, DP rounds are co-signed as in :class:`CommitteeSum`.
    public_context_bytes:
        Sent with each train message when given (deployments: devices get the key that way).
    ceremony:
        The ceremony's record, sent with the key (deployments): devices check every holder's
        signature of it before they encrypt.
    relay_registry:
        Send the device registry with each holder request (deployments).
    seed:
        The run's seed (unused by the threshold release; kept for the committee interface).
    """

    def __init__(
        self,
        keys: ServerKeys,
        grid: Grid,
        *,
        holders: Sequence[HolderNode],
        threshold: int,
        registry: Mapping[str, str],
        min_contributors: int,
        timeout: float,
        run_id: str,
        server_key: str | None = None,
        public_context_bytes: bytes | None = None,
        ceremony: Transcript | None = None,
        relay_registry: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            keys,
            grid,
            committee_size=max(2, threshold),
            timeout=timeout,
            seed=seed,
            run_id=run_id if server_key else None,
            server_key=server_key,
        )
        self.holders = list(holders)
        self.threshold = threshold
        self.registry = dict(registry)
        self.min_contributors = min_contributors
        self.run_id = run_id
        self.public_context_bytes = public_context_bytes
        self.ceremony_json = None if ceremony is None else json.dumps(ceremony.to_json())
        self.relay_registry = relay_registry
        self._slot = ""
        self._uploads: list[_Upload] = []

    def announce(self, config: ConfigRecord) -> None:
        """The key, the slot (run, round or release) senders sign, and the DP mechanism."""
        super().announce(config)
        release = config.get(RELEASE)
        server_round = config.get(SERVER_ROUND)
        self._slot = slot_name(
            self.run_id,
            int(server_round) if isinstance(server_round, int) else 0,
            release if isinstance(release, str) else None,
        )
        config[HE_SLOT] = self._slot
        if self.public_context_bytes is not None:
            config[HE_PUBLIC_CONTEXT] = self.public_context_bytes
        if self.ceremony_json is not None:  # what the devices check the key against
            config[HE_CEREMONY] = self.ceremony_json
        if self.relay_registry:
            config[HE_REGISTRY] = json.dumps(self.registry)

    def begin(self, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> None:
        super().begin(server_round, global_arrays)
        self._uploads = []

    def add(self, msg: Message) -> str | None:
        """Check one signed upload and add it; a rejected one leaves the sum unchanged."""
        assert self._acc is not None, "begin() first"
        record = msg.content.config_records.get(HE_RECORD)
        upload = msg.content.config_records.get(HE_UPLOAD_RECORD)
        if record is None or upload is None:
            return "reply has no signed encrypted upload (threshold mode)"
        client, digest = upload.get("client"), upload.get("digest")
        signature = upload.get("signature")
        if not (isinstance(client, int) and isinstance(digest, str) and isinstance(signature, str)):
            return "malformed upload signature record"
        if upload.get("slot") != self._slot:
            return f"upload for slot {upload.get('slot')!r}, this is {self._slot!r}"
        chunks = record.get("chunks")
        if not isinstance(chunks, list) or not all(isinstance(c, bytes) for c in chunks):
            return "malformed upload: 'chunks' must be a list of bytes"
        try:
            firsts, seconds = split_upload(chunks)  # type: ignore[arg-type]
        except (SealFormatError, ValueError) as err:
            return f"ciphertext rejected (malformed): {err}"
        if upload_digest(firsts, seconds) != digest:
            return "the upload's digest does not match its ciphertexts"
        key = self.registry.get(str(client))
        statement = upload_statement(self.keys.fingerprint, self._slot, client, digest)
        if key is None or not verify_signature(key, signature, statement):
            return f"upload not signed by registered device {client}"
        if any(u.client == client for u in self._uploads):
            return f"repeated sender {client}: dropped"
        if any(u.digest == digest for u in self._uploads):
            return "repeated ciphertext: dropped"
        problem = self._accumulate(msg, record)
        if problem is not None:
            return problem
        self._uploads.append(
            _Upload(
                node=msg.metadata.src_node_id,
                client=client,
                digest=digest,
                signature=signature,
                firsts=firsts,
                seconds=seconds,
            )
        )
        return None

    def total(self) -> dict[str, np.ndarray] | None:
        """The holders' checked, combined decryption of the sum, or ``None`` (see why_not)."""
        assert self._acc is not None and self._layout is not None, "begin() first"
        if self._acc.count < max(1, self.min_contributors):
            self._why = (
                f"{self._acc.count} contributor(s), the holders decrypt no fewer than "
                f"{self.min_contributors}"
            )
            return None
        encrypted_sum, sum_record = self._sealed_sum()
        start = time.perf_counter()
        try:
            result = self._release(encrypted_sum, sum_record)
        except (CeremonyError, ThresholdError, CiphertextRejectedError) as err:
            self._why = str(err)
            result = None
        self._seconds[HE_DECRYPT_SECONDS] = time.perf_counter() - start
        return result

    def _wave(
        self, contents: Mapping[int, RecordDict], message_type: str, step: str
    ) -> dict[int, Message]:
        """One message per node for this slot's ``step``; the replies by node."""
        return _send(
            self.grid,
            contents,
            message_type=message_type,
            timeout=self.timeout,
            group=f"{self._slot}-{step}",
        )

    def _tag_config(self, seeds_json: str, upload: _Upload) -> ConfigRecord:
        record = ConfigRecord(
            {
                "slot": self._slot,
                "fingerprint": self.keys.fingerprint,
                "seeds": seeds_json,
                "firsts": json.dumps(upload.firsts),
                "seconds": upload.seconds,
            }
        )
        if self.public_context_bytes is not None:
            record[HE_PUBLIC_CONTEXT] = self.public_context_bytes
        return record

    def _base(self, sum_hash: str, contributors: str) -> dict[str, str | int]:
        base: dict[str, str | int] = {
            "slot": self._slot,
            "fingerprint": self.keys.fingerprint,
            "sum_digest": sum_hash,
            "contributors": contributors,
            "min_contributors": self.min_contributors,
        }
        if self.relay_registry:
            base["registry"] = json.dumps(self.registry)
        return base

    def _release(self, encrypted_sum: object, sum_record: ConfigRecord) -> dict[str, np.ndarray]:
        from common.he.wire import EncryptedSum

        assert isinstance(encrypted_sum, EncryptedSum)
        phases: dict[str, float] = {}
        clock = time.perf_counter()
        sum_hash = chunks_digest(encrypted_sum.chunks)
        contributors = json.dumps([[u.client, u.digest, u.signature] for u in self._uploads])
        base = self._base(sum_hash, contributors)
        # 1. every holder fixes the sum and the list, then draws its seed
        commit = {
            h.node: RecordDict({THRESHOLD_RECORD: ConfigRecord({**base, "step": "commit"})})
            for h in self.holders
        }
        replies = self._wave(commit, THRESHOLD_MESSAGE_TYPE, "commit")
        seeds: dict[int, str] = {}
        refusals = []
        for h in self.holders:
            reply = replies.get(h.node)
            if reply is None or reply.has_error():
                why = "no reply" if reply is None else reply.error.reason
                refusals.append(f"holder {h.index}: {why}")
                continue
            record = reply.content.config_records.get(THRESHOLD_RECORD)
            seed = None if record is None else record.get("seed")
            if isinstance(seed, str):
                seeds[h.index] = seed
        if len(seeds) < self.threshold:
            raise CeremonyError(
                f"{len(seeds)} of {len(self.holders)} key holders committed, the threshold is "
                f"{self.threshold} ({'; '.join(refusals)[:300]})"
            )
        committee = sorted(seeds)
        phases["commit"], clock = time.perf_counter() - clock, time.perf_counter()
        # 2. each sender tags its own upload under the committed holders' seeds
        seeds_json = json.dumps({str(j): seeds[j] for j in committee})
        tag_requests = {
            u.node: RecordDict({THRESHOLD_RECORD: self._tag_config(seeds_json, u)})
            for u in self._uploads
        }
        tag_replies = self._wave(tag_requests, TAG_MESSAGE_TYPE, "tag")
        tags: dict[int, tuple[dict[str, list[int]], dict[str, str]]] = {}
        for u in self._uploads:
            record = _reply_record(tag_replies.get(u.node), f"tags of sender {u.client}")
            tags[u.client] = _tag_reply(record, committee, u.client)
        phases["tags"], clock = time.perf_counter() - clock, time.perf_counter()
        # 3. the committee checks the tags and decrypts
        content: dict[int, RecordDict] = {}
        cosign, expected = self._cosign_request(encrypted_sum)
        nodes = {h.index: h.node for h in self.holders}
        for j in committee:
            own = [
                [u.client, tags[u.client][0][str(j)], tags[u.client][1][str(j)]]
                for u in self._uploads
            ]
            records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
                THRESHOLD_RECORD: ConfigRecord(
                    {
                        **base,
                        "step": "decrypt",
                        "committee": json.dumps(committee),
                        "tags": json.dumps(own),
                    }
                ),
                HE_SUM_RECORD: sum_record,
                CONFIG_RECORD: RoundConfig(self._round).to_record(),
            }
            if cosign is not None:
                records[COSIGN_REQUEST_RECORD] = cosign
            content[nodes[j]] = RecordDict(records)
        replies = self._wave(content, THRESHOLD_MESSAGE_TYPE, "decrypt")
        partials: dict[int, list[bytes]] = {}
        for j in committee:
            record = _reply_record(replies.get(nodes[j]), f"holder {j}'s partial decryption")
            partial = record.get("partial")
            if not isinstance(partial, list):
                raise CeremonyError(f"holder {j} sent no partial decryption")
            partials[j] = [p for p in partial if isinstance(p, bytes)]
        phases["decrypt"], clock = time.perf_counter() - clock, time.perf_counter()
        total = combine_sum(encrypted_sum, partials, keys=self.keys, threshold=self.threshold)
        phases["combine"] = time.perf_counter() - clock
        if expected is not None:
            self._cosignatures = self._collect_cosignatures(replies.values(), expected)
        logger.info(
            "%s: holders %s decrypted %d senders' sum (commit %.1f s, tags %.1f s, decrypt "
            "%.1f s, combine %.1f s)",
            self._slot,
            committee,
            len(self._uploads),
            phases["commit"],
            phases["tags"],
            phases["decrypt"],
            phases["combine"],
        )
        return {k: v.astype(np.float64) for k, v in total.items()}
