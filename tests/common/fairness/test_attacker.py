"""The attacker's AUC: Mann-Whitney by hand, separable and random codes, label mapping."""

from __future__ import annotations

import numpy as np
import pytest

from common.fairness.attacker import (
    attacker_auc,
    attribute_classes,
    attribute_labels,
    mann_whitney_auc,
)


def test_mann_whitney_on_four_points_by_hand() -> None:
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: pairs won 1 + 0 + 1 + 1 = 3 of 4
    assert mann_whitney_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75


def test_mann_whitney_ties_count_one_half() -> None:
    # positives 0.5 and 0.9, negatives 0.5 and 0.2: 0.5 (tie) + 1 + 1 + 1 = 3.5 of 4
    assert mann_whitney_auc([0.5, 0.5, 0.2, 0.9], [True, False, False, True]) == 0.875
    assert mann_whitney_auc([1.0, 1.0, 1.0], [True, False, True]) == 0.5


def test_mann_whitney_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="positives and negatives"):
        mann_whitney_auc([0.1, 0.2], [True, True])


def test_separable_codes_give_auc_near_one() -> None:
    rng = np.random.default_rng(0)
    labels = np.where(rng.random(200) < 0.3, "F", "M")
    z = rng.normal(size=(200, 8))
    z[:, 2] += 6.0 * (labels == "F")

    result = attacker_auc(z, labels)

    assert result["auc"] > 0.99
    assert result["classes"] == ["F", "M"] and result["n"] == 200 and result["folds"] == 5
    assert result["counts"] == [int((labels == "F").sum()), int((labels == "M").sum())]


def test_random_labels_give_auc_near_one_half() -> None:
    rng = np.random.default_rng(1)
    aucs = []
    for _ in range(10):
        z = rng.normal(size=(300, 4))
        labels = np.where(rng.random(300) < 0.4, "F", "M")
        aucs.append(attacker_auc(z, labels, seed=0)["auc"])

    # one AUC's spread at chance is about 0.04 here, the mean of ten about 0.013
    assert abs(float(np.mean(aucs)) - 0.5) < 0.04


def test_permutations_give_the_chance_level_and_a_p_value() -> None:
    rng = np.random.default_rng(4)
    labels = np.where(rng.random(200) < 0.5, "F", "M")
    z = rng.normal(size=(200, 4))
    z[:, 0] += 2.0 * (labels == "F")

    result = attacker_auc(z, labels, permutations=9)

    assert result["chance"]["permutations"] == 9
    assert abs(result["chance"]["mean"] - 0.5) < 0.1
    assert result["auc"] > result["chance"]["p95"]
    assert result["p_value"] == pytest.approx(0.1)  # (1 + 0) / (1 + 9): none beats it


def test_multiclass_is_macro_one_vs_rest_and_unknowns_are_left_out() -> None:
    rng = np.random.default_rng(2)
    classes = np.array(["a", "b", "c"])
    y = rng.integers(0, 3, 300)
    z = rng.normal(size=(300, 4))
    z[np.arange(300), y] += 5.0  # class c's signal sits in feature c
    labels = classes[y]
    labels[:30] = ""
    labels[30:33] = "rare"  # fewer users than folds: left out

    result = attacker_auc(z, labels)
    noise = attacker_auc(rng.normal(size=(300, 4)), classes[y])

    assert result["classes"] == ["a", "b", "c"] and result["n"] == 267
    assert result["auc"] > 0.99
    assert abs(noise["auc"] - 0.5) < 0.08


def test_attacker_refuses_a_single_class() -> None:
    with pytest.raises(ValueError, match="at least two classes"):
        attacker_auc(np.zeros((10, 2)), np.array(["M"] * 9 + ["F"]))


def test_attribute_labels_use_the_public_vocabularies() -> None:
    ages = ["1", "24", "25", "56", "73", "", "old"]
    assert attribute_classes("age", ages).tolist() == [
        "<18", "18-24", "25-34", "56+", "56+", "", ""
    ]  # fmt: skip
    assert attribute_labels("age", ages).tolist() == [0, 1, 2, 6, 6, -1, -1]
    assert attribute_labels("gender", ["F", "M", "", "X"]).tolist() == [0, 1, -1, -1]
    # ML-100K names and ML-1M codes share one occupation vocabulary
    occupation = attribute_labels("occupation", ["administrator", "writer", "0", "20"])
    assert occupation.tolist() == [0, 20, 21, 41]
