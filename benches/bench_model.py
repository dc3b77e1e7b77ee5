"""Whole-model benchmark: a DLRM shaped like MLPerf's DLRMv2, fastrec int8 vs torch.

Model (issue "Models end to end"): 13 dense features; 26 tables of 100,000 rows, D=64, with
MLPerf DLRMv2's multi-hot bag sizes; bottom MLP 512-256-64; dot interaction; top MLP
1024-1024-512-256-1. Random weights, seed 0: ``fastrec.torch.DLRM``'s layout with He-normal
MLP weights, N(0, 0.1) biases and N(0, 0.05) embedding rows, so that the click probabilities
spread over (0.2, 0.9) and depend on the ids (the module's own initialisation gives outputs
within 1e-4 of each other, where a check against the reference could not tell a wrong answer).
Random ids.

Groups:

* ``model-dlrm-B2048``: throughput at batch 2048 (extra_info ``samples_per_s``).
* ``model-dlrm-B270``: one ranking request of 270 candidates (extra_info ``p50_us`` /
  ``p99_us``).

Implementations, all at ``FASTREC_BENCH_THREADS`` threads (default 2), all given the same
table-major ``(dense, indices, offsets)`` numpy arrays:

* ``fastrec``: ``fastrec.torch.export(model, dir, precision="int8", embedding_bits=8)``, then
  ``fastrec.load(dir).score(dense, (indices, offsets))``.
* ``fastrec-fp32``: the same export with ``precision="fp32", embedding_bits=None``.
* ``torch-fp32``: the model's forward written out in plain torch eager (``inference_mode``):
  one ``nn.EmbeddingBag`` per table over the per-table views of the ids, the bottom MLP, the
  interaction, the top MLP, sigmoid. (The module's own ``predict`` adds input checks a serving
  loop would not repeat; the per-table split of the ids is made once per input, untimed.)
* ``torch-dynq``: the same forward with torch's int8 paths, doing fastrec's work: 8-bit
  row-wise tables through FBGEMM's ``quantized::embedding_bag_byte_rowwise_offsets`` (the same
  bytes as fastrec's q8 tables), and dynamic int8 MLPs (per-channel qint8 weights, Linear+ReLU
  fused; ``benchutils.torch_dynamic_int8``).

Not compared: onnxruntime (the EmbeddingBag-with-offsets graph does not export to ONNX from
this module; said here rather than measured).

Every implementation's output is checked against torch-fp32's before timing: shape (B,), fp32
paths within 1e-4 absolute on the probabilities, int8 paths within 0.1 and correlated >= 0.95;
the reference's probabilities must spread (std > 0.05). A constant answer (max error 0.25) or one
that ignores or shuffles the ids (correlation 0.1-0.2) fails. With these random weights int8
loses more than on a trained model: on B=270, fastrec's max / mean error was 0.023 / 0.0056
(correlation 0.997), torch-dynq's 0.051 / 0.014 (0.983).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

import fastrec
from benchutils import DLRM_V2_MULTI_HOT as BAG_SIZES, THREADS, record_latency, torch_dynamic_int8

torch = pytest.importorskip("torch")
ftorch = pytest.importorskip("fastrec.torch")

ROWS = int(os.environ.get("FASTREC_BENCH_MODEL_ROWS", "100000"))
D = 64
BOTTOM = (512, 256, 64)
TOP = (1024, 1024, 512, 256, 1)
IMPLS = ("fastrec", "fastrec-fp32", "torch-fp32", "torch-dynq")
TOL = {"fastrec": 0.1, "fastrec-fp32": 1e-4, "torch-fp32": 0.0, "torch-dynq": 0.1}
MIN_CORR = 0.95   # int8 paths: correlation with the reference's probabilities
MIN_SPREAD = 0.05

_cache: dict = {}


def _model():
    if "model" not in _cache:
        torch.manual_seed(0)
        tables = [(f"t{i}", ROWS, D) for i in range(len(BAG_SIZES))]
        m = ftorch.DLRM(13, tables, [name for name, _, _ in tables], list(BOTTOM), list(TOP))
        with torch.no_grad():
            for name, _, _ in tables:
                m._ebc.embedding_bags[name].weight.normal_(0.0, 0.05)
            for lin in m.modules():
                if isinstance(lin, torch.nn.Linear):
                    torch.nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
                    lin.bias.normal_(0.0, 0.1)
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


def _torch_inputs(dense, idx, off):
    """Torch views of one input, split per table (made once per input: untimed, as a serving
    loop that received per-table tensors would have them)."""
    key = ("torch-inputs", id(idx))
    if key not in _cache:
        B, T = dense.shape[0], len(BAG_SIZES)
        i, o = torch.from_numpy(idx), torch.from_numpy(off)
        parts = []
        for t in range(T):
            ot = o[t * B:(t + 1) * B + 1]
            parts.append((i[int(ot[0]):int(ot[-1])], ot - ot[0]))
        _cache[key] = (idx, torch.from_numpy(dense), parts)  # (idx kept: its id stays unique)
    return _cache[key][1:]


def _sequential(mlp) -> "torch.nn.Sequential":
    """A fastrec.torch MLP as plain Linear / ReLU modules (sharing the weights)."""
    mods = []
    for p in mlp._mlp:
        mods.append(p._linear)
        if p.relu:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def _torch_impl(name: str):
    m = _model()
    bags = [m._ebc.embedding_bags[t] for _, t in m.sparse_features]
    bottom = _sequential(m.dense_arch.model)
    over_mlp, over_last = m.over_arch.model
    top = torch.nn.Sequential(*_sequential(over_mlp), over_last)
    if name == "torch-fp32":
        pools = bags
    else:
        op = torch.ops.quantized.embedding_bag_byte_rowwise_offsets
        packed = [torch.ops.quantized.embedding_bag_byte_prepack(b.weight.detach()) for b in bags]
        pools = [lambda i, o, w=w: op(w, i, o, False, 0, False, None, None, True) for w in packed]
        bottom, top = torch_dynamic_int8(bottom), torch_dynamic_int8(top)
    inter = m.inter_arch

    def fn(dense, idx, off):
        d, parts = _torch_inputs(dense, idx, off)
        with torch.inference_mode():
            pooled = [pool(i, o) for pool, (i, o) in zip(pools, parts)]
            return torch.sigmoid(top(inter(bottom(d), pooled))).reshape(-1).numpy()
    return fn


def _impl(name: str):
    if name in _cache:
        return _cache[name]
    if name.startswith("fastrec"):
        tmp = tempfile.mkdtemp(prefix="fastrec-bench-")
        prec, bits = ("int8", 8) if name == "fastrec" else ("fp32", None)
        path = ftorch.export(_model(), os.path.join(tmp, name), precision=prec, embedding_bits=bits)
        model = fastrec.load(path)
        model.warmup()
        fn = lambda dense, idx, off: model.score(dense, (idx, off))  # noqa: E731
    else:
        fn = _torch_impl(name)
    _cache[name] = fn
    return fn


def _reference(B: int) -> np.ndarray:
    """torch-fp32's probabilities, checked against the module's own predict()."""
    key = ("ref", B)
    if key not in _cache:
        dense, idx, off = _batch(B)
        ref = _impl("torch-fp32")(dense, idx, off).astype(np.float64)
        with torch.inference_mode():
            own = _model().predict(torch.from_numpy(dense), torch.from_numpy(idx), torch.from_numpy(off)).numpy()
        assert np.abs(ref - own).max() <= 1e-5, "the written-out torch forward differs from the module's"
        assert ref.std() > MIN_SPREAD, f"reference probabilities barely vary (std {ref.std():.3g})"
        _cache[key] = ref
    return _cache[key]


def _check(name, out, B):
    ref = _reference(B)
    out = np.asarray(out, dtype=np.float64)
    assert out.shape == (B,), f"{name}: output shape {out.shape}, expected ({B},)"
    err = float(np.abs(out - ref).max())
    assert err <= TOL[name] + 1e-6, f"{name}: max abs error {err} on the probabilities"
    corr = float(np.corrcoef(out, ref)[0, 1]) if B > 1 else 1.0
    assert corr >= MIN_CORR, f"{name}: correlation {corr} with the reference's probabilities"


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
