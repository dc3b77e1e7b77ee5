"""fastrec.metrics: AUC, Recall@k and NDCG@k against hand-computed values (and sklearn's
roc_auc_score when it is installed)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fastrec.metrics import auc, ndcg_at_k, recall_at_k


def auc_pairs(labels, scores) -> float:
    """O(P*Q) definition: the share of (positive, negative) pairs ordered right, ties 1/2."""
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    good = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return good / (len(pos) * len(neg))


# ---- AUC ---------------------------------------------------------------------------------------


def test_auc_hand_computed():
    assert auc([0, 1], [0.1, 0.9]) == 1.0
    assert auc([1, 0], [0.1, 0.9]) == 0.0
    # pairs (pos, neg): (0.8, 0.1) ok, (0.8, 0.4) ok, (0.35, 0.1) ok, (0.35, 0.4) wrong -> 3/4
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    # ties: every pair tied -> 1/2
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # one tie out of four pairs: (0.7, 0.2) ok, (0.7, 0.7) 1/2, (0.9, 0.2) ok, (0.9, 0.7) ok
    assert auc([1, 0, 1, 0], [0.7, 0.2, 0.9, 0.7]) == 3.5 / 4


def test_auc_matches_pairwise_definition_and_is_rank_invariant():
    rng = np.random.default_rng(0)
    for n in (2, 3, 17, 200):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = rng.integers(0, 5, n).astype(np.float64)  # many ties
        assert auc(y, s) == pytest.approx(auc_pairs(y, s), abs=1e-12)
        assert auc(y.astype(bool), np.exp(s)) == pytest.approx(auc(y, s), abs=1e-12)
        assert auc(y.astype(np.float32), -s) == pytest.approx(1.0 - auc(y, s), abs=1e-12)


def test_auc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 5000)
    s = np.round(rng.random(5000) + 0.3 * y, 2)  # ties
    assert auc(y, s) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)


def test_auc_integer_scores_ranked_exactly():
    # int64 scores above 2**53 went through float64, where 2**62 and 2**62 + 1 are one value (a tie)
    for scores in (np.array([2**62, 2**62 + 1], np.int64), np.array([2**64 - 2, 2**64 - 1], np.uint64),
                   [2**62 + 1, 2**62 + 2]):
        assert auc([0, 1], scores) == 1.0 and auc([1, 0], scores) == 0.0
    assert auc([0, 1, 0, 1], np.array([2**62, 2**62, 2**62 + 1, 2**62 + 1])) == 0.5  # real ties
    # longdouble scores that differ below float64's resolution (where longdouble is wider)
    one = np.longdouble(1)
    s = np.array([one, one + np.finfo(np.longdouble).eps, one + 2 * np.finfo(np.longdouble).eps])
    if len(set(s.astype(np.float64).tolist())) < 3:
        assert auc([0, 1, 1], s) == 1.0 and auc([1, 0, 0], s) == 0.0


def test_auc_refuses_complex_scores():
    with pytest.raises(ValueError, match="real numbers"):
        auc([0, 1], np.array([0.1, 0.9]) + 1j)


def test_auc_errors():
    with pytest.raises(ValueError, match="one class"):
        auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0 or 1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="same length"):
        auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="binary"):
        auc(np.array(["a", "b"]), [0.1, 0.2])


# ---- Recall@k / NDCG@k -------------------------------------------------------------------------


def test_recall_hand_computed():
    rec = np.array([[5, 3, 9, 1],
                    [2, 7, 4, -1],     # -1: padding, never a hit
                    [8, 6, 0, 3]])
    rel = [{3, 1}, [4, 11], 8]
    # k=2: user 0 finds 3 of {3, 1} -> 1/2; user 1 none of {4, 11} -> 0; user 2 finds 8 -> 1
    assert recall_at_k(rec, rel, 2) == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    # k=4: user 0 both -> 1; user 1 finds 4 -> 1/2; user 2 -> 1
    assert recall_at_k(rec, rel, 4) == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    # k beyond the list: the list as it is
    assert recall_at_k(rec, rel, 10) == recall_at_k(rec, rel, 4)
    # queries with nothing relevant are skipped
    assert recall_at_k(rec, [{3, 1}, set(), []], 2) == 0.5
    assert math.isnan(recall_at_k(rec[:1], [set()], 2))


def test_ndcg_hand_computed():
    rec = [[5, 3, 9, 1], [2, 7, 4], [8, 6, 0]]
    rel = [{3, 1}, {4, 11}, {8}]
    l2 = math.log2
    # user 0: hits at ranks 2 and 4; ideal: ranks 1 and 2
    u0 = (1 / l2(3) + 1 / l2(5)) / (1 + 1 / l2(3))
    # user 1: hit at rank 3; ideal ranks 1, 2
    u1 = (1 / l2(4)) / (1 + 1 / l2(3))
    u2 = 1.0
    assert ndcg_at_k(rec, rel, 4) == pytest.approx((u0 + u1 + u2) / 3)
    # k=2: user 0 hit at rank 2 only; ideal for two relevant within k=2 is 1 + 1/log2(3)
    assert ndcg_at_k(rec, rel, 2) == pytest.approx(((1 / l2(3)) / (1 + 1 / l2(3)) + 0 + 1) / 3)
    # one relevant item at rank r: 1 / log2(r + 1)
    assert ndcg_at_k([[1, 2, 3]], [3], 3) == pytest.approx(0.5)
    # a repeated id counts once
    assert ndcg_at_k([[3, 3]], [{3, 4}], 2) == pytest.approx(1 / (1 + 1 / l2(3)))


def test_topk_metric_errors():
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k([[1]], [{1}], 0)
    with pytest.raises(ValueError, match="queries"):
        ndcg_at_k([[1], [2]], [{1}], 1)
    with pytest.raises(ValueError, match="2-D"):
        recall_at_k(np.array([1, 2]), [{1}, {2}], 1)
    # Relevant ids: integers >= 0. A float was truncated (1.7 counted as id 1), a string split
    # into characters, and -1 matched the padding of recommended ids.
    for bad, exc in (([[1.7]], TypeError), (["12"], TypeError), ([[None]], TypeError), ([[-1]], ValueError)):
        for fn in (recall_at_k, ndcg_at_k):
            with pytest.raises(exc):
                fn([[1, 2, -1]], bad, 3)
    assert recall_at_k([[1, 2]], [np.array([2, 5], np.int32)], 2) == 0.5
    assert recall_at_k([[1, 2]], [np.int64(2)], 2) == 1.0
