"""Threshold mode end to end: the key ceremony and checked decryptions through fedrec's ClientApp.

The grid runs the real ClientApp in this process (node ``100 + i`` is client ``i``), as the warm
start's tests do; it can also keep some nodes silent, and let a test change each request before
it reaches a node (a malicious server).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import tenseal as ts
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from client.app import app
from common.data import synthesize
from common.he import EncryptedSum, SumAccumulator, from_record, layout_of, to_record
from common.he.keys import FINGERPRINT, SERVER_CONTEXT
from common.he.shares import SHARE_FILE, Transcript, load_share, load_transcript
from common.he.statements import slot_name, upload_statement
from common.he.tags import chunks_digest
from common.model import build_model
from common.privacy.signing import read_device_seed, simulated_device_key
from common.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    HE_RECORD,
    HE_SUM_RECORD,
    HE_UPLOAD_RECORD,
    TAG_MESSAGE_TYPE,
    THRESHOLD_MESSAGE_TYPE,
    THRESHOLD_RECORD,
    RoundConfig,
)
from common.run.config import RunConfig, load_run_config
from common.run.folder import load_eval_data, n_clients_of
from server.federation import _threshold_summer, run_federation
from server.state import STATE_FILE, ServerState
from server.threshold import ThresholdSum
from simulations.runner import prepare_run

pytestmark = pytest.mark.usefixtures("task_identity")

TINY = ["data.n_heldout_users=8", "model.dims=[16, 8]", "reference=false"]
THRESHOLD = [
    "rounds=1",
    "privacy.mode='off'",
    "server.sample_rate=0.5",
    "encryption.enabled=true",
    "encryption.min_contributors=3",
]
"""5 key holders, threshold 3 (the defaults); each holder decrypts sums of 3 senders or more."""
SENDERS = [2, 3, 4, 5]
RIGHT = 1e-5
"""Largest error of a released sum (the flood's std is far below it; the sums are about 1e-2)."""

Tamper = Callable[[Message], None]


class HolderGrid:
    """A grid whose nodes run fedrec's ClientApp in this process (node ``100 + i`` is client
    ``i``), keeping each node's context; a node's exception becomes its error reply, as in
    Flower's ClientApp runner. ``silent`` nodes never answer; ``tamper`` sees (and may change)
    every request before its node does, ``doctor`` every reply before the server does."""

    def __init__(self, run_dir: Path) -> None:
        self.nodes = [100 + i for i in range(n_clients_of(run_dir))]
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 100},
                state=RecordDict(),
                run_config={"run-dir": str(run_dir)},
            )
            for node in self.nodes
        }
        self.silent: set[int] = set()
        self.tamper: Tamper | None = None
        self.doctor: Tamper | None = None
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            if self.tamper is not None:
                self.tamper(msg)
            try:
                reply = app(msg, self.contexts[node])
            except Exception as err:  # as flwr.supernode.runtime.run_clientapp answers
                reason = f"{type(err)}:<'{err}'>"
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
                )
            reply.metadata.__dict__["_src_node_id"] = node  # as if the node had answered
            if self.doctor is not None:
                self.doctor(reply)
            replies.append(reply)
        return replies

    def steps_since(self, start: int) -> list[tuple[str, str]]:
        """``(message type, step)`` of the threshold and tag requests sent since ``start``."""
        out = []
        for msg in self.sent[start:]:
            kind = msg.metadata.message_type
            if kind in (THRESHOLD_MESSAGE_TYPE, TAG_MESSAGE_TYPE):
                record = msg.content.config_records[THRESHOLD_RECORD]
                out.append((kind, str(record.get("step", "tag"))))
        return out


