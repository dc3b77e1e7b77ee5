"""Embedding-bag benchmarks: fastrec vs torch (CPU), fp32 and 8-bit row-wise tables.

Cases (each pytest-benchmark group holds fastrec and its peers on identical inputs):

* ``large-{fp32,8bit}-{uniform,zipf}``: 8 tables x 1,000,000 rows x D=64, B=2048 bags of 32 ids
  per table, mode "sum". ``fastrec`` is one ``embedding_bags`` call over the 8 tables;
  ``fastrec-loop`` is one ``embedding_bag`` call per table (for information); ``torch`` loops over
  the 8 tables (``nn.EmbeddingBag`` for fp32, ``quantized::embedding_bag_byte_rowwise_offsets``
  for 8-bit). Zipf ids: exponent 1.05 over the rows, hot rows scattered by a fixed permutation.
  extra_info: rows_per_s (ids gathered per second) and GB_per_s (row bytes read: 256 B per fp32
  row, 72 B per 8-bit row incl. scale/bias), from the median.
* ``small-{fp32,8bit}-B{1,270}``: 26 tables x 100,000 rows x D=64 with the MLPerf DLRMv2
  multi-hot bag sizes, one request of B samples. ``fastrec`` is ONE ``embedding_bags`` call;
  ``torch`` is a loop of 26 calls. One call per round, so extra_info p50_us / p99_us are per-call
  latencies.

Every loop (torch and fastrec-loop) concatenates the per-table outputs into the same (B, T*D)
result ``embedding_bags`` returns. Each bench cycles through a pool of distinct requests (so the
large case is not served from the last-level cache by repeating one request) and first checks
its output on every request against torch's (rtol = atol = 1e-4).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastrec
from benchutils import (
    DLRM_V2_MULTI_HOT,
    THREADS,
    ZipfSampler,
    assert_same,
    random_table,
    record_latency,
    record_throughput,
    split_per_table,
    table_major_offsets,
)

torch = pytest.importorskip("torch")

D = 64

LARGE_T = 8
LARGE_ROWS = 1_000_000
LARGE_B = 2048
LARGE_L = 32
LARGE_POOL = 8  # distinct requests cycled through: 8 x 134 MB of fp32 rows > the LLC
LARGE_ROUNDS = 64

SMALL_T = 26
SMALL_ROWS = 100_000
SMALL_POOL = 8
SMALL_ROUNDS = {1: 3000, 270: 400}
SMALL_WARMUP = {1: 200, 270: 20}

PRECISIONS = ("fp32", "8bit")
IMPLS = ("fastrec", "fastrec-loop", "torch")
ROW_BYTES = {"fp32": 4 * D, "8bit": D + 8}

assert len(DLRM_V2_MULTI_HOT) == SMALL_T


def _qop():
    return torch.ops.quantized.embedding_bag_byte_rowwise_offsets


# --------------------------------------------------------------------------------------------
# Tables (module-scoped: built once) and requests


class _Tables:
    """fp32 tables, their 8-bit QuantizedTables (built lazily) and torch views of the same memory."""

    def __init__(self, num_tables: int, rows: int, seed: int):
        rng = np.random.default_rng(seed)
        self.fp32 = [random_table(rng, rows, D) for _ in range(num_tables)]
        self._q8 = None
        self._torch = {}

    def get(self, precision: str):
        if precision == "fp32":
            return self.fp32
        if self._q8 is None:
            self._q8 = [fastrec.QuantizedTable.from_float(w, bits=8) for w in self.fp32]
        return self._q8

    def torch_tables(self, precision: str):
        """fp32: nn.EmbeddingBag modules sharing the numpy memory; 8bit: tensors over qt.data."""
        if precision not in self._torch:
            if precision == "fp32":
                mods = []
                for w in self.fp32:
                    m = torch.nn.EmbeddingBag.from_pretrained(
                        torch.from_numpy(w), freeze=True, mode="sum", include_last_offset=True)
                    assert m.weight.data_ptr() == w.ctypes.data  # no copy
                    mods.append(m.eval())
                self._torch[precision] = mods
            else:
                ts = []
                for qt in self.get("8bit"):
                    t = torch.from_numpy(qt.data)
                    assert t.data_ptr() == qt.data.ctypes.data
                    ts.append(t)
                self._torch[precision] = ts
        return self._torch[precision]


class _Request:
    """Table-major ids/offsets for fastrec, per-table views for the loops, torch tensors over the
    same memory."""

    def __init__(self, indices: np.ndarray, offsets: np.ndarray, num_tables: int, batch: int):
        self.indices = indices
        self.offsets = offsets
        self.per_table = split_per_table(indices, offsets, num_tables, batch)
        self.torch_per_table = [(torch.from_numpy(i), torch.from_numpy(o)) for i, o in self.per_table]
        self.num_ids = int(indices.shape[0])


def _make_requests(rng, samplers, bag_lengths, batch: int, count: int):
    T = len(bag_lengths)
    offsets = table_major_offsets(bag_lengths, batch)
    reqs = []
    for _ in range(count):
        parts = [samplers[t](rng, bag_lengths[t] * batch) for t in range(T)]
        indices = np.ascontiguousarray(np.concatenate(parts).astype(np.int64))
        reqs.append(_Request(indices, offsets, T, batch))
    return reqs


def _uniform(rows):
    return lambda rng, n: rng.integers(0, rows, n, dtype=np.int64)


# Built once per process, shared by the fixtures below and by benches/paired.py.
_POOLS: dict = {}


_TABLE_SPECS = {"large": (LARGE_T, LARGE_ROWS, 0), "small": (SMALL_T, SMALL_ROWS, 10)}  # tables, rows, seed


def get_tables(kind: str) -> _Tables:
    if kind not in _POOLS:
        num_tables, rows, seed = _TABLE_SPECS[kind]
        _POOLS[kind] = _Tables(num_tables, rows, seed=seed)
    return _POOLS[kind]


def get_large_requests(dist: str):
    key = ("large", dist)
    if key not in _POOLS:
        rng = np.random.default_rng(1 if dist == "uniform" else 2)
        if dist == "uniform":
            samplers = [_uniform(LARGE_ROWS)] * LARGE_T
        else:
            samplers = [ZipfSampler(LARGE_ROWS, 1.05, seed=100 + t) for t in range(LARGE_T)]
        _POOLS[key] = _make_requests(rng, samplers, [LARGE_L] * LARGE_T, LARGE_B, LARGE_POOL)
    return _POOLS[key]


def get_small_requests(batch: int):
    key = ("small", batch)
    if key not in _POOLS:
        rng = np.random.default_rng(20 + batch)
        samplers = [_uniform(SMALL_ROWS)] * SMALL_T
        _POOLS[key] = _make_requests(rng, samplers, DLRM_V2_MULTI_HOT, batch, SMALL_POOL)
    return _POOLS[key]


@pytest.fixture(scope="module")
def large_tables():
    return get_tables("large")


@pytest.fixture(scope="module")
def large_requests():
    return get_large_requests


@pytest.fixture(scope="module")
def small_tables():
    return get_tables("small")


@pytest.fixture(scope="module")
def small_requests():
    return get_small_requests


@pytest.fixture(scope="module")
def reference_cache():
    return {}


# --------------------------------------------------------------------------------------------
# The implementations (all return the (B, T*D) result)


def _runner(impl: str, precision: str, tables: _Tables):
    if impl == "fastrec":
        tabs = tables.get(precision)
        bags = fastrec.ops.embedding_bags
        return lambda r: bags(tabs, r.indices, r.offsets, modes="sum")
    if impl == "fastrec-loop":
        tabs = tables.get(precision)
        bag = fastrec.ops.embedding_bag
        return lambda r: np.concatenate(
            [bag(w, i, o, mode="sum") for w, (i, o) in zip(tabs, r.per_table)], axis=1)
    if impl == "torch":
        peers = tables.torch_tables(precision)
        cat = torch.cat
        if precision == "fp32":
            return lambda r: cat([m(i, o) for m, (i, o) in zip(peers, r.torch_per_table)], dim=1)
        op = _qop()
        return lambda r: cat(
            [op(w, i, o, False, 0, False, None, None, True) for w, (i, o) in zip(peers, r.torch_per_table)],
            dim=1)
    raise ValueError(impl)


def _as_numpy(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check(impl, precision, tables, requests, ref_key, reference_cache, run):
    """Compare this impl's output on every request with torch's (computed once per input set)."""
    if ref_key not in reference_cache:
        ref_run = _runner("torch", precision, tables)
        reference_cache[ref_key] = [_as_numpy(ref_run(r)).copy() for r in requests]
    for k, (r, ref) in enumerate(zip(requests, reference_cache[ref_key])):
        assert_same(_as_numpy(run(r)), ref, f"{impl} {ref_key} request {k}")


def _cycling(run, requests):
    it = itertools.cycle(requests)
    return lambda: run(next(it))


def _params(prefix_parts):
    out = []
    for parts in prefix_parts:
        group = "-".join(str(p) for p in parts)
        for impl in IMPLS:
            out.append(pytest.param(*parts[1:], impl, id=f"{group}-{impl}",
                                    marks=pytest.mark.benchmark(group=group)))
    return out


# --------------------------------------------------------------------------------------------
# Case 1: large batch


@pytest.mark.parametrize(
    "precision,dist,impl",
    _params([("large", p, d) for p in PRECISIONS for d in ("uniform", "zipf")]))
def test_large(benchmark, large_tables, large_requests, reference_cache, precision, dist, impl):
    requests = large_requests(dist)
    run = _runner(impl, precision, large_tables)
    with torch.inference_mode():
        _check(impl, precision, large_tables, requests, ("large", precision, dist), reference_cache, run)
        benchmark.extra_info.update(impl=impl, case="large", precision=precision, dist=dist,
                                    tables=LARGE_T, rows=LARGE_ROWS, dim=D, batch=LARGE_B,
                                    bag=LARGE_L, threads=THREADS)
        benchmark.pedantic(_cycling(run, requests), rounds=LARGE_ROUNDS, iterations=1,
                           warmup_rounds=2)
    record_throughput(benchmark, requests[0].num_ids, ROW_BYTES[precision])
    record_latency(benchmark)


# --------------------------------------------------------------------------------------------
# Case 2: small requests (DLRMv2 multi-hot)


@pytest.mark.parametrize(
    "precision,batch,impl",
    _params([("small", p, f"B{b}") for p in PRECISIONS for b in (1, 270)]))
def test_small(benchmark, small_tables, small_requests, reference_cache, precision, batch, impl):
    B = int(batch[1:])
    requests = small_requests(B)
    run = _runner(impl, precision, small_tables)
    with torch.inference_mode():
        _check(impl, precision, small_tables, requests, ("small", precision, B), reference_cache, run)
        benchmark.extra_info.update(impl=impl, case="small", precision=precision, batch=B,
                                    tables=SMALL_T, rows=SMALL_ROWS, dim=D, threads=THREADS)
        benchmark.pedantic(_cycling(run, requests), rounds=SMALL_ROUNDS[B], iterations=1,
                           warmup_rounds=SMALL_WARMUP[B])
    record_latency(benchmark)
    record_throughput(benchmark, requests[0].num_ids, ROW_BYTES[precision])
