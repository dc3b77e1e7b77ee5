"""Float64 numpy oracles and tolerance helpers, for fastrec's tests and for users' own checks.

The oracles are deliberately plain loops over numpy: slow, obviously correct, independent of
fastrec's kernels.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "assert_close",
    "assert_no_worse_than",
    "assert_topk_matches",
    "dense_table_f64",
    "embedding_bag_ref",
    "embedding_bags_ref",
    "max_abs_error",
    "topk_ref",
    "torch_offsets",
]


def dense_table_f64(table) -> np.ndarray:
    """A table (float array or QuantizedTable) as float64 ``(R, D)``; quantized rows are
    decoded in float64 from their codes, scale and bias."""
    from .tables import QuantizedTable

    if isinstance(table, QuantizedTable):
        q, scale, bias = table._codes_and_qparams()
        return q.astype(np.float64) * scale.astype(np.float64)[:, None] + bias.astype(np.float64)[:, None]
    return np.asarray(table, dtype=np.float64)


def embedding_bag_ref(weight, indices, offsets=None, *, mode="sum", per_sample_weights=None,
                      padding_idx=None) -> np.ndarray:
    """Float64 reference of :func:`fastrec.ops.embedding_bag` (same arguments)."""
    w = dense_table_f64(weight)
    R, D = w.shape
    indices = np.asarray(indices)
    if offsets is None:
        B, L = indices.shape
        offsets = np.arange(B + 1) * L
        indices = indices.reshape(-1)
        if per_sample_weights is not None:
            per_sample_weights = np.asarray(per_sample_weights).reshape(-1)
    offsets = np.asarray(offsets)
    if padding_idx is not None and padding_idx < 0:
        padding_idx += R
    B = len(offsets) - 1
    out = np.zeros((B, D), dtype=np.float64)
    for b in range(B):
        rows, ws = [], []
        for p in range(int(offsets[b]), int(offsets[b + 1])):
            i = int(indices[p])
            if padding_idx is not None and i == padding_idx:
                continue
            if not 0 <= i < R:
                raise IndexError(f"index {i} at position {p} is out of range [0, {R})")
            rows.append(w[i])
            ws.append(1.0 if per_sample_weights is None else float(per_sample_weights[p]))
        if not rows:
            continue
        m = np.stack(rows)
        if mode == "sum":
            out[b] = (np.asarray(ws)[:, None] * m).sum(axis=0)
        elif mode == "mean":
            out[b] = m.mean(axis=0)
        elif mode == "max":  # NaN values are ignored (np.fmax from -inf), as the kernels do
            out[b] = np.fmax.reduce(np.vstack([np.full((1, m.shape[1]), -np.inf), m]), axis=0)
        else:
            raise ValueError(f"unknown mode {mode!r}")
    return out


def embedding_bags_ref(tables, indices, offsets, *, modes="sum", per_sample_weights=None) -> np.ndarray:
    """Float64 reference of :func:`fastrec.ops.embedding_bags`."""
    T = len(tables)
    offsets = np.asarray(offsets)
    B = (len(offsets) - 1) // T
    modes = [modes] * T if isinstance(modes, str) else list(modes)
    blocks = []
    for t in range(T):
        off = offsets[t * B:(t + 1) * B + 1]
        lo, hi = int(off[0]), int(off[-1])
        psw = None if per_sample_weights is None else np.asarray(per_sample_weights)[lo:hi]
        blocks.append(embedding_bag_ref(tables[t], np.asarray(indices)[lo:hi], off - lo, mode=modes[t],
                                        per_sample_weights=psw))
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((B, 0))


def torch_offsets(offsets) -> np.ndarray:
    """CSR offsets (B + 1) -> torch.nn.EmbeddingBag's B start offsets."""
    return np.asarray(offsets)[:-1]


