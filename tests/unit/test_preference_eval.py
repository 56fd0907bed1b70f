"""Length-aware RM evaluation: worked numbers on a hand-built set of six pairs."""

from __future__ import annotations

import math

import pytest

from rlhfkit.algorithms.preference_eval import length_aware_metrics, length_ratio

# margin, chosen chars, rejected chars     ratio  matched  RM right  chosen longer  bin
SIX = [
    (2.0, 100, 90),  #                      1.11   yes      yes       yes            [1, 1.25]
    (-1.0, 100, 120),  #                    1.20   yes      no        no             [1, 1.25]
    (0.5, 300, 100),  #                     3.00   no       yes       yes            (2, 3]
    (0.0, 50, 50),  #                       1.00   yes      tie=no    no (equal)     [1, 1.25]
    (1.0, 100, 400),  #                     4.00   no       yes       no             (3, ∞)
    (-0.5, 200, 150),  #                    1.33   no       no        yes            (1.25, 1.5]
]


def test_worked_example_six_pairs():
    m, c, r = (list(x) for x in zip(*SIX))
    tokens_c, tokens_r = [10, 10, 10, 10, 10, 10], [9, 9, 9, 11, 11, 11]  # the rule on tokens: 3 of 6
    out = length_aware_metrics(m, c, r, tokens_c, tokens_r)
    assert out["pairs"] == 6
    assert out["accuracy"] == 3 / 6 and out["ties"] == 1 / 6
    assert out["margin"] == pytest.approx(2.0 / 6)
    assert out["longer_wins"] == 3 / 6 and out["longer_wins_tokens"] == 3 / 6
    assert out["matched_pairs"] == 3  # pairs 0, 1, 3
    assert out["matched_accuracy"] == 1 / 3 and out["matched_longer_wins"] == 1 / 3
    # 5 pairs of unequal length; the RM picks the longer one in pairs 0, 1 (negative margin, rejected longer), 2
    assert out["length_agreement"] == 3 / 5
    bins = [(b["lo"], b["hi"], b["pairs"], b["accuracy"], b["longer_wins"]) for b in out["bins"]]
    assert bins == [
        (1.0, 1.25, 3, 1 / 3, 1 / 3),
        (1.25, 1.5, 1, 0.0, 1.0),
        (1.5, 2.0, 0, None, None),
        (2.0, 3.0, 1, 1.0, 1.0),
        (3.0, None, 1, 1.0, 0.0),
    ]
    # least squares m = β·ℓ, ℓ = log(c/r): β = Σmℓ / Σℓ² = −0.58778 / 3.25586 (by hand)
    assert out["length_slope"] == pytest.approx(-0.180532, abs=1e-5)
    # residuals m − βℓ: +2.019, −1.033, +0.698, 0, +0.750, −0.448 → 3 of 6 above 0
    assert out["length_controlled_accuracy"] == 3 / 6


def test_a_pure_length_detector_has_no_length_controlled_accuracy():
    """m = 2·log(c/r): it scores the length rule's accuracy, and nothing is left once length is regressed out."""
    c, r = [200, 100, 300, 120], [100, 200, 100, 100]
    m = [2 * math.log(a / b) for a, b in zip(c, r)]
    out = length_aware_metrics(m, c, r)
    assert out["accuracy"] == out["longer_wins"] == 3 / 4
    assert out["length_agreement"] == 1.0
    assert out["length_slope"] == pytest.approx(2.0) and out["margin_length_corr"] == pytest.approx(1.0)
    assert out["length_controlled_accuracy"] == 0.0
    # an RM that judges content (right on every pair, whatever the lengths) keeps most of its accuracy
    judge = length_aware_metrics([1.0, 1.0, 1.0, 1.0], c, r)
    assert judge["accuracy"] == 1.0 and judge["length_controlled_accuracy"] >= 0.75


def test_length_ratio_edges():
    assert length_ratio(10, 8) == length_ratio(8, 10) == 1.25
    assert length_ratio(0, 0) == 1.0 and length_ratio(0, 5) == math.inf
    out = length_aware_metrics([1.0], [0], [5])  # an empty answer falls in the open last bin
    assert out["bins"][-1]["pairs"] == 1 and out["matched_pairs"] == 0
    with pytest.raises(ValueError, match="2 margins but 1/1"):
        length_aware_metrics([1.0, 2.0], [1], [1])
