"""Tests for common.retrieval_metrics: hand-worked cases, edge cases, input checks, and a randomized
comparison against a deliberately naive pure-python reference implementation."""

from __future__ import annotations

import json
import math
from math import log2

import numpy as np
import pytest

from common.retrieval_metrics import (
    accuracy_within_margin,
    average_precision,
    fraction_recalled_at_k,
    hits,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    sign_test,
    summarize,
)

# ---------------------------------------------------------------------------------------------
# shared hand-worked example: ndb = 6, nq = 4, K = 4
#
#   query 0: relevant {1, 3}        ranked [3, 0, 1, -1]   -> hits [T, F, T, F]
#   query 1: relevant {0}           ranked [2, 4, -1, -1]  -> hits [F, F, F, F]
#   query 2: relevant {} (none)     ranked [0, 1, 2, 3]    -> hits [F, F, F, F]
#   query 3: relevant {0..5} (all)  ranked [5, 4, -1, -1]  -> hits [T, T, F, F]

NDB = 6


def _example() -> tuple[np.ndarray, np.ndarray]:
    ranked = np.array([[3, 0, 1, -1], [2, 4, -1, -1], [0, 1, 2, 3], [5, 4, -1, -1]], dtype=np.int64)
    rel = np.zeros((4, NDB), dtype=bool)
    rel[0, [1, 3]] = True
    rel[1, 0] = True
    rel[3, :] = True
    return ranked, rel


def test_hits_example() -> None:
    ranked, rel = _example()
    expected = np.array(
        [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]],
        dtype=bool,
    )
    h = hits(ranked, rel)
    assert h.dtype == bool
    np.testing.assert_array_equal(h, expected)


def test_hits_padding_never_relevant_even_if_last_column_relevant() -> None:
    # -1 must not wrap around to column ndb-1 (nor be clipped to column 0): both are relevant here.
    rel = np.array([[True, False, True]])
    ranked = np.array([[-1, -1, 1]])
    np.testing.assert_array_equal(hits(ranked, rel), [[False, False, False]])
    # -1 in the middle of a list is also just an empty slot
    ranked = np.array([[0, -1, 2]])
    np.testing.assert_array_equal(hits(ranked, rel), [[True, False, True]])


def test_precision_at_k_example() -> None:
    ranked, rel = _example()
    # k=1: q0 1/1, q1 0, q2 0, q3 1/1
    np.testing.assert_allclose(precision_at_k(ranked, rel, 1), [1.0, 0.0, 0.0, 1.0])
    # k=2: q0 1/2 (hit at rank 1 only), q1 0, q2 0, q3 2/2
    np.testing.assert_allclose(precision_at_k(ranked, rel, 2), [0.5, 0.0, 0.0, 1.0])
    # k=4: q0 2/4, q3 2/4 (the -1 slots count as misses; denominator stays 4)
    np.testing.assert_allclose(precision_at_k(ranked, rel, 4), [0.5, 0.0, 0.0, 0.5])


def test_precision_at_k_beyond_list_length() -> None:
    ranked, rel = _example()
    # K=4 < k=5 and k=10: missing slots are non-relevant, denominator is k
    # q0: 2/5 = 0.4, q3: 2/5 = 0.4 ; k=10: 2/10 = 0.2
    np.testing.assert_allclose(precision_at_k(ranked, rel, 5), [0.4, 0.0, 0.0, 0.4])
    np.testing.assert_allclose(precision_at_k(ranked, rel, 10), [0.2, 0.0, 0.0, 0.2])


def test_precision_all_relevant_full_list() -> None:
    rel = np.ones((2, 3), dtype=bool)
    ranked = np.array([[0, 1, 2], [2, 1, 0]])
    np.testing.assert_allclose(precision_at_k(ranked, rel, 3), [1.0, 1.0])
    # k=6 > ndb: at most 3 of 6 slots can hold anything -> 3/6
    np.testing.assert_allclose(precision_at_k(ranked, rel, 6), [0.5, 0.5])