def max_abs_error(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape mismatch: {actual.shape} vs {expected.shape}")
    return float(np.max(np.abs(actual - expected))) if actual.size else 0.0


def assert_close(actual, expected, *, rtol=1e-5, atol=1e-6, err_msg="") -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, with a useful message."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=err_msg)


def assert_no_worse_than(actual, peer, oracle, *, factor=2.0, atol=1e-6, err_msg="") -> None:
    """DESIGN.md's rule for lossy paths: fastrec's max error against the float64 oracle is at
    most ``factor`` times the peer's (plus ``atol``, for when the peer happens to be exact)."""
    ours = max_abs_error(actual, oracle)
    theirs = max_abs_error(peer, oracle)
    if not ours <= factor * theirs + atol:
        raise AssertionError(f"{err_msg} max error {ours:.3e} > {factor} x peer's {theirs:.3e} + {atol:.1e}")


def topk_ref(queries, items, k: int, *, ids=None, exclude=None):
    """Exact float64 inner-product top-k: ``(scores float64 (Q, k), ids int64 (Q, k))``, best
    first, ties by the smaller id, padded with (-inf, -1). ``exclude``: a list of Q id lists."""
    q = np.asarray(queries, dtype=np.float64)
    x = np.asarray(items, dtype=np.float64)
    ids = np.arange(x.shape[0], dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    Q = q.shape[0]
    out_s = np.full((Q, k), -np.inf)
    out_i = np.full((Q, k), -1, dtype=np.int64)
    # Each distinct row is scored once: BLAS may round identical rows differently depending on
    # where they sit, which broke exact ties (the smaller id must win them).
    if x.shape[0]:
        uniq, inverse = np.unique(x, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
    for r in range(Q):
        scores = (uniq @ q[r])[inverse] if x.shape[0] else np.empty(0)
        keep = np.ones(x.shape[0], dtype=bool)
        if exclude is not None and exclude[r] is not None and len(exclude[r]):
            keep &= ~np.isin(ids, np.asarray(exclude[r], dtype=np.int64))
        cand = np.flatnonzero(keep)
        order = cand[np.lexsort((ids[cand], -scores[cand]))][:k]
        out_s[r, : len(order)] = scores[order]
        out_i[r, : len(order)] = ids[order]
    return out_s, out_i


def assert_topk_matches(scores, ids, items, queries, ref_scores, ref_ids, *, item_ids=None, rtol=1e-5,
                        atol=1e-5, min_recall=1.0, exact_scores=True, exclude=None) -> None:
    """Checks a top-k result against :func:`topk_ref`'s, "equal up to ties".

    Every returned id is a real, distinct item, not in ``exclude`` (topk_ref's form: a list of
    Q id lists); scores are sorted; where ``exact_scores`` they equal the float64 inner
    products of the returned ids within tolerance; the padding matches; recall against the
    reference is at least ``min_recall``, counting as found any reference item whose score ties
    (within tolerance) with the lowest true score returned. With ``min_recall=1.0`` the returned
    items' true scores, sorted, must also equal the reference's position by position.
    """
    scores = np.asarray(scores)
    ids = np.asarray(ids)
    x = np.asarray(items, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    item_ids = np.arange(x.shape[0], dtype=np.int64) if item_ids is None else np.asarray(item_ids)
    row_of = {int(v): i for i, v in enumerate(item_ids)}
    assert scores.shape == ids.shape == ref_ids.shape, (scores.shape, ids.shape, ref_ids.shape)
    for r in range(scores.shape[0]):
        n_ref = int((ref_ids[r] >= 0).sum())
        got = ids[r][ids[r] >= 0]
        assert len(got) == n_ref, f"query {r}: {len(got)} results, expected {n_ref}"
        assert (ids[r][n_ref:] == -1).all() and np.isneginf(scores[r][n_ref:]).all(), f"query {r}: bad padding"
        assert len(set(got.tolist())) == len(got), f"query {r}: duplicate ids"
        s = scores[r][:n_ref].astype(np.float64)
        assert np.all(s[:-1] >= s[1:]), f"query {r}: scores not sorted"
        if n_ref == 0:
            continue
        assert all(int(i) in row_of for i in got), f"query {r}: unknown ids returned"
        if exclude is not None and exclude[r] is not None and len(exclude[r]):
            hit = np.intersect1d(got, np.asarray(exclude[r], dtype=np.int64))
            assert hit.size == 0, f"query {r}: excluded ids returned: {hit[:5].tolist()}"
        true = np.array([x[row_of[int(i)]] @ q[r] for i in got])
        tol = atol + rtol * np.abs(ref_scores[r][:n_ref]).max()
        if exact_scores:
            np.testing.assert_allclose(s, true, rtol=0, atol=tol, err_msg=f"query {r}: scores")
        if min_recall >= 1.0:  # the same scores as the reference, up to which of tied items
            np.testing.assert_allclose(np.sort(true)[::-1], ref_scores[r][:n_ref], rtol=0, atol=tol,
                                       err_msg=f"query {r}: not the top {n_ref}")
        last = true.min()  # (the reference's own last score would count its k-th item as found always)
        returned = set(got.tolist())
        found = sum(1 for i, rs in zip(ref_ids[r][:n_ref], ref_scores[r][:n_ref])
                    if int(i) in returned or abs(rs - last) <= tol)
        recall = found / n_ref
        assert recall >= min_recall, f"query {r}: recall {recall:.4f} < {min_recall}"
