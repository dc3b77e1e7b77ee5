"""The CuPy kernels (fastrec.kernels): hashing against the NumPy reference, and the RawKernel
embedding bags against the CPU op and the compiled CUDA op (when built) for every row format,
mode, weights, padding, shape and error case.

The embedding tests run the CuPy path through ``fastrec.ops`` with ``FASTREC_CUDA_BACKEND=cupy``
(and check that it really ran); where ``fastrec._C_cuda`` is built they also run the compiled op
on the same inputs (``FASTREC_CUDA_BACKEND=compiled``) and compare. GPU tests need CuPy and a
GPU, not the compiled module, and skip cleanly without them; their "emulated" cases run
anywhere the CUDA host emulation builds (the RawKernel sources compiled for the host and run by
a CuPy stand-in, cuda_emu_rawkernel.py, against fastrec._C_cuda_emu); the backend-choice tests
at the end run everywhere.
"""

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fastrec import QuantizedTable, _cuda, _cuda_embedding, ops, testing
from fastrec.kernels import cupy_embedding, hashing
import cuda_emu_rawkernel as emu_rawkernel
import nvrtc_ctypes as nvrtc
from conftest import CUDA_SKIP_REASON, emulation_unavailable, make_to_device, random_csr, to_host
from test_cuda_embedding import KINDS, MODES, TOL, _framework, _host_table, _on_device, _stream_context
from test_embedding_bags import _kjt

CUPY_SKIP_REASON = cupy_embedding.available()
needs_cupy = pytest.mark.skipif(CUPY_SKIP_REASON is not None, reason=CUPY_SKIP_REASON or "")
HAS_COMPILED = CUDA_SKIP_REASON is None


@pytest.fixture(params=["cupy", "torch", "emulated"])
def dev(request, monkeypatch):
    """Copies a numpy array to the GPU as a CuPy array or a torch CUDA tensor (skips without
    CuPy and a GPU, or without torch's CUDA support); "emulated": to a CPU torch tensor posing
    as a CUDA one (conftest.make_to_device), with the CuPy kernels compiled for the host and run
    by a CuPy stand-in (cuda_emu_rawkernel.py), and the compiled kernels' emulation as the
    "compiled" backend they are compared with."""
    if request.param == "emulated":
        to_device = make_to_device("emulated", monkeypatch)
        if emu_rawkernel.SKIP_REASON is not None:
            emulation_unavailable(f"the CuPy kernels cannot be emulated: {emu_rawkernel.SKIP_REASON}")
        monkeypatch.setattr(cupy_embedding, "_cupy", emu_rawkernel.module)
        monkeypatch.setattr(cupy_embedding, "available", lambda: None)
        monkeypatch.setattr(cupy_embedding, "_kernels", {})
        return to_device
    if CUPY_SKIP_REASON is not None:
        pytest.skip(CUPY_SKIP_REASON)
    if request.param == "torch":
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("torch has no CUDA here")
        return lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()
    import cupy

    return lambda a: cupy.asarray(np.ascontiguousarray(a))


@pytest.fixture
def gpu(dev, monkeypatch):
    """Runs a call on each GPU backend present: ``gpu(fn)`` returns fn()'s result with
    FASTREC_CUDA_BACKEND=cupy (checking the CuPy kernels ran), after checking that the compiled
    op, where built (or emulated), gives the same result (or raises the same exception and
    message)."""
    has_compiled = HAS_COMPILED or getattr(dev, "emulated", False)
    calls = []
    real = cupy_embedding.embedding_bags

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(cupy_embedding, "embedding_bags", counting)

    def run(fn, backend):
        monkeypatch.setenv("FASTREC_CUDA_BACKEND", backend)
        try:
            return fn(), None
        except Exception as e:  # compared between the backends, then re-raised
            return None, e
        finally:
            monkeypatch.delenv("FASTREC_CUDA_BACKEND")

    def call(fn):
        before = len(calls)
        out, err = run(fn, "cupy")
        assert len(calls) == before + 1, "the CuPy backend did not run"
        if has_compiled:
            ref, ref_err = run(fn, "compiled")
            assert len(calls) == before + 1, "the compiled backend ran the CuPy kernels"
            if err is None and ref_err is None:
                assert _framework(out) == _framework(ref)
                testing.assert_close(to_host(out), to_host(ref), **TOL)
            else:
                assert (type(err), str(err)) == (type(ref_err), str(ref_err))
        if err is not None:
            raise err
        return out

    return call