@dataclass
class World:
    """A run folder after its key ceremony, its grid and the run's ThresholdSum."""

    cfg: RunConfig
    run_dir: Path
    grid: HolderGrid
    summer: ThresholdSum
    transcript: Transcript
    template: dict[str, np.ndarray]

    @property
    def keydir(self) -> Path:
        return self.cfg.encryption.keys_dir(self.run_dir)

    def holder_clients(self) -> list[int]:
        assert self.transcript.clients is not None
        return list(self.transcript.clients.values())

    def slot(self, rnd: int) -> str:
        return slot_name(self.run_dir.name, rnd, None)

    def holder_ledger(self, client: int) -> dict[str, Any]:
        path = self.keydir / "holders" / str(client) / "decryptions.json"
        return cast(dict[str, Any], json.loads(path.read_text()))

    def slot_state(self, client: int, rnd: int) -> dict[str, Any] | None:
        slots: dict[str, dict[str, Any]] = self.holder_ledger(client)["slots"]
        return slots.get(self.slot(rnd))

    def decrypted(self, client: int, rnd: int) -> bool:
        """Whether holder ``client`` committed to round ``rnd``'s slot and decrypted it."""
        state = self.slot_state(client, rnd)
        return state is not None and state["decrypted"] is True

    def device_key(self, client: int) -> Ed25519PrivateKey:
        seed = read_device_seed(self.run_dir)
        assert seed is not None
        return simulated_device_key(seed, client)


def _set_task_identity() -> None:
    """What the ``task_identity`` fixture does, for the module's fixtures."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _make_world(root: Path, synth_csv: Path, sets: list[str]) -> World:
    """Prepare a run folder and run its key ceremony through the grid, as run_federation does."""
    _set_task_identity()
    cfg = load_run_config(None, [f"data.dataset={str(synth_csv)!r}", *TINY, *THRESHOLD, *sets])
    run_dir = root / "run"
    prepare_run(cfg, run_dir)
    grid = HolderGrid(run_dir)
    summer = _threshold_summer(
        cast(Grid, grid), cfg, run_dir, None, nodes=grid.nodes, simulated=True
    )
    data = load_eval_data(run_dir)
    model = build_model(cfg.model.to_model_config(len(data.item_ids)))
    template = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    transcript = load_transcript(cfg.encryption.keys_dir(run_dir))
    return World(cfg, run_dir, grid, summer, transcript, template)


@pytest.fixture(scope="module")
def synth_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(60, 40, seed=3, out_dir=tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def world_once(tmp_path_factory: pytest.TempPathFactory, synth_csv: Path) -> World:
    return _make_world(tmp_path_factory.mktemp("threshold"), synth_csv, [])


@pytest.fixture
def world(world_once: World) -> Iterable[World]:
    """The module's run (each test uses its own round, so its own slot); the grid honest."""
    yield world_once
    world_once.grid.silent = set()
    world_once.grid.tamper = None
    world_once.grid.doctor = None


def _train(world: World, rnd: int, clients: list[int], *, encrypted: bool = True) -> list[Message]:
    """Send round ``rnd``'s train message to ``clients``; encrypted: announced by the summer."""
    config = ConfigRecord()
    RoundConfig(server_round=rnd, beta=0.1).write(config)
    if encrypted:
        world.summer.announce(config)
    arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in world.template.items()})
    content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: config})
    messages = [
        Message(content, dst_node_id=100 + c, message_type=MessageType.TRAIN, group_id=str(rnd))
        for c in clients
    ]
    return world.grid.send_and_receive(messages, timeout=60.0)


def _plain_sum(world: World, rnd: int, clients: list[int]) -> dict[str, np.ndarray]:
    """The sum of the clients' plaintext updates of round ``rnd`` (training is seeded)."""
    total: dict[str, np.ndarray] = {}
    for reply in _train(world, rnd, clients, encrypted=False):
        assert not reply.has_error(), reply.error.reason
        for name, array in reply.content.array_records[ARRAYS_RECORD].items():
            total[name] = total.get(name, 0.0) + array.numpy().astype(np.float64)
    return total


