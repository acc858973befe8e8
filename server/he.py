"""Encrypted aggregation on the server: add CKKS ciphertexts, have a committee decrypt the sum.

:class:`CommitteeSum` is the :class:`server.aggregation.UpdateSum` of an encrypted run
(docs/design.md, "One training round", steps 4-5). The server holds only the public context
(``server.ctx``, no secret key): it checks each client's ciphertext (format version, key
fingerprint, parameter set, layout, chunk count and size) and adds the good ones
homomorphically, leaving out a bad one with a logged reason while the round goes on. Then it
sends the encrypted sum to a committee of ``committee_size`` clients of the round, each of which
decrypts it, floods it with noise and rounds it before release (Li and Micciancio 2021;
:func:`common.he.decrypt_sum`). Their outputs must agree within
:func:`common.he.committee_tolerance`; a missing member or a disagreement discards the round.
The server only adds: clients pre-weight their updates (example counts, or
the DP fixed denominator), so no ciphertext is ever multiplied.

Co-signatures (:mod:`common.privacy.signing`). Given a ``run_id`` and the server's ledger key,
the decrypt request of a client-level DP round also asks each member to co-sign what it can
check: the round, the sum's update count and digest, and the mechanism announced with the round.
The valid co-signatures of a released sum (:meth:`CommitteeSum.cosignatures`) go into the
round's ledger line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.he import (
    CiphertextRejectedError,
    EncryptedSum,
    Layout,
    ServerKeys,
    SumAccumulator,
    committee_agree,
    committee_tolerance,
    default_flood_std,
    from_record,
    layout_of,
    to_record,
)
from common.privacy.signing import (
    COSIGN_REQUEST_RECORD,
    COSIGNATURE_RECORD,
    Cosignature,
    cosign_request,
    statement_from_request,
    sum_digest,
)
from common.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    DECRYPT_MESSAGE_TYPE,
    HE_AGGREGATE_SECONDS,
    HE_DECRYPT_SECONDS,
    HE_FINGERPRINT,
    HE_RECORD,
    HE_SUM_RECORD,
    ClientDPConfig,
    RoundConfig,
)

__all__ = ["CommitteeSum"]

logger = logging.getLogger(__name__)


class CommitteeSum:
    """Adds encrypted updates; a committee of clients of the round decrypts the sum.

    Parameters
    ----------
    keys:
        The server's public context (loaded with :func:`common.he.load_server_context`).
    grid:
        Where committee requests are sent.
    committee_size:
        Members asked to decrypt (>= 2); all must answer and agree.
    timeout:
        Seconds to wait for the committee.
    seed:
        Seed of the committee draw; round ``r`` uses ``default_rng([seed, r, 3])``.
    max_chunk_bytes:
        Largest accepted ciphertext chunk; default: what the parameter set can produce.
    run_id, server_key:
        The ledger's run id and the server's ledger key (hex): when both are given, members
        are asked to co-sign client-level DP rounds (module docstring).
    """

    def __init__(
        self,
        keys: ServerKeys,
        grid: Grid,
        *,
        committee_size: int,
        timeout: float,
        seed: int,
        max_chunk_bytes: int | None = None,
        run_id: str | None = None,
        server_key: str | None = None,
    ) -> None:
        if committee_size < 2:
            raise ValueError(f"committee_size must be >= 2, got {committee_size}")
        self.keys = keys
        self.grid = grid
        self.committee_size = committee_size
        self.timeout = timeout
        self.seed = seed
        self.max_chunk_bytes = max_chunk_bytes
        self._round = 0
        self._layout: Layout | None = None
        self._acc: SumAccumulator | None = None
        self._contributors: list[int] = []
        self._why = ""
        self._seconds: dict[str, float] = {}
        self._signing = (run_id, server_key) if run_id and server_key else None
        self._mechanism: dict[str, float] | None = None
        self._cosignatures: list[dict[str, object]] = []

    def announce(self, config: ConfigRecord) -> None:
        """Tell clients which key pair to encrypt with (and note the announced DP mechanism,
        which the committee co-signs)."""
        config[HE_FINGERPRINT] = self.keys.fingerprint
        dp = ClientDPConfig.read(config) if self._signing is not None else None
        self._mechanism = None
        if dp is not None:
            self._mechanism = {
                "noise_multiplier": dp.noise_multiplier,
                "clip": dp.clip,
                "sample_rate": dp.sample_rate,
                "expected_participants": dp.denominator,
                "delta": dp.delta,
            }

    def begin(self, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> None:
        """Start an empty encrypted sum with the layout of the model the clients received."""
        self._round = server_round
        self._layout = layout_of(global_arrays)
        self._acc = SumAccumulator(
            keys=self.keys, layout=self._layout, max_chunk_bytes=self.max_chunk_bytes
        )
        self._contributors = []
        self._why = ""
        self._seconds = {HE_AGGREGATE_SECONDS: 0.0, HE_DECRYPT_SECONDS: 0.0}
        self._cosignatures = []

    def add(self, msg: Message) -> str | None:
        """Check one reply's ciphertext and add it; a rejected one leaves the sum unchanged."""
        assert self._acc is not None, "begin() first"
        record = msg.content.config_records.get(HE_RECORD)
        if record is None:
            return "reply has no encrypted update (plaintext refused in an encrypted run)"
        return self._accumulate(msg, record)

    def _accumulate(self, msg: Message, record: ConfigRecord) -> str | None:
        """Check and add one reply's ciphertext (timed); the reason it was refused, or None."""
        assert self._acc is not None, "begin() first"
        start = time.perf_counter()
        try:
            self._acc.add(from_record(record))
        except CiphertextRejectedError as err:
            return f"ciphertext rejected ({err.reason.value}): {err}"
        finally:
            self._seconds[HE_AGGREGATE_SECONDS] += time.perf_counter() - start
        self._contributors.append(msg.metadata.src_node_id)
        return None

    def total(self) -> dict[str, np.ndarray] | None:
        """The committee's agreed decryption of the sum (float64), or ``None`` (see why_not)."""
        assert self._acc is not None and self._layout is not None, "begin() first"
        if self._acc.count == 0:
            self._why = "no update was added"
            return None
        if len(self._contributors) < self.committee_size:
            self._why = (
                f"{len(self._contributors)} contributor(s), the committee needs "
                f"{self.committee_size}"
            )
            return None
        encrypted_sum, encrypted = self._sealed_sum()
        content: dict[str, ConfigRecord] = {
            HE_SUM_RECORD: encrypted,
            CONFIG_RECORD: RoundConfig(self._round).to_record(),
        }
        cosign, expected = self._cosign_request(encrypted_sum)
        if cosign is not None:
            content[COSIGN_REQUEST_RECORD] = cosign
        rng = np.random.default_rng([self.seed, self._round, 3])
        # choose positions, not ids: Flower node ids are uint64 and numpy would make them float
        picks = rng.choice(len(self._contributors), self.committee_size, replace=False)
        members = sorted(self._contributors[int(i)] for i in picks)
        start = time.perf_counter()
        requests = [
            Message(
                RecordDict(dict(content)),
                dst_node_id=node,
                message_type=DECRYPT_MESSAGE_TYPE,
                ttl=self.timeout + 60.0,
                group_id=f"{self._round}-decrypt",
            )
            for node in members
        ]
        replies = list(self.grid.send_and_receive(requests, timeout=self.timeout))
        outputs = self._collect(replies)
        self._seconds[HE_DECRYPT_SECONDS] = time.perf_counter() - start
        if len(outputs) < self.committee_size:
            self._why = f"committee incomplete: {len(outputs)} of {self.committee_size} answered"
            return None
        flood_std = default_flood_std(self.keys.params, n_updates=self._acc.count)
        agreed = committee_agree(outputs, tolerance=committee_tolerance(flood_std))
        if agreed is None:
            self._why = "committee outputs disagree"
            return None
        logger.debug("round %d: committee %s agreed", self._round, members)
        if expected is not None:
            self._cosignatures = self._collect_cosignatures(replies, expected)
        return {k: v.astype(np.float64) for k, v in agreed.items()}

    def _sealed_sum(self) -> tuple[EncryptedSum, ConfigRecord]:
        """The encrypted sum and its record (the time it takes counts as aggregation)."""
        assert self._acc is not None, "begin() first"
        start = time.perf_counter()
        encrypted_sum = self._acc.result()
        record = to_record(encrypted_sum)
        self._seconds[HE_AGGREGATE_SECONDS] += time.perf_counter() - start
        return encrypted_sum, record

    def _cosign_request(
        self, encrypted_sum: EncryptedSum
    ) -> tuple[ConfigRecord | None, dict[str, object] | None]:
        """The co-signing request of a signed DP round and the statement members must sign, or
        ``(None, None)`` when the round is not co-signed."""
        if self._signing is None or self._mechanism is None:
            return None, None
        request = cosign_request(
            run_id=self._signing[0], server_key=self._signing[1], mechanism=self._mechanism
        )
        expected = statement_from_request(
            request,
            server_round=self._round,
            contributors=encrypted_sum.n_updates,
            sum_sha256=sum_digest(
                encrypted_sum.header.fingerprint, encrypted_sum.n_updates, encrypted_sum.chunks
            ),
        )
        return ConfigRecord(dict(request)), expected

    def _collect_cosignatures(
        self, replies: Iterable[Message], expected: dict[str, object]
    ) -> list[dict[str, object]]:
        """The members' valid co-signatures of ``expected`` (one per key), as ledger records."""
        kept: dict[str, dict[str, object]] = {}
        for reply in replies:
            if reply.has_error():
                continue
            cosignature = Cosignature.from_wire(
                reply.content.config_records.get(COSIGNATURE_RECORD)
            )
            if cosignature is None:
                logger.info(
                    "round %d: committee member %s did not co-sign",
                    self._round,
                    reply.metadata.src_node_id,
                )
            elif cosignature.statement != expected or not cosignature.valid():
                logger.warning(
                    "round %d: committee member %s co-signed something else; left out",
                    self._round,
                    reply.metadata.src_node_id,
                )
            else:
                kept[cosignature.key] = cosignature.to_record()
        return list(kept.values())

    def cosignatures(self) -> list[dict[str, object]]:
        """The committee's co-signatures of the last released sum (empty if none)."""
        return list(self._cosignatures)

    def _collect(self, replies: Iterable[Message]) -> list[dict[str, np.ndarray]]:
        """The members' decryptions with the expected names and shapes."""
        assert self._layout is not None
        expected = {t.name: t.shape for t in self._layout.tensors}
        outputs = []
        for reply in replies:
            if reply.has_error() or ARRAYS_RECORD not in reply.content.array_records:
                logger.warning(
                    "round %d: committee member %s did not decrypt: %s",
                    self._round,
                    reply.metadata.src_node_id,
                    reply.error.reason if reply.has_error() else "no arrays",
                )
                continue
            out = {k: v.numpy() for k, v in reply.content.array_records[ARRAYS_RECORD].items()}
            if {k: v.shape for k, v in out.items()} != expected:
                logger.warning("round %d: a committee output has the wrong layout", self._round)
                continue
            outputs.append(out)
        return outputs

    def why_not(self) -> str:
        """Why the last :meth:`total` was ``None``."""
        return self._why

    def timings(self) -> dict[str, float]:
        """Server-side seconds: adding (and checking) ciphertexts, and the committee round trip."""
        return dict(self._seconds)
