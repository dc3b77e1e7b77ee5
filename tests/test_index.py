"""fastrec.ItemIndex and fastrec.ops.topk against the exact float64 oracle."""

from __future__ import annotations

import gc
import mmap
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import threading
import warnings

import numpy as np
import pytest

import fastrec
from fastrec import index as index_module
from fastrec.testing import assert_topk_matches, topk_ref

PRECISIONS = ["fp32", "fp16", "int8"]


def data(rng, N, D, Q):
    return (rng.standard_normal((N, D)).astype(np.float32), rng.standard_normal((Q, D)).astype(np.float32))


def check(index, items, queries, k, *, ids=None, exclude=None, precision=None, search_exclude=None):
    precision = precision or index.precision
    scores, got = index.search(queries, k, exclude=exclude if search_exclude is None else search_exclude)
    ref_s, ref_i = topk_ref(queries, items, k, ids=ids, exclude=exclude)
    assert scores.dtype == np.float32 and got.dtype == np.int64
    assert scores.shape == got.shape == (queries.shape[0], k)
    if index.rerank or precision == "fp32":
        # exact scores for the returned ids; int8/fp16 candidates may (rarely) miss an item
        assert_topk_matches(scores, got, items, queries, ref_s, ref_i, item_ids=ids, exclude=exclude,
                            min_recall=1.0 if precision == "fp32" else 0.98)
    else:
        assert_topk_matches(scores, got, items, queries, ref_s, ref_i, item_ids=ids, exact_scores=False,
                            min_recall=0.8, exclude=exclude)
    return scores, got


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("N,D,Q,k", [(1000, 64, 5, 10), (777, 97, 9, 50), (300, 3, 4, 7), (50, 1, 3, 5),
                                     (2000, 32, 70, 100), (10, 8, 2, 20), (5000, 16, 2, 4096)])
def test_matches_oracle(rng, isa, precision, N, D, Q, k):
    items, queries = data(rng, N, D, Q)
    check(fastrec.ItemIndex(items, precision=precision), items, queries, k)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_without_rerank(rng, isa, precision):
    items, queries = data(rng, 3000, 48, 6)
    index = fastrec.ItemIndex(items, precision=precision, rerank=False)
    assert not index.rerank
    scores, got = check(index, items, queries, 20)
    true = np.einsum("qd,qkd->qk", queries.astype(np.float64), items[got].astype(np.float64))
    tol = 0.05 if precision == "int8" else 0.01
    assert np.abs(scores - true).max() <= tol * np.abs(true).max()


def test_int8_items_too_small_for_127_over_amax(rng, isa):
    # Item rows with max |x| < ~3.7e-37 (127 / amax overflows float32) are quantized like any
    # other: before, zeros became -127 and every other code saturated, and top-1 could change.
    items, queries = data(rng, 500, 16, 5)
    items[rng.random(items.shape) < 0.3] = 0.0
    tiny, big = items * np.float32(1e-38), queries * np.float32(1e36)
    index = fastrec.ItemIndex(tiny, precision="int8", rerank=False)
    scores, got = check(index, tiny, big, 10)
    true = np.einsum("qd,qkd->qk", big.astype(np.float64), tiny[got].astype(np.float64))
    assert np.abs(scores - true).max() <= 0.05 * np.abs(true).max()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("rerank", [True, False])
def test_scores_near_and_beyond_float32_range(rng, isa, precision, rerank):
    # Scores past ~3.4e38 used to come back inf for every item, in no order; and a partial sum
    # that overflowed made an item score inf though its true score was small. Queries whose
    # float32 scoring could overflow are now searched exactly in float64.
    items, queries = data(rng, 400, 16, 4)
    items *= np.float32(1e19)
    queries *= np.float32(1e19)
    exact = queries.astype(np.float64) @ items.T.astype(np.float64)
    assert np.abs(exact).max() > 3.5e38
    scores, got = fastrec.ItemIndex(items, precision=precision, rerank=rerank).search(queries, 5)
    want = np.argsort(-exact, axis=1, kind="stable")[:, :5]
    if rerank or precision == "fp32":
        np.testing.assert_array_equal(got, want)
        with np.errstate(over="ignore"):  # float32 rounds the scores past its range to inf
            np.testing.assert_array_equal(scores, np.take_along_axis(exact, want, 1).astype(np.float32))
    else:
        assert (got[:, 0] == want[:, 0]).mean() >= 0.75
    # cancellation: 3e38 + 3e38 - 3e38 - 3e38 overflowed to inf, so this item ranked first
    big = np.float32(3e38)
    items = np.array([[big, big, -big, -big], [1, 1, 1, 1], [0, 0, 0, 1]], np.float32)
    q = np.ones((1, 4), np.float32)
    scores, got = fastrec.ItemIndex(items, precision=precision, rerank=rerank).search(q, 3)
    np.testing.assert_array_equal(got[0, :1], [1])
    if rerank or precision == "fp32":
        np.testing.assert_array_equal(got[0], [1, 2, 0])
        np.testing.assert_array_equal(scores[0], [4, 1, 0])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_huge_queries_keep_their_small_components(precision):
    # A first fix scaled such queries down by a power of two, which flushed their small
    # components to zero: these scores (1e18, 2e18) came back 0 and the ids in the wrong order.
    items = np.array([[0, 1e38], [0, 2e38], [1e38, 0]], np.float32)
    s, i = fastrec.ItemIndex(items[:2], precision=precision).search(np.array([1e38, 1e-20], np.float32), 2)
    assert i.tolist() == [1, 0]
    np.testing.assert_allclose(s, [2e18, 1e18], rtol=1e-6)
    s, i = fastrec.ItemIndex(items, precision=precision).search(np.array([[1e30, 1e-38]], np.float32), 3)
    assert i.tolist() == [[2, 1, 0]]
    assert s[0, 0] == np.inf
    np.testing.assert_allclose(s[0, 1:], [2, 1], rtol=1e-6)
    # exclude lists and removed items apply on this path too
    index = fastrec.ItemIndex(items, ids=[10, 20, 30], precision=precision)
    index.remove([30])
    s, i = index.search(np.array([[1e30, 1e-38]], np.float32), 3, exclude=[[10]])
    assert i.tolist() == [[20, -1, -1]]


