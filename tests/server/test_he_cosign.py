"""The decryption committee co-signs the round it released, and the ledger keeps it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from client.he_mod import decrypt_for_committee
from common.config import parse
from common.he import HE_RECORD_KEY, ClientKeys, ParamSet, encrypt_update, generate_keys, to_record
from common.privacy import PrivacyAccountant, client_noise_std, plan_privacy
from common.privacy.audit import AuditStatus, verify_ledger
from common.privacy.ledger import LedgerWriter
from common.privacy.rounds import charge_round, client_round_step, ledger_header
from common.privacy.signing import public_key_hex, server_signer
from common.protocol import ClientDPConfig
from common.run.config import RunConfig
from server.he import CommitteeSum

pytestmark = pytest.mark.usefixtures("task_identity")

SHAPES = {"w": (3, 4), "b": (4,)}
N = 10
CFG = parse(
    RunConfig,
    {
        "rounds": 1,
        "server": {"sample_rate": 0.3},
        "privacy": {"mode": "client", "clip": 1.0, "noise_multiplier": 1.2},
        "encryption": {"enabled": True},
    },
)


@pytest.fixture(scope="module")
def keys() -> ClientKeys:
    return generate_keys(ParamSet.FEDREC.params)


class _Committee:
    """A grid whose nodes decrypt and co-sign as fedrec clients do (node -> its signing key)."""

    def __init__(self, keys: ClientKeys, signing: dict[int, Ed25519PrivateKey], **told: float):
        self.keys, self.signing, self.told = keys, signing, told

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            content = decrypt_for_committee(
                msg, self.keys, signing_key=self.signing.get(node), announced=self.told or None
            )
            reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node  # as if the node had answered
            replies.append(reply)
        return replies


def _reply(node: int, record: ConfigRecord) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = MetricRecord({"weight": 1.0})
    reply = Message(RecordDict({HE_RECORD_KEY: record, "metrics": metrics}), reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def _round(summer: CommitteeSum, keys: ClientKeys, n: int = 3) -> dict[str, np.ndarray] | None:
    """Announce the DP mechanism, add ``n`` encrypted updates, release the sum."""
    plan = plan_privacy(CFG, N)
    assert plan is not None
    config = ConfigRecord()
    ClientDPConfig(
        clip=plan.clip,
        noise_multiplier=plan.noise_multiplier,
        accounting_noise_multiplier=plan.guard_noise_multiplier,
        noise_std=client_noise_std(
            noise_multiplier=plan.noise_multiplier,
            clip=plan.clip,
            expected_participants=plan.expected_participants,
        ),
        denominator=plan.expected_participants,
        sample_rate=plan.sample_rate,
        delta=plan.delta,
    ).write(config)
    summer.announce(config)
    summer.begin(1, {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()})
    rng = np.random.default_rng(0)
    for node in range(1, n + 1):
        update = {k: rng.normal(0, 1e-2, size=s).astype(np.float32) for k, s in SHAPES.items()}
        assert summer.add(_reply(node, to_record(encrypt_update(update, keys=keys)))) is None
    return summer.total()


def _summer(keys: ClientKeys, grid: _Committee, run_dir: Path) -> CommitteeSum:
    return CommitteeSum(
        keys.public(),
        grid,  # type: ignore[arg-type]
        committee_size=2,
        timeout=10,
        seed=0,
        run_id=run_dir.name,
        server_key=server_signer(run_dir).public_key,
    )


def test_the_committee_cosigns_and_the_signed_ledger_verifies(
    keys: ClientKeys, tmp_path: Path
) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    devices = {node: Ed25519PrivateKey.generate() for node in range(1, 4)}
    summer = _summer(keys, _Committee(keys, devices), run_dir)

    # Execute: a round released by the committee, written to a signed ledger
    assert _round(summer, keys) is not None
    cosignatures = summer.cosignatures()
    plan = plan_privacy(CFG, N)
    assert plan is not None
    writer = LedgerWriter.create(
        run_dir / "ledger.jsonl",
        ledger_header(run_id=run_dir.name, cfg=CFG, plan=plan),
        signer=server_signer(run_dir),
    )
    record = charge_round(
        PrivacyAccountant(delta=plan.delta),
        plan,
        server_round=1,
        invited=3,
        participated=3,
        step=client_round_step(plan, participated=3),
    )
    writer.append_round(record.to_record(), cosignatures=cosignatures)
    writer.close(epsilon=record.epsilon, epsilon_rdp=record.epsilon_rdp)
    registry = tmp_path / "devices.json"
    registry.write_text(
        json.dumps({"format": 1, "keys": {str(n): public_key_hex(k) for n, k in devices.items()}})
    )
    report = verify_ledger(run_dir, device_keys=registry, require_signed=True)

    # Assert
    assert len(cosignatures) == 2
    assert {c["statement"]["contributors"] for c in cosignatures} == {3}
    assert report.status is AuditStatus.VERIFIED, report.reason
    assert report.cosigned_rounds == 1


def test_a_member_without_a_key_or_told_otherwise_does_not_cosign(
    keys: ClientKeys, tmp_path: Path
) -> None:
    # a member without a signing key answers without co-signing
    unsigned = _summer(keys, _Committee(keys, {}), tmp_path / "a")
    assert _round(unsigned, keys) is not None and unsigned.cosignatures() == []

    # a device that was told another clip in training refuses to co-sign (but decrypts)
    devices = {node: Ed25519PrivateKey.generate() for node in range(1, 4)}
    lied_to = _summer(keys, _Committee(keys, devices, clip=2.0), tmp_path / "b")
    assert _round(lied_to, keys) is not None and lied_to.cosignatures() == []


def test_no_cosigning_without_a_ledger_key(keys: ClientKeys) -> None:
    devices = {node: Ed25519PrivateKey.generate() for node in range(1, 4)}
    summer = CommitteeSum(
        keys.public(),
        _Committee(keys, devices),  # type: ignore[arg-type]
        committee_size=2,
        timeout=10,
        seed=0,
    )
    assert _round(summer, keys) is not None and summer.cosignatures() == []