def test_recall_at_k_example() -> None:
    ranked, rel = _example()
    # any hit in the first k: q0 yes (rank 1), q1 no, q2 no relevant at all -> 0, q3 yes
    for k in (1, 2, 4, 50):
        np.testing.assert_array_equal(recall_at_k(ranked, rel, k), [1.0, 0.0, 0.0, 1.0])
    # first hit at rank 3 only: recall@2 = 0, recall@3 = 1
    rel2 = np.zeros((1, 5), dtype=bool)
    rel2[0, 4] = True
    ranked2 = np.array([[0, 1, 4, 2]])
    assert recall_at_k(ranked2, rel2, 2).tolist() == [0.0]
    assert recall_at_k(ranked2, rel2, 3).tolist() == [1.0]


def test_fraction_recalled_at_k_example() -> None:
    ranked, rel = _example()
    # k=1: q0 1 of 2 relevant = 0.5; q1 0 of 1 = 0; q2 no relevant -> NaN; q3 1 of 6
    np.testing.assert_allclose(fraction_recalled_at_k(ranked, rel, 1), [0.5, 0.0, np.nan, 1 / 6])
    # k=4: q0 2/2 = 1; q1 0; q2 NaN; q3 2/6
    np.testing.assert_allclose(fraction_recalled_at_k(ranked, rel, 4), [1.0, 0.0, np.nan, 2 / 6])
    # k beyond K changes nothing
    np.testing.assert_allclose(fraction_recalled_at_k(ranked, rel, 20), [1.0, 0.0, np.nan, 2 / 6])


def test_average_precision_example() -> None:
    ranked, rel = _example()
    # q0: hits at ranks 1 and 3 -> (1/1 + 2/3) / min(2 relevant, K=4) = (5/3)/2 = 5/6
    # q1: no hit -> 0 / min(1, 4) = 0
    # q2: no relevant item -> NaN
    # q3: hits at ranks 1, 2 -> (1 + 1) / min(6 relevant, K=4) = 2/4 = 0.5
    np.testing.assert_allclose(average_precision(ranked, rel), [5 / 6, 0.0, np.nan, 0.5])


def test_average_precision_normalised_by_min_nrel_k() -> None:
    # 5 relevant items, list of K=3 all relevant -> AP = 3/min(5,3) = 1.0 (not 3/5)
    rel = np.zeros((1, 8), dtype=bool)
    rel[0, :5] = True
    assert average_precision(np.array([[0, 1, 2]]), rel).tolist() == [1.0]
    # same with a miss at rank 2: (1/1 + 2/3) / 3 = 5/9
    np.testing.assert_allclose(average_precision(np.array([[0, 7, 2]]), rel), [5 / 9])
    # single relevant item found at rank 4: (1/4) / min(1, 4) = 0.25
    rel1 = np.zeros((1, 8), dtype=bool)
    rel1[0, 6] = True
    np.testing.assert_allclose(average_precision(np.array([[0, 1, 2, 6]]), rel1), [0.25])


def test_average_precision_empty_list() -> None:
    rel = np.array([[True, False], [False, False]])
    ranked = np.zeros((2, 0), dtype=np.int64)
    np.testing.assert_array_equal(average_precision(ranked, rel), [0.0, np.nan])


def _gains_example() -> tuple[np.ndarray, np.ndarray]:
    gains = np.array([[0.0, 1.0, 0.5, 0.25], [0.0, 0.0, 0.0, 0.0]])
    ranked = np.array([[2, 1, -1], [0, 1, 2]])
    return ranked, gains


def test_ndcg_example() -> None:
    ranked, gains = _gains_example()
    # q0, k=3: DCG = 0.5/log2(2) + 1.0/log2(3) + 0 (empty slot) = 1.13093
    #          ideal = top-3 gains [1, .5, .25]: 1 + .5/log2(3) + .25/log2(4) = 1.44046
    #          nDCG = 0.785114
    # q1: all gains 0 -> ideal DCG 0 -> NaN
    expected_q0 = (0.5 + 1 / log2(3)) / (1 + 0.5 / log2(3) + 0.25 / 2)
    assert expected_q0 == pytest.approx(0.7851144250702093)
    out = ndcg_at_k(ranked, gains, 3)
    assert out[0] == pytest.approx(expected_q0)
    assert np.isnan(out[1])


