"""The CUDA embedding bags: every row format, mode and shape against the CPU op (itself checked
against the float64 oracle), results in the caller's framework and stream, threads, and errors.

Each test takes the ``to_device`` fixture (torch CUDA tensors and CuPy arrays) and skips
cleanly without a GPU, the CUDA module or the framework. Its third kind, "emulated", runs the
same test without a GPU: the real kernel and launcher (csrc/cuda/embedding.cu) compiled for the
host (fastrec._C_cuda_emu, built with FASTREC_CUDA_EMU=ON; see csrc/cuda/emu/host_emulation.h),
behind the CUDA op's Python layer, on CPU torch tensors posing as CUDA tensors on device 0.
Tests of what only a GPU has (streams, graph capture, two devices, the framework's own CUDA
calls) skip there.
"""

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fastrec import QuantizedTable, info, ops, testing
from conftest import gpu_only, make_to_device, random_csr, to_host
from test_embedding_bags import _kjt
from test_quantized_table import _to_tbe


@pytest.fixture(params=["torch", "cupy", "emulated"])
def to_device(request, monkeypatch):
    return make_to_device(request.param, monkeypatch)


def _max_tables_per_launch() -> int:
    from fastrec import _cuda

    return _cuda.module().embedding_max_tables_per_launch


MODES = ["sum", "mean", "max"]
KINDS = ["f32", "f16", "q8", "q4", "q2", "q8-tbe", "q4-tbe", "q2-tbe"]
TOL = dict(rtol=1e-5, atol=1e-4)


def _framework(x) -> str:
    return "torch" if hasattr(x, "is_cuda") else "cupy"


def _host_table(kind: str, W: np.ndarray):
    if kind == "f32":
        return W
    if kind == "f16":
        return W.astype(np.float16)
    qt = QuantizedTable.from_float(W, bits=int(kind[1]))
    if not kind.endswith("tbe"):
        return qt
    # The same codes in the fbgemm_gpu inference layout (fp16 scale and bias first, rows of 16n bytes).
    return QuantizedTable.from_fbgemm(_to_tbe(qt.to_fbgemm(), qt.bits, qt.dim, 16), qt.bits, layout="tbe", dim=qt.dim)


def _on_device(table, to_device):
    """The GPU copy of a host table, in to_device's framework."""
    if isinstance(table, QuantizedTable):
        return table.to_device(like=to_device(np.zeros(1, np.uint8)))
    return to_device(table)


def _check(out, expected, to_device, **tol):
    assert _framework(out) == _framework(to_device(np.zeros(1)))
    host = to_host(out)
    assert host.dtype == np.float32
    assert host.shape == np.shape(expected)
    testing.assert_close(host, expected, **(tol or TOL))


