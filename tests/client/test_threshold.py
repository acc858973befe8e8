"""A device's part in the threshold scheme (client/threshold.py), with hand-built messages: a key
holder's ceremony steps, its commit and decrypt steps with every refusal, and a sender's tags."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.threshold import (
    DECRYPTIONS_FILE,
    PENDING_FILE,
    Holder,
    ThresholdRefusedError,
    handle_keygen,
    handle_tag,
    handle_threshold,
    sign_upload,
)
from common.he import (
    EncryptedSum,
    ParamSet,
    ServerKeys,
    SumAccumulator,
    encrypt_update,
    from_record,
    layout_of,
    load_server_context,
    to_record,
)
from common.he.ceremony import CeremonyPlan, LocalCeremony, exchange_statement, new_plan, run_local
from common.he.codec import combine_sum
from common.he.shares import SHARE_FILE, load_share, save_share, write_public_context
from common.he.statements import (
    contributors_digest,
    finish_statement,
    partial_statement,
    seed_statement,
    tags_statement,
    upload_statement,
)
from common.he.tags import chunks_digest, split_upload, tags_of
from common.he.threshold import KeyShare, ThresholdError, plan_flood, ring_of
from common.privacy.signing import public_key_hex, verify_signature
from common.protocol import (
    HE_SLOT,
    HE_SUM_RECORD,
    KEYGEN_MESSAGE_TYPE,
    TAG_MESSAGE_TYPE,
    THRESHOLD_MESSAGE_TYPE,
    THRESHOLD_RECORD,
)

pytestmark = pytest.mark.usefixtures("task_identity")

P = ParamSet.THRESHOLD.params
HOLDERS = {1: 11, 2: 12, 3: 13}
"""Shamir index -> the holder's client id (a 2-of-3 key)."""
SENDERS = (1, 2, 3, 4)
SLOTS = ("run/round/1", "run/round/2")
SLOT = SLOTS[0]
FLOOR = 3
"""The holders' own floor of distinct senders."""
RIGHT = 1e-5
"""Largest error of a correct combination (the sums are about 0.1 and more)."""


@dataclass(frozen=True)
class Keyring:
    """A 2-of-3 key made by :func:`run_local`, device keys, and every sender's upload."""

    ceremony: LocalCeremony
    keys: ServerKeys
    devices: dict[int, Ed25519PrivateKey]
    registry: dict[str, str]
    plain: dict[int, dict[str, np.ndarray]]
    uploads: dict[int, ConfigRecord]
    """Each sender's encrypted update (the ``he`` record)."""
    contexts: dict[int, Context]
    """Each sender's node context: the digests it signed, by slot."""
    signed: dict[tuple[int, str], ConfigRecord]
    """Each sender's signed upload record, by (sender, slot)."""

    def digest(self, client: int) -> str:
        return str(self.signed[(client, SLOT)]["digest"])

    def entry(self, client: int, slot: str = SLOT) -> list[Any]:
        """A contributor-list entry: client, upload digest, its signature."""
        signed = self.signed[(client, slot)]
        return [client, signed["digest"], signed["signature"]]

    def total(self, clients: Sequence[int]) -> EncryptedSum:
        acc = SumAccumulator(keys=self.keys, layout=layout_of(self.plain[clients[0]]))
        for c in clients:
            acc.add(from_record(self.uploads[c]))
        return acc.result()

    def plain_sum(self, clients: Sequence[int]) -> dict[str, np.ndarray]:
        return {
            k: np.sum([self.plain[c][k].astype(np.float64) for c in clients], axis=0)
            for k in self.plain[1]
        }


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    from flwr.supercore.task_identity import TaskIdentity  # as the task_identity fixture

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    ceremony = run_local(P, holders=len(HOLDERS), threshold=2)
    public = tmp_path_factory.mktemp("public")
    write_public_context(public, context=ceremony.context, params=P)
    keys = load_server_context(public)
    devices = {c: Ed25519PrivateKey.generate() for c in (*SENDERS, *HOLDERS.values())}
    registry = {str(c): public_key_hex(k) for c, k in devices.items()}
    rng = np.random.default_rng(5)
    plain: dict[int, dict[str, np.ndarray]] = {}
    uploads: dict[int, ConfigRecord] = {}
    contexts: dict[int, Context] = {}
    signed: dict[tuple[int, str], ConfigRecord] = {}
    for c in SENDERS:
        plain[c] = {
            "w": rng.normal(0.0, 0.1, (30, 40)).astype(np.float32),
            "b": rng.normal(0.0, 0.1, 17),
        }
        update = encrypt_update(plain[c], keys=keys)
        uploads[c] = to_record(update)
        contexts[c] = Context(
            run_id=1, node_id=c, node_config={}, state=RecordDict(), run_config={}
        )
        for slot in SLOTS:
            signed[(c, slot)] = sign_upload(
                contexts[c],
                ConfigRecord({HE_SLOT: slot}),
                list(update.chunks),
                fingerprint=keys.fingerprint,
                client=c,
                signing_key=devices[c],
            )
    return Keyring(ceremony, keys, devices, registry, plain, uploads, contexts, signed)