def _check(out, expected, dev, **tol):
    assert _framework(out) == _framework(dev(np.zeros(1)))
    host = to_host(out)
    assert host.dtype == np.float32 and host.shape == np.shape(expected)
    testing.assert_close(host, expected, **(tol or TOL))


# ---- hashing --------------------------------------------------------------------------------------


@needs_cupy
@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])
def test_cupy_hash_matches_numpy(dtype):
    import cupy

    rng = np.random.default_rng(5)
    info = np.iinfo(dtype)
    for n in (0, 1, 3, 97, 100_000):
        ids = rng.integers(info.min, info.max, size=n, endpoint=True, dtype=dtype)
        for salt in (0, 7, -1, "item_id"):
            for num_rows in (1, 97, 2**31 - 1, 2**63 - 1):
                got = hashing.hash_ids_cupy(cupy.asarray(ids), num_rows, salt)
                assert isinstance(got, cupy.ndarray) and got.dtype == cupy.int64
                assert np.array_equal(got.get(), hashing.hash_ids_ref(ids, num_rows, salt))


@needs_cupy
def test_cupy_hash_dispatch_and_shapes():
    import cupy

    ids = np.arange(-30, 30, dtype=np.int64).reshape(3, 4, 5)
    expected = hashing.hash_ids_ref(ids, 1000, "f")
    got = hashing.hash_ids(cupy.asarray(ids), 1000, "f")  # hash_ids sends CuPy arrays to the GPU
    assert isinstance(got, cupy.ndarray) and got.shape == (3, 4, 5)
    assert np.array_equal(got.get(), expected)
    strided = cupy.asarray(ids)[:, ::2, 1::2]
    assert np.array_equal(hashing.hash_ids(strided, 1000, "f").get(), expected[:, ::2, 1::2])
    assert hashing.hash_ids(cupy.zeros((2, 0), cupy.int32), 10).shape == (2, 0)


@needs_cupy
def test_cupy_hash_torch_cuda_tensor():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    ids = np.arange(-500, 500, dtype=np.int64)
    for dtype in (torch.int64, torch.int32, torch.int16):
        t = torch.from_numpy(ids).to(dtype).cuda()
        got = hashing.hash_ids(t, 12345, 3)
        assert isinstance(got, torch.Tensor) and got.is_cuda and got.dtype == torch.int64
        assert np.array_equal(got.cpu().numpy(), hashing.hash_ids_ref(ids, 12345, 3))
    with pytest.raises(TypeError, match="integers"):
        hashing.hash_ids(torch.ones(3, device="cuda"), 10)


@needs_cupy
def test_cupy_hash_errors():
    import cupy

    ids = cupy.arange(5)
    for fn in (hashing.hash_ids, hashing.hash_ids_cupy):
        with pytest.raises(ValueError, match="num_rows must be >= 1"):
            fn(ids, 0)
        with pytest.raises(TypeError, match="num_rows must be an int"):
            fn(ids, 2.5)
        for bad in (cupy.ones(3), cupy.ones(3, dtype=cupy.bool_), cupy.ones(3, dtype=cupy.float16)):
            with pytest.raises(TypeError, match="integers"):
                fn(bad, 10)
    with pytest.raises(TypeError, match="CuPy array"):
        hashing.hash_ids_cupy(np.arange(3), 10)


