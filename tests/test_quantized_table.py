"""QuantizedTable: FBGEMM byte compatibility, TBE layout, and pooling over quantized rows."""

import numpy as np
import pytest

from fastrec import QuantizedTable, ops, testing
from conftest import needs_torch, random_csr

BITS = [8, 4, 2]


def _prepack(bits):
    import torch

    q = torch.ops.quantized
    return {8: q.embedding_bag_byte_prepack, 4: q.embedding_bag_4bit_prepack, 2: q.embedding_bag_2bit_prepack}[bits]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dim", [1, 3, 8, 64, 97])
def test_roundtrip_and_error_bound(rng, bits, dim):
    W = rng.standard_normal((77, dim)).astype(np.float32)
    qt = QuantizedTable.from_float(W, bits=bits)
    assert (qt.bits, qt.num_rows, qt.dim) == (bits, 77, dim)
    deq = qt.dequantize()
    assert deq.shape == W.shape and deq.dtype == np.float32
    # Row-wise: error at most half a step (plus fp16 rounding of scale/bias for 4/2-bit).
    step = (W.max(1) - W.min(1)) / ((1 << bits) - 1)
    slack = 0.5 if bits == 8 else 0.5 + 2 ** -9 * (1 << bits)
    err = np.abs(deq - W).max(1)
    assert np.all(err <= step * slack + 1e-3 * np.abs(W).max(1) * (bits != 8) + 1e-6)
    # Bytes per row: D + 8 for 8-bit, ceil(D * bits / 8) + 4 otherwise.
    per_row = dim + 8 if bits == 8 else -(-dim * bits // 8) + 4
    assert qt.nbytes == 77 * per_row
    assert qt.to_fbgemm().shape == (77, per_row)


@pytest.mark.parametrize("bits", BITS)
def test_from_fbgemm_roundtrip(rng, bits):
    W = rng.standard_normal((20, 16)).astype(np.float32)
    qt = QuantizedTable.from_float(W, bits=bits)
    packed = qt.to_fbgemm()
    qt2 = QuantizedTable.from_fbgemm(packed, bits)
    assert qt2.dim == 16
    assert np.array_equal(qt2.to_fbgemm(), packed)
    assert np.array_equal(qt2.dequantize(), qt.dequantize())


def _to_tbe(packed, bits, dim, pad_to=1):
    """FBGEMM CPU layout -> TBE inference layout (fp16 scale/bias first, rows padded)."""
    cb = -(-dim * bits // 8)
    codes = packed[:, :cb]
    if bits == 8:
        qp = packed[:, cb:cb + 8].copy().view(np.float32).astype(np.float16).view(np.uint8)
    else:
        qp = packed[:, cb:cb + 4]
    row = np.concatenate([qp, codes], axis=1)
    width = -(-row.shape[1] // pad_to) * pad_to
    out = np.zeros((packed.shape[0], width), dtype=np.uint8)
    out[:, :row.shape[1]] = row
    return out


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("pad_to", [1, 16])
def test_tbe_layout(isa, rng, bits, pad_to):
    dim = 24
    W = rng.standard_normal((40, dim)).astype(np.float32)
    fb = QuantizedTable.from_float(W, bits=bits)
    tbe = _to_tbe(fb.to_fbgemm(), bits, dim, pad_to)
    qt = QuantizedTable.from_fbgemm(tbe, bits, layout="tbe", dim=dim)
    assert qt.layout == "tbe" and qt.dim == dim
    indices, offsets = random_csr(rng, 17, 40)
    out = ops.embedding_bag(qt, indices, offsets)
    ref = testing.embedding_bag_ref(qt, indices, offsets)
    testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    if bits != 8:  # same fp16 qparams: identical to the fbgemm-layout table
        assert np.array_equal(qt.to_fbgemm(), fb.to_fbgemm())
        testing.assert_close(out, ops.embedding_bag(fb, indices, offsets), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("dim", [1, 3, 16, 64, 97, 130])
def test_pooling_matches_oracle(isa, rng, bits, mode, dim):
    W = rng.standard_normal((64, dim)).astype(np.float32)
    qt = QuantizedTable.from_float(W, bits=bits)
    indices, offsets = random_csr(rng, 29, 64)
    psw = rng.random(len(indices)).astype(np.float32) if mode == "sum" else None
    out = ops.embedding_bag(qt, indices, offsets, mode=mode, per_sample_weights=psw)
    ref = testing.embedding_bag_ref(qt, indices, offsets, mode=mode, per_sample_weights=psw)
    testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_padding_idx_quantized(isa, rng):
    W = rng.standard_normal((10, 12)).astype(np.float32)
    qt = QuantizedTable.from_float(W, bits=4)
    indices = np.array([0, 3, 0, 0, 5], dtype=np.int64)
    offsets = np.array([0, 2, 4, 5], dtype=np.int64)
    out = ops.embedding_bag(qt, indices, offsets, mode="mean", padding_idx=0)
    testing.assert_close(out, testing.embedding_bag_ref(qt, indices, offsets, mode="mean", padding_idx=0),
                         rtol=1e-6, atol=1e-6)


def test_constant_and_extreme_rows(isa, rng):
    W = np.zeros((4, 10), dtype=np.float32)
    W[1] = 3.5
    W[2] = rng.standard_normal(10) * 1e4
    W[3] = rng.standard_normal(10) * 1e-6
    for bits in BITS:
        qt = QuantizedTable.from_float(W, bits=bits)
        out = ops.embedding_bag(qt, np.arange(4), np.arange(5))
        testing.assert_close(out, qt.dequantize(), rtol=1e-6, atol=1e-6)
        assert np.all(np.isfinite(out))


def test_rows_whose_scale_or_bias_cannot_be_stored():
    # 4/2-bit rows keep fp16 scale and bias; 8-bit rows a float32 range. Beyond them the scale
    # came out inf and the row dequantized to NaN; now from_float refuses the row.
    W = np.zeros((3, 8), dtype=np.float32)
    W[1, 0] = 7e4  # min 0, (max - min) / 15 fits fp16: fine at every width
    for bits in BITS:
        assert np.isfinite(QuantizedTable.from_float(W, bits=bits).dequantize()).all()
    W[2] = -7e4  # a min beyond fp16
    for bits in (4, 2):
        with pytest.raises(ValueError, match="row 2 .*float16"):
            QuantizedTable.from_float(W, bits=bits)
    assert np.isfinite(QuantizedTable.from_float(W, bits=8).dequantize()).all()
    W[2, :2] = [3e38, -3e38]  # max - min overflows float32
    with pytest.raises(ValueError, match="row 2 .*overflows float32"):
        QuantizedTable.from_float(W, bits=8)


# ---- byte compatibility and results against torch's FBGEMM ops ---------------------------


@needs_torch
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dim", [4, 8, 36, 64, 128])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 100.0])
def test_bytes_equal_torch_prepack(rng, bits, dim, scale):
    import torch

    W = (rng.standard_normal((200, dim)) * scale).astype(np.float32)
    W[0] = 0.25  # a constant row
    ours = QuantizedTable.from_float(W, bits=bits).to_fbgemm()
    theirs = _prepack(bits)(torch.from_numpy(W)).numpy()
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


@needs_torch
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_pooling_matches_torch_quantized_ops(isa, rng, bits, weighted):
    # torch's quantized embedding-bag ops pool with "sum" (their mode argument does not scale
    # for "mean"), so sum is what is compared here; mean and max are checked against the oracle.
    import torch

    W = rng.standard_normal((300, 64)).astype(np.float32)
    packed = _prepack(bits)(torch.from_numpy(W))
    qt = QuantizedTable.from_fbgemm(packed, bits)
    indices, offsets = random_csr(rng, 50, 300, max_len=20)
    psw = rng.random(len(indices)).astype(np.float32) if weighted else None
    fn = torch.ops.quantized.embedding_bag_byte_rowwise_offsets if bits == 8 else \
        torch.ops.quantized.embedding_bag_4bit_rowwise_offsets
    ref = fn(packed, torch.from_numpy(indices), torch.from_numpy(offsets), False, 0, False,
             None if psw is None else torch.from_numpy(psw), None, True).numpy()
    out = ops.embedding_bag(qt, indices, offsets, per_sample_weights=psw)
    testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    oracle = testing.embedding_bag_ref(qt, indices, offsets, per_sample_weights=psw)
    testing.assert_no_worse_than(out, ref, oracle, factor=2.0, atol=1e-6)


@needs_torch
def test_from_fbgemm_accepts_tensor_without_copy(rng):
    import torch

    W = rng.standard_normal((10, 8)).astype(np.float32)
    packed = torch.ops.quantized.embedding_bag_byte_prepack(torch.from_numpy(W))
    qt = QuantizedTable.from_fbgemm(packed, 8)
    assert qt.dim == 8 and qt.num_rows == 10
    assert np.shares_memory(qt.data, packed.numpy())
