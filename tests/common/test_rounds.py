"""The round semantics the Flower server, the ClientApp and the in-process engine share."""

from __future__ import annotations

from common.privacy.rounds import PrivacyRound
from common.rounds import ROUND_FIELDS, RoundRecord, RoundStats, split_seed, train_seed


def test_seeds_are_distinct_per_round_and_client_and_stable() -> None:
    # the values the ClientApp has always used: changing them changes every seeded run
    assert train_seed(0, 1, 0) == 7919 and train_seed(2, 3, 5) == 2 * 1_000_003 + 3 * 7919 + 5
    assert split_seed(1, 4) == 1_000_007
    seeds = {train_seed(0, r, c) for r in range(1, 50) for c in range(100)}
    assert len(seeds) == 49 * 100


def test_round_record_reports_stats_timings_and_privacy() -> None:
    stats = RoundStats(
        invited=4,
        returned=2,
        failed=1,
        dropped=1,
        applied=True,
        client_seconds={"train-seconds": 3.0},
        server_seconds={"he-decrypt-seconds": 0.25},
    )
    privacy = PrivacyRound(
        round=2, sample_rate=0.1, invited=4, participated=2, expected_participants=4.0,
        clip=1.0, noise_multiplier=1.0, effective_noise_multiplier=0.7071, steps=1,
        released=True, epsilon=0.5, epsilon_accountant="rdp", epsilon_rdp=0.5,
    )  # fmt: skip
    record = RoundRecord(
        round=2,
        stats=stats,
        privacy=privacy,
        test={"ndcg@100": 0.3, "recall@20": 0.2},
        encrypted=True,
        seconds=1.23456,
    )
    row = record.to_dict()
    assert row["train_seconds"] == 1.5  # mean over the returned updates
    assert row["he_decrypt_seconds"] == 0.25 and row["seconds"] == 1.2346
    assert (row["epsilon"], row["participated"], row["discarded"]) == (0.5, 2, False)
    assert row["ledger"] == privacy.to_record()
    timings = {"deserialize_seconds", "serialize_seconds", "he_encrypt_seconds"}
    assert set(ROUND_FIELDS) - set(row) == timings | {"he_aggregate_seconds"}  # not measured


def test_round_record_without_privacy_or_evaluation() -> None:
    row = RoundRecord(round=1, stats=RoundStats(invited=3, returned=3)).to_dict()
    assert row["ndcg@100"] is None and "epsilon" not in row and "discarded" not in row
