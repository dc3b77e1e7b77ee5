"""Helpers shared by the benches (imported by conftest.py and the bench_*.py files)."""

from __future__ import annotations

import os

import numpy as np

# threads for fastrec and every peer (fastrec.set_num_threads / torch.set_num_threads)
THREADS = int(os.environ.get("FASTREC_BENCH_THREADS", "2"))


def _check_threads() -> None:
    # fastrec clamps its threads to the CPUs this process may use, torch and onnxruntime do not:
    # above that count the libraries would not run at the thread count the reports print.
    from fastrec._config import available_cpus

    if not 1 <= THREADS <= available_cpus():
        raise SystemExit(f"FASTREC_BENCH_THREADS={THREADS}: must be between 1 and the {available_cpus()} CPUs "
                         "this process may use (fastrec would clamp to that, its peers would not)")


_check_threads()

# --------------------------------------------------------------------------------------------
# Inputs

# MLPerf DLRMv2's multi-hot sizes: ids per bag of each of its 26 sparse features
DLRM_V2_MULTI_HOT = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)

# FASTREC_BENCH_ALIGN=64: tables start on a 64-byte boundary (fastrec.aligned_empty) instead of
# where numpy puts them (16 bytes past a page boundary); every library reads the same memory.
TABLE_ALIGN = int(os.environ.get("FASTREC_BENCH_ALIGN", "0"))


def random_table(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    if TABLE_ALIGN:
        import fastrec

        out = fastrec.aligned_empty((rows, dim), np.float32, alignment=TABLE_ALIGN)
        rng.standard_normal((rows, dim), dtype=np.float32, out=out)
        return out
    return rng.standard_normal((rows, dim), dtype=np.float32)


class ZipfSampler:
    """Ids drawn with P(rank r) proportional to 1 / r**exponent over ranks 1..rows; ranks map to
    rows through a fixed random permutation so the hot rows are scattered over the table."""

    def __init__(self, rows: int, exponent: float = 1.05, seed: int = 0):
        p = 1.0 / np.arange(1, rows + 1, dtype=np.float64) ** exponent
        cdf = np.cumsum(p)
        self.cdf = cdf / cdf[-1]
        self.perm = np.random.default_rng(seed).permutation(rows).astype(np.int64)

    def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ranks = np.searchsorted(self.cdf, rng.random(n), side="right")
        np.minimum(ranks, self.perm.shape[0] - 1, out=ranks)
        return self.perm[ranks]


def table_major_offsets(bag_lengths_per_table, batch: int) -> np.ndarray:
    """CSR offsets of length T*B + 1 where every bag of table t has ``bag_lengths_per_table[t]`` ids."""
    lengths = np.repeat(np.asarray(bag_lengths_per_table, dtype=np.int64), batch)
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def split_per_table(indices: np.ndarray, offsets: np.ndarray, num_tables: int, batch: int):
    """Per-table (indices, local offsets of length B + 1) views of table-major inputs."""
    out = []
    for t in range(num_tables):
        o = offsets[t * batch:(t + 1) * batch + 1]
        out.append((indices[o[0]:o[-1]], np.ascontiguousarray(o - o[0])))
    return out


# --------------------------------------------------------------------------------------------
# Checks and timing


def assert_same(actual, expected, what: str, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """fastrec's answer must match the peer's before anything is timed."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if not np.allclose(actual, expected, rtol=rtol, atol=atol):
        err = np.abs(actual.astype(np.float64) - expected).max()
        raise AssertionError(f"{what}: output differs from the reference (max abs error {err:.3g})")


def percentiles_us(data_s) -> tuple[float, float]:
    """(p50, p99) in microseconds of per-call times in seconds."""
    a = np.asarray(data_s, dtype=np.float64) * 1e6
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def record_latency(benchmark) -> tuple[float, float] | None:
    """Put p50/p99 of the per-round times into extra_info (run with iterations=1 so a round is
    one call)."""
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    data = getattr(stats, "data", None)
    if not data:
        return None
    p50, p99 = percentiles_us(data)
    benchmark.extra_info["p50_us"] = round(p50, 2)
    benchmark.extra_info["p99_us"] = round(p99, 2)
    benchmark.extra_info["calls"] = len(data)
    return p50, p99


def record_throughput(benchmark, num_ids: int, row_bytes: int) -> None:
    """rows/s (ids gathered per second) and GB/s of row bytes read, from the median time."""
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    median = getattr(stats, "median", None)
    benchmark.extra_info["ids_per_call"] = int(num_ids)
    benchmark.extra_info["row_bytes"] = int(row_bytes)
    if median:
        benchmark.extra_info["rows_per_s"] = num_ids / median
        benchmark.extra_info["GB_per_s"] = num_ids * row_bytes / median / 1e9


def assert_rel_error(actual, expected, what: str, tol: float, scale: float | None = None) -> float:
    """max |actual - expected| must be <= tol * scale, where scale defaults to max |expected|
    (a loose check for int8 paths, whose error grows with the output's range). Returns the
    relative error."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if scale is None:
        scale = float(np.abs(expected).max())
    scale = max(float(scale), np.finfo(np.float32).tiny)
    rel = float(np.abs(actual.astype(np.float64) - expected).max()) / scale
    if not rel <= tol:  # also catches NaN
        raise AssertionError(f"{what}: max abs error is {rel:.3g} of the reference's max abs "
                             f"(tolerance {tol})")
    return rel


def record_gops(benchmark, ops: int) -> None:
    """GOPS (multiply-adds count 2) from the median time."""
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    median = getattr(stats, "median", None)
    benchmark.extra_info["ops_per_call"] = int(ops)
    if median:
        benchmark.extra_info["GOPS"] = round(ops / median / 1e9, 3)


# --------------------------------------------------------------------------------------------
# torch's best int8 path for MLPs


def torch_dynamic_int8(model):
    """A copy of ``model`` (nn.Linear / nn.ReLU modules, or an nn.Sequential of them) with torch's
    dynamic int8 quantization at its best: per-channel qint8 weights (FBGEMM / x86 engine) and
    every Linear followed by a ReLU fused into one quantized LinearReLU. Asserts that no Linear
    is left in fp32."""
    import copy
    import warnings

    import torch
    import torch.ao.nn.intrinsic as nni
    from torch import nn
    from torch.ao.quantization import fuse_modules, per_channel_dynamic_qconfig, quantize_dynamic

    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = "fbgemm" if "fbgemm" in engines else "x86"
    model = copy.deepcopy(model)
    if not isinstance(model, nn.Sequential):
        model = nn.Sequential(model)  # quantize_dynamic swaps children, never the root
    names = list(model._modules)
    pairs = [[a, b] for a, b in zip(names, names[1:])
             if isinstance(model._modules[a], nn.Linear) and isinstance(model._modules[b], nn.ReLU)]
    if pairs:
        model = fuse_modules(model, pairs)
    spec = {nn.Linear: per_channel_dynamic_qconfig, nni.LinearReLU: per_channel_dynamic_qconfig}
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        model = quantize_dynamic(model, spec, dtype=torch.qint8).eval()
    left = [type(m).__name__ for m in model.modules() if isinstance(m, (nn.Linear, nni.LinearReLU))]
    assert not left, f"torch-dynq: modules left in fp32: {left}"
    return model