def test_topk_assertion_helper_rejects_wrong_results(rng):
    # assert_topk_matches counted the reference's k-th item as found whatever came back (it
    # compared with the reference's own last score), so the worst item passed as a top-1
    items, q = data(rng, 100, 8, 1)
    rs, ri = topk_ref(q, items, 1)
    worst = int(np.argmin(items @ q[0]))
    with pytest.raises(AssertionError):
        assert_topk_matches([[items[worst] @ q[0]]], [[worst]], items, q, rs, ri)
    rs, ri = topk_ref(q, items, 5)
    wrong = ri.copy()
    wrong[0, 4] = worst
    wrong_s = (items[wrong[0]] @ q[0])[None, :]
    with pytest.raises(AssertionError):
        assert_topk_matches(wrong_s, wrong, items, q, rs, ri)
    with pytest.raises(AssertionError, match="excluded"):  # an excluded id came back
        assert_topk_matches(rs.astype(np.float32), ri, items, q, rs, ri, exclude=[[int(ri[0, 2])]])
    assert_topk_matches(rs.astype(np.float32), ri, items, q, rs, ri)  # the right answer passes


def test_int8_dimension_limit():
    # beyond D = 133144 the int32 sums of 127 * 127 * D overflow; fp16 / fp32 take any D
    D = 2**31 // (127 * 127) + 1
    items = np.ones((2, D), np.float32)
    with pytest.raises(ValueError, match="at most 133144"):
        fastrec.ItemIndex(items, precision="int8")
    scores, ids = fastrec.ItemIndex(items, precision="fp32").search(items[:1], 1)
    assert scores[0, 0] == D