def test_ndcg_cutoffs() -> None:
    ranked, gains = _gains_example()
    # k=1: DCG = 0.5, ideal = 1.0 -> 0.5
    assert ndcg_at_k(ranked, gains, 1)[0] == pytest.approx(0.5)
    # k=2: DCG = .5 + 1/log2(3); ideal = 1 + .5/log2(3)
    assert ndcg_at_k(ranked, gains, 2)[0] == pytest.approx((0.5 + 1 / log2(3)) / (1 + 0.5 / log2(3)))
    # k=10 > K=3 and > ndb=4: DCG as for k=3, ideal over all 4 gains (last is 0) -> same as k=3
    assert ndcg_at_k(ranked, gains, 10)[0] == pytest.approx(0.7851144250702093)


def test_ndcg_perfect_and_ties() -> None:
    gains = np.array([[0.0, 1.0, 0.5, 0.25]])
    assert ndcg_at_k(np.array([[1, 2, 3]]), gains, 3)[0] == pytest.approx(1.0)
    # two equal gains in either order are both ideal
    g2 = np.array([[0.5, 0.5, 0.0]])
    assert ndcg_at_k(np.array([[1, 0]]), g2, 2)[0] == pytest.approx(1.0)
    assert ndcg_at_k(np.array([[0, 1]]), g2, 2)[0] == pytest.approx(1.0)
    # a list of only zero-gain items (column 0, then an empty slot) scores 0, not NaN
    assert ndcg_at_k(np.array([[0, -1]]), gains, 2)[0] == 0.0
    # column 3 (gain .25) at rank 2: (.25/log2(3)) / (1 + .5/log2(3)) = 0.119906
    assert ndcg_at_k(np.array([[0, 3]]), gains, 2)[0] == pytest.approx(0.11990623328406573)


def test_accuracy_within_margin() -> None:
    # values exact in binary so the boundary is not a rounding question
    pred = np.array([0.25, 0.5, 1.0, 0.0])
    target = np.array([0.5, 0.5, 0.75, 1.0])
    # |diff| = [.25, 0, .25, 1]
    assert accuracy_within_margin(pred, target, 0.25) == 0.75  # boundary is inclusive
    assert accuracy_within_margin(pred, target, 0.1) == 0.25
    assert accuracy_within_margin(pred, target, 0.0) == 0.25
    assert accuracy_within_margin(pred, target, 1.0) == 1.0
    out = accuracy_within_margin(pred.astype(np.float32), target.astype(np.float32), 0.25)
    assert type(out) is float and out == 0.75
    # a NaN pair counts as a miss: diffs [nan, 0] -> 1/2
    assert accuracy_within_margin(np.array([np.nan, 0.5]), np.array([0.5, 0.5]), 1.0) == 0.5


@pytest.mark.parametrize(
    ("pred", "target", "margin"),
    [
        (np.zeros(3), np.zeros(4), 0.1),  # length mismatch
        (np.zeros(0), np.zeros(0), 0.1),  # empty
        (np.zeros((2, 2)), np.zeros((2, 2)), 0.1),  # not 1-D
        (np.zeros(3), np.zeros(3), -0.1),  # negative margin
        (np.zeros(3), np.zeros(3), float("nan")),
        (np.array(["a", "b"]), np.zeros(2), 0.1),  # not numeric
    ],
)
def test_accuracy_within_margin_errors(pred: np.ndarray, target: np.ndarray, margin: float) -> None:
    with pytest.raises(ValueError):
        accuracy_within_margin(pred, target, margin)


def test_summarize_example() -> None:
    ranked, rel = _example()
    s = summarize(ranked, rel, ks=(1, 2))
    # q2 (no relevant item) is excluded: evaluated queries q0, q1, q3
    assert s["n_queries"] == 3
    assert s["precision@1"] == pytest.approx((1 + 0 + 1) / 3)  # 2/3
    assert s["precision@2"] == pytest.approx((0.5 + 0 + 1) / 3)  # 0.5
    assert s["recall@1"] == pytest.approx(2 / 3)
    assert s["recall@2"] == pytest.approx(2 / 3)
    assert s["mAP"] == pytest.approx((5 / 6 + 0 + 0.5) / 3)  # 4/9
    assert s["ndcg@10"] is None
    assert list(s) == ["n_queries", "precision@1", "precision@2", "recall@1", "recall@2", "mAP", "ndcg@10"]
    for key, value in s.items():
        assert type(value) is (int if key == "n_queries" else type(None) if key == "ndcg@10" else float)
    json.dumps(s, allow_nan=False)