def _release(world: World, rnd: int, replies: list[Message]) -> dict[str, np.ndarray] | None:
    """Add the replies to a fresh sum of round ``rnd`` (each must be accepted), then release."""
    world.summer.begin(rnd, world.template)
    assert [world.summer.add(r) for r in replies] == [None] * len(replies)
    return world.summer.total()


def _assert_is_sum(total: dict[str, np.ndarray] | None, expected: dict[str, np.ndarray]) -> None:
    assert total is not None
    assert set(total) == set(expected)
    assert max(float(np.abs(v).max()) for v in expected.values()) > 10 * RIGHT  # not all ~0
    for name, value in expected.items():
        np.testing.assert_allclose(total[name], value, rtol=0, atol=RIGHT, err_msg=name)


def _blobs(record: ConfigRecord, key: str) -> list[bytes]:
    value = record[key]
    assert isinstance(value, list)
    return [v for v in value if isinstance(v, bytes)]


def _copy(msg: Message) -> Message:
    """A reply with its own records (to be changed), from the same node."""
    records = msg.content.config_records
    content = RecordDict(
        {
            HE_RECORD: ConfigRecord(dict(records[HE_RECORD])),
            HE_UPLOAD_RECORD: ConfigRecord(dict(records[HE_UPLOAD_RECORD])),
        }
    )
    copy = Message(content, reply_to=msg)
    copy.metadata.__dict__["_src_node_id"] = msg.metadata.src_node_id
    return copy


def _resign(world: World, msg: Message, *, client: int, key: Ed25519PrivateKey) -> Message:
    """``msg``'s ciphertext presented as ``client``'s upload, signed by ``key``."""
    out = _copy(msg)
    upload = out.content.config_records[HE_UPLOAD_RECORD]
    digest, slot = str(upload["digest"]), str(upload["slot"])
    upload["client"] = client
    statement = upload_statement(world.summer.keys.fingerprint, slot, client, digest)
    upload["signature"] = key.sign(statement).hex()
    return out


def _one_upload_as_sum(world: World, msg: Message) -> EncryptedSum:
    """One client's ciphertext, as the server would present a sum of it alone."""
    acc = SumAccumulator(keys=world.summer.keys, layout=layout_of(world.template))
    acc.add(from_record(msg.content.config_records[HE_RECORD]))
    return acc.result()


def _holder_client(world: World, index: int) -> int:
    return next(h.client for h in world.summer.holders if h.index == index)


def _holder_node(world: World, index: int) -> int:
    return next(h.node for h in world.summer.holders if h.index == index)


# ------------------------------------------------------------------------------ the ceremony


def test_ceremony_leaves_no_secret_key_and_one_owner_only_share_per_holder(world: World) -> None:
    # Prepare
    run_dir, keydir, transcript = world.run_dir, world.keydir, world.transcript

    # Execute: everything the ceremony wrote in the run folder
    contexts = sorted(run_dir.rglob("*.ctx"))
    shares = sorted(run_dir.rglob(SHARE_FILE))

    # Assert: a 3-of-5 key among registered clients, found on the nodes it names
    assert transcript.holders == (1, 2, 3, 4, 5) and transcript.threshold == 3
    assert transcript.clients is not None and transcript.nodes is not None
    assert sorted(transcript.clients) == [1, 2, 3, 4, 5]
    assert len(set(transcript.clients.values())) == 5
    assert all(transcript.nodes[j] == 100 + c for j, c in transcript.clients.items())
    fingerprint = (keydir / FINGERPRINT).read_text().strip()
    assert transcript.fingerprint == fingerprint == world.summer.keys.fingerprint
    # no secret key anywhere: no client.ctx, and every context is a public one
    assert not list(run_dir.rglob("client.ctx"))
    assert keydir / SERVER_CONTEXT in contexts and len(contexts) == 1 + 5
    for path in contexts:
        context = ts.context_from(path.read_bytes(), n_threads=1)
        assert not context.has_secret_key(), path
    # one share per holder, in its own owner-only folder, matching its commitment
    expected = {keydir / "holders" / str(c) / SHARE_FILE for c in transcript.clients.values()}
    assert set(shares) == expected
    for index, client in transcript.clients.items():
        folder = keydir / "holders" / str(client)
        assert (folder / SHARE_FILE).stat().st_mode & 0o777 == 0o600
        assert folder.stat().st_mode & 0o777 == 0o700
        share = load_share(folder, transcript=transcript)  # checks the digest and commitment
        assert share.index == index and share.fingerprint == fingerprint
        assert transcript.commitments[index] == share.digest()
        assert (folder / FINGERPRINT).read_text().strip() == fingerprint
        assert not (folder / "ceremony.pending").exists()
    assert len(set(transcript.commitments.values())) == 5


