"""CUDA Int8Linear / Int8MLP: exact int32 sums on every GEMM kernel, the quantization pass and the
float outputs equal to the CPU op's (scalar ISA: the same float operations in the same order),
MLPs, streams, threads, result framework / device / dtype, errors. Skipped without a GPU."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

from fastrec import Int8Linear, Int8MLP, _C, _cuda_linear
from conftest import CUDA_SKIP_REASON, make_to_device, to_host

needs_cuda = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")


@pytest.fixture(params=["torch", "cupy", "emulated"])
def to_device(request, monkeypatch):
    """conftest's, plus "emulated": the real kernels compiled for the host (conftest.make_to_device)."""
    return make_to_device(request.param, monkeypatch)

DIMS = [1, 13, 31, 32, 33, 64, 100, 479, 512, 1024]
BATCHES = [0, 1, 3, 16, 17, 64, 255, 1000]
# The emulated cases (every GPU thread a fiber on one CPU core) take the smaller shapes: each
# kernel and code path still, the tiled GEMMs with several tiles and a partial one.
EMULATED_DIMS = {1, 13, 33, 64, 100}
EMULATED_BATCHES = [0, 1, 3, 17, 64, 255]


def _batches(to_device):
    return EMULATED_BATCHES if getattr(to_device, "emulated", False) else BATCHES


def _small_if_emulated(to_device, *dims):
    if getattr(to_device, "emulated", False) and any(d not in EMULATED_DIMS for d in dims):
        pytest.skip("emulated: the smaller shapes only")


def test_int32_sums_exact_deep_k_emulated(to_device):
    # K = 512 (8 chunks of 64): every forced tiled GEMM refills its cp.async pipeline in its main
    # loop, which the emulated cases' smaller K (at most 2 chunks) never reach; N small to stay quick.
    if not getattr(to_device, "emulated", False):
        pytest.skip("test_int32_sums_exact covers K = 512 on a GPU")
    rng = np.random.default_rng(512)
    lin = _layer(rng, 512, 13)
    w = lin.weight_int8.astype(np.float64)
    for B in (1, 40, 130):
        q = rng.integers(-128, 128, size=(B, 512)).astype(np.int8)
        ref = (q.astype(np.float64) @ w.T).astype(np.int64)
        for config in GEMM_CONFIGS:
            with gemm_config(config):
                out = to_host(_cuda_linear.int8_linear_int32(to_device(q), lin))
            assert np.array_equal(out, ref), f"B={B} config={config}"
# 0: kernel chosen by shape (small-batch kernel for B <= 32); 2, 3, 4: each tiled kernel forced.
GEMM_CONFIGS = [0, 2, 3, 4]
ACTIVATIONS = [None, "relu", "sigmoid"]


def _cuda_module():
    from fastrec import _cuda

    return _cuda.module()  # (fastrec._C_cuda_emu in the emulated cases)


@contextlib.contextmanager
def gemm_config(config):
    m = _cuda_module()
    before = m.linear_gemm_config()
    m.set_linear_gemm_config(config)
    try:
        yield
    finally:
        m.set_linear_gemm_config(before)


@contextlib.contextmanager
def scalar_cpu():
    """The CPU reference with the scalar kernels: no FMA anywhere, so the GPU equals it exactly."""
    before = _C.current_isa()
    _C.set_isa("scalar")
    try:
        yield
    finally:
        _C.set_isa(before)


def _framework(a) -> str:
    return "torch" if hasattr(a, "detach") else "cupy"


def _layer(rng, K, N, bias=True):
    W = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    return Int8Linear.from_float(W, b)


def _x(rng, B, K):
    """Rows of very different magnitudes, one all-zero row."""
    x = (rng.standard_normal((B, K)) * rng.uniform(0.01, 100, size=(B, 1))).astype(np.float32)
    if B > 2:
        x[2] = 0.0
    return x


def _check_output(y, ref, activation):
    if activation == "sigmoid":  # expf on the GPU vs the C library's exp: a few ulp
        np.testing.assert_allclose(y, ref, rtol=2e-6, atol=2e-7)
    else:
        np.testing.assert_array_equal(y, ref)


# ---- exact integer sums ----------------------------------------------------------------------