def test_summarize_default_ks_and_ndcg() -> None:
    ranked, rel = _example()
    gains = rel.astype(np.float32)
    s = summarize(ranked, rel, gains=gains)
    assert {f"precision@{k}" for k in (1, 5, 10, 20, 50)} <= set(s)
    assert {f"recall@{k}" for k in (1, 5, 10, 20, 50)} <= set(s)
    # precision@50: q0 2/50, q1 0, q3 2/50 -> mean 4/150
    assert s["precision@50"] == pytest.approx(4 / 150)
    # binary gains, k=10:
    #   q0: hits at ranks 1, 3 -> DCG = 1 + 1/log2(4) = 1.5; ideal (2 ones) = 1 + 1/log2(3) -> 0.919721
    #   q1: DCG 0 -> 0
    #   q3: DCG = 1 + 1/log2(3); ideal = sum over r=1..6 (ndb=6 < 10) of 1/log2(r+1) -> 0.493523
    #   mean over q0, q1, q3 = 0.471081
    q0 = 1.5 / (1 + 1 / log2(3))
    q3 = (1 + 1 / log2(3)) / sum(1 / log2(r + 1) for r in range(1, 7))
    assert s["ndcg@10"] == pytest.approx((q0 + 0 + q3) / 3)
    assert s["ndcg@10"] == pytest.approx(0.47108135627531195)
    json.dumps(s, allow_nan=False)


def test_summarize_ndcg_skips_zero_ideal() -> None:
    ranked, rel = _example()
    gains = rel.astype(np.float64)
    gains[1] = 0.0  # q1 is relevant-bearing but has no gain: its nDCG is NaN and is skipped
    s = summarize(ranked, rel, gains=gains, ks=(1,))
    assert s["n_queries"] == 3
    q0 = 1.5 / (1 + 1 / log2(3))
    q3 = (1 + 1 / log2(3)) / sum(1 / log2(r + 1) for r in range(1, 7))
    assert s["ndcg@10"] == pytest.approx((q0 + q3) / 2)


def test_summarize_no_evaluable_queries() -> None:
    ranked = np.array([[0, 1], [1, -1]])
    rel = np.zeros((2, 3), dtype=bool)
    s = summarize(ranked, rel, gains=np.zeros((2, 3)), ks=(1,))
    assert s == {"n_queries": 0, "precision@1": None, "recall@1": None, "mAP": None, "ndcg@10": None}
    json.dumps(s, allow_nan=False)


def test_summarize_all_relevant() -> None:
    rel = np.ones((3, 4), dtype=bool)
    ranked = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, -1, -1]])
    s = summarize(ranked, rel, gains=rel.astype(float), ks=(2, 4))
    assert s["n_queries"] == 3
    assert s["precision@2"] == 1.0
    # q2 has 2 of 4 slots filled -> 0.5; mean (1 + 1 + .5)/3
    assert s["precision@4"] == pytest.approx(2.5 / 3)
    assert s["recall@2"] == 1.0
    # AP: q0, q1 = 4/min(4,4) = 1; q2 = (1 + 1)/min(4, 4) = 0.5
    assert s["mAP"] == pytest.approx(2.5 / 3)


