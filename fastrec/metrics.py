"""Offline accuracy metrics for ranking and retrieval models (NumPy only).

* :func:`auc`: area under the ROC curve of binary labels and scores, from ranks (the
  Mann-Whitney U statistic), tied scores given their average rank, so it equals
  ``sklearn.metrics.roc_auc_score`` (which also counts a tie as half a correct pair).
* :func:`recall_at_k` / :func:`ndcg_at_k`: top-k retrieval metrics with binary relevance,
  averaged over the queries (users) that have at least one relevant item.

    from fastrec.metrics import auc, recall_at_k, ndcg_at_k
    auc(labels, model.score(dense, sparse))
    _, top = model.recommend(users, k=10, exclude=seen)
    recall_at_k(top, held_out, 10), ndcg_at_k(top, held_out, 10)
"""

from __future__ import annotations

import math

import numpy as np

from ._arrays import as_numpy

__all__ = ["auc", "ndcg_at_k", "recall_at_k"]


def auc(labels, scores) -> float:
    """ROC AUC: the probability that a random positive scores above a random negative, a tie
    counting one half.

    Args:
        labels: ``(N,)`` binary labels (bool, or numbers that are all 0 or 1).
        scores: ``(N,)`` real scores (probabilities, logits: any monotone transform gives the
            same AUC), finite.

    Computed from the ranks of the scores (ties get the average of the ranks they span) in
    O(N log N), with float64 sums: ``(sum of the positives' ranks - P (P + 1) / 2) / (P * Q)``
    for P positives and Q negatives.

    Raises:
        ValueError: shapes differ or are not 1-D, labels that are not 0/1, non-finite scores,
            or only one class present (the AUC is undefined).
    """
    y = as_numpy(labels)  # (torch tensors too: bfloat16, requires_grad)
    s = as_numpy(scores)
    if s.dtype.kind not in "biuf":  # complex scores lost their imaginary part with only a warning
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    if s.dtype.kind == "f" and s.dtype.itemsize < 8:  # float16 / 32 (integer and longdouble scores
        s = s.astype(np.float64, copy=False)          # are ranked as they are: float64 would tie them)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels and scores must be 1-D of the same length, got shapes "
                         f"{y.shape} and {s.shape}")
    if y.dtype != np.bool_:
        if y.dtype.kind not in "biuf":
            raise ValueError(f"labels must be binary (bool or 0/1 numbers), got dtype {y.dtype}")
        bad = (y != 0) & (y != 1)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"labels must be 0 or 1; labels[{i}] = {y[i]!r}")
        y = y == 1
    if not np.isfinite(s).all():
        i = int(np.argmax(~np.isfinite(s)))
        raise ValueError(f"scores must be finite; scores[{i}] = {s[i]!r}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC is undefined with only one class ({n_pos} positives, "
                         f"{n_neg} negatives)")
    # average ranks (1-based) of tied groups
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts, dtype=np.float64)        # rank of each group's last member
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum = float(avg_rank[inverse.reshape(-1)][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (float(n_pos) * float(n_neg))


def _per_query(recommended, relevant, k: int):
    """Yields (top-k ids as a list, set of relevant ids) for every query with a relevant item."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    rec = recommended
    if hasattr(rec, "detach") or isinstance(rec, memoryview):  # a torch tensor: as an array
        rec = as_numpy(rec)
    if isinstance(rec, np.ndarray) and rec.ndim != 2:
        raise ValueError(f"recommended_ids must be 2-D (queries, ranked ids), got shape {rec.shape}")
    n = len(rec)
    if len(relevant) != n:
        raise ValueError(f"recommended_ids has {n} queries, relevant_sets has {len(relevant)}")
    for row, rel in zip(rec, relevant):
        if isinstance(rel, (str, bytes)):  # would be split into characters
            raise TypeError(f"each relevant set must hold integer ids, got {type(rel).__name__}")
        if hasattr(rel, "detach"):  # a torch tensor
            rel = as_numpy(rel)
        if isinstance(rel, (int, np.integer)):
            values = [rel]
        elif isinstance(rel, np.ndarray):
            values = rel.reshape(-1).tolist()
        else:
            values = list(rel)
        values = [int(v) if isinstance(v, np.integer) else v for v in values]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise TypeError(f"relevant ids must be integers, got {values!r}")  # 1.7 used to count as id 1
        rel = set(values)
        if any(v < 0 for v in rel):  # -1 would match the padding of recommended ids
            raise ValueError(f"relevant ids must be >= 0 (-1 pads recommended ids), got {sorted(rel)}")
        if not rel:
            continue
        top = np.asarray(row).reshape(-1)[:k].tolist()
        yield top, rel


def recall_at_k(recommended_ids, relevant_sets, k: int) -> float:
    """Mean Recall@k: for each query, the share of its relevant items found among its first
    ``k`` recommended ids, ``|top-k ∩ relevant| / |relevant|``, averaged over the queries
    with at least one relevant item (the others are skipped).

    Args:
        recommended_ids: ``(Q, >= k)`` ids, best first (e.g. ``Model.recommend``'s ids; padding
            ids such as -1 simply never match), or a list of Q ranked lists.
        relevant_sets: Q entries, each an id or an iterable of ids (set, list, array).
        k: the cut-off, >= 1.

    With one held-out item per query (leave-last-out) this is the hit rate HR@k.

    Returns NaN when no query has a relevant item.

    Raises:
        ValueError: k not an int >= 1 (also for 2.0), the two inputs hold different numbers of
            queries, a ``recommended_ids`` array that is not 2-D, or a negative relevant id.
        TypeError: a relevant id that is not an integer (float, str, None, bool).
    """
    total, n = 0.0, 0
    for top, rel in _per_query(recommended_ids, relevant_sets, k):
        total += len(set(top) & rel) / len(rel)
        n += 1
    return total / n if n else float("nan")


def ndcg_at_k(recommended_ids, relevant_sets, k: int) -> float:
    """Mean NDCG@k with binary relevance: for each query,
    ``DCG = sum over ranks r = 1..k of [id at r is relevant] / log2(r + 1)`` divided by the
    best possible DCG, ``sum over r = 1..min(k, |relevant|) of 1 / log2(r + 1)``; averaged over
    the queries with at least one relevant item. A repeated id counts at its first rank only.

    Arguments as for :func:`recall_at_k`. With one held-out item at rank r <= k a query scores
    ``1 / log2(r + 1)`` (1 at rank 1), else 0.
    """
    total, n = 0.0, 0
    for top, rel in _per_query(recommended_ids, relevant_sets, k):
        seen = set()
        dcg = 0.0
        for r, item in enumerate(top):
            if item in rel and item not in seen:
                dcg += 1.0 / math.log2(r + 2)
            seen.add(item)
        ideal = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(rel))))
        total += dcg / ideal
        n += 1
    return total / n if n else float("nan")