def test_fp16_items_below_the_normal_range_warn(rng):
    """An item whose every value is below float16's normal range (6.1e-05) keeps few bits as
    float16 (none below 6e-08): its scores and rank came out coarse or 0, and nothing said so.
    Now a RuntimeWarning names how many items, with or without a rerank (which rescores only
    the candidates the coarse scores picked); items of ordinary size and all-zero items are
    quiet, and so is int8 (a scale per item)."""
    items = rng.standard_normal((6, 8)).astype(np.float32)
    items[2] = 0.0
    tiny = items.copy()
    tiny[1] *= 1e-8  # 2 items: tiny, and 2e-8 times item 4
    tiny[4] = tiny[1] * 2
    for rerank in (False, True):
        with pytest.warns(RuntimeWarning, match=r"2 item\(s\) have every value below float16's normal range"):
            index = fastrec.ItemIndex(tiny, precision="fp16", rerank=rerank)
    scores, ids = index.search(tiny[4:5] * 1e8, 6)  # (the result itself: coarse, as the warning says)
    assert scores.shape == (1, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastrec.ItemIndex(items, precision="fp16", rerank=False)  # ordinary values, one zero item
        q = tiny[[1, 4]] * 1e8  # queries along the two tiny items
        want = np.argsort(-(q.astype(np.float64) @ tiny.T.astype(np.float64)), axis=1)[:, :4]
        _, got = fastrec.ItemIndex(tiny, precision="int8").search(q, 4)
        assert np.array_equal(got, want)  # a scale per item: the tiny items rank right
        quiet = fastrec.ItemIndex(items, precision="fp16", rerank=False)
    with pytest.warns(RuntimeWarning, match=r"1 item\(s\)"):
        quiet.add(tiny[1:2], [10])


def test_item_id_and_value_checks(rng):
    items = rng.standard_normal((3, 4)).astype(np.float32)
    # -1 pads results, so it (and any negative id) cannot be an item id; uint64 ids above
    # int64's range used to wrap to negative ids.
    for bad in ([-1, 5, 7], [0, -5, 7], np.array([2**64 - 1, 2, 3], np.uint64)):
        with pytest.raises(ValueError, match="ids must"):
            fastrec.ItemIndex(items, ids=bad)
    index = fastrec.ItemIndex(items, ids=[0, 1, 2])
    with pytest.raises(ValueError, match="ids must"):
        index.add(items[:1], [-3])
    # fp16 stores items as float16: values beyond +-65504 would become inf and drop out.
    big = items.copy()
    big[1, 2] = 1e5
    with pytest.raises(ValueError, match="float16's range"):
        fastrec.ItemIndex(big, precision="fp16")
    with pytest.raises(ValueError, match="float16's range"):
        fastrec.ItemIndex(items, precision="fp16").add(big[1:2], [9])
    scores, ids = fastrec.ItemIndex(big, precision="int8").search(items[:1], 3)  # other precisions are fine
    assert sorted(ids[0].tolist()) == [0, 1, 2]
    for k in (2**31, 2**63, 2**64):  # 2**63 overflowed the candidate count: a raw pybind11 TypeError
        with pytest.raises(ValueError, match="k must be"):
            index.search(items[:1], k)
    # Results beyond the machine's memory: a MemoryError up front (filling a (1, 2**31 - 1)
    # result over overcommitted memory got the process killed).
    if index_module._memory_limit() is not None and index_module._memory_limit() < 24 * 2**30 * 64:
        with pytest.raises(MemoryError, match="k=2147483647"):
            index.search(np.repeat(items[:1], 64, axis=0), 2**31 - 1)
    # A dict's keys would have been read as the per-query id lists.
    with pytest.raises(TypeError, match="exclude"):
        index.search(items[:2], 2, exclude={0: [1], 1: [2]})


def test_result_size_check_reads_the_cgroup_limit(tmp_path, monkeypatch, rng):
    """A container's memory limit (cgroup v2 memory.max or v1 memory.limit_in_bytes, on the
    process's own cgroup or an ancestor) bounds the results, not the host's memory."""
    def tree(files, cgroup_lines):
        base = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        base.mkdir()
        for rel, text in files.items():
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / rel).write_text(text)
        (base / "cgroup").write_text(cgroup_lines)
        return index_module._cgroup_memory_limit(str(base / "fs"), str(base / "cgroup"))

    # v2: the process's cgroup says "max", its parent 4 GiB
    assert tree({"fs/app/memory.max": "4294967296\n", "fs/app/svc/memory.max": "max\n"}, "0::/app/svc\n") == 4 * 2**30
    # v2 in a cgroup namespace: the limit sits at the mount's top
    assert tree({"fs/memory.max": "1073741824\n"}, "0::/\n") == 2**30
    # v1: the memory controller's hierarchy, the tighter of two levels
    assert tree({"fs/memory/a/memory.limit_in_bytes": "3000000000\n",
                 "fs/memory/a/b/memory.limit_in_bytes": "2000000000\n"},
                "5:cpu,cpuacct:/a/b\n4:memory:/a/b\n") == 2_000_000_000
    assert tree({}, "0::/x\n") is None  # nothing readable
    assert index_module._cgroup_memory_limit(proc_cgroup=str(tmp_path / "absent")) is None
    # v1 with the memory controller co-mounted with another (no "memory" folder)
    assert tree({"fs/cpu,memory/a/memory.limit_in_bytes": "5000000\n"}, "3:cpu,memory:/a\n") == 5_000_000
    # odd contents are skipped, never an error: non-ASCII digits, bytes that are not UTF-8, a
    # zero limit, a path that climbs out of the hierarchy
    assert tree({"fs/memory.max": "\u00b2\n"}, "0::/\n") is None
    assert tree({"fs/memory.max": "0\n"}, "0::/\n") is None
    base = tmp_path / "raw"
    (base / "fs").mkdir(parents=True)
    (base / "fs" / "memory.max").write_bytes(b"\xff\n")
    (base / "cgroup").write_bytes(b"0::/\xff/../..\n")
    assert index_module._cgroup_memory_limit(str(base / "fs"), str(base / "cgroup")) is None

    monkeypatch.setattr(index_module, "_cgroup_memory_limit", lambda: 2**30)
    monkeypatch.setattr(index_module, "_memory_limit_cache", None)  # (read once per process)
    assert index_module._memory_limit() == 2**30
    index = fastrec.ItemIndex(rng.standard_normal((50, 8)).astype(np.float32))
    with pytest.raises(MemoryError, match="1.0 GiB of memory this process may use"):
        index.search(rng.standard_normal((1000, 8)).astype(np.float32), 100_000)  # 1.1 GiB of results


def test_oracle_breaks_exact_ties_by_the_smaller_id(rng):
    # Identical rows used to get slightly different float64 scores from BLAS depending on
    # their position, so the oracle itself broke "ties by the smaller id".
    x = np.repeat(rng.standard_normal((1, 17)), 79, 0).astype(np.float32)
    q = rng.standard_normal((3, 17)).astype(np.float32)
    assert topk_ref(q, x, 3)[1].tolist() == [[0, 1, 2]] * 3
    assert fastrec.ItemIndex(x, precision="fp32").search(q, 3)[1].tolist() == [[0, 1, 2]] * 3


def test_isas_agree(rng):
    from fastrec import _C

    items, queries = data(rng, 4000, 40, 33)
    results = {}
    before = _C.current_isa()
    try:
        for isa in _C.available_isas():
            _C.set_isa(isa)
            for p in PRECISIONS:
                results[(isa, p)] = fastrec.ItemIndex(items, precision=p, rerank=False).search(queries, 17)
    finally:
        _C.set_isa(before)
    for (isa, p), (s, i) in results.items():
        s0, i0 = results[("scalar", p)]
        np.testing.assert_array_equal(i, i0, err_msg=f"{isa} {p}")
        np.testing.assert_allclose(s, s0, rtol=1e-5, atol=1e-5, err_msg=f"{isa} {p}")


def test_q0_and_k_larger_than_n(rng):
    items, queries = data(rng, 5, 4, 3)
    index = fastrec.ItemIndex(items)
    s, i = index.search(np.empty((0, 4), np.float32), 3)
    assert s.shape == (0, 3) and i.shape == (0, 3)
    s, i = index.search(queries, 8)
    assert (i[:, 5:] == -1).all() and np.isneginf(s[:, 5:]).all()
    assert sorted(i[0, :5].tolist()) == [0, 1, 2, 3, 4]