# ------------------------------------------------------------------------------ honest rounds


def test_threshold_sum_releases_the_sum_of_the_plaintext_updates(world: World) -> None:
    # Prepare
    rnd = 1
    expected = _plain_sum(world, rnd, SENDERS)
    replies = _train(world, rnd, SENDERS)
    start = len(world.grid.sent)

    # Execute
    total = _release(world, rnd, replies)

    # Assert: commit to all five holders, a tag request to each sender, decrypt to all five
    _assert_is_sum(total, expected)
    assert world.summer.why_not() == ""
    steps = world.grid.steps_since(start)
    assert (
        steps
        == [(THRESHOLD_MESSAGE_TYPE, "commit")] * 5
        + [(TAG_MESSAGE_TYPE, "tag")] * 4
        + [(THRESHOLD_MESSAGE_TYPE, "decrypt")] * 5
    )
    # every holder spent the slot, and its budget by the sum's one ciphertext
    for client in world.holder_clients():
        assert world.decrypted(client, rnd)
        assert world.holder_ledger(client)["decrypted"] >= 1


def test_add_drops_a_repeated_sender_and_a_repeated_ciphertext(world: World) -> None:
    # Prepare: client 3 replays client 2's ciphertext under its own signature
    rnd = 2
    replies = dict(zip(SENDERS, _train(world, rnd, SENDERS), strict=True))
    copycat = _resign(world, replies[2], client=3, key=world.device_key(3))
    world.summer.begin(rnd, world.template)

    # Execute
    first = world.summer.add(replies[2])
    again = world.summer.add(replies[2])
    replayed = world.summer.add(copycat)
    rest = [world.summer.add(replies[c]) for c in (3, 4, 5)]
    total = world.summer.total()

    # Assert: each client once; the sum is of the four uploads
    assert first is None and rest == [None, None, None]
    assert again is not None and "repeated sender 2" in again
    assert replayed is not None and "repeated ciphertext" in replayed
    _assert_is_sum(total, _plain_sum(world, rnd, SENDERS))


def test_add_drops_unsigned_and_wrongly_signed_uploads(world: World) -> None:
    # Prepare
    rnd = 3
    replies = dict(zip(SENDERS, _train(world, rnd, SENDERS), strict=True))
    unsigned = _copy(replies[2])
    del unsigned.content.config_records[HE_UPLOAD_RECORD]
    by_another = _resign(world, replies[2], client=2, key=world.device_key(3))
    unregistered = _resign(world, replies[2], client=999, key=Ed25519PrivateKey.generate())
    altered = _copy(replies[2])
    chunks = _blobs(altered.content.config_records[HE_RECORD], "chunks")
    chunks[0] = chunks[0][:-1] + bytes([chunks[0][-1] ^ 1])
    altered.content.config_records[HE_RECORD]["chunks"] = chunks
    world.summer.begin(rnd, world.template)

    # Execute
    reasons = [world.summer.add(m) for m in (unsigned, by_another, unregistered, altered)]
    honest = [world.summer.add(replies[c]) for c in SENDERS]
    total = world.summer.total()

    # Assert: none of the four added; the honest ones still are, and their sum is released
    assert reasons[0] is not None and "no signed encrypted upload" in reasons[0]
    assert reasons[1] is not None and "not signed by registered device 2" in reasons[1]
    assert reasons[2] is not None and "not signed by registered device 999" in reasons[2]
    assert reasons[3] is not None and "digest does not match" in reasons[3]
    assert honest == [None] * 4
    _assert_is_sum(total, _plain_sum(world, rnd, SENDERS))