# ---- one table: formats, modes, shapes --------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", [1, 3, 64, 128, 300])
def test_matches_cpu_every_kind(to_device, rng, kind, mode, dim):
    W = rng.standard_normal((70, dim)).astype(np.float32)
    table = _host_table(kind, W)
    indices, offsets = random_csr(rng, 37, 70, max_len=20)
    expected = ops.embedding_bag(table, indices, offsets, mode=mode)
    out = ops.embedding_bag(_on_device(table, to_device), to_device(indices), to_device(offsets), mode=mode)
    _check(out, expected, to_device)
    if kind in ("f32", "q8", "q4"):  # and against the float64 oracle directly
        testing.assert_close(to_host(out), testing.embedding_bag_ref(table, indices, offsets, mode=mode), **TOL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", [3, 64, 130])
def test_per_sample_weights_and_padding(to_device, rng, kind, dim):
    W = rng.standard_normal((40, dim)).astype(np.float32)
    table = _host_table(kind, W)
    dev = _on_device(table, to_device)
    indices, offsets = random_csr(rng, 31, 40, max_len=12)
    indices[::4] = 5
    psw = rng.random(len(indices)).astype(np.float32)
    for pad in (None, 5, -35):
        expected = ops.embedding_bag(table, indices, offsets, per_sample_weights=psw, padding_idx=pad)
        out = ops.embedding_bag(dev, to_device(indices), to_device(offsets), per_sample_weights=to_device(psw),
                                padding_idx=pad)
        _check(out, expected, to_device)
        for mode in MODES:
            expected = ops.embedding_bag(table, indices, offsets, mode=mode, padding_idx=pad)
            out = ops.embedding_bag(dev, to_device(indices), to_device(offsets), mode=mode, padding_idx=pad)
            _check(out, expected, to_device)


@pytest.mark.parametrize("kind, big, w", [("q8", 1e30, 1e10), ("q4", 6e4, 1e34), ("q8-tbe", 6e4, 1e34)])
@pytest.mark.parametrize("dim", [64, 70])
def test_large_weights_on_wide_quantized_rows(to_device, rng, kind, big, w, dim):
    """As the CPU test of that name, on the GPU's fast paths (dim 64: vector loads) and its
    byte-wise one (dim 70): w * (scale*q + bias) is finite where w * bias alone is not, so the
    result is finite, and equals the CPU op's."""
    W = np.zeros((5, dim), np.float32)
    W[:, 0], W[:, 1] = -big, big
    W[:, 2:] = rng.uniform(-big / 100, big / 100, (5, dim - 2)).astype(np.float32)
    table = _host_table(kind, W)
    idx = np.array([0, 1, 2, 3, 1], np.int64)
    off = np.array([0, 1, 3, 5], np.int64)
    psw = (np.array([1, 0.2, -0.3, 1, 0.5]) * w).astype(np.float32)
    with np.errstate(over="ignore"):  # columns 0 and 1 do overflow
        expected = ops.embedding_bag(table, idx, off, per_sample_weights=psw)
    assert np.isfinite(expected[:, 2:]).all()
    out = to_host(ops.embedding_bag(_on_device(table, to_device), to_device(idx), to_device(off),
                                    per_sample_weights=to_device(psw)))
    testing.assert_close(out[:, 2:], expected[:, 2:], rtol=1e-4, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_padding_semantics(to_device, rng, mode):
    R = 8
    W = rng.standard_normal((R, 6)).astype(np.float32)
    indices = np.array([3, 1, 3, 2, 3, 3, 4, 5], dtype=np.int64)
    offsets = np.array([0, 4, 6, 6, 8], dtype=np.int64)  # mixed, all padding, empty, none
    out = to_host(ops.embedding_bag(to_device(W), to_device(indices), to_device(offsets), mode=mode, padding_idx=3))
    testing.assert_close(out, testing.embedding_bag_ref(W, indices, offsets, mode=mode, padding_idx=3),
                         rtol=1e-6, atol=1e-6)
    assert np.all(out[1] == 0) and np.all(out[2] == 0)
    if mode == "mean":  # divides by the count of non-padding entries
        testing.assert_close(out[0], (W[1] + W[2]) / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("off_dtype", [np.int32, np.int64])
def test_index_and_offset_dtypes(to_device, rng, idx_dtype, off_dtype):
    W = rng.standard_normal((40, 8)).astype(np.float32)
    qt = QuantizedTable.from_float(W, 4)
    indices, offsets = random_csr(rng, 11, 40)
    for table in (W, qt):
        out = ops.embedding_bag(_on_device(table, to_device), to_device(indices.astype(idx_dtype)),
                                to_device(offsets.astype(off_dtype)))
        _check(out, ops.embedding_bag(table, indices, offsets), to_device)


@pytest.mark.parametrize("B", [0, 1, 3, 97, 1024])
def test_batch_sizes(to_device, rng, B):
    W = rng.standard_normal((300, 24)).astype(np.float32)
    indices, offsets = random_csr(rng, B, 300)
    out = ops.embedding_bag(to_device(W), to_device(indices), to_device(offsets), mode="mean")
    _check(out, ops.embedding_bag(W, indices, offsets, mode="mean"), to_device)


@pytest.mark.parametrize("kind", ["f32", "f16", "q8", "q4"])
def test_large_batch(to_device, rng, kind):
    """Thousands of warps and blocks, pooling 20, D=128."""
    W = rng.standard_normal((5000, 128)).astype(np.float32)
    table = _host_table(kind, W)
    B, L = 2048, 20
    indices = rng.integers(0, 5000, size=B * L)
    offsets = np.arange(B + 1, dtype=np.int64) * L
    out = ops.embedding_bag(_on_device(table, to_device), to_device(indices), to_device(offsets))
    _check(out, ops.embedding_bag(table, indices, offsets), to_device)


def test_empty_bags_give_zeros(to_device, rng):
    W = rng.standard_normal((10, 5)).astype(np.float32)
    offsets = to_device(np.array([0, 0, 2, 2], dtype=np.int64))
    indices = to_device(np.array([1, 2], dtype=np.int64))
    for mode in MODES:
        out = to_host(ops.embedding_bag(to_device(W), indices, offsets, mode=mode))
        assert np.all(out[0] == 0) and np.all(out[2] == 0)


@pytest.mark.parametrize("mode", MODES)
def test_2d_indices(to_device, rng, mode):
    W = rng.standard_normal((30, 7)).astype(np.float32)
    idx = rng.integers(0, 30, size=(6, 4))
    out = ops.embedding_bag(to_device(W), to_device(idx), mode=mode)
    _check(out, ops.embedding_bag(W, idx, mode=mode), to_device)
    empty = to_host(ops.embedding_bag(to_device(W), to_device(np.zeros((3, 0), dtype=np.int64)), mode=mode))
    assert empty.shape == (3, 7) and np.all(empty == 0)
    assert to_host(ops.embedding_bag(to_device(W), to_device(np.zeros((0, 4), dtype=np.int32)))).shape == (0, 7)
    if mode == "sum":
        psw = rng.standard_normal((6, 4)).astype(np.float32)
        out = ops.embedding_bag(to_device(W), to_device(idx), per_sample_weights=to_device(psw))
        _check(out, ops.embedding_bag(W, idx, per_sample_weights=psw), to_device)


def test_unusual_tables(to_device, rng):
    """Zero-width and empty tables, odd row alignments (sliced device arrays)."""
    out = ops.embedding_bag(to_device(np.zeros((5, 0), np.float32)), to_device(np.array([1, 2])),
                            to_device(np.array([0, 2])))
    assert to_host(out).shape == (1, 0)
    out = ops.embedding_bag(to_device(np.zeros((0, 4), np.float32)), to_device(np.zeros(0, np.int64)),
                            to_device(np.array([0, 0])))
    assert np.all(to_host(out) == 0)
    with pytest.raises(IndexError, match="out of range \\[0, 0\\)"):
        ops.embedding_bag(to_device(np.zeros((0, 4), np.float32)), to_device(np.array([0])),
                          to_device(np.array([0, 1])))
    # Row 1 onwards of a device array: the base address loses its 16-byte alignment.
    indices, offsets = random_csr(rng, 19, 30, max_len=9)
    for dim in (4, 6, 8, 64):
        W = rng.standard_normal((31, dim)).astype(np.float32)
        for table in (W, W.astype(np.float16)):
            out = ops.embedding_bag(to_device(table)[1:], to_device(indices), to_device(offsets))
            _check(out, ops.embedding_bag(np.ascontiguousarray(table[1:]), indices, offsets), to_device)
        for bits in (8, 4, 2):
            packed = QuantizedTable.from_float(W, bits).to_fbgemm()
            dev = QuantizedTable.from_fbgemm(to_device(packed)[1:], bits, dim=dim)
            host = QuantizedTable.from_fbgemm(np.ascontiguousarray(packed[1:]), bits, dim=dim)
            _check(ops.embedding_bag(dev, to_device(indices), to_device(offsets), mode="max"),
                   ops.embedding_bag(host, indices, offsets, mode="max"), to_device)


def test_non_contiguous_device_inputs(to_device, rng):
    W = rng.standard_normal((20, 12)).astype(np.float32)
    indices, offsets = random_csr(rng, 9, 20)
    idx_strided = to_device(np.repeat(indices, 2))[::2]
    out = ops.embedding_bag(to_device(W), idx_strided, to_device(offsets))
    _check(out, ops.embedding_bag(W, indices, offsets), to_device)


# ---- many tables -------------------------------------------------------------------------------


def _mixed_tables(rng):
    dims = [8, 3, 64, 97, 16, 5, 128, 300, 1]
    rows = [50, 20, 300, 40, 10, 7, 100, 30, 9]
    kinds = ["f32", "f16", "q8", "q4", "q2", "f32", "q8-tbe", "f16", "q4-tbe"]
    tables = [_host_table(k, rng.standard_normal((r, d)).astype(np.float32)) for k, r, d in zip(kinds, rows, dims)]
    return tables, rows, dims


@pytest.mark.parametrize("B", [0, 1, 33, 500])
def test_many_tables_match_cpu(to_device, rng, B):
    tables, rows, dims = _mixed_tables(rng)
    T = len(tables)
    dev = [_on_device(t, to_device) for t in tables]
    indices, offsets = _kjt(rng, T, B, rows)
    modes = ["sum", "mean", "max", "mean", "max", "sum", "max", "mean", "sum"]
    pads = [1, None, -1, 0, None, 2, None, 3, 0]
    for kw in (dict(), dict(modes=modes), dict(modes=modes, padding_idx=pads)):
        out = ops.embedding_bags(dev, to_device(indices), to_device(offsets), **kw)
        assert to_host(out).shape == (B, sum(dims))
        _check(out, ops.embedding_bags(tables, indices, offsets, **kw), to_device)
    psw = rng.random(len(indices)).astype(np.float32)
    out = ops.embedding_bags(dev, to_device(indices.astype(np.int32)), to_device(offsets.astype(np.int32)),
                             per_sample_weights=to_device(psw))
    _check(out, ops.embedding_bags(tables, indices, offsets, per_sample_weights=psw), to_device)


def test_more_tables_than_one_launch(to_device, rng):
    T = _max_tables_per_launch() + 13
    rows = [int(r) for r in rng.integers(1, 40, size=T)]
    dims = [4 * int(d) for d in rng.integers(1, 10, size=T)]  # one row format: one variant, two launches
    tables = [rng.standard_normal((r, d)).astype(np.float32) for r, d in zip(rows, dims)]
    indices, offsets = _kjt(rng, T, 7, rows)
    out = ops.embedding_bags([to_device(t) for t in tables], to_device(indices), to_device(offsets), modes="mean")
    _check(out, ops.embedding_bags(tables, indices, offsets, modes="mean"), to_device)
    bad = indices.copy()
    t_last = T - 1
    pos = int(offsets[t_last * 7]) if offsets[t_last * 7] < len(indices) else None
    if pos is not None:
        bad[pos] = rows[t_last]
        with pytest.raises(IndexError, match=rf"at position {pos} \(table {t_last},"):
            ops.embedding_bags([to_device(t) for t in tables], to_device(bad), to_device(offsets))


# ---- frameworks, streams, threads ---------------------------------------------------------------


def _stream_context(x):
    """A context manager making a fresh non-default stream current in x's framework (nothing
    under emulation, where every stream is 0)."""
    if _framework(x) == "torch":
        import contextlib

        import torch

        if not torch.cuda.is_available():  # (emulated)
            return type("NoStream", (), {"synchronize": staticmethod(lambda: None)}), contextlib.nullcontext()
        s = torch.cuda.Stream()
        return s, torch.cuda.stream(s)
    import cupy

    s = cupy.cuda.Stream(non_blocking=True)
    return s, s


def test_result_type_device_and_stream(to_device, rng):
    gpu_only(to_device, "streams and devices")
    W = rng.standard_normal((100, 32)).astype(np.float32)
    indices, offsets = random_csr(rng, 50, 100)
    idx = to_device(indices)
    stream, ctx = _stream_context(idx)
    with ctx:
        out = ops.embedding_bag(to_device(W), idx, to_device(offsets))
    stream.synchronize()
    assert type(out) is type(idx)
    if _framework(idx) == "torch":
        assert out.is_cuda and out.device == idx.device and str(out.dtype) == "torch.float32"
    else:
        assert out.device.id == idx.device.id and out.dtype == np.float32
    _check(out, ops.embedding_bag(W, indices, offsets), to_device)


def _capture(x):
    """A context manager that captures a CUDA graph on x's framework's current stream."""
    import contextlib

    if _framework(x) == "torch":
        import torch

        return torch.cuda.graph(torch.cuda.CUDAGraph())
    import cupy

    @contextlib.contextmanager
    def cupy_capture():
        s = cupy.cuda.Stream(non_blocking=True)
        with s:
            s.begin_capture()
            try:
                yield
            finally:
                s.end_capture()
    return cupy_capture()


def test_graph_capture_is_refused_before_anything_is_enqueued(to_device, rng):
    """The bounds check reads a flag back to the host, which a capture cannot wait for: a
    ValueError before any work is queued (the capture ends cleanly), not a CUDA error."""
    gpu_only(to_device, "graph capture")
    W = to_device(rng.standard_normal((100, 16)).astype(np.float32))
    indices, offsets = random_csr(rng, 20, 100)
    idx, off = to_device(indices), to_device(offsets)
    idx2 = to_device(np.concatenate([indices, indices]))  # two tables, table-major
    off2 = to_device(np.concatenate([offsets, offsets[1:] + offsets[-1]]))
    expect = to_host(ops.embedding_bag(W, idx, off))  # warm-up outside the capture
    for call in (lambda: ops.embedding_bag(W, idx, off), lambda: ops.embedding_bags([W, W], idx2, off2)):
        with pytest.raises(ValueError, match="CUDA graph capture"):
            with _capture(idx):
                call()
    np.testing.assert_array_equal(to_host(ops.embedding_bag(W, idx, off)), expect)


def test_many_threads_at_once(to_device, rng):
    """8 threads, each on its own stream, over every common row format, with errors mixed in."""
    W = rng.standard_normal((5000, 64)).astype(np.float32)
    host = {kind: _host_table(kind, W) for kind in ("f32", "f16", "q8", "q4")}
    dev = {kind: _on_device(t, to_device) for kind, t in host.items()}
    cases = []
    for i, (kind, B) in enumerate(itertools.product(host, (1, 300, 2000))):
        indices, offsets = random_csr(rng, B, 5000, max_len=16, dtype=(np.int32, np.int64)[i % 2])
        expected = ops.embedding_bag(host[kind], indices, offsets)
        cases.append((dev[kind], to_device(indices), to_device(offsets), expected))

    def worker(k):
        errors = []
        for rep in range(10):
            table, indices, offsets, expected = cases[(k + rep) % len(cases)]
            if rep % 3 == 2:  # an error in the mix must not disturb the others
                with pytest.raises(IndexError):
                    ops.embedding_bag(table, to_device(np.array([1, 5000])), to_device(np.array([0, 2])))
            stream, ctx = _stream_context(indices)
            with ctx:
                out = ops.embedding_bag(table, indices, offsets)
            stream.synchronize()
            if not np.allclose(to_host(out), expected, rtol=1e-5, atol=1e-4):
                errors.append(f"thread {k} rep {rep}: result differs")
        return errors

    with ThreadPoolExecutor(8) as pool:  # a hang fails with TimeoutError, an exception re-raises here
        errors = [e for errs in pool.map(worker, range(8), timeout=300) for e in errs]
    assert not errors, errors[:3]


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [11, 10, -1, -100, 2**40])
def test_out_of_range_index(to_device, bad):
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    idx = np.array([1, 2, bad, 4, 5], dtype=np.int64)
    with pytest.raises(IndexError, match=rf"index {bad} at position 2 \(table 0, bag 1\) is out of range \[0, 10\)"):
        ops.embedding_bag(to_device(W), to_device(idx), to_device(np.array([0, 2, 5])))
    # The context is still usable, and the next call is right.
    out = ops.embedding_bag(to_device(W), to_device(np.array([1, 2, 3, 4, 5])), to_device(np.array([0, 2, 5])))
    _check(out, ops.embedding_bag(W, np.array([1, 2, 3, 4, 5]), np.array([0, 2, 5])), to_device)


def test_out_of_range_reports_first_position(to_device):
    rng = np.random.default_rng(0)
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    idx = rng.integers(0, 10, size=50_000)
    idx[40_000] = -7
    idx[31_337] = 99
    idx[45_000] = 10
    off = np.arange(0, 50_001, 50)
    for table in (W, QuantizedTable.from_float(W, 4)):
        with pytest.raises(IndexError, match=r"index 99 at position 31337 \(table 0, bag 626\)"):
            ops.embedding_bag(_on_device(table, to_device), to_device(idx), to_device(off))
    with pytest.raises(IndexError, match=r"index 99 at position 31337"):  # 2-D form, int32
        ops.embedding_bag(to_device(W), to_device(idx.astype(np.int32).reshape(1000, 50)))


def test_out_of_range_multi_table_names_table(to_device):
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    idx = np.array([0, 1, 2, 30], dtype=np.int64)
    off = np.array([0, 2, 4], dtype=np.int64)
    with pytest.raises(IndexError, match=r"index 30 at position 3 \(table 1, bag 0\)"):
        ops.embedding_bags([to_device(W), to_device(W)], to_device(idx), to_device(off))


@pytest.mark.parametrize("offsets, msg", [
    ([1, 1, 3], "offsets\\[0\\] must be 0, got 1"),
    ([0, 2, 1, 3], "non-decreasing: offsets\\[2\\]=1 < offsets\\[1\\]=2"),
    ([0, 1, 2], "must equal len\\(indices\\)=3, got 2"),
    ([0, 1, 4], "must equal len\\(indices\\)=3, got 4"),
    ([0, 5, 3], "non-decreasing"),
    ([-4, 3], "offsets\\[0\\] must be 0"),
    ([], "length B \\+ 1"),
])
def test_bad_offsets(to_device, offsets, msg):
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    idx = to_device(np.array([1, 2, 3], dtype=np.int64))
    for dtype in (np.int64, np.int32):
        with pytest.raises(ValueError, match=msg):
            ops.embedding_bag(to_device(W), idx, to_device(np.array(offsets, dtype=dtype)))
    out = ops.embedding_bag(to_device(W), idx, to_device(np.array([0, 1, 3])))
    _check(out, ops.embedding_bag(W, np.array([1, 2, 3]), np.array([0, 1, 3])), to_device)


def test_bad_offsets_multi_table(to_device):
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    idx = to_device(np.array([1, 2, 3], dtype=np.int64))
    with pytest.raises(ValueError, match="T\\*B \\+ 1"):
        ops.embedding_bags([to_device(W), to_device(W)], idx, to_device(np.array([0, 1, 2, 3])))
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.embedding_bags([to_device(W), to_device(W)], idx, to_device(np.array([0, 2, 1, 2, 3])))


def test_deferred_check(to_device, rng):
    """PreparedBags.deferred (what the GPU model runtime calls): the kernel is queued and the
    bounds / offsets check read only by pending.check(), which raises what the waiting call
    raises; one check per call; a call dropped unchecked leaves nothing behind for the next."""
    from fastrec import _cuda_embedding
    from fastrec._cuda_embedding import PreparedBags

    if not hasattr(_cuda_embedding._embedding_backend(), "embedding_bags_deferred"):
        pytest.skip("the CuPy fallback reads its check at once (pending is None)")
    W = rng.standard_normal((10, 4)).astype(np.float32)
    bags = PreparedBags([to_device(W), _on_device(QuantizedTable.from_float(W, 8), to_device)], ["sum", "max"], 0)
    idx, off = np.array([1, 2, 3, 4, 5, 6]), np.array([0, 2, 3, 5, 6])
    want = ops.embedding_bags([W, QuantizedTable.from_float(W, 8)], idx, off, modes=["sum", "max"])
    d_idx, d_off = to_device(idx), to_device(off)
    out, pending = bags.deferred(d_idx, d_off)
    assert type(pending.pending).__name__ == "PendingBags"
    pending.check()
    pending.check()
    _check(out, want, to_device)
    for bad_idx, bad_off, err, msg in (
            (np.array([1, 2, 30, 4, 5, 6]), off, IndexError, r"index 30 at position 2 \(table 0, bag 1\)"),
            (idx, np.array([0, 2, 1, 5, 6]), ValueError, "non-decreasing")):
        bad = to_device(bad_idx), to_device(bad_off)  # (alive until their checks have run)
        with pytest.raises(err, match=msg):
            bags(*bad)  # the waiting call
        _, pending = bags.deferred(*bad)  # queued: no error yet
        with pytest.raises(err, match=msg):
            pending.check()
        pending.check()  # (once)
        bags.deferred(*bad)  # dropped unchecked
        out, pending = bags.deferred(d_idx, d_off)
        pending.check()  # the next call's check is its own
        _check(out, want, to_device)
    with pytest.raises(ValueError, match="T\\*B \\+ 1"):  # argument errors: at once
        bags.deferred(d_idx, to_device(off[:-1]))
    strided = to_device(np.stack([idx, idx], 1))[:, 0]  # copied to a contiguous array, kept by pending
    strided_bad = to_device(np.stack([np.array([1, 2, 30, 4, 5, 6])] * 2, 1))[:, 0]
    out, pending = bags.deferred(strided, d_off)
    pending.check()
    _check(out, want, to_device)
    _, pending = bags.deferred(strided_bad, d_off)
    for _ in range(20):
        to_device(np.zeros(6, np.int64))  # (allocations that could take a dropped copy's memory)
    with pytest.raises(IndexError, match=r"index 30 at position 2"):
        pending.check()


def test_torch_fast_path_reads_tables_as_the_general_path_does(to_device, rng):
    # _table_heads reads torch float tables straight off the tensor; anything it does not take
    # must fall back to the general path (copies, errors) and be None here.
    from fastrec import _cuda_embedding as ce

    if _framework(to_device(np.zeros(1))) != "torch":
        pytest.skip("the fast path is for torch tensors")
    import torch

    kinds = ce._torch_fast()["kinds"]
    W = rng.standard_normal((9, 6)).astype(np.float32)
    for t in (to_device(W), to_device(W.astype(np.float16)), torch.nn.Parameter(to_device(W))):
        dev = t.get_device()
        assert ce._torch_float_head(t, dev, kinds) == ce._general_head(t, 0, dev)[0]
    t = to_device(W)
    others = [t[:, ::2], t.to(torch.bfloat16), t.double(), t.reshape(-1)]
    if not getattr(to_device, "emulated", False):  # (emulated, every tensor poses as a CUDA one)
        others.append(t.cpu())
    for other in others:
        assert ce._torch_float_head(other, t.get_device(), kinds) is None
    assert ce._torch_float_head(t, t.get_device() + 1, kinds) is None


def test_bad_types_and_shapes(to_device):
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    idx = np.array([1, 2, 3], dtype=np.int64)
    off = np.array([0, 1, 3], dtype=np.int64)
    dW, didx, doff = to_device(W), to_device(idx), to_device(off)
    with pytest.raises(TypeError, match="indices must be int32 or int64"):
        ops.embedding_bag(dW, to_device(idx.astype(np.float32)), doff)
    with pytest.raises(TypeError, match="offsets must be int32 or int64"):
        ops.embedding_bag(dW, didx, to_device(off.astype(np.float64)))
    with pytest.raises(TypeError, match="table 0 must be float32 or float16"):
        ops.embedding_bag(to_device(W.astype(np.float64)), didx, doff)
    with pytest.raises(ValueError, match="table 0 must be 2-D"):
        ops.embedding_bag(to_device(W.reshape(-1)), didx, doff)
    with pytest.raises(ValueError, match="2-D \\(B, L\\) when offsets is None"):
        ops.embedding_bag(dW, didx)
    with pytest.raises(ValueError, match="1-D when offsets are given"):
        ops.embedding_bag(dW, to_device(idx.reshape(3, 1)), doff)
    with pytest.raises(TypeError, match="per_sample_weights must be float32"):
        ops.embedding_bag(dW, didx, doff, per_sample_weights=to_device(np.ones(3)))
    with pytest.raises(ValueError, match="one weight per index"):
        ops.embedding_bag(dW, didx, doff, per_sample_weights=to_device(np.ones(2, np.float32)))
    with pytest.raises(ValueError, match="only supported with mode 'sum'"):
        ops.embedding_bag(dW, didx, doff, mode="max", per_sample_weights=to_device(np.ones(3, np.float32)))
    with pytest.raises(ValueError, match="padding_idx must be within"):
        ops.embedding_bag(dW, didx, doff, padding_idx=10)


def test_host_and_device_mixed_is_an_error(to_device):
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    idx = np.array([1, 2, 3], dtype=np.int64)
    off = np.array([0, 1, 3], dtype=np.int64)
    qt = QuantizedTable.from_float(W, 8)
    with pytest.raises(TypeError, match="table 0 is a host array"):
        ops.embedding_bag(W, to_device(idx), to_device(off))
    with pytest.raises(TypeError, match="host QuantizedTable"):
        ops.embedding_bag(qt, to_device(idx), to_device(off))
    with pytest.raises(TypeError, match="indices is a host array"):
        ops.embedding_bag(to_device(W), idx, off)
    with pytest.raises(TypeError, match="indices is a host array"):
        ops.embedding_bag(_on_device(qt, to_device), idx, off)
    with pytest.raises(TypeError, match="offsets is a host array"):
        ops.embedding_bag(to_device(W), to_device(idx), off)
    with pytest.raises(TypeError, match="per_sample_weights is a host array"):
        ops.embedding_bag(to_device(W), to_device(idx), to_device(off), per_sample_weights=np.ones(3, np.float32))
    with pytest.raises(TypeError, match="indices is a host array"):
        ops.embedding_bags([W, _on_device(qt, to_device)], np.array([1, 2]), np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="host array"):  # one device table sends the call to the GPU
        ops.embedding_bags([W, to_device(W)], np.array([1, 2]), np.array([0, 1, 2]))


def test_inputs_on_two_devices(to_device):
    gpu_only(to_device, "two devices")
    from fastrec import _C_cuda

    if _C_cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    idx = np.array([1, 2, 3], dtype=np.int64)
    off = np.array([0, 1, 3], dtype=np.int64)
    like1 = to_device(np.zeros(1))
    if _framework(like1) == "torch":
        def on1(a):
            return to_device(a).to("cuda:1")
    else:
        import cupy

        def on1(a):
            with cupy.cuda.Device(1):
                return cupy.asarray(a)
    out = ops.embedding_bag(on1(W), on1(idx), on1(off))
    assert (out.device.index if _framework(out) == "torch" else out.device.id) == 1
    _check(out, ops.embedding_bag(W, idx, off), to_device)
    with pytest.raises(ValueError, match="cuda:0 but the indices are on cuda:1"):
        ops.embedding_bag(to_device(W), on1(idx), on1(off))


# ---- QuantizedTable on the GPU ------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_table_to_device(to_device, rng, bits):
    W = rng.standard_normal((33, 20)).astype(np.float32)
    qt = QuantizedTable.from_float(W, bits)
    like = to_device(np.zeros(1, np.uint8))
    dev = qt.to_device(like=like)
    assert isinstance(dev, QuantizedTable)
    assert (dev.bits, dev.dim, dev.num_rows, dev.layout, dev.nbytes) == (bits, 20, 33, "fbgemm", qt.nbytes)
    assert dev.row_stride == qt.row_stride and dev.framework == _framework(like) and "cuda:" in repr(dev)
    assert np.array_equal(to_host(dev.data), qt.data)
    assert np.array_equal(dev.dequantize(), qt.dequantize())
    assert np.array_equal(dev.to_fbgemm(), qt.to_fbgemm())
    assert dev.to_device(like=like) is dev
    # Wrapping packed rows that already live on the GPU shares their memory.
    packed = to_device(qt.to_fbgemm())
    wrapped = QuantizedTable.from_fbgemm(packed, bits)
    assert wrapped.data is packed or to_host(wrapped.data).tobytes() == qt.to_fbgemm().tobytes()
    idx, off = random_csr(rng, 9, 33)
    _check(ops.embedding_bag(wrapped, to_device(idx), to_device(off)), ops.embedding_bag(qt, idx, off), to_device)
    with pytest.raises(ValueError, match="too short"):
        QuantizedTable.from_fbgemm(to_device(np.zeros((4, 6), np.uint8)), bits, dim=20)
    with pytest.raises(TypeError, match="uint8"):
        QuantizedTable.from_fbgemm(to_device(np.zeros((4, 30), np.int8)), bits)


# ---- fastrec.info (runs without a GPU too) -------------------------------------------------------


def test_info_reports_cuda():
    d = info.info()
    cu = d["cuda"]
    assert set(cu) >= {"built", "archs", "devices"}
    assert cu["built"] == d["cuda_module_built"]
    if cu["built"]:
        assert cu["archs"] and cu["runtime"]
        for g in cu["devices"]:
            assert "name" in g or "error" in g
    text = info.format_info(d)
    assert "CUDA module built" in text


def test_to_device_without_a_gpu_is_a_clear_error():
    # torch.cuda.current_device() on a CPU-only torch raised a bare AssertionError
    import importlib.util

    table = QuantizedTable.from_float(np.ones((3, 4), np.float32))
    if importlib.util.find_spec("torch") is not None:
        import torch

        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match="no CUDA device"):
                table.to_device("torch")
    if importlib.util.find_spec("cupy") is None:
        with pytest.raises(RuntimeError, match="CuPy"):
            table.to_device("cupy")
    with pytest.raises(ValueError, match="like must be"):
        table.to_device("jax")