def test_single_query_vector(rng):
    items, queries = data(rng, 200, 16, 1)
    index = fastrec.ItemIndex(items, precision="fp32")
    s1, i1 = index.search(queries[0], 5)
    s2, i2 = index.search(queries, 5)
    assert s1.shape == (5,) and i1.shape == (5,)
    np.testing.assert_array_equal(i1, i2[0])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ties_broken_by_smaller_id(isa, precision):
    items = np.ones((100, 8), np.float32)
    ids = np.arange(100, dtype=np.int64)[::-1] * 7 + 3  # descending external ids
    index = fastrec.ItemIndex(items, ids=ids, precision=precision)
    s, i = index.search(np.ones((2, 8), np.float32), 10)
    np.testing.assert_array_equal(i[0], np.sort(ids)[:10])
    np.testing.assert_array_equal(i[1], np.sort(ids)[:10])
    assert (s == s[0, 0]).all()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_custom_ids_and_exclude(rng, isa, precision):
    items, queries = data(rng, 800, 24, 5)
    ids = rng.permutation(10_000)[:800].astype(np.int64)
    index = fastrec.ItemIndex(items, ids=ids, precision=precision)
    _, top = index.search(queries, 30)
    exclude = [top[0, :10], [], top[2, ::2].tolist(), None, np.array([123456789], np.int64)]
    s, got = check(index, items, queries, 30, ids=ids, exclude=exclude)
    for r in (0, 2):
        assert not set(got[r].tolist()) & set(np.asarray(exclude[r]).tolist())
    # the same as CSR
    parts = [np.asarray(e if e is not None else [], np.int64) for e in exclude]
    off = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    s2, got2 = index.search(queries, 30, exclude=(np.concatenate(parts), off))
    np.testing.assert_array_equal(got, got2)
    np.testing.assert_array_equal(s, s2)


def test_exclude_everything_pads(rng):
    items, queries = data(rng, 20, 4, 2)
    index = fastrec.ItemIndex(items, precision="fp32")
    s, i = index.search(queries, 5, exclude=[np.arange(20), np.arange(18)])
    assert (i[0] == -1).all() and np.isneginf(s[0]).all()
    assert sorted(i[1, :2].tolist()) == [18, 19] and (i[1, 2:] == -1).all()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_add_and_remove(rng, isa, precision):
    items, queries = data(rng, 500, 16, 4)
    index = fastrec.ItemIndex(items[:300], precision=precision)
    assert len(index) == 300 and index.dim == 16 and index.precision == precision
    index.add(items[300:], np.arange(300, 500))
    assert len(index) == 500
    check(index, items, queries, 25)
    gone = rng.choice(500, 120, replace=False)
    index.remove(gone)
    assert len(index) == 380
    keep = np.setdiff1d(np.arange(500), gone)
    check(index, items[keep], queries, 25, ids=keep)
    with pytest.raises(KeyError):
        index.remove([int(gone[0])])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(items[:1], [int(keep[0])])
    index.add(items[gone[:5]], gone[:5])  # removed ids can come back
    back = np.sort(np.concatenate([keep, gone[:5]]))
    check(index, items[back], queries, 25, ids=back)
    np.testing.assert_array_equal(index.ids, back)


def test_many_adds_merge_and_mass_remove(rng):
    items, queries = data(rng, 400, 8, 3)
    index = fastrec.ItemIndex(items[:10], precision="int8")
    for s in range(10, 400, 10):
        index.add(items[s:s + 10], np.arange(s, s + 10))
    assert len(index._snap.segments) <= 16
    check(index, items, queries, 15)
    index.remove(np.arange(0, 390))
    assert len(index) == 10
    check(index, items[390:], queries, 15, ids=np.arange(390, 400))
    index.remove(np.arange(390, 400))
    assert len(index) == 0
    s, i = index.search(queries, 3)
    assert (i == -1).all()
    index.add(items[:3], [7, 8, 9])
    assert sorted(index.search(queries, 3)[1][0].tolist()) == [7, 8, 9]


def test_empty_index(rng):
    index = fastrec.ItemIndex(np.empty((0, 5), np.float32))
    assert len(index) == 0
    s, i = index.search(np.ones((2, 5), np.float32), 4)
    assert (i == -1).all() and np.isneginf(s).all()
    index.add(np.ones((1, 5), np.float32), [42])
    assert index.search(np.ones((1, 5), np.float32), 1)[1][0, 0] == 42


def test_searches_during_updates_see_old_or_new(rng):
    """Searches in other threads meanwhile see either the old or the new catalogue."""
    items, queries = data(rng, 2000, 16, 8)
    index = fastrec.ItemIndex(items, precision="int8")
    base = index.search(queries, 5)[1]
    boost = np.tile(queries.sum(0, keepdims=True) * 100, (5, 1)).astype(np.float32)
    boosted_ids = np.arange(10_000, 10_005)
    errors = []
    stop = threading.Event()

    def searcher():
        while not stop.is_set():
            got = index.search(queries, 5)[1]
            if not (np.array_equal(got, base) or set(got[0].tolist()) == set(boosted_ids.tolist())):
                errors.append(got)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(15):
            index.add(boost, boosted_ids)
            index.remove(boosted_ids)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors


def test_concurrent_searches_agree(rng):
    items, queries = data(rng, 20_000, 32, 20)
    index = fastrec.ItemIndex(items, precision="int8")
    expected = index.search(queries, 10)
    out = [None] * 6

    def run(t):
        out[t] = index.search(queries, 10)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s, i in out:
        np.testing.assert_array_equal(i, expected[1])
        np.testing.assert_array_equal(s, expected[0])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("Q", [20, 150])