def test_sign_test_hand_cases() -> None:
    # 5 wins, 0 losses, 1 tie: n = 5, p = 2 * C(5,0) / 2^5 = 2/32 = 0.0625
    a = np.array([1.0, 2, 3, 4, 5, 0.5])
    b = np.array([0.0, 1, 2, 3, 4, 0.5])
    assert sign_test(a, b) == {"wins": 5, "losses": 0, "ties": 1, "p_value": 0.0625}
    # swapped: same p, wins and losses exchanged
    assert sign_test(b, a) == {"wins": 0, "losses": 5, "ties": 1, "p_value": 0.0625}
    # 3 wins, 1 loss: n = 4, p = 2 * (C(4,0) + C(4,1)) / 16 = 10/16 = 0.625
    r = sign_test(np.array([1.0, 1, 1, 0]), np.array([0.0, 0, 0, 1]))
    assert (r["wins"], r["losses"], r["ties"]) == (3, 1, 0)
    assert r["p_value"] == pytest.approx(0.625)
    # 2 wins, 2 losses: 2 * (1 + 4 + 6)/16 = 22/16 -> capped at 1.0
    assert sign_test(np.array([1.0, 1, 0, 0]), np.array([0.0, 0, 1, 1]))["p_value"] == 1.0
    # 10 wins, 0 losses: 2 / 1024
    assert sign_test(np.ones(10), np.zeros(10))["p_value"] == pytest.approx(2 / 1024)
    r = sign_test(np.ones(10), np.zeros(10))
    assert all(type(r[key]) is int for key in ("wins", "losses", "ties"))
    assert type(r["p_value"]) is float


def test_sign_test_edge_cases() -> None:
    # all ties -> no informative pair -> p = 1
    assert sign_test(np.ones(4), np.ones(4)) == {"wins": 0, "losses": 0, "ties": 4, "p_value": 1.0}
    assert sign_test(np.zeros(0), np.zeros(0)) == {"wins": 0, "losses": 0, "ties": 0, "p_value": 1.0}
    # NaN pairs (e.g. AP of queries without relevant items) are dropped entirely
    a = np.array([np.nan, 1.0, 1.0, np.nan])
    b = np.array([np.nan, 0.0, 1.0, 0.0])
    assert sign_test(a, b) == {"wins": 1, "losses": 0, "ties": 1, "p_value": 1.0}
    # large n stays exact and fast: 60 wins, 40 losses -> two-sided p ~ 0.0569
    r = sign_test(np.r_[np.ones(60), np.zeros(40)], np.r_[np.zeros(60), np.ones(40)])
    assert r["p_value"] == pytest.approx(2 * sum(math.comb(100, i) for i in range(41)) / 2**100)
    assert 0.05 < r["p_value"] < 0.06
    with pytest.raises(ValueError):
        sign_test(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError):
        sign_test(np.zeros((3, 1)), np.zeros((3, 1)))


# ---------------------------------------------------------------------------------------------
# input checks