def test_add_drops_an_upload_whose_chunks_are_not_bytes(world: World) -> None:
    # Prepare: a sender's reply whose ciphertext list holds integers
    rnd = 13
    replies = dict(zip(SENDERS, _train(world, rnd, SENDERS), strict=True))
    malformed = _copy(replies[2])
    malformed.content.config_records[HE_RECORD]["chunks"] = [1, 2]
    world.summer.begin(rnd, world.template)

    # Execute
    reason = world.summer.add(malformed)
    honest = [world.summer.add(replies[c]) for c in SENDERS]

    # Assert: a reason, as for any other bad upload; the round goes on
    assert reason is not None and "must be a list of bytes" in reason
    assert honest == [None] * 4


def test_add_drops_an_upload_for_another_slot(world: World) -> None:
    # Prepare: client 2's upload of round 4, then the summer announces round 5
    replies = dict(zip(SENDERS, _train(world, 4, SENDERS), strict=True))
    later = _train(world, 5, [3])
    world.summer.begin(5, world.template)

    # Execute
    reason = world.summer.add(replies[2])
    accepted = world.summer.add(later[0])

    # Assert
    assert reason is not None
    assert world.slot(4) in reason and world.slot(5) in reason
    assert accepted is None


# ------------------------------------------------------------------------------ holders drop out


def test_one_silent_key_holder_costs_nothing(world: World) -> None:
    # Prepare: holder 5 never answers
    rnd = 6
    expected = _plain_sum(world, rnd, SENDERS)
    replies = _train(world, rnd, SENDERS)
    world.grid.silent = {_holder_node(world, 5)}
    start = len(world.grid.sent)

    # Execute
    total = _release(world, rnd, replies)

    # Assert: the four that committed decrypted it together
    _assert_is_sum(total, expected)
    steps = world.grid.steps_since(start)
    assert steps.count((THRESHOLD_MESSAGE_TYPE, "decrypt")) == 4
    assert world.slot_state(_holder_client(world, 5), rnd) is None
    assert all(world.decrypted(_holder_client(world, j), rnd) for j in (1, 2, 3, 4))


def test_three_silent_key_holders_leave_the_sum_encrypted(world: World) -> None:
    # Prepare: holders 1, 3 and 5 never answer: two of five are left, the threshold is 3
    rnd = 7
    replies = _train(world, rnd, SENDERS)
    world.grid.silent = {_holder_node(world, j) for j in (1, 3, 5)}
    start = len(world.grid.sent)

    # Execute
    total = _release(world, rnd, replies)

    # Assert: nobody is asked to tag or decrypt; the two holders committed only
    assert total is None
    assert "2 of 5 key holders committed, the threshold is 3" in world.summer.why_not()
    assert world.grid.steps_since(start) == [(THRESHOLD_MESSAGE_TYPE, "commit")] * 5
    for j in (2, 4):
        state = world.slot_state(_holder_client(world, j), rnd)
        assert state is not None and state["decrypted"] is False


# ------------------------------------------------------------------------------ a malicious server


def _assert_nothing_released(world: World, rnd: int, total: object, why: str) -> None:
    assert total is None
    assert why in world.summer.why_not()
    assert not any(world.decrypted(c, rnd) for c in world.holder_clients())