def test_thread_splits_agree(rng, isa, precision, Q):
    """Several threads split a search by items (few queries) or by queries (enough for every
    thread: each query then sees all the items in one stream); either way the result equals one
    thread's, bit for bit, over several segments, removed items, exclude lists and tied scores."""
    items, queries = data(rng, 6000, 24, Q)
    items[100:140] = items[7]  # 41 items tied with item 7
    queries[::5] = items[7] * 2
    index = fastrec.ItemIndex(items[:4000], precision=precision)
    index.add(items[4000:], np.arange(4000, 6000))
    index.remove(np.arange(0, 6000, 37))
    keep = np.setdiff1d(np.arange(6000), np.arange(0, 6000, 37))
    exclude = [rng.choice(6000, size=q % 7 * 5, replace=False) for q in range(Q)]
    old = fastrec.get_num_threads()
    try:
        fastrec.set_num_threads(1)
        want = index.search(queries, 60, exclude=exclude)
        fastrec.set_num_threads(2)
        got = index.search(queries, 60, exclude=exclude)
    finally:
        fastrec.set_num_threads(old)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    check_items = items[keep]
    ref_s, ref_i = topk_ref(queries, check_items, 60, ids=keep, exclude=exclude)
    if precision == "fp32" or index.rerank:
        assert_topk_matches(got[0], got[1], check_items, queries, ref_s, ref_i, item_ids=keep, exclude=exclude,
                            min_recall=1.0 if precision == "fp32" else 0.98)


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_read_only_mapped_items_are_borrowed_not_copied(rng, tmp_path, precision):
    """Items nobody can change (a file mapped read-only, bytes) are reranked where they are; the
    index keeps no float32 copy, and every operation gives what an index over a copy gives."""
    items, queries = data(rng, 3000, 16, 12)
    path = tmp_path / "items.f32"
    items.tofile(path)
    sources = {"memmap": np.memmap(path, dtype=np.float32, mode="r", shape=items.shape),
               "bytes": np.frombuffer(items.tobytes(), np.float32).reshape(items.shape)}
    for name, src in sources.items():
        ids = np.arange(3000, dtype=np.int64) * 3
        borrowed = fastrec.ItemIndex(src, ids=ids, precision=precision)
        copied = fastrec.ItemIndex(items.copy(), ids=ids, precision=precision)
        assert borrowed._snap.segments[0].rows is not None, name
        assert copied._snap.segments[0].rows is None
        assert borrowed.nbytes == copied.nbytes - items.nbytes, name
        huge = queries * np.float32(1e36)  # (searched exactly in float64, from the borrowed rows)
        for index in (borrowed, copied):
            index.remove(ids[::3])  # tombstones over the borrowed segment
            index.add(items[:40] * 2, np.arange(40) + 100_000)  # a second, owned segment
        for q in (queries, huge):
            for a, b in zip(borrowed.search(q, 30, exclude=[ids[:50]] * 12), copied.search(q, 30, exclude=[ids[:50]] * 12)):
                np.testing.assert_array_equal(a, b)
        clone = pickle.loads(pickle.dumps(borrowed))
        np.testing.assert_array_equal(clone.search(queries, 30)[1], copied.search(queries, 30)[1])
        borrowed.remove(ids[1:2000:3])  # mostly tombstones: rebuilt into an owned segment
        copied.remove(ids[1:2000:3])
        np.testing.assert_array_equal(borrowed.search(queries, 30)[1], copied.search(queries, 30)[1])
    del sources