def _bad_calls() -> list:
    ranked, rel = _example()
    gains = rel.astype(float)
    return [
        lambda: hits(ranked[0], rel),  # ranked 1-D
        lambda: hits(ranked.astype(float), rel),  # ranked not integer
        lambda: hits(ranked.astype(bool), rel),  # bool is not an index dtype
        lambda: hits(ranked, rel.astype(np.int64)),  # relevance not bool
        lambda: hits(ranked, rel[0]),  # relevance 1-D
        lambda: hits(ranked, rel[:3]),  # row count mismatch
        lambda: hits(np.array([[0, NDB]] * 4), rel),  # column out of range
        lambda: hits(np.array([[0, -2]] * 4), rel),  # negative other than -1
        lambda: hits(np.array([[1, 1]] * 4), rel),  # repeated column within a row
        lambda: precision_at_k(ranked, rel, 0),
        lambda: precision_at_k(ranked, rel, -1),
        lambda: precision_at_k(ranked, rel, 1.5),
        lambda: precision_at_k(ranked, rel, True),
        lambda: recall_at_k(ranked, rel[:, :3], 1),  # columns referenced beyond ndb=3
        lambda: fraction_recalled_at_k(ranked, rel[:2], 1),
        lambda: average_precision(ranked, rel[None]),  # 3-D
        lambda: ndcg_at_k(ranked, gains[:2], 3),
        lambda: ndcg_at_k(ranked, gains * 2, 3),  # gains above 1
        lambda: ndcg_at_k(ranked, -gains, 3),  # gains below 0
        lambda: ndcg_at_k(ranked, np.where(rel, np.nan, 0.0), 3),
        lambda: ndcg_at_k(ranked, gains, 0),
        lambda: ndcg_at_k(ranked[:, 0], gains, 3),
        lambda: summarize(ranked, rel, ks=()),
        lambda: summarize(ranked, rel, ks=(0, 5)),
        lambda: summarize(ranked, rel, gains=gains[:, :2]),
        lambda: summarize(ranked, rel.astype(float)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_shape_and_dtype_errors(case: int) -> None:
    with pytest.raises(ValueError):
        _bad_calls()[case]()


def test_duplicate_padding_is_fine_and_int32_accepted() -> None:
    ranked, rel = _example()
    # -1 repeated within a row is not a duplicate; int32 indices are fine; numpy int k is fine
    np.testing.assert_allclose(precision_at_k(ranked.astype(np.int32), rel, np.int64(4)), [0.5, 0, 0, 0.5])


def test_zero_queries_and_empty_database() -> None:
    ranked = np.zeros((0, 5), dtype=np.int64)
    rel = np.zeros((0, 7), dtype=bool)
    assert precision_at_k(ranked, rel, 3).shape == (0,)
    assert average_precision(ranked, rel).shape == (0,)
    assert ndcg_at_k(ranked, np.zeros((0, 7)), 3).shape == (0,)
    assert summarize(ranked, rel)["n_queries"] == 0
    # an empty database: every slot must be -1, nothing is relevant
    ranked = np.full((2, 3), -1)
    rel = np.zeros((2, 0), dtype=bool)
    np.testing.assert_array_equal(hits(ranked, rel), np.zeros((2, 3), dtype=bool))
    assert np.isnan(average_precision(ranked, rel)).all()
    assert np.isnan(ndcg_at_k(ranked, np.zeros((2, 0)), 3)).all()


# ---------------------------------------------------------------------------------------------
# randomized comparison against a brute-force reference (python loops, one query at a time)


def ref_hits(ranked: list[list[int]], rel: list[list[bool]]) -> list[list[bool]]:
    return [[j != -1 and rel[i][j] for j in row] for i, row in enumerate(ranked)]


def ref_precision(ranked, rel, k):
    out = []
    for i, row in enumerate(ranked):
        n = sum(1 for j in row[:k] if j != -1 and rel[i][j])
        out.append(n / k)
    return out


def ref_recall(ranked, rel, k):
    return [1.0 if any(j != -1 and rel[i][j] for j in row[:k]) else 0.0 for i, row in enumerate(ranked)]


def ref_fraction(ranked, rel, k):
    out = []
    for i, row in enumerate(ranked):
        total = sum(rel[i])
        found = sum(1 for j in row[:k] if j != -1 and rel[i][j])
        out.append(math.nan if total == 0 else found / total)
    return out


def ref_ap(ranked, rel):
    out = []
    for i, row in enumerate(ranked):
        total = sum(rel[i])
        if total == 0:
            out.append(math.nan)
            continue
        found, acc = 0, 0.0
        for rank, j in enumerate(row, start=1):
            if j != -1 and rel[i][j]:
                found += 1
                acc += found / rank
        denom = min(total, len(row))
        out.append(acc / denom if denom else 0.0)
    return out


def ref_ndcg(ranked, gains, k):
    out = []
    for i, row in enumerate(ranked):
        dcg = 0.0
        for rank, j in enumerate(row[:k], start=1):
            if j != -1:
                dcg += gains[i][j] / math.log2(rank + 1)
        best = sorted(gains[i], reverse=True)[:k]
        idcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(best, start=1))
        out.append(math.nan if idcg == 0 else dcg / idcg)
    return out


def ref_sign_test(a, b):
    wins = losses = ties = 0
    for x, y in zip(a, b, strict=True):
        if math.isnan(x) or math.isnan(y):
            continue
        if x > y:
            wins += 1
        elif x < y:
            losses += 1
        else:
            ties += 1
    n = wins + losses
    # two-sided: total probability of every outcome at least as far from n/2 as the observed one
    far = abs(wins - n / 2)
    p = sum(math.comb(n, i) for i in range(n + 1) if abs(i - n / 2) >= far) / 2**n
    return {"wins": wins, "losses": losses, "ties": ties, "p_value": min(1.0, p)}


def _random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nq = int(rng.integers(1, 30))
    ndb = int(rng.integers(1, 40))
    big_k = int(rng.integers(0, ndb + 5))  # sometimes longer than the database (padded)
    ranked = np.full((nq, big_k), -1, dtype=np.int64)
    for i in range(nq):
        n_filled = int(rng.integers(0, min(big_k, ndb) + 1))
        ranked[i, :n_filled] = rng.permutation(ndb)[:n_filled]
        if big_k and rng.random() < 0.3:  # also -1 holes in the middle of a list
            holes = rng.random(big_k) < 0.2
            ranked[i, holes] = -1
    density = rng.random(nq)[:, None] * rng.choice([0.1, 0.5, 1.0])
    rel = rng.random((nq, ndb)) < density
    rel[rng.random(nq) < 0.15] = False  # some queries without any relevant item
    rel[rng.random(nq) < 0.1] = True  # some where everything is relevant
    gains = np.where(rng.random((nq, ndb)) < 0.5, rng.random((nq, ndb)), 0.0)
    gains[rng.random(nq) < 0.15] = 0.0
    gains[:, rng.random(ndb) < 0.1] = 1.0
    return ranked, rel, gains


SEEDS = list(range(12))


@pytest.mark.parametrize("seed", SEEDS)
def test_random_against_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(5):
        ranked, rel, gains = _random_case(rng)
        r, rl, g = ranked.tolist(), rel.tolist(), gains.tolist()
        np.testing.assert_array_equal(hits(ranked, rel), np.array(ref_hits(r, rl), dtype=bool).reshape(ranked.shape))
        for k in (1, 2, 3, 5, 10, 50):
            np.testing.assert_allclose(precision_at_k(ranked, rel, k), ref_precision(r, rl, k), atol=1e-12)
            np.testing.assert_array_equal(recall_at_k(ranked, rel, k), ref_recall(r, rl, k))
            np.testing.assert_allclose(fraction_recalled_at_k(ranked, rel, k), ref_fraction(r, rl, k), atol=1e-12)
            np.testing.assert_allclose(ndcg_at_k(ranked, gains, k), ref_ndcg(r, g, k), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(average_precision(ranked, rel), ref_ap(r, rl), rtol=1e-12, atol=1e-12)

        ks = (1, 3, 10)
        s = summarize(ranked, rel, gains=gains, ks=ks)
        keep = [i for i in range(len(r)) if any(rl[i])]
        assert s["n_queries"] == len(keep)

        def mean(vals: list[float]) -> float | None:
            return sum(vals) / len(vals) if vals else None

        for k in ks:
            p, rc = ref_precision(r, rl, k), ref_recall(r, rl, k)
            assert s[f"precision@{k}"] == pytest.approx(mean([p[i] for i in keep]))
            assert s[f"recall@{k}"] == pytest.approx(mean([rc[i] for i in keep]))
        ap = ref_ap(r, rl)
        assert s["mAP"] == pytest.approx(mean([ap[i] for i in keep]))
        nd = ref_ndcg(r, g, 10)
        assert s["ndcg@10"] == pytest.approx(mean([nd[i] for i in keep if not math.isnan(nd[i])]))
        json.dumps(s, allow_nan=False)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_accuracy_within_margin_against_reference(seed: int) -> None:
    rng = np.random.default_rng(500 + seed)
    n = int(rng.integers(1, 200))
    pred = rng.integers(0, 9, n) / 8  # multiples of 1/8: differences are exact
    target = rng.integers(0, 9, n) / 8
    for margin in (0.0, 0.125, 0.25, 0.5, 1.0):
        expected = sum(1 for x, y in zip(pred.tolist(), target.tolist(), strict=True) if abs(x - y) <= margin) / n
        assert accuracy_within_margin(pred, target, margin) == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_random_sign_test_against_reference(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    for _ in range(10):
        n = int(rng.integers(0, 80))
        a = rng.integers(0, 4, n).astype(float)  # few levels -> plenty of ties
        b = rng.integers(0, 4, n).astype(float)
        a[rng.random(n) < 0.1] = np.nan
        expected = ref_sign_test(a.tolist(), b.tolist())
        got = sign_test(a, b)
        assert (got["wins"], got["losses"], got["ties"]) == (
            expected["wins"],
            expected["losses"],
            expected["ties"],
        )
        assert got["p_value"] == pytest.approx(expected["p_value"], rel=1e-12)
