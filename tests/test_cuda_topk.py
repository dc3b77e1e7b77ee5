"""CUDA top-k / ItemIndex on device: against the CPU ItemIndex and the float64 oracle.

Skipped cleanly without the CUDA module, a GPU, or torch / CuPy."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import fastrec
from fastrec import ItemIndex
from fastrec.testing import assert_topk_matches, topk_ref

from conftest import gpu_only, make_to_device, needs_cuda, to_host

PRECISIONS = ["int8", "fp16", "fp32"]


@pytest.fixture(params=["torch", "cupy", "emulated"])
def to_device(request, monkeypatch):
    """conftest's, plus "emulated": the real kernels compiled for the host (conftest.make_to_device)."""
    return make_to_device(request.param, monkeypatch)


def _fp32_only_if_emulated(to_device, precision):
    """The emulated cases of the biggest catalogues run one precision (every GPU thread is a
    fiber on one core): their stages and selection do not depend on it."""
    if getattr(to_device, "emulated", False) and precision != "fp32":
        pytest.skip("emulated: fp32 only at this size")


def _data(rng, n, d, q):
    return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((q, d)).astype(np.float32)


def _check(index, items, queries, k, scores, ids, *, item_ids=None, exclude=None, precision="fp32", rerank=True):
    scores, ids = to_host(scores), to_host(ids)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    rs, ri = topk_ref(queries, items, k, ids=item_ids, exclude=exclude)
    exact = rerank or precision == "fp32"
    # Without rerank, scores are the first pass's (int8 / fp16): compare with a relative tolerance
    # and a recall a little below 1, as the CPU tests do for those paths.
    rtol = 1e-5 if exact else (3e-2 if precision == "int8" else 3e-3)
    min_recall = 1.0 if exact else 0.8
    assert_topk_matches(scores, ids, items, queries, rs, ri, item_ids=item_ids, rtol=rtol, atol=rtol,
                        min_recall=min_recall, exact_scores=True, exclude=exclude)
    if exact:  # the device index equals the CPU index up to ties
        cs, ci = index.search(queries, k, exclude=exclude)
        np.testing.assert_allclose(scores, cs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("rerank", [True, False])
@pytest.mark.parametrize("d", [1, 3, 64, 97])
def test_search_matches_cpu(to_device, rng, precision, rerank, d):
    items, queries = _data(rng, 5000, d, 37)
    index = ItemIndex(items, precision=precision, rerank=rerank)
    for k in (1, 100):
        s, i = index.search(to_device(queries), k)
        assert type(s) is type(to_device(queries[:1]))
        _check(index, items, queries, k, s, i, precision=precision, rerank=rerank)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_large_catalogue_many_stages(to_device, rng, precision):
    _fp32_only_if_emulated(to_device, precision)
    # 200k items: several scoring stages and threshold updates.
    items, queries = _data(rng, 200_003, 64, 70)
    index = ItemIndex(items, precision=precision)
    s, i = index.search(to_device(queries), 100)
    _check(index, items, queries, 100, s, i, precision=precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_k_4096(to_device, rng, precision):
    items, queries = _data(rng, 60_000, 32, 5)
    index = ItemIndex(items, precision=precision)
    s, i = index.search(to_device(queries), 4096)
    _check(index, items, queries, 4096, s, i, precision=precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_k_larger_than_n_pads(to_device, rng, precision):
    items, queries = _data(rng, 50, 8, 4)
    index = ItemIndex(items, precision=precision)
    s, i = index.search(to_device(queries), 100)
    s, i = to_host(s), to_host(i)
    assert (i[:, 50:] == -1).all() and np.isneginf(s[:, 50:]).all()
    _check(index, items, queries, 100, s, i, precision=precision)


def test_q_zero_and_single_query(to_device, rng):
    items, queries = _data(rng, 300, 16, 3)
    index = ItemIndex(items)
    s, i = index.search(to_device(np.zeros((0, 16), np.float32)), 5)
    assert tuple(s.shape) == (0, 5) and tuple(i.shape) == (0, 5)
    s, i = index.search(to_device(queries[0]), 5)
    assert tuple(s.shape) == (5,)
    cs, ci = index.search(queries[0], 5)
    np.testing.assert_array_equal(to_host(i), ci)


def test_empty_index(to_device, rng):
    index = ItemIndex(np.zeros((0, 8), np.float32))
    s, i = index.search(to_device(np.ones((2, 8), np.float32)), 3)
    assert (to_host(i) == -1).all() and np.isneginf(to_host(s)).all()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_exclude_both_forms(to_device, rng, precision):
    items, queries = _data(rng, 20_000, 24, 9)
    ids = rng.permutation(100_000)[:20_000].astype(np.int64)
    index = ItemIndex(items, ids=ids, precision=precision)
    base_s, base_i = index.search(queries, 50)
    # exclude each query's top 30 (so the threshold must account for them) plus unknown ids
    ex = [np.concatenate([base_i[r, :30], [-5, 10**9]]) if r % 3 else np.zeros(0, np.int64) for r in range(9)]
    s, i = index.search(to_device(queries), 50, exclude=ex)
    _check(index, items, queries, 50, s, i, item_ids=ids, exclude=ex, precision=precision)
    off = np.zeros(10, np.int64)
    off[1:] = np.cumsum([len(e) for e in ex])
    csr = (to_device(np.concatenate(ex)), to_device(off))
    s2, i2 = index.search(to_device(queries), 50, exclude=csr)
    np.testing.assert_array_equal(to_host(i2), to_host(i))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ties_by_smaller_id(to_device, rng, precision):
    base = rng.standard_normal((7, 16)).astype(np.float32)
    items = np.repeat(base, 300, axis=0)  # 300 identical copies of each row
    ids = rng.permutation(items.shape[0]).astype(np.int64) * 3 + 1
    queries = rng.standard_normal((4, 16)).astype(np.float32)
    index = ItemIndex(items, ids=ids, precision=precision)
    s, i = index.search(to_device(queries), 500)
    cs, ci = index.search(queries, 500)
    np.testing.assert_array_equal(to_host(i), ci)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ties_across_many_stages(to_device, rng, precision):
    _fp32_only_if_emulated(to_device, precision)
    # 30,000 copies of each of 7 rows (shuffled): every stage after the first meets items that
    # tie its threshold, which must lose to the kept smaller rows exactly as on the CPU
    base = rng.standard_normal((7, 16)).astype(np.float32)
    items = np.ascontiguousarray(base[rng.permutation(np.repeat(np.arange(7), 30_000))])
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    index = ItemIndex(items, precision=precision)
    for k in (10, 700):
        s, i = index.search(to_device(queries), k)
        cs, ci = index.search(queries, k)
        np.testing.assert_array_equal(to_host(i), ci)
        np.testing.assert_allclose(to_host(s), cs, rtol=1e-6, atol=1e-6)


def test_all_equal_scores(to_device, rng, monkeypatch):
    # every score ties: after the first stage no item passes the threshold (each would lose the
    # tie to a kept smaller id), so no buffer overflows and the search runs once; smallest ids win
    from fastrec import _cuda_topk

    runs = []
    real_run = _cuda_topk._run
    monkeypatch.setattr(_cuda_topk, "_run", lambda *a: runs.append(a[-1]) or real_run(*a))
    ids = rng.permutation(100_000).astype(np.int64) * 2 + 5
    index = ItemIndex(np.ones((100_000, 4), np.float32), ids=ids, precision="fp32")
    s, i = index.search(to_device(np.ones((3, 4), np.float32)), 10)
    np.testing.assert_array_equal(to_host(i), np.tile(np.sort(ids)[:10], (3, 1)))
    assert runs == [1]  # growth 1 only: no overflow retry


def test_sorted_catalogue_overflow_retry(to_device, rng):
    # items ordered worst-first for the query: the first stage's threshold is useless
    items, _ = _data(rng, 300_000, 8, 1)
    q = rng.standard_normal((2, 8)).astype(np.float32)
    order = np.argsort(items @ q[0])
    items = np.ascontiguousarray(items[order])
    index = ItemIndex(items, precision="fp32")
    s, i = index.search(to_device(q), 1000)
    _check(index, items, q, 1000, s, i)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_add_remove(to_device, rng, precision):
    items, queries = _data(rng, 4000, 16, 6)
    index = ItemIndex(items, precision=precision)
    dq = to_device(queries)
    index.search(dq, 10)  # uploads the first snapshot
    more = rng.standard_normal((500, 16)).astype(np.float32)
    index.add(more, np.arange(10_000, 10_500))
    index.remove(np.arange(0, 4000, 3))
    s, i = index.search(dq, 10)
    cs, ci = index.search(queries, 10)
    np.testing.assert_array_equal(to_host(i), ci)


@needs_cuda
def test_non_default_stream_torch(rng):
    torch = pytest.importorskip("torch")
    items, queries = _data(rng, 30_000, 64, 16)
    index = ItemIndex(items)
    st = torch.cuda.Stream()
    with torch.cuda.stream(st):
        dq = torch.from_numpy(queries).cuda()
        s, i = index.search(dq, 20)
        i2 = i.clone()
    st.synchronize()
    np.testing.assert_array_equal(i2.cpu().numpy(), index.search(queries, 20)[1])


@needs_cuda
def test_graph_capture_is_refused(rng):
    """search reads overflow flags back to the host: a ValueError before anything is queued."""
    torch = pytest.importorskip("torch")
    items, queries = _data(rng, 3000, 16, 4)
    index = ItemIndex(items)
    dq = torch.from_numpy(queries).cuda()
    dx = torch.from_numpy(items).cuda()
    expect = index.search(dq, 5)[1].cpu().numpy()  # warm-up outside the capture: uploads the index
    for call in (lambda: index.search(dq, 5), lambda: fastrec.ops.topk(dq, dx, 5)):
        with pytest.raises(ValueError, match="CUDA graph capture"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                call()
    np.testing.assert_array_equal(index.search(dq, 5)[1].cpu().numpy(), expect)


def test_threads(to_device, rng):
    items, queries = _data(rng, 20_000, 32, 8)
    index = ItemIndex(items)
    want = index.search(queries, 10)[1]
    dq = to_device(queries)
    errors = []

    def work():
        try:
            for _ in range(5):
                np.testing.assert_array_equal(to_host(index.search(dq, 10)[1]), want)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]


def test_functional_topk(to_device, rng):
    from fastrec import _cuda_topk

    items, queries = _data(rng, 3000, 97, 11)
    s, i = _cuda_topk.topk(to_device(queries), to_device(items), 25)
    rs, ri = topk_ref(queries, items, 25)
    assert_topk_matches(to_host(s), to_host(i), items, queries, rs, ri)


def test_errors(to_device, rng):
    items, queries = _data(rng, 100, 8, 2)
    index = ItemIndex(items)
    with pytest.raises(TypeError):
        index.search(to_device(queries.astype(np.float64)), 3)
    with pytest.raises(ValueError):
        index.search(to_device(queries[:, :5]), 3)
    with pytest.raises(ValueError):
        index.search(to_device(queries[None]), 3)
    with pytest.raises(TypeError):
        index.search(to_device(queries), 2.0)
    with pytest.raises(ValueError):
        index.search(to_device(queries), 0)
    with pytest.raises(ValueError):
        index.search(to_device(queries), 3, exclude=[[1]])
    with pytest.raises(ValueError):
        index.search(to_device(queries), 3, exclude=(np.array([1]), np.array([0, 1])))
    bad = queries.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError):
        index.search(to_device(bad), 3)
    with pytest.raises(ValueError):  # too large for the shared-memory sort
        index_big = ItemIndex(rng.standard_normal((40_000, 4)).astype(np.float32), precision="fp32", rerank=False)
        index_big.search(to_device(queries[:, :4]), 20_000)


def test_module_exports_without_gpu():
    # importable everywhere; no GPU needed to import
    from fastrec import _cuda_topk

    assert callable(_cuda_topk.search) and fastrec.ItemIndex is ItemIndex


@pytest.mark.parametrize("tiny", ["queries", "items"])
def test_int8_rows_too_small_for_127_over_amax(to_device, rng, tiny):
    # Rows with max |x| < ~3.7e-37 (127 / amax overflows float32) are scaled by 2^100 before
    # rounding, on the device (queries: csrc/cuda/topk.cu) as on the CPU (items and queries).
    items, queries = _data(rng, 3000, 24, 9)
    items[rng.random(items.shape) < 0.3] = 0.0
    queries[rng.random(queries.shape) < 0.3] = 0.0
    small, big = np.float32(1e-38), np.float32(1e36)
    items, queries = (items * big, queries * small) if tiny == "queries" else (items * small, queries * big)
    index = ItemIndex(items, precision="int8", rerank=False)
    cs, ci = index.search(queries, 20)
    ds, di = index.search(to_device(queries), 20)
    np.testing.assert_allclose(to_host(ds), cs, rtol=1e-5, atol=1e-6 * np.abs(cs).max())
    _check(index, items, queries, 20, ds, di, precision="int8", rerank=False)


@pytest.mark.parametrize("rerank", [True, False])
@pytest.mark.parametrize("scale", [1e-30, 1e-9, 1e6, 1e30])
def test_fp16_queries_of_any_magnitude(to_device, rng, rerank, scale):
    # The fp16 index takes fp16 queries on the device: queries beyond +-65504 became inf (NaN
    # scores, items dropped) and ones below ~6e-8 zeros (every score 0). The CPU scores float32
    # queries; each device row is now scaled by a power of two before the conversion.
    items, queries = _data(rng, 3000, 32, 9)
    queries *= np.float32(scale)
    index = ItemIndex(items, precision="fp16", rerank=rerank)
    ds, di = index.search(to_device(queries), 20)
    cs, ci = index.search(queries, 20)
    assert np.isfinite(to_host(ds)).all()
    np.testing.assert_allclose(to_host(ds), cs, rtol=3e-3 if not rerank else 1e-5)
    _check(index, items, queries, 20, ds, di, precision="fp16", rerank=rerank)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_large_magnitude_queries_take_the_float64_path_as_on_the_cpu(to_device, rng, precision):
    """Queries whose float32 scores could overflow (D * max|q| * max|x| >= 2**126) are searched in
    float64 on the host, as on the CPU (the device returned inf scores in no true order); the
    other rows of the same call stay on the device."""
    items, queries = _data(rng, 3000, 16, 6)
    index = ItemIndex(items, precision=precision)
    queries[[1, 4]] *= np.float32(2.0**124)
    exclude = [[int(i)] for i in range(6)]
    cs, ci = index.search(queries, 10, exclude=exclude)
    ds, di = index.search(to_device(queries), 10, exclude=exclude)
    np.testing.assert_array_equal(to_host(di)[[1, 4]], ci[[1, 4]])
    np.testing.assert_array_equal(to_host(ds)[[1, 4]], cs[[1, 4]])
    np.testing.assert_allclose(to_host(ds)[[0, 2, 3, 5]], cs[[0, 2, 3, 5]], rtol=1e-5, atol=1e-5)
    s, i = fastrec.ops.topk(to_device(queries), to_device(items), 10, exclude=exclude)
    ws, wi = fastrec.ops.topk(queries, items, 10, exclude=exclude)
    np.testing.assert_array_equal(to_host(i)[[1, 4]], wi[[1, 4]])


def test_flat_device_exclude_is_refused(to_device, rng):
    items, queries = _data(rng, 100, 8, 2)
    index = ItemIndex(items, precision="fp32")
    with pytest.raises(TypeError, match="flat sequence"):
        index.search(to_device(queries), 3, exclude=to_device(np.array([5, 7])))
    s, i = index.search(to_device(queries), 3, exclude=to_device(np.array([[5], [7]])))  # one row per query
    np.testing.assert_array_equal(to_host(i), index.search(queries, 3, exclude=[[5], [7]])[1])


def test_threads_with_different_shared_memory_needs(to_device, rng):
    """The kernels' shared-memory limit is a per-kernel attribute: set per call to each call's
    size, a thread needing less lowered it under another's launch, which then failed. Searches
    of indexes of different D (and k) from many threads at once must all succeed."""
    gpu_only(to_device, "shared-memory limits (emulated: 80 s)")
    indexes = []
    # int8 scoring: 64 vs 128 KiB a block for D = 1024 / 2048; selection: P = 8192 / 16384 keys
    # (64 / 128 KiB) for k = 3000 / 9000 with rerank (1.5k + 16 kept, within 20,000 items)
    for n, d, k in ((4000, 1024, 10), (4000, 2048, 10), (20000, 64, 3000), (20000, 64, 9000)):
        items, queries = _data(rng, n, d, 4)
        indexes.append((ItemIndex(items, precision="int8"), queries, k))
    want = [idx.search(q, k)[1] for idx, q, k in indexes]
    errors = []

    def work(j):
        idx, q, k = indexes[j % len(indexes)]
        try:
            for _ in range(20):
                np.testing.assert_array_equal(to_host(idx.search(to_device(q), k)[1]), want[j % len(indexes)])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(j,)) for j in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