def test_holders_refuse_one_upload_presented_as_the_sum_of_all(world: World) -> None:
    # Prepare: the server commits the holders to client 2's ciphertext as "the sum" of four
    rnd = 8
    replies = _train(world, rnd, SENDERS)
    fake = _one_upload_as_sum(world, replies[0])

    def swap_sum(msg: Message) -> None:
        if msg.metadata.message_type == THRESHOLD_MESSAGE_TYPE:
            msg.content.config_records[THRESHOLD_RECORD]["sum_digest"] = chunks_digest(fake.chunks)
            if HE_SUM_RECORD in msg.content.config_records:
                msg.content.config_records[HE_SUM_RECORD] = to_record(fake)

    world.grid.tamper = swap_sum

    # Execute
    total = _release(world, rnd, replies)

    # Assert: the senders' tags do not add up to the fake sum's
    _assert_nothing_released(world, rnd, total, "tag check")


def test_holders_refuse_a_sum_other_than_the_one_they_committed_to(world: World) -> None:
    # Prepare: an honest commit, then client 2's ciphertext sent for decryption instead
    rnd = 9
    replies = _train(world, rnd, SENDERS)
    fake = to_record(_one_upload_as_sum(world, replies[0]))

    def swap_sum(msg: Message) -> None:
        if HE_SUM_RECORD in msg.content.config_records:
            msg.content.config_records[HE_SUM_RECORD] = fake

    world.grid.tamper = swap_sum

    # Execute
    total = _release(world, rnd, replies)

    # Assert
    _assert_nothing_released(world, rnd, total, "not the one whose digest this holder fixed")


def test_holders_decrypt_each_slot_once(world: World) -> None:
    # Prepare: round 10 released; then the server asks again with one more sender, whose update
    # the difference of the two sums would be
    rnd = 10
    _assert_is_sum(
        _release(world, rnd, _train(world, rnd, [2, 3, 4])), _plain_sum(world, rnd, [2, 3, 4])
    )
    replies = _train(world, rnd, [2, 3, 4, 6])
    start = len(world.grid.sent)

    # Execute
    total = _release(world, rnd, replies)

    # Assert: every holder refuses at once; no sender is asked to tag, no one decrypts
    assert total is None
    assert "one decryption per slot" in world.summer.why_not()
    assert world.grid.steps_since(start) == [(THRESHOLD_MESSAGE_TYPE, "commit")] * 5


