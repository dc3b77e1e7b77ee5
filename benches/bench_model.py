"""Whole-model benchmark: a DLRM shaped like MLPerf's DLRMv2, fastrec int8 vs torch.

Model (issue "Models end to end"): 13 dense features; 26 tables of 100,000 rows, D=64, with
MLPerf DLRMv2's multi-hot bag sizes; bottom MLP 512-256-64; dot interaction; top MLP
1024-1024-512-256-1. Random weights (``fastrec.torch.DLRM`` initialisation, seed 0), random ids.

Groups:

* ``model-dlrm-B2048``: throughput at batch 2048 (extra_info ``samples_per_s``).
* ``model-dlrm-B270``: one ranking request of 270 candidates (extra_info ``p50_us`` /
  ``p99_us``).

Implementations, all at ``FASTREC_BENCH_THREADS`` threads (default 2):

* ``fastrec``: ``fastrec.torch.export(model, dir, precision="int8", embedding_bits=8)``, then
  ``fastrec.load(dir).score(dense, (indices, offsets))``.
* ``fastrec-fp32``: the same export with ``precision="fp32", embedding_bits=None``.
* ``torch-fp32``: the torch module's ``predict`` (eager, ``inference_mode``).
* ``torch-dynq``: ``torch.ao.quantization.quantize_dynamic`` on the module's ``nn.Linear``
  layers (per-channel qint8, FBGEMM); the embedding bags stay fp32.

Not compared: onnxruntime (the EmbeddingBag-with-offsets graph does not export to ONNX from
this module; said here rather than measured).

Every implementation's output is checked against torch-fp32's first: fp32 paths within 1e-4
absolute on the probabilities, int8 paths within 2e-2.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import pytest

import fastrec
from benchutils import DLRM_V2_MULTI_HOT as BAG_SIZES, THREADS, record_latency

torch = pytest.importorskip("torch")
ftorch = pytest.importorskip("fastrec.torch")

ROWS = int(os.environ.get("FASTREC_BENCH_MODEL_ROWS", "100000"))
D = 64
BOTTOM = (512, 256, 64)
TOP = (1024, 1024, 512, 256, 1)
IMPLS = ("fastrec", "fastrec-fp32", "torch-fp32", "torch-dynq")
TOL = {"fastrec": 2e-2, "fastrec-fp32": 1e-4, "torch-fp32": 0.0, "torch-dynq": 2e-2}

_cache: dict = {}


def _model():
    if "model" not in _cache:
        torch.manual_seed(0)
        tables = [(f"t{i}", ROWS, D) for i in range(len(BAG_SIZES))]
        m = ftorch.DLRM(13, tables, [name for name, _, _ in tables], list(BOTTOM), list(TOP))
        m.eval()
        _cache["model"] = m
    return _cache["model"]


def _batch(B: int):
    key = ("batch", B)
    if key not in _cache:
        rng = np.random.default_rng(B)
        dense = rng.random((B, 13), dtype=np.float32) * 3
        lengths = np.repeat(np.asarray(BAG_SIZES, dtype=np.int64), B)
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        indices = rng.integers(0, ROWS, size=int(offsets[-1]), dtype=np.int64)
        _cache[key] = (dense, indices, offsets)
    return _cache[key]


def _impl(name: str):
    if name in _cache:
        return _cache[name]
    m = _model()
    if name.startswith("fastrec"):
        tmp = tempfile.mkdtemp(prefix="fastrec-bench-")
        prec, bits = ("int8", 8) if name == "fastrec" else ("fp32", None)
        path = ftorch.export(m, os.path.join(tmp, name), precision=prec, embedding_bits=bits)
        model = fastrec.load(path)
        model.warmup()
        fn = lambda dense, idx, off: model.score(dense, (idx, off))  # noqa: E731
    else:
        mod = m
        if name == "torch-dynq":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = torch.ao.quantization.quantize_dynamic(
                    m, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)

        def fn(dense, idx, off, mod=mod):
            with torch.inference_mode():
                return mod.predict(torch.from_numpy(dense), torch.from_numpy(idx), torch.from_numpy(off)).numpy()
    _cache[name] = fn
    return fn


def _check(name, out, B):
    ref = _impl("torch-fp32")(*_batch(B))
    err = float(np.abs(np.asarray(out, dtype=np.float64) - ref).max())
    assert err <= TOL[name] + 1e-6, f"{name}: max abs error {err} on the probabilities"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B", (2048, 270))
def test_model(benchmark, impl, B):
    fn = _impl(impl)
    args = _batch(B)
    _check(impl, fn(*args), B)
    benchmark.group = f"model-dlrm-B{B}"
    benchmark.extra_info.update(impl=impl, threads=THREADS, batch=B)
    rounds = 20 if B == 2048 else 300
    benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=2)
    record_latency(benchmark)
    benchmark.extra_info["samples_per_s"] = round(B / benchmark.stats.stats.median, 1)
