"""The privacy sweep's per-group gaps: averaged over repeats, tabled per epsilon."""

from __future__ import annotations

import math

import pytest

from simulations.sweep_warm import _mean_point, markdown_table


def _run(ndcg: float, groups: dict[str, float], counted: list[str]) -> dict:
    high = max(counted, key=lambda g: groups[g])
    low = min(counted, key=lambda g: groups[g])
    gap = {"groups": groups, "counted": counted, "gap": groups[high] - groups[low]}
    return {"ndcg@100": ndcg, "recall@20": 0.1, "groups": {"gender": {**gap, "high": high,
            "low": low, "gap_ci": [0.0, 0.1]}}}  # fmt: skip


def test_repeats_average_each_groups_ndcg_and_take_the_gap_between_the_means() -> None:
    runs = [
        _run(0.30, {"F": 0.28, "M": 0.32, "X": 0.9}, ["F", "M"]),  # X: too few users to count
        _run(0.32, {"F": 0.30, "M": 0.30, "X": 0.1}, ["F", "M"]),
    ]
    point = _mean_point(runs)
    gender = point["groups"]["gender"]
    assert gender["groups"] == {"F": pytest.approx(0.29), "M": pytest.approx(0.31), "X": 0.5}
    assert (gender["high"], gender["low"]) == ("M", "F")
    assert gender["gap"] == pytest.approx(0.02)
    assert gender["gap_runs"] == [pytest.approx(0.04), pytest.approx(0.0)]


def test_the_sweep_table_adds_the_largest_gap_per_attribute_and_point() -> None:
    point = {
        "target_epsilon": 8.0,
        "epsilon": 7.9,
        **_mean_point([_run(0.3, {"F": 0.2, "M": 0.3}, ["F", "M"])]),
    }
    free = {
        "target_epsilon": math.inf,
        **_mean_point([_run(0.4, {"F": 0.4, "M": 0.38}, ["F", "M"])]),
    }
    results = {
        "datasets": {
            "ml-100k": {
                "points": [point, free],
                "federated_no_dp": _mean_point([_run(0.39, {"F": 0.4, "M": 0.4}, ["F", "M"])]),
                "baselines": None,
            }
        }
    }
    text = markdown_table(results)
    assert "Largest test NDCG@100 gap between user groups" in text
    assert "| ml-100k | gender | 0.1000 (M > F) | 0.0200 (F > M) | 0.0000 (" in text