def test_a_borrowed_mapping_stays_open(rng, tmp_path):
    """The index pins the read-only mapping it reranks from: closing it (a `with mmap.mmap(...)`
    block ending) raised nothing and left the index reading unmapped memory (a segfault at the
    next search). Now the close raises BufferError and searches go on; once the index is gone,
    the mapping closes."""
    items = rng.standard_normal((500, 8)).astype(np.float32)
    path = tmp_path / "rows.f32"
    items.tofile(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    rows = np.ndarray(items.shape, np.float32, buffer=mm)  # (numpy itself does not pin mm here)
    index = fastrec.ItemIndex(rows, precision="int8")
    assert index._snap.segments[0].rows is not None
    want = fastrec.ItemIndex(items, precision="int8").search(items[:3], 5)
    del rows
    with pytest.raises(BufferError):
        mm.close()
    for a, b in zip(index.search(items[:3], 5), want):
        np.testing.assert_array_equal(a, b)
    del index
    gc.collect()
    mm.close()


def test_only_immutable_items_are_borrowed(rng):
    """A writable array, a read-only array that owns its memory (anyone may make it writable
    again) and a read-only view of a writable buffer may all change after the build: copied."""
    items = rng.standard_normal((200, 8)).astype(np.float32)
    owner = items.copy()
    owner.flags.writeable = False
    view_of_writable = np.frombuffer(bytearray(items.tobytes()), np.float32).reshape(items.shape)
    view_of_writable.flags.writeable = False
    buf = bytearray(items.tobytes())  # a read-only memoryview of writable memory: its owner writes on
    through_readonly_view = np.frombuffer(memoryview(buf).toreadonly(), np.float32).reshape(items.shape)
    anon = mmap.mmap(-1, items.nbytes)  # an anonymous (writable) mapping, seen read-only
    anon[:] = items.tobytes()
    anon_view = np.frombuffer(memoryview(anon).toreadonly(), np.float32).reshape(items.shape)
    for src in (items, owner, view_of_writable, items[:, :].view(), through_readonly_view, anon_view):
        index = fastrec.ItemIndex(src, precision="int8")
        assert index._snap.segments[0].rows is None
    del index, anon_view
    # without a rerank (or at fp32, whose panels are the only copy) there is nothing to borrow
    frozen = np.frombuffer(items.tobytes(), np.float32).reshape(items.shape)
    for kwargs in ({"precision": "int8", "rerank": False}, {"precision": "fp32"}):
        assert fastrec.ItemIndex(frozen, **kwargs)._snap.segments[0].rows is None


def test_nbytes_and_repr(rng):
    items, _ = data(rng, 1000, 64, 1)
    small = fastrec.ItemIndex(items, precision="int8", rerank=False)
    big = fastrec.ItemIndex(items, precision="int8", rerank=True)
    assert 64_000 <= small.nbytes < big.nbytes
    assert big.nbytes >= 1000 * 64 * 4
    assert "int8" in repr(small)


def test_ops_topk(rng, isa):
    items, queries = data(rng, 1500, 20, 7)
    s, i = fastrec.ops.topk(queries, items, 12)
    ref_s, ref_i = topk_ref(queries, items, 12)
    assert_topk_matches(s, i, items, queries, ref_s, ref_i)


def test_against_faiss(rng):
    faiss = pytest.importorskip("faiss")
    items, queries = data(rng, 5000, 32, 10)
    flat = faiss.IndexFlatIP(32)
    flat.add(items)
    fs, fi = flat.search(queries, 20)
    s, i = fastrec.ItemIndex(items, precision="fp32").search(queries, 20)
    np.testing.assert_allclose(s, fs, rtol=1e-5, atol=1e-5)
    ref_s, ref_i = topk_ref(queries, items, 20)
    assert_topk_matches(s, i, items, queries, ref_s, ref_i)


# ---- errors --------------------------------------------------------------------------------

def test_byte_swapped_float32(rng):
    """Big-endian float32 items and queries are converted, as the embedding ops convert tables."""
    items, queries = data(rng, 300, 8, 5)
    want = fastrec.ItemIndex(items).search(queries, 7)
    got = fastrec.ItemIndex(items.astype(">f4")).search(queries.astype(">f4"), 7)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(fastrec.ops.topk(queries.astype(">f4"), items.astype(">f4"), 7)[1],
                                  fastrec.ops.topk(queries, items, 7)[1])


def test_exclude_lists_of_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    items, queries = data(rng, 60, 4, 2)
    index = fastrec.ItemIndex(items, precision="fp32")
    want = index.search(queries, 5, exclude=[np.array([1, 2]), np.array([3])])
    got = index.search(queries, 5, exclude=[torch.tensor([1, 2]), torch.tensor([3])])
    np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(TypeError, match="flat sequence"):  # Q = 2 ids in one tensor: not one per query
        index.search(queries, 5, exclude=torch.tensor([1, 2]))
    np.testing.assert_array_equal(index.search(queries, 5, exclude=torch.tensor([[1], [3]]))[1],
                                  index.search(queries, 5, exclude=[[1], [3]])[1])


def test_python_lists_are_float32(rng):
    """Lists (no dtype) are taken as float32; arrays of other dtypes stay a TypeError."""
    items, queries = data(rng, 60, 4, 3)
    index = fastrec.ItemIndex(items.tolist(), precision="fp32")
    want = fastrec.ItemIndex(items, precision="fp32").search(queries, 5)
    for q in (queries.tolist(), tuple(map(tuple, queries.tolist()))):
        got = index.search(q, 5)
        np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(index.search(queries[0].tolist(), 5)[1], want[1][0])
    with pytest.raises(ValueError, match="beyond float32's range"):  # (not silently inf)
        index.search([[1e300, 0, 0, 0]], 5)
    for bad in ([["1", "2", "3", "4"]], [[True, False, True, False]], [[None, 1, 1, 1]], [[1j, 0, 0, 0]]):
        with pytest.raises(TypeError, match="list of numbers"):  # not numbers: as arrays of them
            index.search(bad, 5)


def test_errors(rng):
    items, queries = data(rng, 50, 8, 2)
    index = fastrec.ItemIndex(items)
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones((2, 7), np.float32), 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(queries, 0)
    with pytest.raises(TypeError):
        index.search(queries, 2.5)
    with pytest.raises(TypeError, match="float32"):
        index.search(queries.astype(np.float64), 3)
    bad = queries.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        index.search(bad, 3)
    bad_items = items.copy()
    bad_items[7, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        fastrec.ItemIndex(bad_items)
    with pytest.raises(ValueError, match="unique"):
        fastrec.ItemIndex(items, ids=np.zeros(50, np.int64))
    with pytest.raises(ValueError, match="one id per item"):
        fastrec.ItemIndex(items, ids=np.arange(49))
    with pytest.raises(ValueError, match="precision"):
        fastrec.ItemIndex(items, precision="int4")
    with pytest.raises(ValueError, match="2-D"):
        fastrec.ItemIndex(items[0])
    with pytest.raises(KeyError):
        index.remove([1000])
    with pytest.raises(ValueError, match="unique"):
        index.add(items[:2], [100, 100])
    with pytest.raises(ValueError, match="dimension"):
        index.add(np.ones((1, 3), np.float32), [100])
    with pytest.raises(ValueError, match="one id list per query"):
        index.search(queries, 3, exclude=[[1]])
    for flat in ([3, 5], np.array([3, 5]), [np.int64(3), [5]], [None, 5]):  # Q = 2 ids, not 2 lists
        with pytest.raises(TypeError, match="flat sequence"):
            index.search(queries, 3, exclude=flat)
    np.testing.assert_array_equal(index.search(queries, 3, exclude=np.array([[3], [5]]))[1],
                                  index.search(queries, 3, exclude=[[3], [5]])[1])
    with pytest.raises(ValueError, match="offsets"):
        index.search(queries, 3, exclude=(np.array([1, 2]), np.array([0, 3, 2])))
    with pytest.raises(TypeError):
        index.search(queries, 3, exclude=(np.array([1.5]), np.array([0, 1, 1])))
    assert len(index) == 50  # nothing was changed by the failed calls


def test_index_keeps_its_own_ids_and_checks_its_arguments():
    X = np.eye(4, dtype=np.float32)
    ids = np.array([10, 11, 12, 13], dtype=np.int64)
    index = fastrec.ItemIndex(X, ids=ids, precision="fp32")
    ids[0] = 99  # the caller reuses its buffer: the index returned 99, and add / remove disagreed
    assert index.search(X[:1], 1)[1].tolist() == [[10]]
    new = np.array([20], np.int64)
    index.add(np.ones((1, 4), np.float32), new)
    new[0] = 11
    assert sorted(index.search(np.ones((1, 4), np.float32), 5)[1][0].tolist()) == [10, 11, 12, 13, 20]
    index.remove([10])
    assert index.ids.tolist() == [11, 12, 13, 20]
    with pytest.raises(TypeError, match="rerank must be a bool"):
        fastrec.ItemIndex(X, rerank="no")  # (any truthy object used to mean True)
    assert fastrec.ItemIndex(X, rerank=np.bool_(False)).rerank is False
    with pytest.raises(TypeError, match="precision must be a str"):
        fastrec.ItemIndex(X, precision=["fp32"])
    with pytest.raises(ValueError, match="ids must be 1-D"):
        fastrec.ItemIndex(X, ids=[[5, 6], [7, 8]])  # (was flattened)
    for big in (2**64, -2**64):
        with pytest.raises(ValueError, match="fit in int64"):
            fastrec.ItemIndex(X[:1], ids=[big])
    with pytest.raises(TypeError, match="ids are required"):
        index.add(X[:1], None)
    with pytest.raises(ValueError, match="beyond float32's range"):  # (said "contain NaN or Inf")
        index.search([[1e300, 0, 0, 0]], 1)


def test_float64_search_ranks_ties_as_the_kernels_do():
    """Queries whose float32 scoring could overflow are searched in float64; their ranking must
    follow the same rule (float32 score, ties by the smaller id), so scaling a query by a power
    of two does not reorder items whose float32 scores tie."""
    items = np.array([[1, 0], [1, 2.0**-30], [1, -1]], np.float32)
    index = fastrec.ItemIndex(items, precision="fp32")
    q = np.array([[1.0, 1.0]], np.float32)
    s1, i1 = index.search(q, 3)
    s2, i2 = index.search(q * np.float32(2.0**125), 3)  # takes the float64 path
    assert i1.tolist() == i2.tolist() == [[0, 1, 2]]
    np.testing.assert_array_equal(s2, s1 * np.float32(2.0**125))
    # past float32's range the float64 score still decides (documented)
    big = fastrec.ItemIndex(np.array([[2, 0], [2, 2.0**-20], [1, -1]], np.float32), precision="fp32")
    s3, i3 = big.search(np.array([[2.0**127, 2.0**127]], np.float32), 3)
    assert np.isposinf(s3[0, :2]).all() and i3[0].tolist() == [1, 0, 2]


def test_centring_uncentred_items_restores_int8_recall(rng):
    """The documented remedy for items that share a large common component: int8's one scale
    per item leaves few levels for the differences; subtracting the mean item keeps the ranking
    (every score of a query shifts by q . mean) and restores recall."""
    N, D, k = 5000, 32, 10
    items = (3 * rng.standard_normal(D) + 0.03 * rng.standard_normal((N, D))).astype(np.float32)
    q = rng.standard_normal((20, D)).astype(np.float32)
    want = topk_ref(q, items, k)[1]

    def recall(got):
        return np.mean([len(set(a) & set(b)) / k for a, b in zip(got, want)])

    assert recall(fastrec.ItemIndex(items, precision="int8").search(q, k)[1]) < 0.9  # the limitation
    centred = (items.astype(np.float64) - items.mean(axis=0, dtype=np.float64)).astype(np.float32)
    assert recall(fastrec.ItemIndex(centred, precision="int8").search(q, k)[1]) >= 0.99


def test_device_search_refuses_a_flat_exclude_as_the_cpu_path_does():
    """The GPU search turned a flat tensor into a list of 0-d tensors before the flat-sequence
    check, which then read it as one id per query (seen items came back). Runs without a GPU:
    the check comes before anything touches the device."""
    from fastrec import _cuda_topk

    flats = [np.array([5, 7]), [np.int64(5), 7]]
    try:
        import torch

        flats.append(torch.tensor([5, 7]))
    except ImportError:
        pass
    for flat in flats:
        with pytest.raises(TypeError, match="flat sequence"):
            _cuda_topk._exclude(flat, 2, None)
    # a namedtuple (ids, offsets) is read as the CPU path reads it (rebuilding it from a
    # generator failed), and a 2-D array as one row per query
    from collections import namedtuple

    CSR = namedtuple("CSR", "ids offsets")
    ids, off = _cuda_topk._exclude_host(CSR(np.array([3, 1]), np.array([0, 1, 2])), 2)
    assert ids.tolist() == [3, 1] and off.tolist() == [0, 1, 2]
    ids, off = _cuda_topk._exclude_host(np.array([[5], [7]]), 2)
    assert ids.tolist() == [5, 7] and off.tolist() == [0, 1, 2]


def test_device_exclude_lists_go_up_sorted_per_query_in_one_copy(monkeypatch):
    """_exclude's device CSR (here on CPU torch tensors posing as CUDA ones): ids sorted within
    each query (the kernel's binary search), offsets as given, both slices of one upload."""
    torch = pytest.importorskip("torch")
    from fastrec import _cuda, _cuda_topk

    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True), raising=False)
    like = _cuda.DeviceArray(torch.zeros(1), "torch", 0, (1,), np.dtype(np.float32), 0)
    copies = []
    real = _cuda.from_host
    monkeypatch.setattr(_cuda, "from_host", lambda like_, a: copies.append(a.shape) or real(like_, a))
    d_ids, d_off, (ids, off) = _cuda_topk._exclude([[9, 2, 5], [], [4, 1]], 3, like)
    assert d_ids.obj.tolist() == [2, 5, 9, 1, 4] and d_off.obj.tolist() == [0, 3, 3, 5]
    assert d_off.ptr == d_ids.ptr + 5 * 8 and copies == [(9,)]
    d_ids, d_off, _ = _cuda_topk._exclude([np.array([7, 3, 3])], 1, like)
    assert d_ids.obj.tolist() == [3, 3, 7] and d_off.obj.tolist() == [0, 3]
    assert _cuda_topk._exclude([[], []], 2, like) == (None, None, None)


