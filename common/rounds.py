"""One round semantics, shared by the Flower round loop and the in-process engine.

The Flower server (:mod:`server.federation`) and the in-process engine
(:mod:`simulations.fastsim`) run the same rounds (docs/design.md, "One training round"); what they
must agree on to the last bit lives here:

- the seeds a client trains and splits its rows with (:func:`train_seed`, :func:`split_seed`),
  also used by the ClientApp and a device (:mod:`client.app`, :mod:`client.store`);
- what a round's training exchange produced (:class:`RoundStats`);
- the test metrics on the held-out test users (:func:`test_metrics`);
- the typed record of a round in ``results.json`` and ``rounds.csv`` (:class:`RoundRecord`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.metrics import evaluate
from common.model import ModelConfig, build_model
from common.privacy.rounds import PrivacyRound
from common.run.folder import EvalData
from common.training import score_users

__all__ = [
    "ROUND_FIELDS",
    "TEST_METRICS",
    "RoundRecord",
    "RoundStats",
    "epsilon_prv",
    "split_seed",
    "test_metrics",
    "train_seed",
]

TEST_METRICS = ("ndcg@100", "recall@20", "recall@50", "coverage@20")
"""The test metrics a run reports (``final.test`` in ``results.json``)."""

ROUND_FIELDS = (
    "round",
    "sampled",
    "returned",
    "failed",
    "dropped",
    "refused",
    "applied",
    "ndcg@100",
    "recall@20",
    "client_ndcg@100",
    "epsilon_rdp",
    "epsilon_prv",
    "effective_noise_multiplier",
    "seconds",
    "bytes_up",
    "bytes_down",
    "deserialize_seconds",
    "train_seconds",
    "serialize_seconds",
    "he_encrypt_seconds",
    "he_aggregate_seconds",
    "he_decrypt_seconds",
    "discarded",
)
"""Columns of ``rounds.csv``, in order (DP and HE columns stay empty when those are off).

Each epsilon column holds one accountant only: ``epsilon_rdp`` is the RDP epsilon of every DP
round, ``epsilon_prv`` the PRV epsilon, computed only at the last round (docs/design.md,
"Privacy accounting"). The claimed ``epsilon`` (RDP, or PRV at the last round) stays in
``results.json`` and the ledger, where ``epsilon_accountant`` names its accountant."""

_SEED_STRIDE = 1_000_003  # a prime larger than any client id: (run seed, client) pairs stay apart
_ROUND_STRIDE = 7919


def train_seed(run_seed: int, server_round: int, client_id: int) -> int:
    """The seed of client ``client_id``'s local training in round ``server_round``."""
    return run_seed * _SEED_STRIDE + server_round * _ROUND_STRIDE + client_id


def split_seed(run_seed: int, client_id: int) -> int:
    """The seed of client ``client_id``'s split of its rows into training and local held-out."""
    return run_seed * _SEED_STRIDE + client_id


def epsilon_prv(ledger_record: Mapping[str, Any]) -> float | None:
    """The PRV epsilon of a round's ledger record, or ``None`` if the round claims RDP.

    Parameters
    ----------
    ledger_record:
        :meth:`common.privacy.rounds.PrivacyRound.to_record` of the round.

    Returns
    -------
    float or None
        ``epsilon`` when ``epsilon_accountant`` is ``"prv"`` (the last round), else ``None``.
    """
    if ledger_record.get("epsilon_accountant") != "prv":
        return None
    return float(ledger_record["epsilon"])


def test_metrics(
    model_cfg: ModelConfig, weights: dict[str, np.ndarray], data: EvalData
) -> dict[str, float]:
    """:data:`TEST_METRICS` of ``weights`` on the held-out test users (fold-in items scored -inf),
    with the metric code of the centralized run (:func:`common.metrics.evaluate`)."""
    model = build_model(model_cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    m = evaluate(lambda x: score_users(model, x), data.test_foldin, data.test_holdout)
    return {k: float(m[k]) for k in TEST_METRICS}


@dataclass
class RoundStats:
    """What one round's training exchange produced, for the log, the ledger and results."""

    invited: int = 0
    returned: int = 0
    failed: int = 0
    dropped: int = 0
    refused: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    applied: bool = False
    discarded: bool = False
    """The sum could not be released (e.g. the decryption committee disagreed)."""
    reasons: list[str] = field(default_factory=list)
    client_seconds: dict[str, float] = field(default_factory=dict)
    """Client-side cost summed over the returned updates, by name (``train-seconds``, ...)."""
    server_seconds: dict[str, float] = field(default_factory=dict)
    """Server-side cost of the sum by name (``he-aggregate-seconds``, ``he-decrypt-seconds``)."""
    contributors: list[int] = field(default_factory=list)
    """Positions (in canonical node order) of the clients whose update entered the sum."""


@dataclass
class RoundRecord:
    """One round as ``results.json`` and ``rounds.csv`` report it."""

    round: int
    stats: RoundStats
    privacy: PrivacyRound | None = None
    """The round's ledger record; ``None`` with DP off."""
    test: dict[str, float] | None = None
    """:func:`test_metrics`, on evaluation rounds."""
    client_ndcg: float | None = None
    """Mean NDCG@100 the clients measured on their own held-out items (Flower runs)."""
    encrypted: bool = False
    """Whether the sum was encrypted (``discarded`` is reported only then)."""
    seconds: float = 0.0
    """Wall time of the round, evaluation included."""

    def to_dict(self) -> dict[str, Any]:
        """The plain-JSON form (the keys of :data:`ROUND_FIELDS`, plus the claimed ``epsilon``,
        ``participated`` and ``ledger`` with DP; ``epsilon_prv`` is ``None`` where PRV was not
        computed)."""
        s = self.stats
        record: dict[str, Any] = {
            "round": self.round,
            "sampled": s.invited,
            "returned": s.returned,
            "failed": s.failed,
            "dropped": s.dropped,
            "refused": s.refused,
            "applied": s.applied,
            "ndcg@100": None if self.test is None else self.test["ndcg@100"],
            "recall@20": None if self.test is None else self.test["recall@20"],
            "client_ndcg@100": self.client_ndcg,
            "bytes_up": s.bytes_up,
            "bytes_down": s.bytes_down,
        }
        if self.privacy is not None:
            record["epsilon"] = self.privacy.epsilon
            record["epsilon_rdp"] = self.privacy.epsilon_rdp
            record["epsilon_prv"] = epsilon_prv(self.privacy.to_record())
            record["participated"] = s.returned
            record["effective_noise_multiplier"] = self.privacy.effective_noise_multiplier
            record["ledger"] = self.privacy.to_record()
        for key, total in s.client_seconds.items():
            record[key.replace("-", "_")] = round(total / max(s.returned, 1), 6)
        for key, value in s.server_seconds.items():
            record[key.replace("-", "_")] = round(value, 6)
        if self.encrypted:
            record["discarded"] = s.discarded
        record["seconds"] = round(self.seconds, 4)
        return record
