"""Int8Linear / Int8MLP / ops.int8_linear: exact integer accumulation on every ISA, accuracy
against float64 and against torch's dynamic int8 Linear, awkward shapes, errors."""

import numpy as np
import pytest

import fastrec
from fastrec import Int8Linear, Int8MLP, _C, ops
from conftest import needs_torch

SHAPES = [(1, 1), (3, 3), (97, 97), (3, 97), (97, 3), (1, 3), (3, 1), (1, 97), (97, 1), (512, 256), (64, 1)]


def _layer(rng, K, N, bias=True):
    W = rng.standard_normal((N, K)).astype(np.float32) / np.sqrt(K)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    return W, b


def _ref_quantize_rows(x):
    """numpy version of the kernels' activation quantization (float32 arithmetic)."""
    amax = np.abs(x).max(axis=1).astype(np.float32) if x.shape[1] else np.zeros(len(x), np.float32)
    with np.errstate(over="ignore"):
        inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    # Where 127 / amax overflows (amax < ~3.7e-37) the row is scaled by 2^100 first (exactly).
    tiny = np.isinf(inv)
    up = np.where(tiny, np.float32(2.0**100), np.float32(1)).astype(np.float32)
    inv = np.where(tiny, np.float32(127) / np.where(tiny, amax * up, 1), inv).astype(np.float32)
    y = np.rint((x * up[:, None]) * inv[:, None])
    q = np.clip(y, -127, 127).astype(np.int8)
    return q, (amax / np.float32(127)).astype(np.float32)


# (8196, 64): K split into slices with partial sums between them on every CPU (AMD runs K up
# to 8192 whole, other vendors split K above 512).
@pytest.mark.parametrize("K,N", SHAPES + [(1024, 1024), (13, 512), (8196, 64)])
@pytest.mark.parametrize("B", [0, 1, 3, 33, 257])
def test_int32_accumulation_is_exact(isa, rng, K, N, B):
    W, b = _layer(rng, K, N)
    lin = Int8Linear.from_float(W, b)
    q = rng.integers(-128, 128, size=(B, K)).astype(np.int8)
    ref = q.astype(np.int64) @ lin.weight_int8.astype(np.int64).T
    out = _C.int8_linear_int32(q, lin._core)
    assert out.dtype == np.int32 and out.shape == (B, N)
    assert np.array_equal(out, ref)


def test_weight_quantization_matches_the_activation_quantizer(rng):
    # Weight rows are quantized as activation rows are, tiny rows (127 / amax overflows) included:
    # before, a weight row of max |w| ~1e-38 saturated its codes and 0 * inf gave NaN.
    from fastrec.linear import quantize_weight

    W = rng.standard_normal((6, 19)).astype(np.float32)
    W[rng.random(W.shape) < 0.3] = 0
    W[1] *= np.float32(1e-38)
    W[2] *= np.float32(1e-43)
    W[3] = 0
    W[4] *= np.float32(1e30)
    q, s = quantize_weight(W)
    q_ref, s_ref = _ref_quantize_rows(W)
    assert np.array_equal(q, q_ref) and np.array_equal(s, s_ref)
    assert q[1].tolist() != [127 * int(np.sign(v)) for v in W[1]]


def test_largest_k_is_exact_and_larger_is_refused(isa):
    # 127 * 127 * K must fit the int32 accumulators: up to K = 133144 every sum is exact; beyond,
    # all-127 inputs wrapped to negative outputs on every ISA, silently. Now a ValueError.
    K = 2**31 // (127 * 127)
    lin = Int8Linear.from_float(np.ones((1, K), np.float32))
    q = np.array([[127] * K, [-127] * K], np.int8)
    assert _C.int8_linear_int32(q, lin._core).tolist() == [[127 * 127 * K], [-127 * 127 * K]]
    np.testing.assert_allclose(lin(np.ones((2, K), np.float32)), K, rtol=1e-6)
    with pytest.raises(ValueError, match="at most 133144 input features"):
        Int8Linear.from_float(np.ones((1, K + 1), np.float32))