def test_device_search_picks_the_same_float64_rows_as_the_cpu():
    """The GPU search sends the queries whose float32 scoring could overflow to the host's
    float64 search, chosen by the CPU's rule (_checked_queries). The choice runs here on CPU
    torch tensors through the framework code (the device arrays' own methods); the device
    search itself needs a GPU (tests/test_cuda_topk.py)."""
    torch = pytest.importorskip("torch")
    from fastrec import _cuda, _cuda_topk
    from fastrec.index import _checked_queries

    q = np.ones((5, 4), np.float32)
    q[1, 2] = 2.0**120
    q[3, 0] = -2.0**122
    t = torch.from_numpy(q)
    a = _cuda.DeviceArray(t, "torch", 0, tuple(q.shape), np.dtype(np.float32), 0)
    for amax in (0.0, 1.0, 4.0, 16.0, 2.0**-10):
        want = _checked_queries(q, amax)
        got = _cuda_topk._overflow_check(a, amax)()
        assert (want is None and got is None) or np.array_equal(want, got), (amax, want, got)
    assert _cuda_topk._overflow_check(a, 4.0)().tolist() == [3]
    assert _cuda_topk._overflow_check(a, 16.0)().tolist() == [1, 3]
    check = _cuda_topk._overflow_check(a, 4.0)  # the reduction is queued here, read by check()
    t[1, 2] = 2.0**125
    assert check().tolist() == [3] and _cuda_topk._overflow_check(a, 4.0)().tolist() == [1, 3]


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc"
                    or "libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="reads /proc/self/status; the heap trim is glibc's (ASan replaces the allocator)")