def _device(folder: Path, keyring: Keyring, index: int, **changes: Any) -> Holder:
    """Holder ``index``'s device, its folder ``folder`` (nothing written there yet)."""
    client = HOLDERS[index]
    holder = Holder(
        folder=folder,
        client=client,
        signing_key=keyring.devices[client],
        registry=keyring.registry,
        min_contributors=FLOOR,
        max_decryptions=4096,
    )
    return replace(holder, **changes)


def _holder(root: Path, keyring: Keyring, index: int, **changes: Any) -> Holder:
    """Holder ``index`` with its share of the module's key and the public context, in a fresh
    folder (no ledger yet)."""
    folder = root / f"holder-{index}"
    share = keyring.ceremony.shares[index - 1]
    save_share(folder, share, ceremony_id=keyring.ceremony.plan.ceremony_id)
    write_public_context(folder, context=keyring.ceremony.context, params=P)
    return _device(folder, keyring, index, **changes)


@pytest.fixture
def holders(tmp_path: Path, keyring: Keyring) -> dict[int, Holder]:
    """The three holders, each with a fresh ledger (no slot decrypted)."""
    return {j: _holder(tmp_path, keyring, j) for j in HOLDERS}


def _request(
    keyring: Keyring,
    step: str,
    *,
    contributors: list[list[Any]],
    sum_digest: str,
    slot: str = SLOT,
    min_contributors: int = FLOOR,
    total: EncryptedSum | None = None,
    **extra: str,
) -> Message:
    record = ConfigRecord(
        {
            "step": step,
            "slot": slot,
            "fingerprint": keyring.keys.fingerprint,
            "sum_digest": sum_digest,
            "contributors": json.dumps(contributors),
            "min_contributors": min_contributors,
            **extra,
        }
    )
    content = RecordDict({THRESHOLD_RECORD: record})
    if total is not None:
        content[HE_SUM_RECORD] = to_record(total)
    return Message(content, dst_node_id=1, message_type=THRESHOLD_MESSAGE_TYPE)


def _commit(
    keyring: Keyring,
    holder: Holder,
    contributors: list[list[Any]],
    sum_digest: str,
    **kwargs: Any,
) -> ConfigRecord:
    msg = _request(keyring, "commit", contributors=contributors, sum_digest=sum_digest, **kwargs)
    content, stated = handle_threshold(msg, holder, keyring.keys)
    assert stated is None
    return content.config_records[THRESHOLD_RECORD]


def _handed_back(record: ConfigRecord, upload: ConfigRecord) -> RecordDict:
    """A ``query.tag`` request: the upload's second halves and first halves' digests."""
    firsts, seconds = split_upload([c for c in upload["chunks"] if isinstance(c, bytes)])
    out = ConfigRecord(dict(record))
    out["firsts"] = json.dumps(firsts)
    out["seconds"] = seconds
    return RecordDict({THRESHOLD_RECORD: out})


def _tags(keyring: Keyring, client: int, seeds: dict[int, str], slot: str = SLOT) -> ConfigRecord:
    """The sender's ``query.tag`` reply for its own upload under the holders' seeds."""
    record = ConfigRecord(
        {
            "slot": slot,
            "fingerprint": keyring.keys.fingerprint,
            "seeds": json.dumps({str(j): s for j, s in seeds.items()}),
        }
    )
    msg = Message(
        _handed_back(record, keyring.uploads[client]),
        dst_node_id=client,
        message_type=TAG_MESSAGE_TYPE,
    )
    content = handle_tag(
        msg,
        keyring.contexts[client],
        keyring.keys,
        client=client,
        signing_key=keyring.devices[client],
    )
    return content.config_records[THRESHOLD_RECORD]


def _tag_list(replies: dict[int, ConfigRecord], index: int) -> list[list[Any]]:
    """What the server sends holder ``index``: each sender's tags and signature for it."""
    out = []
    for client, reply in replies.items():
        tags, signatures = json.loads(str(reply["tags"])), json.loads(str(reply["signatures"]))
        out.append([client, tags[str(index)], signatures[str(index)]])
    return out