@pytest.mark.parametrize("K", [1, 3, 17, 97, 1024])
def test_activation_quantization_matches_numpy(isa, rng, K):
    x = (rng.standard_normal((9, K)) * rng.uniform(0.01, 100, size=(9, 1))).astype(np.float32)
    x[0] = 0.0  # an all-zero row
    q, s = _C.quantize_rows_int8(x)
    q_ref, s_ref = _ref_quantize_rows(x)
    assert np.array_equal(q, q_ref)
    assert np.array_equal(s, s_ref)


@pytest.mark.parametrize("K", [5, 16, 70])
def test_activation_quantization_special_values(isa, K):
    """Ties (x * inv exactly k + 0.5 round to even), signed zeros, subnormals, the row maximum
    at either sign, and a lone huge value."""
    rows = np.zeros((6, K), np.float32)
    rows[0, :] = -0.0
    rows[1, 0] = 127.0
    rows[1, 1:] = np.resize(np.float32([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]), K - 1)
    rows[2, :] = np.float32(1e-45) * np.arange(K)  # subnormals
    rows[3, -1] = -3.0e38
    rows[3, 0] = 1.0e30
    rows[4, :] = np.linspace(-1, 1, K, dtype=np.float32)
    rows[5, K // 2] = -7.0
    q, s = _C.quantize_rows_int8(rows)
    q_ref, s_ref = _ref_quantize_rows(rows)
    assert np.array_equal(q, q_ref)
    assert np.array_equal(s, s_ref)


@pytest.mark.parametrize("K", [4, 16, 70])
def test_rows_too_small_for_127_over_amax(isa, K):
    """Rows whose max |x| is below ~3.7e-37 (where 127 / amax overflows float32, normal and
    subnormal values alike) get codes like any other row: zeros stay 0, the rest keep their
    ratios. Their scale, amax / 127, is subnormal below ~1.5e-36, so the dequantized output
    loses relative precision there: measured below, ~0.4% at 1e-38."""
    pattern = np.resize(np.float32([1.0, 0.5, 0.0, -0.25, -1.0, 0.75, -0.0]), K)
    rows = np.stack([pattern * np.float32(m) for m in (3e-37, 1e-38, 1e-40, 1e-44, 4e-37, 1e-30)])
    q, s = _C.quantize_rows_int8(rows)
    q_ref, s_ref = _ref_quantize_rows(rows)
    assert np.array_equal(q, q_ref) and np.array_equal(s, s_ref)
    expect = pattern.astype(np.float64) * 127
    for i in range(3):  # the ratios survive, to rounding (row 3's subnormals keep ~3 bits: skipped)
        assert np.all(np.abs(q[i] - expect) <= 0.5 + 1e-3), (i, q[i])
    assert not np.any(q[:, pattern == 0])  # zeros are zeros
    # Through a layer: identity weights of 1e36 give back x * 1e36 to int8 precision.
    lin = Int8Linear.from_float(np.eye(K, dtype=np.float32) * np.float32(1e36))
    x = rows[:2]  # 3e-37 and 1e-38
    y = lin(x).astype(np.float64)
    ref = x.astype(np.float64) * 1e36
    tol = np.abs(ref).max(axis=1, keepdims=True) * (0.5 / 127 + 0.005)  # rounding + the subnormal scale
    assert np.all(np.abs(y - ref) <= tol), (y, ref)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("K,col", [(5, 4), (64, 63), (70, 66), (1024, 0)])
def test_nonfinite_found_in_any_column(isa, rng, bad, K, col):
    lin = Int8Linear.from_float(*_layer(rng, K, 16))
    x = rng.standard_normal((8, K)).astype(np.float32)
    x[6, col] = bad
    with pytest.raises(ValueError, match="row 6"):
        lin(x)


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("B", [0, 1, 3, 97])
@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"])
def test_float_output_matches_quantized_reference(isa, rng, K, N, B, activation):
    """The fused epilogue equals the float64 evaluation of the same quantized operands."""
    W, b = _layer(rng, K, N)
    lin = Int8Linear.from_float(W, b)
    x = rng.standard_normal((B, K)).astype(np.float32)
    y = lin(x, activation=activation)
    assert y.dtype == np.float32 and y.shape == (B, N)
    q, s = _ref_quantize_rows(x)
    acc = q.astype(np.float64) @ lin.weight_int8.astype(np.float64).T
    ref = acc * s[:, None].astype(np.float64) * lin.weight_scale.astype(np.float64)[None, :] + b
    if activation == "relu":
        ref = np.maximum(ref, 0)
    elif activation == "sigmoid":
        ref = 1 / (1 + np.exp(-ref))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_no_bias_and_zero_rows(rng):
    W, _ = _layer(rng, 16, 8, bias=False)
    lin = Int8Linear.from_float(W)
    x = np.zeros((2, 16), dtype=np.float32)
    assert np.array_equal(lin(x), np.zeros((2, 8), dtype=np.float32))
    W[3] = 0.0  # an all-zero output channel
    lin = Int8Linear.from_float(W, np.ones(8, dtype=np.float32))
    y = lin(rng.standard_normal((4, 16)).astype(np.float32))
    assert np.all(y[:, 3] == 1.0)


@pytest.mark.parametrize("B", [1, 5, 40])
def test_huge_inputs_times_huge_weights(isa, rng, B):
    """Inputs and weight scales whose product of scales overflows float32: an output whose
    int32 sum is 0 is the bias (as x @ W.T gives 0 there), not NaN from 0 * inf; the others
    overflow to inf as in float32, with the right sign."""
    q = np.zeros((4, 6), np.int8)
    q[0, 0], q[1, 1], q[2, 0] = 127, -127, 1  # output 3 has all-zero weights
    lin = Int8Linear.from_int8(q, np.full(4, 1e30, np.float32), np.arange(4, dtype=np.float32))
    x = np.zeros((B, 6), np.float32)
    x[:, 1] = 1e20  # a_scale ~7.9e17: a_scale * 1e30 overflows
    y = lin(x)
    expect = np.array([0.0, -np.inf, 2.0, 3.0], np.float32)
    np.testing.assert_array_equal(y, np.broadcast_to(expect, (B, 4)))
    np.testing.assert_array_equal(lin(x, activation="relu"), np.broadcast_to(np.maximum(expect, 0), (B, 4)))
    mlp = Int8MLP([lin], [None])
    np.testing.assert_array_equal(mlp(x), np.broadcast_to(expect, (B, 4)))


def test_zero_outputs_have_the_same_sign_on_every_isa():
    """Zero sums with negative scales and no bias give -0.0 (0 * scale) on every ISA, also in
    jobs that the SIMD kernels hand to the reference (a huge row beside them)."""
    q = np.zeros((4, 6), np.int8)
    q[0, 0], q[1, 1], q[2, 0], q[2, 1] = 127, -127, 1, -1
    lin = Int8Linear.from_int8(q, np.full(4, -3e30, np.float32))
    x = np.zeros((3, 6), np.float32)
    x[:, 1] = [1e-30, 1.0, 1e20]  # row 2: a_scale * w_scale overflows (the guarded path)
    before = _C.current_isa()
    results = {}
    try:
        for name in _C.available_isas():
            _C.set_isa(name)
            results[name] = lin(x)
    finally:
        _C.set_isa(before)
    ref = results["scalar"]
    assert not np.isnan(ref).any() and ref[0, 0] == 0 and np.signbit(ref[0, 0]) and np.signbit(ref[2, 3])
    for name, y in results.items():
        np.testing.assert_array_equal(np.signbit(y), np.signbit(ref), err_msg=name)
        np.testing.assert_array_equal(y, ref, err_msg=name)


def test_attributes(rng):
    W, b = _layer(rng, 10, 4)
    lin = Int8Linear.from_float(W, b)
    assert (lin.in_features, lin.out_features) == (10, 4)
    assert lin.weight_int8.dtype == np.int8 and lin.weight_int8.shape == (4, 10)
    assert lin.weight_scale.dtype == np.float32 and lin.weight_scale.shape == (4,)
    assert np.abs(lin.weight_int8).max() == 127
    np.testing.assert_allclose(lin.dequantized_weight(), W, atol=float(lin.weight_scale.max()) / 2 + 1e-7)


def test_large_batch_parallel_matches_single_thread(rng):
    W, b = _layer(rng, 256, 320)
    lin = Int8Linear.from_float(W, b)
    x = rng.standard_normal((1000, 256)).astype(np.float32)
    before = fastrec.get_num_threads()
    try:
        fastrec.set_num_threads(1)
        one = lin(x, activation="relu")
        fastrec.set_num_threads(fastrec._config.available_cpus())
        many = lin(x, activation="relu")
    finally:
        fastrec.set_num_threads(before)
    assert np.array_equal(one, many)


# B covers one thread's serial path, the per-layer channel split (fewer than 4 rows a thread:
# a static split at B=3, tasks at B=6, wide layers so that both wake the pool), rows split
# evenly (one task a thread: B=37, 71, and 150, past the 10-tile task size), task boundaries
# that are not multiples of the 6-row tile, and whole-tile tasks claimed dynamically (B=1031).
@pytest.mark.parametrize("B", [3, 6, 9, 37, 71, 150, 1031])
@pytest.mark.parametrize("threads", [1, 2])
def test_mlp_equals_layer_by_layer(isa, rng, B, threads):
    dims = [13, 512, 1024, 32, 1] if B < 8 else [13, 64, 600, 32, 1]
    layers = [_layer(rng, dims[i], dims[i + 1]) for i in range(len(dims) - 1)]
    acts = ["relu", "relu", None, "sigmoid"]
    mlp = Int8MLP.from_float(layers, acts)
    x = rng.standard_normal((B, 13)).astype(np.float32)
    before = fastrec.get_num_threads()
    try:
        fastrec.set_num_threads(threads)
        y = mlp(x)
    finally:
        fastrec.set_num_threads(before)
    h = x
    for lin, act in zip(mlp.layers, acts):
        h = lin(h, activation=act)
    assert y.shape == (B, 1)
    assert np.array_equal(y, h)
    assert np.all((y > 0) & (y < 1))
    assert mlp(np.zeros((0, 13), np.float32)).shape == (0, 1)


def test_accuracy_against_float64(rng):
    """Relative error of a 512x256 layer stays at int8 quantization level."""
    W, b = _layer(rng, 512, 256)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    ref = x.astype(np.float64) @ W.T.astype(np.float64) + b
    y = Int8Linear.from_float(W, b)(x)
    assert np.abs(y - ref).max() / np.abs(ref).max() < 0.02


@needs_torch
@pytest.mark.parametrize("K,N", [(3, 3), (97, 97), (512, 256), (1024, 1024)])
@pytest.mark.parametrize("B", [1, 32, 256])
def test_error_no_worse_than_torch_dynamic_quantization(rng, K, N, B):
    import torch

    W, b = _layer(rng, K, N)
    x = rng.standard_normal((B, K)).astype(np.float32)
    ref = x.astype(np.float64) @ W.T.astype(np.float64) + b
    m = torch.nn.Sequential(torch.nn.Linear(K, N))
    with torch.no_grad():
        m[0].weight.copy_(torch.from_numpy(W))
        m[0].bias.copy_(torch.from_numpy(b))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = torch.ao.quantization.quantize_dynamic(
            m, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)
    with torch.inference_mode():
        peer = qm(torch.from_numpy(x)).numpy()
    ours = Int8Linear.from_float(W, b)(x)
    err_ours = np.abs(ours - ref).max()
    err_peer = np.abs(peer - ref).max()
    assert err_ours <= err_peer * 1.0 + 1e-6, (err_ours, err_peer)


def _torch_dynamic_int8(W, b):
    import warnings

    import torch

    m = torch.nn.Sequential(torch.nn.Linear(W.shape[1], W.shape[0]))
    with torch.no_grad():
        m[0].weight.copy_(torch.from_numpy(W))
        m[0].bias.copy_(torch.from_numpy(b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            m, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)


@needs_torch
@pytest.mark.parametrize("K,N", [(1, 1), (1, 3), (3, 1), (3, 3), (97, 1), (1, 97), (97, 3)])
def test_error_on_tiny_layers_over_many_draws(K, N):
    """One request (B=1) through a tiny layer gives one to a few outputs, so one draw's max error
    is mostly luck: the ratio of two independent rounding errors is above 2 in ~15% of draws
    even when one is half the other on average. Over 200 draws per shape, fastrec's mean and
    RMS error must be at most torch.ao's (per-channel dynamic int8), and its worst draw at most
    2x torch's worst (issue 3's bound; these draws measured 0.0-0.9x, and the mean 0.0-0.68x).
    A single draw of (K, N) = (3, 1) or (97, 1) was more than 2x worse than torch's in ~18% of
    300 seeds, with the mean error 0.65x torch's."""
    import torch

    rng = np.random.default_rng(1234)
    ours, peer = [], []
    for _ in range(200):
        W, b = _layer(rng, K, N)
        x = rng.standard_normal((1, K)).astype(np.float32)
        ref = x.astype(np.float64) @ W.T.astype(np.float64) + b
        with torch.inference_mode():
            peer.append(np.abs(_torch_dynamic_int8(W, b)(torch.from_numpy(x)).numpy() - ref).max())
        ours.append(np.abs(Int8Linear.from_float(W, b)(x) - ref).max())
    ours, peer = np.array(ours), np.array(peer)
    assert ours.mean() <= peer.mean(), (ours.mean(), peer.mean())
    assert np.sqrt(np.mean(ours**2)) <= np.sqrt(np.mean(peer**2))
    assert ours.max() <= 2 * peer.max() + 1e-6, (ours.max(), peer.max())


# ---- errors -------------------------------------------------------------------------------


def test_errors(rng):
    W, b = _layer(rng, 8, 4)
    lin = Int8Linear.from_float(W, b)
    with pytest.raises(ValueError, match="features"):
        lin(np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        lin(np.zeros(8, np.float32))
    with pytest.raises(TypeError, match="float32"):
        lin(np.zeros((2, 8), np.float64))
    with pytest.raises(ValueError, match="activation"):
        lin(np.zeros((2, 8), np.float32), activation="gelu")
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((5, 8), np.float32)
        x[3, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf \\(row 3\\)"):
            lin(x)
    with pytest.raises(TypeError, match="Int8Linear"):
        ops.int8_linear(np.zeros((1, 8), np.float32), W)
    with pytest.raises(ValueError, match="2-D"):
        Int8Linear.from_float(W[0])
    with pytest.raises(TypeError, match="floating"):
        Int8Linear.from_float(W.astype(np.int32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        Int8Linear.from_float(np.full((2, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="bias"):
        Int8Linear.from_float(W, b[:2])
    with pytest.raises(ValueError, match="layer 1 takes"):
        Int8MLP.from_float([_layer(rng, 8, 4), _layer(rng, 5, 2)], ["relu", None])
    with pytest.raises(ValueError, match="one activation per layer"):
        Int8MLP.from_float([_layer(rng, 8, 4)], [])


def test_direct_call_path_matches_the_general_path(rng):
    """lin(x) / mlp(x) send a native float32 numpy matrix straight to the kernel; anything
    else (other dtypes and byte orders, views, tensors, unusual activations) takes the checked
    path. Both must give the same numbers; bad activations, widths and dtypes must raise as
    before, and NaN must be found on the direct path too."""
    W, b = _layer(rng, 24, 16)
    lin = Int8Linear.from_float(W, b)
    mlp = Int8MLP.from_float([(W, b), _layer(rng, 16, 3)], ["relu", "sigmoid"])
    x = rng.standard_normal((9, 48)).astype(np.float32)
    views = {"contiguous": np.ascontiguousarray(x[:, :24]), "strided": x[:, ::2],
             "fortran": np.asfortranarray(x[:, :24])}
    for name, v in views.items():
        plain = np.ascontiguousarray(v, dtype=np.float32)
        for act in (None, "none", "relu", "sigmoid"):
            ref = ops.int8_linear(plain, lin, activation=act)
            np.testing.assert_array_equal(lin(v, activation=act), ref, err_msg=f"{name} {act}")
            np.testing.assert_array_equal(lin(plain, activation=act), ref, err_msg=f"{name} {act}")
        h = ops.int8_linear(plain, mlp.layers[0], activation="relu")
        np.testing.assert_array_equal(mlp(v), ops.int8_linear(h, mlp.layers[1], activation="sigmoid"), err_msg=name)
    swapped = views["contiguous"].astype(">f4")  # byte-swapped float32: converted, as the embedding ops do
    np.testing.assert_array_equal(lin(swapped, "relu"), lin(views["contiguous"], "relu"))
    np.testing.assert_array_equal(mlp(swapped), mlp(views["contiguous"]))
    np.testing.assert_array_equal(lin(views["contiguous"].tolist()), lin(views["contiguous"]))  # lists: float32
    np.testing.assert_array_equal(mlp(views["contiguous"].tolist()), mlp(views["contiguous"]))
    for fn in (lin, mlp):
        with pytest.raises(TypeError, match="float32"):
            fn(views["contiguous"].astype(">f8"))
    for bad in ("gelu", ["relu"], 1):  # a wrong value, then wrong types
        with pytest.raises(ValueError if isinstance(bad, str) else TypeError, match="activation"):
            lin(views["contiguous"], activation=bad)
    with pytest.raises(ValueError, match="features"):
        mlp(np.zeros((2, 7), np.float32))
    with pytest.raises(TypeError, match="float32"):
        mlp(np.zeros((2, 24), np.float64))
    x_bad = views["contiguous"].copy()
    x_bad[4, 5] = np.nan
    for fn in (lin, mlp):
        with pytest.raises(ValueError, match="NaN or Inf \\(row 4\\)"):
            fn(x_bad)


def test_nan_in_a_big_parallel_batch(rng):
    W, b = _layer(rng, 512, 512)
    lin = Int8Linear.from_float(W, b)
    x = rng.standard_normal((4000, 512)).astype(np.float32)
    x[3999, 5] = np.nan
    x[2500, 1] = np.inf
    with pytest.raises(ValueError, match="row 2500"):
        lin(x)


def test_weights_are_read_only(rng):
    lin = Int8Linear.from_float(*_layer(rng, 8, 4))
    with pytest.raises(ValueError):
        lin.weight_int8[0, 0] = 1


def test_many_threads_share_one_layer(rng):
    import threading

    W, b = _layer(rng, 256, 128)
    lin = Int8Linear.from_float(W, b)
    mlp = Int8MLP.from_float([(W, b), _layer(rng, 128, 1)], ["relu", "sigmoid"])
    inputs = [rng.standard_normal((B, 256)).astype(np.float32) for B in (1, 4, 64, 700)]
    expected = [(lin(x, activation="relu"), mlp(x)) for x in inputs]
    errors = []

    def worker(k):
        for rep in range(25):
            i = (k + rep) % len(inputs)
            if not (np.array_equal(lin(inputs[i], activation="relu"), expected[i][0])
                    and np.array_equal(mlp(inputs[i]), expected[i][1])):
                errors.append((k, rep))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors


def test_constructor_checks_as_from_int8():
    # Int8Linear(...) directly takes the same checks as from_int8 (it skipped them before).
    w = np.ones((2, 3), np.int8)
    s = np.ones(2, np.float32)
    for args, exc in [((w, np.float32([1, np.nan])), ValueError), ((w, s, np.float32([0, np.inf])), ValueError),
                      ((np.full((2, 3), -128, np.int8), s), ValueError), ((w.astype(np.int16), s), TypeError),
                      ((w, s.astype(np.float64)), TypeError), ((w, np.ones(3, np.float32)), ValueError)]:
        for make in (Int8Linear, Int8Linear.from_int8):
            with pytest.raises(exc):
                make(*args)
    assert Int8Linear(w, s).out_features == 2


@pytest.mark.parametrize("B", [2, 200])  # the layer-by-layer path and the row-task path
def test_overflow_inside_an_mlp_is_named(B):
    """A finite input whose first layer overflows float32: ValueError naming the layer whose
    input held the Inf, not a claim that the caller's input did."""
    W = np.eye(4, dtype=np.float32) * np.float32(1e30)
    mlp = Int8MLP.from_float([(W, None), (W, None)], [None, None])
    with pytest.raises(ValueError, match=r"input of layer 1 holds NaN or Inf \(row 0\): an earlier layer's output"):
        mlp(np.full((B, 4), 1e30, np.float32))
    x = np.ones((B, 4), np.float32)
    x[B - 1, 2] = np.nan
    with pytest.raises(ValueError, match=rf"^input contains NaN or Inf \(row {B - 1}\)$"):
        mlp(x)
    x[0] = 1e30  # row 0 overflows inside, row B-1 is NaN in the input: the input is named
    with pytest.raises(ValueError, match=rf"^input contains NaN or Inf \(row {B - 1}\)$"):
        mlp(x)