def test_building_an_index_leaves_no_freed_heap_behind():
    """A process that builds a large index grows by about the index's own bytes: the build's
    freed temporaries (quantized copies, id sorts: ~70 MiB for 1M x 32) used to stay in glibc's
    heap, in every serving process."""
    code = """if True:
        import gc, numpy as np, fastrec
        def anon():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon"))
        x = np.random.default_rng(0).standard_normal((600_000, 32), dtype=np.float32)
        x.flags.writeable = False
        before = anon()
        index = fastrec.ItemIndex(x, rerank=False)
        gc.collect()
        print(anon() - before, index.nbytes)
        index.remove(np.arange(400_000))  # mostly tombstones: rebuilt into one segment
        gc.collect()
        print(anon() - before, index.nbytes)
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():  # after the build, then after a rebuild by remove()
        grew, nbytes = map(int, line.split())
        assert grew <= 1.1 * nbytes + (8 << 20), (grew, nbytes)


@pytest.mark.parametrize("n", [1, 37, 160])
def test_fp32_index_keeps_its_items_once(rng, n):
    """fp32 items live only in the scoring panels (no row-major copy beside them): the rows read
    back from the panels are the items exactly, and reranking from them gives exact scores."""
    items = rng.standard_normal((n, 5)).astype(np.float32)
    index = fastrec.ItemIndex(items, precision="fp32")
    rows, ids = index._live_rows()
    np.testing.assert_array_equal(rows, items)
    np.testing.assert_array_equal(ids, np.arange(n))
    (segment,) = index._snap.segments
    assert segment.block.nbytes == -(-n // 16) * 16 * 5 * 4  # the panels (16-row groups) alone
    q = rng.standard_normal((3, 5)).astype(np.float32)
    scores, got = index.search(q, min(n, 10))
    exact = np.take_along_axis(q.astype(np.float64) @ items.T.astype(np.float64), got, axis=1)
    np.testing.assert_array_equal(scores, exact.astype(np.float32))