def _decrypt(
    keyring: Keyring,
    holder: Holder,
    contributors: list[list[Any]],
    total: EncryptedSum,
    tags: list[list[Any]],
    *,
    committee: Sequence[int] = (1, 2, 3),
    sum_digest: str | None = None,
    **kwargs: Any,
) -> tuple[ConfigRecord, dict[str, Any] | None]:
    msg = _request(
        keyring,
        "decrypt",
        contributors=contributors,
        sum_digest=chunks_digest(total.chunks) if sum_digest is None else sum_digest,
        total=total,
        committee=json.dumps(list(committee)),
        tags=json.dumps(tags),
        **kwargs,
    )
    content, stated = handle_threshold(msg, holder, keyring.keys)
    return content.config_records[THRESHOLD_RECORD], stated


@dataclass
class Committed:
    """A sum the holders committed to, and the senders' tags under their seeds."""

    contributors: list[list[Any]]
    total: EncryptedSum
    seeds: dict[int, str]
    tags: dict[int, ConfigRecord]


def _commit_all(
    keyring: Keyring,
    holders: dict[int, Holder],
    clients: Sequence[int] = (1, 2, 3),
    *,
    slot: str = SLOT,
) -> Committed:
    contributors = [keyring.entry(c, slot) for c in clients]
    total = keyring.total(clients)
    digest = chunks_digest(total.chunks)
    seeds = {
        j: str(_commit(keyring, h, contributors, digest, slot=slot)["seed"])
        for j, h in holders.items()
    }
    tags = {c: _tags(keyring, c, seeds, slot) for c in clients}
    return Committed(contributors, total, seeds, tags)


def _blobs(record: ConfigRecord, key: str) -> list[bytes]:
    value = record[key]
    assert isinstance(value, list)
    return [v for v in value if isinstance(v, bytes)]


def _read_ledger(holder: Holder) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((holder.folder / DECRYPTIONS_FILE).read_text())
    return data


def _slots(holder: Holder) -> dict[str, Any]:
    """The slots in the holder's ledger (none before its first commit)."""
    if not (holder.folder / DECRYPTIONS_FILE).exists():
        return {}
    return dict(_read_ledger(holder)["slots"])


# ------------------------------------------------------------------------------ commit, decrypt


def test_commit_then_decrypt_returns_partials_that_combine_to_the_sum(
    keyring: Keyring, holders: dict[int, Holder]
) -> None:
    # Prepare: three senders; holders 1 and 3 make the committee
    committed = _commit_all(keyring, holders)
    digest = chunks_digest(committed.total.chunks)
    committee = (1, 3)

    # Execute
    partials, replies = {}, {}
    for j in committee:
        reply, stated = _decrypt(
            keyring,
            holders[j],
            committed.contributors,
            committed.total,
            _tag_list(committed.tags, j),
            committee=committee,
        )
        assert stated == {"slot": SLOT, "sum_digest": digest, "contributors": 3}
        partials[j] = _blobs(reply, "partial")
        replies[j] = reply
    released = combine_sum(committed.total, partials, keys=keyring.keys, threshold=2)

    # Assert: the sum of the three plaintext updates
    expected = keyring.plain_sum((1, 2, 3))
    assert set(released) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(released[name], value, rtol=0, atol=RIGHT, err_msg=name)
    # each partial is signed by its holder's device key, bound to the slot, sum, list, committee
    listed = contributors_digest([(c, d) for c, d, _ in committed.contributors])
    for j in committee:
        public = keyring.registry[str(HOLDERS[j])]
        reply = replies[j]
        assert reply["index"] == j
        statement = partial_statement(
            keyring.keys.fingerprint, SLOT, j, digest, listed, committee, chunks_digest(partials[j])
        )
        assert verify_signature(public, str(reply["signature"]), statement)
    assert len(set(committed.seeds.values())) == 3  # each holder draws its own seed


def test_commit_replies_a_signed_fresh_seed(keyring: Keyring, holders: dict[int, Holder]) -> None:
    # Prepare
    contributors = [keyring.entry(c) for c in (1, 2, 3)]
    digest = chunks_digest(keyring.total((1, 2, 3)).chunks)

    # Execute
    reply = _commit(keyring, holders[2], contributors, digest)

    # Assert: the seed is signed by holder 2's device, and fixed in its ledger with the sum
    seed = str(reply["seed"])
    statement = seed_statement(keyring.keys.fingerprint, SLOT, 2, digest, seed)
    assert verify_signature(keyring.registry["12"], str(reply["signature"]), statement)
    assert not verify_signature(keyring.registry["11"], str(reply["signature"]), statement)
    listed = contributors_digest([(c, d) for c, d, _ in contributors])
    assert _read_ledger(holders[2])["slots"][SLOT] == {
        "sum": digest,
        "contributors": listed,
        "seed": seed,
        "decrypted": False,
    }


