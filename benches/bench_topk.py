"""Retrieval benchmarks: fused scoring + top-k, fastrec vs faiss and torch.

Cases (each pytest-benchmark group ``topk-N{N}-D{D}-Q{Q}-k{k}`` holds every implementation on
the same items and queries): N = 1,000,000 random float32 items of D = 64 (normal), k = 100,
Q in {1, 16, 256} (queries normal too). ``FASTREC_BENCH_TOPK_N`` changes N.

Implementations, all at ``FASTREC_BENCH_THREADS`` threads (default 2):

* ``fastrec-int8``: ``fastrec.ItemIndex(items, precision="int8", rerank=True)`` (the default).
* ``fastrec-fp16`` / ``fastrec-fp32``: the same index with fp16 / fp32 items.
* ``faiss-flat``: ``faiss.IndexFlatIP`` (exact), as faiss ships it: this faiss-cpu build (1.15.1)
  sets ``faiss.cvar.distance_compute_blas_threshold = 128000``, so it never takes its BLAS
  (matrix-product) path for fewer queries.
* ``faiss-flat-blas``: the same index searched with the threshold at 1 (the BLAS path for every
  call, as older faiss releases did from 20 queries): much faster at Q=256, about the same at
  Q=1 (BENCHMARKS.md). Compare fastrec with the faster of the two.
* ``faiss-sq8``: ``faiss.IndexScalarQuantizer(D, QT_8bit, METRIC_INNER_PRODUCT)``, trained on the
  items.
* ``torch``: ``torch.topk(q @ items.T, k)`` (it materialises the Q x N score matrix).

Index construction is outside the timed region. extra_info: ``recall`` (recall@k against the
exact float64 top-k, ties counted as found), ``impl``, ``threads``. Rounds: about one second of
calls per bench, at least 2.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastrec
from benchutils import THREADS

N = int(os.environ.get("FASTREC_BENCH_TOPK_N", "1000000"))
D = 64
K = 100
QUERIES = (1, 16, 256)
IMPLS = ("fastrec-int8", "fastrec-fp16", "fastrec-fp32", "faiss-flat", "faiss-flat-blas", "faiss-sq8", "torch")

_cache: dict = {}


def _items() -> np.ndarray:
    if "items" not in _cache:
        _cache["items"] = np.random.default_rng(7).standard_normal((N, D), dtype=np.float32)
    return _cache["items"]


def _queries(Q: int) -> np.ndarray:
    return np.random.default_rng(100 + Q).standard_normal((Q, D), dtype=np.float32)


def _truth(Q: int):
    key = ("truth", Q)
    if key not in _cache:
        x = _items()
        q = _queries(Q).astype(np.float64)
        scores = np.empty((Q, K))
        ids = np.empty((Q, K), np.int64)
        for r in range(Q):  # float64, one query at a time (keeps memory small)
            s = x @ q[r]
            top = np.argpartition(-s, K)[:K]
            top = top[np.lexsort((top, -s[top]))]
            scores[r], ids[r] = s[top], top
        _cache[key] = (scores, ids)
    return _cache[key]


def recall(ids: np.ndarray, Q: int) -> float:
    """recall@k against the float64 top-k (a reference id tied with the k-th score counts as found)."""
    t_scores, t_ids = _truth(Q)
    found = 0
    for r in range(Q):
        got = set(np.asarray(ids[r]).tolist())
        kth = t_scores[r, -1]
        found += sum(1 for i, s in zip(t_ids[r], t_scores[r]) if i in got or abs(s - kth) <= 1e-6 * abs(kth))
    return found / (Q * K)


def _make(impl: str):
    """search(q) -> (scores, ids) for one implementation (built once, cached)."""
    if impl in _cache:
        return _cache[impl]
    items = _items()
    if impl.startswith("fastrec-"):
        index = fastrec.ItemIndex(items, precision=impl.split("-")[1])
        fn = lambda q: index.search(q, K)  # noqa: E731
    elif impl.startswith("faiss-"):
        faiss = pytest.importorskip("faiss")
        faiss.omp_set_num_threads(THREADS)
        if impl.startswith("faiss-flat"):
            index = faiss.IndexFlatIP(D)
        else:
            index = faiss.IndexScalarQuantizer(D, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            index.train(items)
        index.add(items)
        blas_threshold = 1 if impl == "faiss-flat-blas" else None

        def fn(q, index=index, faiss=faiss):
            if blas_threshold is None:
                return index.search(q, K)
            before = faiss.cvar.distance_compute_blas_threshold
            faiss.cvar.distance_compute_blas_threshold = blas_threshold
            try:
                return index.search(q, K)
            finally:
                faiss.cvar.distance_compute_blas_threshold = before
    else:
        torch = pytest.importorskip("torch")
        xt = torch.from_numpy(items)

        def fn(q):
            with torch.inference_mode():
                s, i = torch.topk(torch.from_numpy(q) @ xt.T, K, dim=1)
            return s.numpy(), i.numpy()
    _cache[impl] = fn
    return fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("Q", QUERIES)
def test_topk(benchmark, impl, Q):
    fn = _make(impl)
    q = _queries(Q)
    scores, ids = fn(q)  # warm-up, and the answer whose recall we report
    rec = recall(ids, Q)
    if impl in ("fastrec-int8", "fastrec-fp16", "fastrec-fp32", "faiss-flat", "faiss-flat-blas", "torch"):  # exact or reranked
        assert rec >= 0.999, f"{impl}: recall {rec}"
    benchmark.group = f"topk-N{N}-D{D}-Q{Q}-k{K}"
    benchmark.extra_info.update(impl=impl, threads=THREADS, recall=rec)
    import time

    t0 = time.perf_counter()
    fn(q)
    once = time.perf_counter() - t0
    rounds = max(5, min(50, int(1.0 / max(once, 1e-6))))  # (at least 5: a median of 2 is noise)
    benchmark.pedantic(fn, args=(q,), rounds=rounds, iterations=1, warmup_rounds=0)