@pytest.mark.parametrize("N", DIMS)
@pytest.mark.parametrize("K", DIMS)
def test_int32_sums_exact(to_device, K, N):
    _small_if_emulated(to_device, K, N)
    rng = np.random.default_rng(K * 10007 + N)
    lin = _layer(rng, K, N)
    w = lin.weight_int8.astype(np.float64)
    for B in _batches(to_device):
        q = rng.integers(-128, 128, size=(B, K)).astype(np.int8)
        ref = (q.astype(np.float64) @ w.T).astype(np.int64)  # exact: |sum| < 2^53
        qd = to_device(q)
        for config in GEMM_CONFIGS:
            with gemm_config(config):
                out = to_host(_cuda_linear.int8_linear_int32(qd, lin))
            assert out.dtype == np.int32 and out.shape == (B, N)
            assert np.array_equal(out, ref), f"B={B} config={config}"


def test_int32_sums_match_cpu_hook(to_device):
    rng = np.random.default_rng(5)
    lin = _layer(rng, 479, 1024)
    q = rng.integers(-128, 128, size=(37, 479)).astype(np.int8)
    assert np.array_equal(to_host(_cuda_linear.int8_linear_int32(to_device(q), lin)), _C.int8_linear_int32(q, lin._core))


# ---- quantization ----------------------------------------------------------------------------

@pytest.mark.parametrize("K", DIMS)
def test_quantization_matches_cpu(to_device, K):
    rng = np.random.default_rng(K)
    x = _x(rng, 67, K)
    x[3, :] = 1e-30
    x[6, :] = np.resize(np.float32([1e-38, 0.0, -5e-39, 2.5e-39]), K)  # 127 / amax overflows: scaled rows
    x[4, :] = 3e38 * (rng.random(K) - 0.5)
    if K >= 6:  # amax 127 makes inv exactly 1: ties that round half to even
        x[5, :6] = [127.0, 2.5, -2.5, 3.5, 0.5, -0.5]
        x[5, 6:] = 0.0
    q, s = _cuda_linear.quantize_rows(to_device(x))
    q_ref, s_ref = _C.quantize_rows_int8(x)
    assert np.array_equal(to_host(q), q_ref)
    assert np.array_equal(to_host(s), s_ref)


def test_quantization_unaligned_input(to_device):
    """A float32 array not 16-byte aligned takes the scalar-load path; same codes."""
    rng = np.random.default_rng(9)
    x = _x(rng, 33, 64)
    buf = to_device(np.concatenate([np.zeros(1, np.float32), x.ravel()]))
    xd = buf[1:].reshape(33, 64)
    q, s = _cuda_linear.quantize_rows(xd)
    q_ref, s_ref = _C.quantize_rows_int8(x)
    assert np.array_equal(to_host(q), q_ref) and np.array_equal(to_host(s), s_ref)
    lin = _layer(rng, 64, 40)
    with scalar_cpu():
        ref = lin(x, activation="relu")
    np.testing.assert_array_equal(to_host(lin(xd, activation="relu")), ref)