# ---- embedding bags: one table -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", [1, 3, 64, 130, 300])
def test_matches_cpu_every_kind(dev, gpu, rng, kind, mode, dim):
    W = rng.standard_normal((70, dim)).astype(np.float32)
    table = _host_table(kind, W)
    indices, offsets = random_csr(rng, 37, 70, max_len=20)
    d_table, d_idx, d_off = _on_device(table, dev), dev(indices), dev(offsets)
    out = gpu(lambda: ops.embedding_bag(d_table, d_idx, d_off, mode=mode))
    _check(out, ops.embedding_bag(table, indices, offsets, mode=mode), dev)
    if kind in ("f32", "q8", "q4"):
        testing.assert_close(to_host(out), testing.embedding_bag_ref(table, indices, offsets, mode=mode), **TOL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", [3, 64, 130])
def test_per_sample_weights_and_padding(dev, gpu, rng, kind, dim):
    W = rng.standard_normal((40, dim)).astype(np.float32)
    table = _host_table(kind, W)
    d_table = _on_device(table, dev)
    indices, offsets = random_csr(rng, 31, 40, max_len=12)
    indices[::4] = 5
    psw = rng.random(len(indices)).astype(np.float32)
    d_idx, d_off, d_psw = dev(indices), dev(offsets), dev(psw)
    for pad in (None, 5, -35):
        out = gpu(lambda: ops.embedding_bag(d_table, d_idx, d_off, per_sample_weights=d_psw, padding_idx=pad))
        _check(out, ops.embedding_bag(table, indices, offsets, per_sample_weights=psw, padding_idx=pad), dev)
        for mode in MODES:
            out = gpu(lambda: ops.embedding_bag(d_table, d_idx, d_off, mode=mode, padding_idx=pad))
            _check(out, ops.embedding_bag(table, indices, offsets, mode=mode, padding_idx=pad), dev)


@pytest.mark.parametrize("mode", MODES)
def test_padding_and_empty_bags(dev, gpu, rng, mode):
    W = rng.standard_normal((8, 6)).astype(np.float32)
    indices = np.array([3, 1, 3, 2, 3, 3, 4, 5], dtype=np.int64)
    offsets = np.array([0, 4, 6, 6, 8], dtype=np.int64)  # mixed, all padding, empty, none
    out = to_host(gpu(lambda: ops.embedding_bag(dev(W), dev(indices), dev(offsets), mode=mode, padding_idx=3)))
    testing.assert_close(out, testing.embedding_bag_ref(W, indices, offsets, mode=mode, padding_idx=3),
                         rtol=1e-6, atol=1e-6)
    assert np.all(out[1] == 0) and np.all(out[2] == 0)
    if mode == "mean":
        testing.assert_close(out[0], (W[1] + W[2]) / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("off_dtype", [np.int32, np.int64])
def test_index_and_offset_dtypes(dev, gpu, rng, idx_dtype, off_dtype):
    W = rng.standard_normal((40, 8)).astype(np.float32)
    indices, offsets = random_csr(rng, 11, 40)
    d_idx, d_off = dev(indices.astype(idx_dtype)), dev(offsets.astype(off_dtype))
    for table in (W, W.astype(np.float16), QuantizedTable.from_float(W, 8), QuantizedTable.from_float(W, 4),
                  QuantizedTable.from_float(W, 2)):
        d_table = _on_device(table, dev)
        out = gpu(lambda: ops.embedding_bag(d_table, d_idx, d_off, mode="mean"))
        _check(out, ops.embedding_bag(table, indices, offsets, mode="mean"), dev)


@pytest.mark.parametrize("B", [0, 1, 3, 97, 1024])
def test_batch_sizes(dev, gpu, rng, B):
    W = rng.standard_normal((300, 24)).astype(np.float32)
    indices, offsets = random_csr(rng, B, 300)
    out = gpu(lambda: ops.embedding_bag(dev(W), dev(indices), dev(offsets), mode="max"))
    _check(out, ops.embedding_bag(W, indices, offsets, mode="max"), dev)


@pytest.mark.parametrize("mode", MODES)
def test_2d_indices(dev, gpu, rng, mode):
    W = rng.standard_normal((30, 7)).astype(np.float32)
    idx = rng.integers(0, 30, size=(6, 4))
    out = gpu(lambda: ops.embedding_bag(dev(W), dev(idx.astype(np.int32)), mode=mode))
    _check(out, ops.embedding_bag(W, idx, mode=mode), dev)
    empty = to_host(gpu(lambda: ops.embedding_bag(dev(W), dev(np.zeros((3, 0), np.int64)), mode=mode)))
    assert empty.shape == (3, 7) and np.all(empty == 0)
    if mode == "sum":
        psw = rng.standard_normal((6, 4)).astype(np.float32)
        out = gpu(lambda: ops.embedding_bag(dev(W), dev(idx), per_sample_weights=dev(psw)))
        _check(out, ops.embedding_bag(W, idx, per_sample_weights=psw), dev)


def test_unusual_tables(dev, gpu, rng):
    """Zero-width and empty tables; rows at odd alignments (device arrays sliced from row 1)."""
    out = gpu(lambda: ops.embedding_bag(dev(np.zeros((5, 0), np.float32)), dev(np.array([1, 2])),
                                        dev(np.array([0, 2]))))
    assert to_host(out).shape == (1, 0)
    out = gpu(lambda: ops.embedding_bag(dev(np.zeros((0, 4), np.float32)), dev(np.zeros(0, np.int64)),
                                        dev(np.array([0, 0]))))
    assert np.all(to_host(out) == 0)
    indices, offsets = random_csr(rng, 19, 30, max_len=9)
    d_idx, d_off = dev(indices), dev(offsets)
    for dim in (3, 4, 6, 64):
        W = rng.standard_normal((31, dim)).astype(np.float32)
        for table in (W, W.astype(np.float16)):
            out = gpu(lambda: ops.embedding_bag(dev(table)[1:], d_idx, d_off))
            _check(out, ops.embedding_bag(np.ascontiguousarray(table[1:]), indices, offsets), dev)
        for bits in (8, 4, 2):
            packed = QuantizedTable.from_float(W, bits).to_fbgemm()
            d_table = QuantizedTable.from_fbgemm(dev(packed)[1:], bits, dim=dim)
            host = QuantizedTable.from_fbgemm(np.ascontiguousarray(packed[1:]), bits, dim=dim)
            out = gpu(lambda: ops.embedding_bag(d_table, d_idx, d_off, mode="max"))
            _check(out, ops.embedding_bag(host, indices, offsets, mode="max"), dev)


# ---- embedding bags: many tables ------------------------------------------------------------------


@pytest.mark.parametrize("B", [0, 1, 33, 500])
def test_many_tables(dev, gpu, rng, B):
    dims = [8, 3, 64, 97, 16, 5, 128, 300, 1]
    rows = [50, 20, 300, 40, 10, 7, 100, 30, 9]
    kinds = ["f32", "f16", "q8", "q4", "q2", "f32", "q8-tbe", "f16", "q4-tbe"]
    tables = [_host_table(k, rng.standard_normal((r, d)).astype(np.float32)) for k, r, d in zip(kinds, rows, dims)]
    d_tables = [_on_device(t, dev) for t in tables]
    indices, offsets = _kjt(rng, len(tables), B, rows)
    modes = ["sum", "mean", "max", "mean", "max", "sum", "max", "mean", "sum"]
    pads = [1, None, -1, 0, None, 2, None, 3, 0]
    d_idx, d_off = dev(indices), dev(offsets)
    for kw in (dict(), dict(modes=modes), dict(modes=modes, padding_idx=pads)):
        out = gpu(lambda: ops.embedding_bags(d_tables, d_idx, d_off, **kw))
        _check(out, ops.embedding_bags(tables, indices, offsets, **kw), dev)
    psw = rng.random(len(indices)).astype(np.float32)
    out = gpu(lambda: ops.embedding_bags(d_tables, dev(indices.astype(np.int32)), dev(offsets.astype(np.int32)),
                                         per_sample_weights=dev(psw)))
    _check(out, ops.embedding_bags(tables, indices, offsets, per_sample_weights=psw), dev)


# ---- streams and threads ----------------------------------------------------------------------------


def test_caller_stream_and_result_type(dev, gpu, rng):
    W = rng.standard_normal((100, 32)).astype(np.float32)
    indices, offsets = random_csr(rng, 50, 100)
    d_W, idx, off = dev(W), dev(indices), dev(offsets)

    def on_stream():
        stream, ctx = _stream_context(idx)
        with ctx:
            out = ops.embedding_bag(d_W, idx, off)
        stream.synchronize()
        return out

    out = gpu(on_stream)
    assert type(out) is type(idx)
    _check(out, ops.embedding_bag(W, indices, offsets), dev)


def test_threads(dev, monkeypatch, rng):
    monkeypatch.setenv("FASTREC_CUDA_BACKEND", "cupy")
    W = rng.standard_normal((2000, 32)).astype(np.float32)
    host = {k: _host_table(k, W) for k in ("f32", "f16", "q8", "q4")}
    cases = []
    for i, (kind, B) in enumerate(itertools.product(host, (1, 300))):
        indices, offsets = random_csr(rng, B, 2000, dtype=(np.int32, np.int64)[i % 2])
        expected = ops.embedding_bag(host[kind], indices, offsets)
        cases.append((_on_device(host[kind], dev), dev(indices), dev(offsets), expected))

    def worker(k):
        bad = []
        for rep in range(6):
            table, idx, off, expected = cases[(k + rep) % len(cases)]
            if rep % 3 == 2:
                with pytest.raises(IndexError):
                    ops.embedding_bag(table, dev(np.array([1, 2000])), dev(np.array([0, 2])))
            stream, ctx = _stream_context(idx)
            with ctx:
                out = ops.embedding_bag(table, idx, off)
            stream.synchronize()
            if not np.allclose(to_host(out), expected, rtol=1e-5, atol=1e-4):
                bad.append((k, rep))
        return bad

    with ThreadPoolExecutor(6) as pool:
        assert [b for bs in pool.map(worker, range(6), timeout=300) for b in bs] == []


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [11, 10, -1, -100, 2**40])
def test_out_of_range_index(dev, gpu, bad):
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    idx = np.array([1, 2, bad, 4, 5], dtype=np.int64)
    msg = rf"index {bad} at position 2 \(table 0, bag 1\) is out of range \[0, 10\)"
    for dtype in (np.int64, np.int32) if abs(bad) < 2**31 else (np.int64,):
        with pytest.raises(IndexError, match=msg):
            gpu(lambda: ops.embedding_bag(dev(W), dev(idx.astype(dtype)), dev(np.array([0, 2, 5]))))
    out = gpu(lambda: ops.embedding_bag(dev(W), dev(np.array([1, 2, 3, 4, 5])), dev(np.array([0, 2, 5]))))
    _check(out, ops.embedding_bag(W, np.array([1, 2, 3, 4, 5]), np.array([0, 2, 5])), dev)


def test_out_of_range_reports_first_position(dev, gpu):
    rng = np.random.default_rng(0)
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    idx = rng.integers(0, 10, size=50_000)
    idx[40_000] = -7
    idx[31_337] = 99
    idx[45_000] = 10
    off = np.arange(0, 50_001, 50)
    for table in (W, QuantizedTable.from_float(W, 4), QuantizedTable.from_float(W, 8)):
        d_table = _on_device(table, dev)
        with pytest.raises(IndexError, match=r"index 99 at position 31337 \(table 0, bag 626\)"):
            gpu(lambda: ops.embedding_bag(d_table, dev(idx), dev(off)))
    with pytest.raises(IndexError, match=r"index 99 at position 31337 \(table 0, bag 626\)"):  # 2-D form
        gpu(lambda: ops.embedding_bag(dev(W), dev(idx.astype(np.int32).reshape(1000, 50))))
    with pytest.raises(IndexError, match=r"index 0 at position 0 \(table 0, bag 0\) is out of range \[0, 0\)"):
        gpu(lambda: ops.embedding_bag(dev(np.zeros((0, 4), np.float32)), dev(np.array([0])), dev(np.array([0, 1]))))


def test_out_of_range_multi_table_names_table(dev, gpu):
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    with pytest.raises(IndexError, match=r"index 30 at position 3 \(table 1, bag 0\)"):
        gpu(lambda: ops.embedding_bags([dev(W), dev(W)], dev(np.array([0, 1, 2, 30])), dev(np.array([0, 2, 4]))))


@pytest.mark.parametrize("offsets, msg", [
    ([1, 1, 3], "offsets\\[0\\] must be 0, got 1"),
    ([0, 2, 1, 3], "non-decreasing: offsets\\[2\\]=1 < offsets\\[1\\]=2"),
    ([0, 1, 2], "must equal len\\(indices\\)=3, got 2"),
    ([0, 1, 4], "must equal len\\(indices\\)=3, got 4"),
    ([0, 5, 3], "non-decreasing"),
    ([-4, 3], "offsets\\[0\\] must be 0"),
    ([], "length B \\+ 1"),
])
def test_bad_offsets(dev, gpu, offsets, msg):
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    idx = dev(np.array([1, 2, 3], dtype=np.int64))
    for dtype in (np.int64, np.int32):
        d_off = dev(np.array(offsets, dtype=dtype))
        if not offsets:  # refused in Python, before any backend
            with pytest.raises(ValueError, match=msg):
                ops.embedding_bag(dev(W), idx, d_off)
            continue
        with pytest.raises(ValueError, match=msg):
            gpu(lambda: ops.embedding_bag(dev(W), idx, d_off))
    out = gpu(lambda: ops.embedding_bag(dev(W), idx, dev(np.array([0, 1, 3]))))
    _check(out, ops.embedding_bag(W, np.array([1, 2, 3]), np.array([0, 1, 3])), dev)


def test_bad_offsets_multi_table(dev, gpu):
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    idx = dev(np.array([1, 2, 3], dtype=np.int64))
    with pytest.raises(ValueError, match="T\\*B \\+ 1"):
        ops.embedding_bags([dev(W), dev(W)], idx, dev(np.array([0, 1, 2, 3])))
    with pytest.raises(ValueError, match="non-decreasing"):
        gpu(lambda: ops.embedding_bags([dev(W), dev(W)], idx, dev(np.array([0, 2, 1, 2, 3]))))
    with pytest.raises(ValueError, match="non-decreasing"):  # bad offsets win over a bad id
        gpu(lambda: ops.embedding_bags([dev(W), dev(W)], dev(np.array([1, 99, 3])), dev(np.array([0, 2, 1, 2, 3]))))


def test_launcher_checks():
    """The CuPy launcher re-checks what it relies on, as the compiled one does."""
    good = (1, 10, 4, 16, 0, False, 0, -1)
    args = dict(indices=1, num_indices=0, indices_int64=True, offsets=1, num_offsets=2, offsets_int64=True,
                fixed_len=-1, per_sample_weights=0, out=1, device=0, stream=0)
    cases = [
        ([], {}, "at least one table"),
        ([good], dict(num_offsets=0), "T\\*B \\+ 1"),
        ([good[:4] + (9,) + good[5:]], {}, "unknown row kind 9"),
        ([good[:6] + (3,) + good[7:]], {}, "mode code"),
        ([good[:7] + (10,)], {}, "padding_idx 10 is out of range"),
        ([good[:3] + (15,) + good[4:]], {}, "dense"),
        ([(1, 10, 4, 11, 2, False, 0, -1)], {}, "too short for dim=4 \\(need >= 12\\)"),
        ([(1, 10, 4, 12, 2, True, 0, -1)], {}, "8-bit TBE"),
        ([good[:6] + (1,) + good[7:]], dict(per_sample_weights=1), "only supported with mode 'sum'"),
        ([good], dict(fixed_len=2), "2-D indices"),
    ]
    for tables, over, msg in cases:
        with pytest.raises(ValueError, match=msg):
            cupy_embedding.embedding_bags(tables, **{**args, **over})


# ---- backend choice (no GPU needed) ---------------------------------------------------------------------


def _compiled_missing():
    raise RuntimeError("fastrec's CUDA module (fastrec._C_cuda) is not available in this build (test).")


def test_backend_falls_back_to_cupy_without_compiled_module(monkeypatch):
    monkeypatch.delenv("FASTREC_CUDA_BACKEND", raising=False)
    monkeypatch.setattr(_cuda_embedding, "_cupy_fallback", None)
    monkeypatch.setattr(_cuda, "module", _compiled_missing)
    monkeypatch.setattr(cupy_embedding, "available", lambda: None)
    assert _cuda_embedding._embedding_backend() is cupy_embedding
    assert _cuda_embedding._embedding_backend() is cupy_embedding  # remembered


def test_backend_error_without_either(monkeypatch):
    monkeypatch.delenv("FASTREC_CUDA_BACKEND", raising=False)
    monkeypatch.setattr(_cuda_embedding, "_cupy_fallback", None)
    monkeypatch.setattr(_cuda, "module", _compiled_missing)
    monkeypatch.setattr(cupy_embedding, "available", lambda: "CuPy is not importable (test)")
    with pytest.raises(RuntimeError, match="not available in this build.*CuPy fallback: CuPy is not importable"):
        _cuda_embedding._embedding_backend()
    assert _cuda_embedding._cupy_fallback is None


def test_backend_env_var(monkeypatch):
    monkeypatch.setattr(_cuda_embedding, "_cupy_fallback", None)
    sentinel = object()
    monkeypatch.setattr(_cuda, "module", lambda: sentinel)
    monkeypatch.setattr(cupy_embedding, "available", lambda: None)
    for value, expected in (("", sentinel), ("auto", sentinel), ("compiled", sentinel), ("cupy", cupy_embedding),
                            (" CuPy ", cupy_embedding)):
        monkeypatch.setenv("FASTREC_CUDA_BACKEND", value)
        assert _cuda_embedding._embedding_backend() is expected
    monkeypatch.setenv("FASTREC_CUDA_BACKEND", "opencl")
    with pytest.raises(ValueError, match="FASTREC_CUDA_BACKEND must be"):
        _cuda_embedding._embedding_backend()
    monkeypatch.setenv("FASTREC_CUDA_BACKEND", "cupy")
    monkeypatch.setattr(cupy_embedding, "available", lambda: "CuPy finds no CUDA device")
    with pytest.raises(RuntimeError, match="FASTREC_CUDA_BACKEND=cupy but CuPy finds no CUDA device"):
        _cuda_embedding._embedding_backend()


def test_kernel_source_variants():
    """Every variant's source names its macros (test_kernel_sources_compile_with_nvrtc compiles them)."""
    for kind in cupy_embedding.KIND_NAMES:
        for idx64, off64 in itertools.product((False, True), repeat=2):
            src = cupy_embedding.kernel_source(kind, idx64, off64)
            assert f"#define FASTREC_KIND {kind}\n" in src and 'extern "C" __global__ void fastrec_embedding_bag' in src
            assert ("FASTREC_IDX_T long long" in src) == idx64 and ("FASTREC_OFF_T long long" in src) == off64


@pytest.mark.skipif(nvrtc.SKIP_REASON is not None, reason=nvrtc.SKIP_REASON or "")
@pytest.mark.parametrize("kind", sorted(cupy_embedding.KIND_NAMES))
def test_kernel_sources_compile_with_nvrtc(kind):
    """Each variant compiles, warning-free, with the compiler CuPy uses (NVRTC, which needs no GPU;
    .ci/run installs NVRTC 12, as cupy-cuda12x uses), for the oldest and newest architectures
    fastrec targets, at NVRTC's default C++ standard and at C++11; the PTX has the entry point
    RawKernel looks up, with its 64-bit id or offset loads where the variant takes them."""
    for idx64, off64 in itertools.product((False, True), repeat=2):
        src = cupy_embedding.kernel_source(kind, idx64, off64)
        for arch, std in (("compute_80", []), ("compute_90", []), ("compute_80", ["--std=c++11"])):
            name = f"fastrec_embedding_bag_{cupy_embedding.KIND_NAMES[kind]}_{idx64:d}{off64:d}_{arch}.cu"
            ptx, log = nvrtc.compile_ptx(src, name, [f"--gpu-architecture={arch}"] + std)
            assert "warning" not in log.lower(), log
            assert ".entry fastrec_embedding_bag(" in ptx
            assert f".target sm_{arch[-2:]}" in ptx
            assert ("ld.global.u64" in ptx or "ld.global.nc.u64" in ptx or "ld.global.s64" in ptx
                    or "ld.global.nc.s64" in ptx) == (idx64 or off64), name


@pytest.mark.skipif(nvrtc.SKIP_REASON is not None, reason=nvrtc.SKIP_REASON or "")
def test_nvrtc_helper_reports_compile_errors():
    with pytest.raises(RuntimeError, match="(?s)does not compile.*is undefined"):
        nvrtc.compile_ptx('extern "C" __global__ void k(int* p) { p[0] = undefined_name; }', "bad.cu")