def test_the_ledger_is_written_owner_only_before_the_partial_is_made(
    keyring: Keyring, holders: dict[int, Holder], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: look at holder 1's ledger at the moment its share decrypts
    committed = _commit_all(keyring, holders)
    seen: list[tuple[int, dict[str, Any]]] = []
    original = KeyShare.partial_decrypt

    def watched(self: KeyShare, *args: Any, **kwargs: Any) -> list[bytes]:
        path = holders[1].folder / DECRYPTIONS_FILE
        seen.append((path.stat().st_mode & 0o777, json.loads(path.read_text())))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(KeyShare, "partial_decrypt", watched)

    # Execute
    reply, _ = _decrypt(
        keyring, holders[1], committed.contributors, committed.total, _tag_list(committed.tags, 1)
    )

    # Assert: the slot was spent, and the budget counted, before any partial existed
    assert reply["partial"]
    assert len(seen) == 1
    mode, ledger = seen[0]
    assert mode == 0o600
    assert ledger["slots"][SLOT]["decrypted"] is True
    assert ledger["decrypted"] == len(committed.total.chunks)


def test_a_decryption_that_fails_midway_still_spends_the_slot(
    keyring: Keyring, holders: dict[int, Holder], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the share crashes while decrypting (the process killed at that point)
    committed = _commit_all(keyring, holders)
    tags = _tag_list(committed.tags, 1)

    def crash(self: KeyShare, *args: Any, **kwargs: Any) -> list[bytes]:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(KeyShare, "partial_decrypt", crash)
        with pytest.raises(KeyboardInterrupt):
            _decrypt(keyring, holders[1], committed.contributors, committed.total, tags)

    # Execute: the server asks again
    with pytest.raises(ThresholdRefusedError) as refused:
        _decrypt(keyring, holders[1], committed.contributors, committed.total, tags)

    # Assert
    assert "one decryption per slot" in str(refused.value)


def test_a_slot_is_decrypted_once(keyring: Keyring, holders: dict[int, Holder]) -> None:
    # Prepare: holder 1 decrypts the sum of 1, 2, 3
    committed = _commit_all(keyring, holders)
    tags = _tag_list(committed.tags, 1)
    _decrypt(keyring, holders[1], committed.contributors, committed.total, tags)
    four = [keyring.entry(c) for c in (1, 2, 3, 4)]
    digest = chunks_digest(keyring.total((1, 2, 3, 4)).chunks)

    # Execute: a new commit for the slot (one more sender), and the same decryption again
    with pytest.raises(ThresholdRefusedError) as again_commit:
        _commit(keyring, holders[1], four, digest)
    with pytest.raises(ThresholdRefusedError) as again_decrypt:
        _decrypt(keyring, holders[1], committed.contributors, committed.total, tags)

    # Assert
    for refused in (again_commit, again_decrypt):
        assert "one decryption per slot" in str(refused.value)


# ------------------------------------------------------------------------------ contributor lists


def test_the_holders_own_floor_wins_over_the_requests(
    keyring: Keyring, holders: dict[int, Holder]
) -> None:
    # Prepare: two senders; the request asks for a floor of 1
    two = [keyring.entry(c) for c in (1, 2)]
    digest = chunks_digest(keyring.total((1, 2)).chunks)
    lenient = replace(holders[2], min_contributors=2)

    # Execute
    with pytest.raises(ThresholdRefusedError) as refused:
        _commit(keyring, holders[1], two, digest, min_contributors=1)
    accepted = _commit(keyring, lenient, two, digest, min_contributors=1)

    # Assert: holder 1 (floor 3) refuses; a holder whose floor is 2 takes it
    assert "a sum of 2 distinct senders; this holder decrypts no fewer than 3" in str(refused.value)
    assert SLOT not in _slots(holders[1])
    assert isinstance(accepted["seed"], str)


def test_a_request_can_raise_the_floor(keyring: Keyring, holders: dict[int, Holder]) -> None:
    three = [keyring.entry(c) for c in (1, 2, 3)]
    digest = chunks_digest(keyring.total((1, 2, 3)).chunks)
    with pytest.raises(ThresholdRefusedError, match="no fewer than 4"):
        _commit(keyring, holders[1], three, digest, min_contributors=4)


def _refusal(keyring: Keyring, holder: Holder, contributors: list[list[Any]]) -> str:
    digest = chunks_digest(keyring.total((1, 2, 3)).chunks)
    with pytest.raises(ThresholdRefusedError) as refused:
        _commit(keyring, holder, contributors, digest)
    assert SLOT not in _slots(holder)
    return str(refused.value)


def test_a_contributor_listed_twice_is_refused(
    keyring: Keyring, holders: dict[int, Holder]
) -> None:
    # Prepare: four entries, three senders
    contributors = [keyring.entry(c) for c in (1, 2, 3, 2)]

    # Execute
    reason = _refusal(keyring, holders[1], contributors)

    # Assert
    assert "contributor 2 is listed twice" in reason


def test_an_unregistered_contributor_is_refused(
    keyring: Keyring, holders: dict[int, Holder]
) -> None:
    # Prepare: a device the registry does not know, signing its own upload
    stranger = Ed25519PrivateKey.generate()
    digest = keyring.digest(4)
    statement = upload_statement(keyring.keys.fingerprint, SLOT, 77, digest)
    contributors = [
        *(keyring.entry(c) for c in (1, 2, 3)),
        [77, digest, stranger.sign(statement).hex()],
    ]

    # Execute
    reason = _refusal(keyring, holders[1], contributors)

    # Assert
    assert "contributor 77 is not a registered device" in reason


def test_a_contributor_whose_signature_is_wrong_is_refused(
    keyring: Keyring, holders: dict[int, Holder]
) -> None:
    # Prepare: client 3's entry signed by client 4's key; then one signed for another slot
    forged = keyring.entry(3)
    statement = upload_statement(keyring.keys.fingerprint, SLOT, 3, forged[1])
    forged[2] = keyring.devices[4].sign(statement).hex()
    other_slot = keyring.entry(3, SLOTS[1])

    # Execute
    reasons = [
        _refusal(keyring, holders[1], [keyring.entry(1), keyring.entry(2), entry])
        for entry in (forged, other_slot)
    ]

    # Assert
    assert all("contributor 3's upload is not signed by it" in r for r in reasons)


def test_two_contributors_listing_one_upload_are_refused(
    keyring: Keyring, holders: dict[int, Holder]
) -> None:
    # Prepare: client 4 signs client 1's upload as its own
    digest = keyring.digest(1)
    statement = upload_statement(keyring.keys.fingerprint, SLOT, 4, digest)
    copycat = [4, digest, keyring.devices[4].sign(statement).hex()]
    contributors = [*(keyring.entry(c) for c in (1, 2, 3)), copycat]

    # Execute
    reason = _refusal(keyring, holders[1], contributors)

    # Assert
    assert "two contributors list the same upload" in reason


def test_a_request_for_another_key_is_refused(keyring: Keyring, holders: dict[int, Holder]) -> None:
    msg = _request(
        keyring,
        "commit",
        contributors=[keyring.entry(c) for c in (1, 2, 3)],
        sum_digest="0" * 64,
    )
    msg.content.config_records[THRESHOLD_RECORD]["fingerprint"] = "f" * 64
    with pytest.raises(ThresholdRefusedError, match="not this holder's"):
        handle_threshold(msg, holders[1], keyring.keys)


# ------------------------------------------------------------------------------ decrypt refusals


def test_a_decrypt_for_a_slot_never_committed_is_refused(
    keyring: Keyring, holders: dict[int, Holder]
) -> None:
    # Prepare: holders 2 and 3 committed; holder 1 never did
    committed = _commit_all(keyring, {j: holders[j] for j in (2, 3)})

    # Execute
    with pytest.raises(ThresholdRefusedError) as refused:
        _decrypt(
            keyring,
            holders[1],
            committed.contributors,
            committed.total,
            _tag_list(committed.tags, 2),
        )

    # Assert
    assert "not the sum and contributors this holder fixed" in str(refused.value)
    assert _slots(holders[1]) == {}


def test_a_decrypt_of_another_sum_than_the_committed_one_is_refused(
    keyring: Keyring, holders: dict[int, Holder]
) -> None:
    # Prepare: committed to the sum of 1, 2, 3; then asked about the sum of 1, 2, 4
    committed = _commit_all(keyring, holders)
    other = keyring.total((1, 2, 4))
    tags = _tag_list(committed.tags, 1)
    four = [keyring.entry(c) for c in (1, 2, 3, 4)]

    # Execute: its digest named as the sum's; the committed digest with the other sum; the
    # committed sum with another contributor list
    with pytest.raises(ThresholdRefusedError) as by_digest:
        _decrypt(keyring, holders[1], committed.contributors, other, tags)
    with pytest.raises(ThresholdRefusedError) as by_content:
        _decrypt(
            keyring,
            holders[1],
            committed.contributors,
            other,
            tags,
            sum_digest=chunks_digest(committed.total.chunks),
        )
    with pytest.raises(ThresholdRefusedError) as by_list:
        _decrypt(keyring, holders[1], four, committed.total, tags)

    # Assert: nothing decrypted, the slot still open
    assert "not the sum and contributors this holder fixed" in str(by_digest.value)
    assert "not the one whose digest this holder fixed" in str(by_content.value)
    assert "not the sum and contributors this holder fixed" in str(by_list.value)
    ledger = _read_ledger(holders[1])
    assert ledger["slots"][SLOT]["decrypted"] is False and ledger["decrypted"] == 0


def test_missing_or_unsigned_tags_are_refused(keyring: Keyring, holders: dict[int, Holder]) -> None:
    # Prepare
    committed = _commit_all(keyring, holders)
    tags = _tag_list(committed.tags, 1)
    missing = tags[:2]
    by_another = [list(t) for t in tags]
    by_another[1][2] = by_another[0][2]  # client 2's tags with client 1's signature
    altered = [list(t) for t in tags]
    altered[2][1] = [v + 1 for v in altered[2][1]]  # client 3's tags changed after signing
    for_holder_2 = _tag_list(committed.tags, 2)  # tags signed for another holder's seed

    # Execute
    reasons = []
    for bad in (missing, by_another, altered, for_holder_2):
        with pytest.raises(ThresholdRefusedError) as refused:
            _decrypt(keyring, holders[1], committed.contributors, committed.total, bad)
        reasons.append(str(refused.value))

    # Assert
    assert "no tags from contributor 3" in reasons[0]
    assert "contributor 2's tags are not signed by it" in reasons[1]
    assert "contributor 3's tags are not signed by it" in reasons[2]
    assert "contributor 1's tags are not signed by it" in reasons[3]
    assert _read_ledger(holders[1])["slots"][SLOT]["decrypted"] is False


def test_a_sum_that_is_not_the_listed_senders_fails_the_tag_check(
    keyring: Keyring, holders: dict[int, Holder]
) -> None:
    # Prepare: the holder fixes the sum of 1 and 2 while the list names 1, 2 and 3 (whose tags
    # are all genuine): a server that wants the sum of two clients
    contributors = [keyring.entry(c) for c in (1, 2, 3)]
    pair = keyring.total((1, 2))
    seed = str(_commit(keyring, holders[1], contributors, chunks_digest(pair.chunks))["seed"])
    tags = {c: _tags(keyring, c, {1: seed}) for c in (1, 2, 3)}

    # Execute
    with pytest.raises(ThresholdRefusedError) as refused:
        _decrypt(keyring, holders[1], contributors, pair, _tag_list(tags, 1))

    # Assert
    assert "the sum is not the sum of the listed senders' uploads (tag check)" in str(refused.value)
    assert _read_ledger(holders[1])["slots"][SLOT]["decrypted"] is False


def test_a_spent_decryption_budget_is_refused(keyring: Keyring, tmp_path: Path) -> None:
    # Prepare: a share allowed one ciphertext in all; each sum is one
    holder = _holder(tmp_path, keyring, 1, max_decryptions=1)
    first = _commit_all(keyring, {1: holder}, slot=SLOTS[0])
    assert len(first.total.chunks) == 1
    _decrypt(
        keyring, holder, first.contributors, first.total, _tag_list(first.tags, 1), slot=SLOTS[0]
    )
    second = _commit_all(keyring, {1: holder}, slot=SLOTS[1])

    # Execute
    with pytest.raises(ThresholdRefusedError) as refused:
        _decrypt(
            keyring,
            holder,
            second.contributors,
            second.total,
            _tag_list(second.tags, 1),
            slot=SLOTS[1],
        )

    # Assert
    assert "decryption budget (1 ciphertexts) is spent" in str(refused.value)
    ledger = _read_ledger(holder)
    assert ledger["decrypted"] == 1 and ledger["slots"][SLOTS[1]]["decrypted"] is False


# ------------------------------------------------------------------------------ the ceremony


def _keygen(
    holder: Holder, plan: CeremonyPlan, index: int, step: str, **extra: Any
) -> ConfigRecord:
    record = ConfigRecord({"step": step, "plan": plan.to_json(), "index": index, **extra})
    msg = Message(
        RecordDict({THRESHOLD_RECORD: record}), dst_node_id=index, message_type=KEYGEN_MESSAGE_TYPE
    )
    return handle_keygen(msg, holder).config_records[THRESHOLD_RECORD]


@dataclass
class Ceremony:
    """A ceremony's first two steps among fresh holders, ready for the third."""

    plan: CeremonyPlan
    holders: dict[int, Holder]
    started: dict[int, ConfigRecord]
    starts: list[dict[str, Any]]
    dealt: dict[int, ConfigRecord]

    def finish_extra(self, index: int) -> dict[str, Any]:
        return {
            "starts": json.dumps(self.starts),
            "public_shares": [self.started[j]["public_share"] for j in self.plan.holders],
            "sealed": [_blobs(self.dealt[i], "sealed")[index - 1] for i in self.plan.holders],
        }


def _start_and_deal(root: Path, keyring: Keyring) -> Ceremony:
    plan = new_plan(P, holders=3, threshold=2)
    holders = {j: _device(root / f"ceremony-{j}", keyring, j) for j in HOLDERS}
    started = {j: _keygen(h, plan, j, "start") for j, h in holders.items()}
    starts = [
        {
            "index": j,
            "client": r["client"],
            "share_sha256": r["share_sha256"],
            "exchange_key": r["exchange_key"],
            "signature": r["signature"],
        }
        for j, r in started.items()
    ]
    dealt = {j: _keygen(h, plan, j, "deal", starts=json.dumps(starts)) for j, h in holders.items()}
    return Ceremony(plan, holders, started, starts, dealt)


def test_a_ceremony_of_handle_keygen_steps_makes_a_working_key(
    tmp_path: Path, keyring: Keyring
) -> None:
    # Prepare
    ceremony = _start_and_deal(tmp_path, keyring)

    # Execute
    finished = {
        j: _keygen(h, ceremony.plan, j, "finish", **ceremony.finish_extra(j))
        for j, h in ceremony.holders.items()
    }

    # Assert: one key; each holder signed it with its share's digest, kept owner-only
    fingerprints = {str(r["fingerprint"]) for r in finished.values()}
    assert len(fingerprints) == 1
    fingerprint = fingerprints.pop()
    shares = {}
    for j, holder in ceremony.holders.items():
        reply = finished[j]
        statement = finish_statement(ceremony.plan.digest(), j, fingerprint, str(reply["digest"]))
        assert verify_signature(
            keyring.registry[str(holder.client)], str(reply["signature"]), statement
        )
        assert (holder.folder / SHARE_FILE).stat().st_mode & 0o777 == 0o600
        assert (holder.folder / DECRYPTIONS_FILE).stat().st_mode & 0o777 == 0o600
        assert not (holder.folder / PENDING_FILE).exists()
        shares[j] = load_share(holder.folder)
        assert shares[j].digest() == reply["digest"] and shares[j].index == j
    # encrypt under the key the holders wrote; two of them decrypt
    keys = load_server_context(ceremony.holders[1].folder)
    assert keys.fingerprint == fingerprint
    values = {"v": np.linspace(-1.0, 1.0, 100)}
    update = encrypt_update(values, keys=keys)
    acc = SumAccumulator(keys=keys, layout=layout_of(values))
    acc.add(update)
    total = acc.result()
    flood = plan_flood(P, n_updates=1, parties=3, members=2, max_decryptions=4096).bits
    partials = {
        j: shares[j].partial_decrypt(total.chunks, committee=[1, 3], flood=flood) for j in (1, 3)
    }
    released = combine_sum(total, partials, keys=keys, threshold=2)
    np.testing.assert_allclose(released["v"], values["v"], rtol=0, atol=RIGHT)


def test_an_exchange_key_not_signed_by_its_named_client_is_refused(
    tmp_path: Path, keyring: Keyring
) -> None:
    # Prepare: the server puts its own exchange key in for holder 2 (signed by holder 3's
    # device key, or with holder 2's signature left on it)
    ceremony = _start_and_deal(tmp_path, keyring)
    server = (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    entry = ceremony.starts[1]
    resigned = dict(entry, exchange_key=server.hex())
    statement = exchange_statement(ceremony.plan, 2, str(entry["share_sha256"]), server)
    resigned["signature"] = keyring.devices[HOLDERS[3]].sign(statement).hex()
    kept_signature = dict(entry, exchange_key=server.hex())

    # Execute
    reasons = []
    for bad in (resigned, kept_signature):
        starts = [ceremony.starts[0], bad, ceremony.starts[2]]
        with pytest.raises(ThresholdRefusedError) as refused:
            _keygen(ceremony.holders[1], ceremony.plan, 1, "deal", starts=json.dumps(starts))
        reasons.append(str(refused.value))

    # Assert
    assert all(
        "holder 2's exchange key is not signed by registered device 12" in r for r in reasons
    )


def test_a_start_list_that_replaces_the_holders_own_exchange_key_is_refused(
    tmp_path: Path, keyring: Keyring
) -> None:
    # Prepare: the server replaces holder 1's own exchange key with one of its own, signed by a
    # registered device it controls (client 4) named as holder 1's client
    ceremony = _start_and_deal(tmp_path, keyring)
    server = X25519PrivateKey.generate()
    raw = server.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    entry = ceremony.starts[0]
    statement = exchange_statement(ceremony.plan, 1, str(entry["share_sha256"]), raw)
    sybil = dict(
        entry, client=4, exchange_key=raw.hex(), signature=keyring.devices[4].sign(statement).hex()
    )
    starts = [sybil, ceremony.starts[1], ceremony.starts[2]]

    # Execute: holder 1 deals
    try:
        reply = _keygen(ceremony.holders[1], ceremony.plan, 1, "deal", starts=json.dumps(starts))
    except ThresholdRefusedError:
        reply = None

    # Assert: refused (today it deals, and the server opens the share f_1(1) with its own key)
    if reply is not None:
        real = bytes.fromhex(str(ceremony.started[1]["exchange_key"]))
        shared = server.exchange(X25519PublicKey.from_public_bytes(real))
        info = f"fedrec-share\x00{ceremony.plan.ceremony_id}\x001\x001".encode()
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
        blob = _blobs(reply, "sealed")[0]
        opened = AESGCM(key).decrypt(blob[:12], blob[12:], info)
        pytest.fail(f"holder 1 sealed its share f_1(1) ({len(opened)} bytes) to the server's key")


def test_a_sealed_share_tampered_in_transit_does_not_open(tmp_path: Path, keyring: Keyring) -> None:
    # Prepare: one byte of what holder 2 sealed to holder 3 flipped
    ceremony = _start_and_deal(tmp_path, keyring)
    extra = ceremony.finish_extra(3)
    sealed = list(extra["sealed"])
    sealed[1] = sealed[1][:20] + bytes([sealed[1][20] ^ 1]) + sealed[1][21:]
    extra["sealed"] = sealed

    # Execute
    with pytest.raises(ThresholdError) as refused:
        _keygen(ceremony.holders[3], ceremony.plan, 3, "finish", **extra)

    # Assert: no share kept; the untampered holder finishes
    assert "the share holder 2 sealed to holder 3 does not open" in str(refused.value)
    assert not (ceremony.holders[3].folder / SHARE_FILE).exists()
    reply = _keygen(ceremony.holders[1], ceremony.plan, 1, "finish", **ceremony.finish_extra(1))
    assert isinstance(reply["fingerprint"], str)


def test_a_public_share_other_than_the_signed_one_is_refused(
    tmp_path: Path, keyring: Keyring
) -> None:
    # Prepare: holder 2's public share replaced by holder 3's
    ceremony = _start_and_deal(tmp_path, keyring)
    extra = ceremony.finish_extra(1)
    publics = list(extra["public_shares"])
    publics[1] = publics[2]
    extra["public_shares"] = publics

    # Execute
    with pytest.raises(ThresholdRefusedError) as refused:
        _keygen(ceremony.holders[1], ceremony.plan, 1, "finish", **extra)

    # Assert
    assert "holder 2's public share is not the one it signed" in str(refused.value)
    assert hashlib.sha256(publics[1]).hexdigest() != ceremony.starts[1]["share_sha256"]


# ------------------------------------------------------------------------------ senders' tags


def test_a_sender_tags_its_own_upload_under_each_seed(keyring: Keyring) -> None:
    # Prepare
    seeds = {1: "11" * 32, 3: "33" * 32}

    # Execute
    reply = _tags(keyring, 2, seeds)

    # Assert: the tags of its ciphertexts, signed for each holder
    tags, signatures = json.loads(str(reply["tags"])), json.loads(str(reply["signatures"]))
    assert reply["client"] == 2 and set(tags) == set(signatures) == {"1", "3"}
    chunks = _blobs(keyring.uploads[2], "chunks")
    ring = ring_of(P)
    for j, seed in seeds.items():
        assert tags[str(j)] == tags_of(ring, chunks, bytes.fromhex(seed))
        statement = tags_statement(
            keyring.keys.fingerprint, SLOT, 2, keyring.digest(2), j, tags[str(j)]
        )
        assert verify_signature(keyring.registry["2"], signatures[str(j)], statement)
    assert tags["1"] != tags["3"]


def test_a_sender_refuses_to_tag_an_upload_it_did_not_sign(keyring: Keyring) -> None:
    # Prepare: the server hands sender 1 sender 2's upload; then names a slot it never sent for
    record = ConfigRecord(
        {
            "slot": SLOT,
            "fingerprint": keyring.keys.fingerprint,
            "seeds": json.dumps({"1": "00" * 32}),
        }
    )
    swapped = Message(
        _handed_back(record, keyring.uploads[2]),
        dst_node_id=1,
        message_type=TAG_MESSAGE_TYPE,
    )
    unknown = ConfigRecord(dict(record, slot="run/round/99"))
    elsewhere = Message(
        _handed_back(unknown, keyring.uploads[1]),
        dst_node_id=1,
        message_type=TAG_MESSAGE_TYPE,
    )

    # Execute
    reasons = []
    for msg in (swapped, elsewhere):
        with pytest.raises(ThresholdRefusedError) as refused:
            handle_tag(
                msg, keyring.contexts[1], keyring.keys, client=1, signing_key=keyring.devices[1]
            )
        reasons.append(str(refused.value))

    # Assert
    assert "the upload sent back is not the one this sender signed" in reasons[0]
    assert "this sender made no upload for slot run/round/99" in reasons[1]