# ---- float outputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("N", DIMS)
@pytest.mark.parametrize("K", DIMS)
def test_output_matches_cpu(to_device, K, N):
    _small_if_emulated(to_device, K, N)
    i = DIMS.index(K) + DIMS.index(N)
    activation = ACTIVATIONS[i % 3]
    rng = np.random.default_rng(K * 31 + N)
    lin = _layer(rng, K, N, bias=(i // 3) % 2 == 0)
    for B in _batches(to_device):
        x = _x(rng, B, K)
        with scalar_cpu():
            ref = lin(x, activation=activation)
        xd = to_device(x)
        configs = GEMM_CONFIGS if B in (1, 17, 255) else [0]
        for config in configs:
            with gemm_config(config):
                y = lin(xd, activation=activation)
            assert _framework(y) == _framework(xd)
            y = to_host(y)
            assert y.dtype == np.float32 and y.shape == (B, N)
            _check_output(y, ref, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_activation_and_bias(to_device, activation, bias):
    rng = np.random.default_rng(3)
    lin = _layer(rng, 100, 33, bias=bias)
    for B in (1, 17, 300):
        x = _x(rng, B, 100)
        with scalar_cpu():
            ref = lin(x, activation=activation)
        _check_output(to_host(lin(to_device(x), activation=activation)), ref, activation)


def test_zero_rows_and_channels(to_device):
    rng = np.random.default_rng(4)
    W = rng.standard_normal((8, 16)).astype(np.float32)
    W[3] = 0.0
    lin = Int8Linear.from_float(W, np.ones(8, np.float32))
    x = rng.standard_normal((5, 16)).astype(np.float32)
    x[1] = 0.0
    y = to_host(lin(to_device(x)))
    assert np.all(y[:, 3] == 1.0) and np.all(y[1] == 1.0)


def test_ops_int8_linear_routes_device_arrays(to_device):
    """Once ops.int8_linear routes device arrays here, it must agree with the object call."""
    from fastrec import ops

    rng = np.random.default_rng(6)
    lin = _layer(rng, 32, 16)
    x = to_device(_x(rng, 9, 32))
    try:
        y = ops.int8_linear(x, lin, activation="relu")
    except TypeError:  # CuPy refuses the implicit copy to numpy of the CPU-only path
        y = np.zeros(0)
    if isinstance(y, np.ndarray):
        pytest.skip("ops.int8_linear does not route device arrays yet")
    np.testing.assert_array_equal(to_host(y), to_host(lin(x, activation="relu")))


# ---- MLPs ------------------------------------------------------------------------------------

MLPS = {
    "bottom-13-512-256-64": ([13, 512, 256, 64], ["relu", "relu", "relu"]),
    "top-479-1024-1024-512-256-1": ([479, 1024, 1024, 512, 256, 1], ["relu", "relu", "relu", "relu", "sigmoid"]),
    "512-256-64": ([512, 256, 64], ["relu", None]),
}


@pytest.mark.parametrize("name", list(MLPS))
def test_mlp_matches_cpu(to_device, name):
    dims, acts = MLPS[name]
    rng = np.random.default_rng(len(dims))
    layers = []
    for i in range(len(dims) - 1):
        W = (rng.standard_normal((dims[i + 1], dims[i])) / np.sqrt(dims[i])).astype(np.float32)
        layers.append((W, rng.standard_normal(dims[i + 1]).astype(np.float32) * 0.1))
    mlp = Int8MLP.from_float(layers, acts)
    for B in _batches(to_device):
        x = _x(rng, B, dims[0])
        with scalar_cpu():
            ref = mlp(x)
        xd = to_device(x)
        y = mlp(xd)
        assert _framework(y) == _framework(xd)
        y = to_host(y)
        assert y.dtype == np.float32 and y.shape == (B, dims[-1])
        _check_output(y, ref, acts[-1])
        # The layers one by one on the GPU give the same bits.
        h = xd
        for lin, act in zip(mlp.layers, acts):
            h = lin(h, activation=act)
        np.testing.assert_array_equal(to_host(h), y)
        if acts[-1] == "sigmoid" and B:
            assert np.all((y > 0) & (y < 1))


# ---- results, streams, threads, devices ------------------------------------------------------

def test_result_framework_device_dtype(to_device):
    rng = np.random.default_rng(7)
    lin = _layer(rng, 33, 17)
    for B in (0, 5):
        xd = to_device(_x(rng, B, 33))
        y = lin(xd)
        assert _framework(y) == _framework(xd)
        assert tuple(y.shape) == (B, 17)
        assert str(y.dtype).endswith("float32")
        assert y.device == xd.device


def test_weights_uploaded_once(to_device):
    rng = np.random.default_rng(8)
    lin = _layer(rng, 64, 64)
    mlp = Int8MLP([lin, _layer(rng, 64, 8)], ["relu", None])
    x = to_device(_x(rng, 4, 64))
    lin(x)
    first = dict(lin._cuda_weights)
    lin(x, activation="relu")
    mlp(x)
    assert len(lin._cuda_weights) == 1
    assert all(lin._cuda_weights[d] is w for d, w in first.items())


def test_non_contiguous_input(to_device):
    rng = np.random.default_rng(10)
    lin = _layer(rng, 40, 24)
    x = _x(rng, 30, 40)
    xt = to_device(np.ascontiguousarray(x.T)).T  # a transposed view
    with scalar_cpu():
        ref = lin(x)
    np.testing.assert_array_equal(to_host(lin(xt)), ref)


@needs_cuda
def test_torch_stream_is_used():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    lin = _layer(rng, 256, 128)
    x = _x(rng, 64, 256)
    with scalar_cpu():
        ref = lin(x, activation="relu")
    src = torch.from_numpy(x).cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    for check_finite in (True, False):
        with torch.cuda.stream(s):
            torch.cuda._sleep(20_000_000)  # x is written long after the launch: only stream order saves it
            xs = src * 1.0
            y = lin(xs, activation="relu", check_finite=check_finite)
        s.synchronize()
        np.testing.assert_array_equal(y.cpu().numpy(), ref)


@needs_cuda
def test_cupy_stream_is_used():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(12)
    lin = _layer(rng, 128, 64)
    x = _x(rng, 40, 128)
    with scalar_cpu():
        ref = lin(x)
    with cupy.cuda.Stream(non_blocking=True) as s:
        xs = cupy.asarray(x) * 1.0
        y = lin(xs, check_finite=False)
        s.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(y), ref)


@needs_cuda
def test_torch_cuda_graph():
    """check_finite=False only launches kernels, so a CUDA graph can capture it."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(18)
    mlp = Int8MLP([_layer(rng, 479, 256), _layer(rng, 256, 1)], ["relu", "sigmoid"])
    lin = mlp.layers[0]
    x_static = torch.from_numpy(_x(rng, 16, 479)).cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture: uploads the weights
        lin(x_static, activation="relu", check_finite=False)
        mlp(x_static, check_finite=False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_static = lin(x_static, activation="relu", check_finite=False)
        p_static = mlp(x_static, check_finite=False)
    x = _x(rng, 16, 479)
    x_static.copy_(torch.from_numpy(x))
    g.replay()
    torch.cuda.synchronize()
    with scalar_cpu():
        np.testing.assert_array_equal(y_static.cpu().numpy(), lin(x, activation="relu"))
        np.testing.assert_allclose(p_static.cpu().numpy(), mlp(x), rtol=2e-6, atol=2e-7)
    with pytest.raises(ValueError, match="check_finite=False"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            lin(x_static)


@needs_cuda
def test_first_call_inside_a_capture_is_refused():
    """The first call on a device uploads the weights (an allocation and a copy, which a capture
    cannot record): a ValueError asking for a call before capturing, and the layer still works."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(19)
    lin = _layer(rng, 64, 32)
    x = _x(rng, 8, 64)
    xd = torch.from_numpy(x).cuda()
    with pytest.raises(ValueError, match="once before capturing"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            lin(xd, check_finite=False)
    with scalar_cpu():
        np.testing.assert_array_equal(lin(xd).cpu().numpy(), lin(x))


def test_threads(to_device):
    rng = np.random.default_rng(13)
    lin = _layer(rng, 479, 256)  # first use happens in the threads: one upload, shared
    mlp = Int8MLP([_layer(rng, 479, 64), _layer(rng, 64, 1)], ["relu", "sigmoid"])
    inputs = [_x(rng, b, 479) for b in (1, 7, 16, 33, 100, 256, 3, 64)]
    with scalar_cpu():
        refs = [(lin(x, activation="relu"), mlp(x)) for x in inputs]
    errors = []
    barrier = threading.Barrier(len(inputs), timeout=120)

    def work(i):
        try:
            xd = to_device(inputs[i])
            torch_stream = None
            if _framework(xd) == "torch" and not getattr(to_device, "emulated", False):
                import torch

                torch_stream = torch.cuda.Stream()
            barrier.wait()
            ctx = torch.cuda.stream(torch_stream) if torch_stream is not None else contextlib.nullcontext()
            with ctx:
                if torch_stream is not None:
                    torch_stream.wait_stream(torch.cuda.default_stream())
                for _ in range(3 if getattr(to_device, "emulated", False) else 20):
                    y = to_host(lin(xd, activation="relu"))
                    p = to_host(mlp(xd))
                    np.testing.assert_array_equal(y, refs[i][0])
                    np.testing.assert_allclose(p, refs[i][1], rtol=2e-6, atol=2e-7)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()  # the others stop waiting for this thread

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(lin._cuda_weights) == 1


@needs_cuda
def test_other_device_keeps_current_device():
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    rng = np.random.default_rng(14)
    lin = _layer(rng, 64, 32)
    x = _x(rng, 10, 64)
    with scalar_cpu():
        ref = lin(x)
    torch.cuda.set_device(0)
    y1 = lin(torch.from_numpy(x).to("cuda:1"))
    assert torch.cuda.current_device() == 0
    assert y1.device == torch.device("cuda:1")
    y0 = lin(torch.from_numpy(x).to("cuda:0"))
    np.testing.assert_array_equal(y1.cpu().numpy(), ref)
    np.testing.assert_array_equal(y0.cpu().numpy(), ref)
    assert set(lin._cuda_weights) == {0, 1}


@needs_cuda
def test_torch_bfloat16_and_requires_grad():
    """As on the CPU path: torch bfloat16 is read as float32; a tensor that requires grad works."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(15)
    lin = _layer(rng, 32, 8)
    x = torch.from_numpy(_x(rng, 6, 32)).cuda()
    xb = x.bfloat16()
    with scalar_cpu():
        ref = lin(xb.float().cpu().numpy())
    np.testing.assert_array_equal(lin(xb).cpu().numpy(), ref)
    xg = x.clone().requires_grad_(True)
    np.testing.assert_array_equal(lin(xg).cpu().numpy(), to_host(lin(x)))


# ---- errors ----------------------------------------------------------------------------------

def test_errors(to_device):
    rng = np.random.default_rng(16)
    lin = _layer(rng, 12, 5)
    mlp = Int8MLP([lin, _layer(rng, 5, 1)], ["relu", "sigmoid"])
    good = _x(rng, 4, 12)
    with pytest.raises(ValueError, match="features"):
        lin(to_device(_x(rng, 4, 11)))
    with pytest.raises(ValueError, match="features"):
        mlp(to_device(_x(rng, 4, 13)))
    with pytest.raises(ValueError, match="2-D"):
        lin(to_device(good[0]))
    with pytest.raises(ValueError, match="2-D"):
        lin(to_device(good[None]))
    for dtype in (np.float64, np.float16, np.int32, np.int8):
        with pytest.raises(TypeError, match="float32"):
            lin(to_device(good.astype(dtype)))
        with pytest.raises(TypeError, match="float32"):
            mlp(to_device(good.astype(dtype)))
    with pytest.raises(ValueError, match="activation"):
        lin(to_device(good), activation="tanh")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_raise_and_op_still_works(to_device, bad):
    rng = np.random.default_rng(17)
    lin = _layer(rng, 40, 24)
    mlp = Int8MLP([_layer(rng, 40, 64), _layer(rng, 64, 1)], ["relu", "sigmoid"])
    for B in (1, 17, 100):
        x = _x(rng, B, 40)
        row = B // 2
        x[row, 7] = bad
        xd = to_device(x)
        with pytest.raises(ValueError, match=rf"NaN or Inf \(row {row}\)"):
            lin(xd)
        with pytest.raises(ValueError, match=rf"NaN or Inf \(row {row}\)"):
            mlp(xd)
        # Without the check the call returns at once; the bad row is NaN, the others are right.
        y = to_host(lin(xd, activation="relu", check_finite=False))
        p = to_host(mlp(xd, check_finite=False))
        assert np.all(np.isnan(y[row])) and np.all(np.isnan(p[row]))
        ok = np.arange(B) != row
        with scalar_cpu():
            np.testing.assert_array_equal(y[ok], lin(x[ok], activation="relu"))
        # The op still works afterwards.
        x[row, 7] = 0.0
        with scalar_cpu():
            ref = lin(x)
        np.testing.assert_array_equal(to_host(lin(to_device(x))), ref)


def test_overflow_inside_mlp_raises(to_device):
    """Finite input whose first layer overflows float32: the next layer's check catches it."""
    W1 = np.full((4, 4), 1.0, np.float32)
    W2 = np.eye(4, dtype=np.float32)
    mlp = Int8MLP.from_float([(W1, None), (W2, None)], [None, None])
    x = np.full((2, 4), 3e38, np.float32)
    x[0] = 1.0
    with pytest.raises(ValueError, match=r"NaN or Inf \(row 1\)"):
        mlp(to_device(x))