def test_holders_keep_their_own_floor_of_contributors(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the server asks for a sum of two (its floor lowered to 1); the holders' is 3
    rnd = 11
    replies = _train(world, rnd, [2, 3])
    monkeypatch.setattr(world.summer, "min_contributors", 1)
    start = len(world.grid.sent)

    # Execute
    total = _release(world, rnd, replies)

    # Assert
    _assert_nothing_released(world, rnd, total, "this holder decrypts no fewer than 3")
    assert world.grid.steps_since(start) == [(THRESHOLD_MESSAGE_TYPE, "commit")] * 5


def test_holders_refuse_a_contributor_list_with_a_bad_signature(world: World) -> None:
    # Prepare: the server lists client 3's upload with a signature of client 4's key
    rnd = 12
    replies = _train(world, rnd, SENDERS)
    forger = world.device_key(4)

    def forge(msg: Message) -> None:
        if msg.metadata.message_type != THRESHOLD_MESSAGE_TYPE:
            return
        record = msg.content.config_records[THRESHOLD_RECORD]
        entries = json.loads(str(record["contributors"]))
        for entry in entries:
            if entry[0] == 3:
                statement = upload_statement(
                    world.summer.keys.fingerprint, world.slot(rnd), 3, entry[1]
                )
                entry[2] = forger.sign(statement).hex()
        record["contributors"] = json.dumps(entries)

    world.grid.tamper = forge

    # Execute
    total = _release(world, rnd, replies)

    # Assert
    _assert_nothing_released(world, rnd, total, "contributor 3's upload is not signed by it")


def test_a_sender_whose_tags_leave_out_a_holder_discards_the_sum_only(world: World) -> None:
    # Prepare: sender 2 answers the tag request without holder 1's tags
    rnd = 14
    replies = _train(world, rnd, SENDERS)

    def drop_holder_1(reply: Message) -> None:
        if reply.metadata.message_type == TAG_MESSAGE_TYPE and reply.metadata.src_node_id == 102:
            record = reply.content.config_records[THRESHOLD_RECORD]
            tags = json.loads(str(record["tags"]))
            del tags["1"]
            record["tags"] = json.dumps(tags)

    world.grid.doctor = drop_holder_1

    # Execute
    total = _release(world, rnd, replies)

    # Assert: the sum is discarded with a reason naming the sender; nothing is decrypted
    assert total is None
    assert "sender 2" in world.summer.why_not()
    assert not any(world.decrypted(c, rnd) for c in world.holder_clients())


# ------------------------------------------------------------------------------ a lying holder


def test_a_lying_holder_makes_the_sum_rejected_not_released_wrong(
    tmp_path: Path, synth_csv: Path, world: World
) -> None:
    # Prepare: the same run (same seed, same holders) with holder 2's client lying
    liar = _holder_client(world, 2)
    other = _make_world(tmp_path, synth_csv, [f"simulation.lying_clients=[{liar}]"])
    assert other.transcript.clients is not None and liar in other.transcript.clients.values()
    rnd = 1
    replies = _train(other, rnd, SENDERS)

    # Execute
    total = _release(other, rnd, replies)

    # Assert: the combination decodes to garbage, which is caught: nothing is released
    assert total is None
    assert "wrapped around" in other.summer.why_not()


# ------------------------------------------------------------------------------ a whole run


def test_a_threshold_run_trains_the_model_of_a_plaintext_run(
    tmp_path: Path, synth_csv: Path
) -> None:
    # Prepare: one round of FedAvg, with and without threshold encryption
    sets = ["server.optimizer='fedavg'", "server.lr=1.0"]
    runs = {}
    for name, extra in (("threshold", []), ("plain", ["encryption.enabled=false"])):
        cfg = load_run_config(
            None, [f"data.dataset={str(synth_csv)!r}", *TINY, *THRESHOLD, *sets, *extra]
        )
        run_dir = tmp_path / name / "run"
        prepare_run(cfg, run_dir)
        runs[name] = (cfg, run_dir)

    # Execute
    for cfg, run_dir in runs.values():
        grid = HolderGrid(run_dir)
        run_federation(cast(Grid, grid), cfg, run_dir, expected_nodes=len(grid.nodes))

    # Assert: the round was applied; the released sum moved the model as the plaintext one did
    keydir = runs["threshold"][1] / "keys"
    assert load_transcript(keydir).threshold == 3 and not list(keydir.rglob("client.ctx"))
    results = {n: json.loads((d / "results.json").read_text()) for n, (_, d) in runs.items()}
    assert [r["applied"] for r in results["threshold"]["rounds"]] == [True]
    assert results["threshold"]["rounds"][0]["returned"] >= 3
    weights = {n: ServerState.load(d / STATE_FILE).weights for n, (_, d) in runs.items()}
    cfg = runs["plain"][0]
    data = load_eval_data(runs["plain"][1])
    generator = torch.Generator().manual_seed(cfg.seed)  # the run's initial model
    initial = build_model(cfg.model.to_model_config(len(data.item_ids)), generator=generator)
    initial_state = initial.state_dict()
    moved = max(
        float(np.abs(v - initial_state[k].numpy()).max()) for k, v in weights["plain"].items()
    )
    assert moved > 100 * RIGHT / 10
    for name, value in weights["plain"].items():  # lr * sum error / weight: below RIGHT / 10
        np.testing.assert_allclose(weights["threshold"][name], value, rtol=0, atol=RIGHT / 10)
