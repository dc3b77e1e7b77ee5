"""fastrec.ops.embedding_bag against the float64 oracle (always) and torch (when installed)."""

import numpy as np
import pytest

import fastrec
from fastrec import ops, testing
from conftest import needs_torch, random_csr

MODES = ["sum", "mean", "max"]
DIMS = [1, 3, 16, 64, 97, 130, 1024]


def tol_for(dtype):
    return dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("wdtype", [np.float32, np.float16])
def test_matches_oracle(isa, rng, mode, dim, wdtype):
    R = 50
    W = rng.standard_normal((R, dim)).astype(wdtype)
    indices, offsets = random_csr(rng, 23, R)
    out = ops.embedding_bag(W, indices, offsets, mode=mode)
    ref = testing.embedding_bag_ref(W, indices, offsets, mode=mode)
    assert out.dtype == np.float32 and out.shape == (23, dim)
    testing.assert_close(out, ref, **tol_for(wdtype))


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("off_dtype", [np.int32, np.int64])
def test_index_and_offset_dtypes(isa, rng, idx_dtype, off_dtype):
    W = rng.standard_normal((40, 8)).astype(np.float32)
    indices, offsets = random_csr(rng, 11, 40)
    out = ops.embedding_bag(W, indices.astype(idx_dtype), offsets.astype(off_dtype))
    testing.assert_close(out, testing.embedding_bag_ref(W, indices, offsets), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B", [0, 1, 3, 97, 1024])
def test_batch_sizes(isa, rng, B):
    W = rng.standard_normal((300, 24)).astype(np.float32)
    indices, offsets = random_csr(rng, B, 300)
    out = ops.embedding_bag(W, indices, offsets, mode="mean")
    assert out.shape == (B, 24)
    testing.assert_close(out, testing.embedding_bag_ref(W, indices, offsets, mode="mean"), rtol=1e-5, atol=1e-5)


def test_large_parallel_batch(isa, rng):
    """Big enough that the work is split across the thread pool."""
    W = rng.standard_normal((20000, 64)).astype(np.float32)
    B = 3000
    offsets = np.arange(B + 1, dtype=np.int64) * 20
    indices = rng.integers(0, 20000, size=B * 20)
    out = ops.embedding_bag(W, indices, offsets)
    ref = W.astype(np.float64)[indices].reshape(B, 20, 64).sum(axis=1)
    testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_empty_bags_give_zeros(isa, rng):
    W = rng.standard_normal((10, 5)).astype(np.float32)
    offsets = np.array([0, 0, 2, 2], dtype=np.int64)
    indices = np.array([1, 2], dtype=np.int64)
    for mode in MODES:
        out = ops.embedding_bag(W, indices, offsets, mode=mode)
        assert np.all(out[0] == 0) and np.all(out[2] == 0)


@pytest.mark.parametrize("mode", MODES)
def test_2d_indices(isa, rng, mode):
    W = rng.standard_normal((30, 7)).astype(np.float32)
    idx = rng.integers(0, 30, size=(6, 4))
    out = ops.embedding_bag(W, idx, mode=mode)
    ref = testing.embedding_bag_ref(W, idx, mode=mode)
    testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # L = 0: every bag empty
    assert np.all(ops.embedding_bag(W, np.zeros((3, 0), dtype=np.int64), mode=mode) == 0)


def test_per_sample_weights(isa, rng):
    W = rng.standard_normal((30, 19)).astype(np.float32)
    indices, offsets = random_csr(rng, 13, 30)
    psw = rng.standard_normal(len(indices)).astype(np.float32)
    out = ops.embedding_bag(W, indices, offsets, per_sample_weights=psw)
    ref = testing.embedding_bag_ref(W, indices, offsets, per_sample_weights=psw)
    testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # 2-D form
    idx2 = rng.integers(0, 30, size=(4, 3))
    psw2 = rng.standard_normal((4, 3)).astype(np.float32)
    testing.assert_close(ops.embedding_bag(W, idx2, per_sample_weights=psw2),
                         testing.embedding_bag_ref(W, idx2, per_sample_weights=psw2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_idx", [0, 3, -1])
def test_padding_idx(isa, rng, mode, padding_idx):
    R = 8
    W = rng.standard_normal((R, 6)).astype(np.float32)
    pad = padding_idx % R
    # bag 0: mix; bag 1: all padding; bag 2: empty; bag 3: no padding
    indices = np.array([pad, 1, pad, 2, pad, pad, 4, 5], dtype=np.int64)
    offsets = np.array([0, 4, 6, 6, 8], dtype=np.int64)
    out = ops.embedding_bag(W, indices, offsets, mode=mode, padding_idx=padding_idx)
    ref = testing.embedding_bag_ref(W, indices, offsets, mode=mode, padding_idx=padding_idx)
    testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert np.all(out[1] == 0) and np.all(out[2] == 0)
    if mode == "mean":  # divides by the count of non-padding entries
        testing.assert_close(out[0], (W[1] + W[2]) / 2, rtol=1e-6, atol=1e-6)


def test_non_contiguous_inputs(isa, rng):
    Wbig = rng.standard_normal((40, 20)).astype(np.float32)
    W = Wbig[::2, ::2]  # non-contiguous view
    indices, offsets = random_csr(rng, 9, 20)
    idx_nc = np.repeat(indices, 2)[::2]
    assert not idx_nc.flags.c_contiguous or len(indices) <= 1
    off_nc = np.repeat(offsets, 2)[::2]
    out = ops.embedding_bag(W, idx_nc, off_nc)
    testing.assert_close(out, testing.embedding_bag_ref(np.ascontiguousarray(W), indices, offsets), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # (np.matrix's)
def test_ndarray_subclasses(rng):
    """Masked arrays and np.matrix as ids, offsets or tables: plain arrays, and masked values
    refused (the masked ids and table values were used as data; a matrix of ids was 2-D)."""
    W = rng.standard_normal((10, 4)).astype(np.float32)
    idx = np.array([1, 5, 2], dtype=np.int64)
    off = np.array([0, 2, 3], dtype=np.int64)
    want = ops.embedding_bag(W, idx, off)
    assert np.array_equal(ops.embedding_bag(np.ma.masked_array(W), np.ma.masked_array(idx), off), want)
    assert np.array_equal(ops.embedding_bag(np.asmatrix(W), idx, off), want)
    assert np.array_equal(ops.embedding_bags([np.ma.masked_array(W)], np.ma.masked_array(idx), off), want)
    with pytest.raises(TypeError, match="masked"):
        ops.embedding_bag(W, np.ma.masked_array(idx, mask=[0, 1, 0]), off)
    with pytest.raises(TypeError, match="masked"):
        ops.embedding_bag(np.ma.masked_array(W, mask=W > 1), idx, off)
    with pytest.raises(TypeError, match="masked"):
        ops.embedding_bags([W], np.ma.masked_array(idx, mask=[0, 1, 0]), off)


def test_lists_and_inputs_unchanged(rng):
    W = rng.standard_normal((5, 4)).astype(np.float32)
    W0 = W.copy()
    idx = np.array([0, 4, 2], dtype=np.int64)
    off = np.array([0, 1, 3], dtype=np.int64)
    out = ops.embedding_bag(W, [0, 4, 2], [0, 1, 3])
    testing.assert_close(out, testing.embedding_bag_ref(W, idx, off), rtol=1e-6, atol=1e-6)
    assert np.array_equal(W, W0)


def test_isa_variants_agree(rng):
    """Every ISA variant gives the scalar reference's result to float rounding."""
    from fastrec import _C

    W = rng.standard_normal((500, 97)).astype(np.float32)
    indices, offsets = random_csr(rng, 200, 500, max_len=30)
    before = _C.current_isa()
    results = {}
    try:
        for name in _C.available_isas():
            _C.set_isa(name)
            results[name] = ops.embedding_bag(W, indices, offsets)
    finally:
        _C.set_isa(before)
    for name, out in results.items():
        testing.assert_close(out, results["scalar"], rtol=1e-5, atol=1e-5, err_msg=name)


# ---- torch.nn.EmbeddingBag, the peer a user compares with --------------------------------


def _torch_bag(W, indices, offsets, mode, psw=None, padding_idx=None):
    import torch

    eb = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(np.asarray(W, dtype=np.float32)), mode=mode,
                                               freeze=True, padding_idx=padding_idx)
    with torch.no_grad():
        return eb(torch.from_numpy(np.asarray(indices, dtype=np.int64)),
                  torch.from_numpy(testing.torch_offsets(offsets).astype(np.int64)),
                  per_sample_weights=None if psw is None else torch.from_numpy(psw)).numpy()


@needs_torch
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_matches_torch_embedding_bag(isa, rng, mode, padding_idx):
    W = rng.standard_normal((60, 33)).astype(np.float32)
    indices, offsets = random_csr(rng, 37, 60)
    indices[::3] = 2  # plenty of padding entries when padding_idx == 2
    out = ops.embedding_bag(W, indices, offsets, mode=mode, padding_idx=padding_idx)
    ref = _torch_bag(W, indices, offsets, mode, padding_idx=padding_idx)
    testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_torch
def test_matches_torch_per_sample_weights(isa, rng):
    W = rng.standard_normal((60, 16)).astype(np.float32)
    indices, offsets = random_csr(rng, 21, 60)
    psw = rng.random(len(indices)).astype(np.float32)
    out = ops.embedding_bag(W, indices, offsets, per_sample_weights=psw)
    testing.assert_close(out, _torch_bag(W, indices, offsets, "sum", psw=psw), rtol=1e-5, atol=1e-5)


@needs_torch
def test_accepts_torch_tensors(rng):
    import torch

    W = rng.standard_normal((20, 4)).astype(np.float32)
    indices, offsets = random_csr(rng, 5, 20)
    out = ops.embedding_bag(torch.from_numpy(W), torch.from_numpy(indices), torch.from_numpy(offsets))
    testing.assert_close(out, testing.embedding_bag_ref(W, indices, offsets), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["f32", "f16", "q8", "q4", "q2"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", [3, 64, 130])
def test_careful_path_all_kinds(isa, rng, kind, mode, dim):
    """A padding_idx sends a job down the checked (careful) path; it must agree with the
    oracle for every row format and mode, like the fast path does."""
    from fastrec import QuantizedTable

    W = rng.standard_normal((40, dim)).astype(np.float32)
    table = {"f32": W, "f16": W.astype(np.float16)}.get(kind)
    if table is None:
        table = QuantizedTable.from_float(W, bits=int(kind[1:]))
    indices, offsets = random_csr(rng, 31, 40, max_len=12)
    indices[::4] = 5
    psw = rng.random(len(indices)).astype(np.float32) if mode == "sum" else None
    for pad in (None, 5):
        out = ops.embedding_bag(table, indices, offsets, mode=mode, per_sample_weights=psw, padding_idx=pad)
        ref = testing.embedding_bag_ref(table, indices, offsets, mode=mode, per_sample_weights=psw, padding_idx=pad)
        testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def _assert_every_pooling_matches_oracle(table, indices, offsets, psw, *, atol):
    """sum, weighted sum, mean and max of the bags against the float64 oracle."""
    for mode, w in (("sum", None), ("sum", psw), ("mean", None), ("max", None)):
        out = ops.embedding_bag(table, indices, offsets, mode=mode, per_sample_weights=w)
        ref = testing.embedding_bag_ref(table, indices, offsets, mode=mode, per_sample_weights=w)
        testing.assert_close(out, ref, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("l1_prefetch", [0, 1])
@pytest.mark.parametrize("kind", ["q8", "q4", "q2"])
@pytest.mark.parametrize("dim", [3, 64, 130])
def test_fast_path_with_and_without_l1_prefetch(isa, rng, l1_prefetch, kind, dim):
    """The fast path of quantized rows has two variants, with and without the L1 prefetch
    (the default depends on the CPU vendor); both must agree with the oracle on any CPU,
    including bags longer than the prefetch distances and short final bags."""
    from fastrec import QuantizedTable, _C

    W = rng.standard_normal((3000, dim)).astype(np.float32)
    table = QuantizedTable.from_float(W, bits=int(kind[1:]))
    lengths = np.array([200, 0, 1, 17, 150, 3], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    indices = rng.integers(0, 3000, int(offsets[-1]))
    psw = rng.random(len(indices)).astype(np.float32)
    _C._set_embedding_l1_prefetch(l1_prefetch)
    try:
        assert _C._embedding_l1_prefetch() == bool(l1_prefetch)
        _assert_every_pooling_matches_oracle(table, indices, offsets, psw, atol=1e-4)
    finally:
        _C._set_embedding_l1_prefetch(-1)
    assert _C._embedding_l1_prefetch() == (not _C._cpu_vendor_amd())


@pytest.mark.parametrize("float_l1", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("dim", [3, 64, 130])
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("lengths", [[200, 0, 1, 70, 129, 3], [5, 0, 40], [17000]],
                         ids=["mixed", "fewer-ids-than-either-distance", "one-bag-past-the-id-scratch"])
def test_fast_path_of_float_rows_with_either_prefetch(isa, rng, float_l1, dtype, dim, misaligned, lengths):
    """Float rows' far prefetch goes into L2 128 ids ahead, or into L1 64 ahead (the default on
    AMD Zen 5 and later); both variants must agree with the oracle on any CPU: a job with
    fewer ids than either distance (only the job-start burst prefetches), bags longer and
    shorter than both, an empty bag, one bag of more ids than the per-thread id copy holds
    (its own exactly-sized copy), and rows that start 4 bytes past a cache line."""
    from fastrec import _C

    W = rng.standard_normal((3000, dim)).astype(dtype)
    if misaligned:
        buf = np.empty(W.nbytes + 128, np.uint8)
        start = (-buf.ctypes.data) % 64 + 4
        W2 = buf[start:start + W.nbytes].view(dtype).reshape(W.shape)
        W2[...] = W
        W = W2
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = rng.integers(0, 3000, int(offsets[-1]))
    psw = rng.random(len(indices)).astype(np.float32)
    # float32 sums of 17,000 N(0, 1) values drift from the float64 oracle by ~1e-3
    atol = 1e-4 if max(lengths) < 1000 else 2e-2
    _C._set_embedding_float_l1_prefetch(float_l1)
    try:
        assert _C._embedding_float_l1_prefetch() == bool(float_l1)
        _assert_every_pooling_matches_oracle(W, indices, offsets, psw, atol=atol)
    finally:
        _C._set_embedding_float_l1_prefetch(-1)
    assert _C._embedding_float_l1_prefetch() == (_C._cpu_vendor_amd() and _C._cpu_family() >= 26)


@pytest.mark.parametrize("bits, big, w", [(8, 1e30, 1e10), (4, 6e4, 1e34)])
def test_large_weights_on_wide_quantized_rows(isa, rng, bits, big, w):
    """A per-sample weight times a quantized row's value is finite here, while the weight
    times the row's bias alone is not: every path computes w * (scale*q + bias), so none of
    them returns inf or NaN where the oracle's value is finite."""
    from fastrec import QuantizedTable

    W = np.zeros((5, 70), np.float32)
    W[:, 0], W[:, 1] = -big, big  # bias -big; the other codes' values are smaller
    W[:, 2:] = rng.uniform(-big / 100, big / 100, (5, 68)).astype(np.float32)
    table = QuantizedTable.from_float(W, bits=bits)
    idx = np.array([0, 1, 2, 3, 1], np.int64)
    off = np.array([0, 1, 3, 5], np.int64)
    psw = (np.array([1, 0.2, -0.3, 1, 0.5]) * w).astype(np.float32)
    with np.errstate(over="ignore"):  # columns 0 and 1 do overflow
        ref = testing.embedding_bag_ref(table, idx, off, per_sample_weights=psw)
    assert np.isfinite(ref[:, 2:]).all() and w * big > float(np.finfo(np.float32).max)
    for pad in (None, 4):  # the fast path, and the careful one (a padding_idx; row 4 is unused)
        out = ops.embedding_bag(table, idx, off, per_sample_weights=psw, padding_idx=pad)
        testing.assert_close(out[:, 2:], ref[:, 2:], rtol=1e-4, atol=0)


def test_unusual_but_valid_tables(rng):
    """Zero-width tables, empty tables with no ids, big-endian and read-only arrays."""
    assert ops.embedding_bag(np.zeros((5, 0), np.float32), [1, 2], [0, 2]).shape == (1, 0)
    assert np.all(ops.embedding_bag(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), [0, 0]) == 0)
    W = rng.standard_normal((6, 5)).astype(np.float32)
    idx, off = np.array([1, 5, 2]), np.array([0, 2, 3])
    ref = testing.embedding_bag_ref(W, idx, off)
    testing.assert_close(ops.embedding_bag(W.astype(">f4"), idx, off), ref, rtol=1e-6, atol=1e-6)
    ro = W.copy()
    ro.setflags(write=False)
    testing.assert_close(ops.embedding_bag(ro, idx, off), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(IndexError, match="out of range \\[0, 0\\)"):
        ops.embedding_bag(np.zeros((0, 4), np.float32), [0], [0, 1])


@pytest.mark.parametrize("dim", [1, 7, 16, 70])
@pytest.mark.parametrize("wdtype", [np.float32, np.float16])
def test_max_ignores_nan_on_every_path(isa, rng, dim, wdtype):
    """Max pooling ignores NaN table values like np.fmax (a column NaN in every row of a bag
    gives -inf), in whatever order the rows come and on the fast and the careful path alike;
    sum propagates them."""
    W = rng.standard_normal((12, dim)).astype(wdtype)
    W[1, :] = np.nan
    W[3, dim // 2] = np.nan
    idx = np.array([0, 1, 2, 2, 1, 0, 1, 3, 1, 1, 4, 5], np.int64)
    off = np.array([0, 3, 6, 8, 10, 10, 12], np.int64)  # bags: NaN first, last, mixed, all NaN, empty
    expect = testing.embedding_bag_ref(W, idx, off, mode="max")
    assert np.isneginf(expect[3]).all() and not np.isnan(expect).any()
    for padding_idx in (None, 5):  # 5 sends the job down the careful path
        out = ops.embedding_bag(W, idx, off, mode="max", padding_idx=padding_idx)
        ref = expect if padding_idx is None else testing.embedding_bag_ref(W, idx, off, mode="max", padding_idx=5)
        np.testing.assert_array_equal(out, ref.astype(np.float32))
    assert np.isnan(ops.embedding_bag(W, idx, off, mode="sum")[0]).all()
