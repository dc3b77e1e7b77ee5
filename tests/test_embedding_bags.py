"""fastrec.ops.embedding_bags: many tables (mixed precisions and dims) in one call."""

import numpy as np
import pytest

import fastrec
from fastrec import QuantizedTable, ops, testing
from conftest import needs_torch


def _kjt(rng, T, B, rows, max_len=6, dtype=np.int64):
    lengths = rng.integers(0, max_len + 1, size=T * B)
    offsets = np.zeros(T * B + 1, dtype=dtype)
    offsets[1:] = np.cumsum(lengths)
    indices = np.empty(int(offsets[-1]), dtype=dtype)
    for t in range(T):
        lo, hi = offsets[t * B], offsets[(t + 1) * B]
        indices[lo:hi] = rng.integers(0, rows[t], size=hi - lo)
    return indices, offsets


def _mixed_tables(rng):
    dims = [8, 3, 64, 97, 16, 5]
    rows = [50, 20, 300, 40, 10, 7]
    W = [rng.standard_normal((r, d)).astype(np.float32) for r, d in zip(rows, dims)]
    tables = [W[0], W[1].astype(np.float16), QuantizedTable.from_float(W[2], 8),
              QuantizedTable.from_float(W[3], 4), QuantizedTable.from_float(W[4], 2), W[5]]
    return tables, rows, dims


@pytest.mark.parametrize("B", [0, 1, 3, 97, 1024])
def test_mixed_tables_match_oracle(isa, rng, B):
    tables, rows, dims = _mixed_tables(rng)
    indices, offsets = _kjt(rng, len(tables), B, rows)
    out = ops.embedding_bags(tables, indices, offsets)
    assert out.shape == (B, sum(dims))
    ref = testing.embedding_bags_ref(tables, indices, offsets)
    testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_per_table_modes_and_weights(isa, rng):
    tables, rows, dims = _mixed_tables(rng)
    T, B = len(tables), 33
    indices, offsets = _kjt(rng, T, B, rows)
    modes = ["sum", "mean", "max", "mean", "max", "sum"]
    out = ops.embedding_bags(tables, indices, offsets, modes=modes)
    testing.assert_close(out, testing.embedding_bags_ref(tables, indices, offsets, modes=modes), rtol=1e-5, atol=1e-4)
    psw = rng.random(len(indices)).astype(np.float32)
    out = ops.embedding_bags(tables, indices, offsets, per_sample_weights=psw)
    testing.assert_close(out, testing.embedding_bags_ref(tables, indices, offsets, per_sample_weights=psw),
                         rtol=1e-5, atol=1e-4)


def test_equals_per_table_calls(rng):
    tables, rows, dims = _mixed_tables(rng)
    T, B = len(tables), 57
    indices, offsets = _kjt(rng, T, B, rows, dtype=np.int32)
    out = ops.embedding_bags(tables, indices, offsets, modes="mean")
    col = 0
    for t in range(T):
        off = offsets[t * B:(t + 1) * B + 1]
        one = ops.embedding_bag(tables[t], indices[off[0]:off[-1]], off - off[0], mode="mean")
        assert np.array_equal(out[:, col:col + dims[t]], one)
        col += dims[t]


def test_many_tables_large_parallel(isa, rng):
    T, B, R, D = 26, 700, 1000, 64
    W = [rng.standard_normal((R, D)).astype(np.float32) for _ in range(T)]
    indices, offsets = _kjt(rng, T, B, [R] * T, max_len=12)
    out = ops.embedding_bags(W, indices, offsets)
    testing.assert_close(out, testing.embedding_bags_ref(W, indices, offsets), rtol=1e-5, atol=1e-4)


def test_jobs_copy_their_ids_in_runs(isa, rng):
    """A job's ids are copied and checked in runs of at most 16,384 (the per-thread scratch
    stays that small); one bag of more ids gets its own copy. Bags on both sides of a run's
    limit, a bag longer than a run, every mode and table kind, and a bad id in a late run."""
    tables, rows, dims = _mixed_tables(rng)
    T = len(tables)
    lengths = np.array([2000, 3000, 0, 16_384, 16_385, 1, 17_000, 1500, 2500])
    B = len(lengths)
    offsets = np.zeros(T * B + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.tile(lengths, T))
    indices = np.concatenate([rng.integers(0, rows[t], size=int(lengths.sum())) for t in range(T)])
    psw = rng.random(len(indices)).astype(np.float32)
    for kw in ({"modes": "sum"}, {"modes": "mean"}, {"modes": "max"}, {"per_sample_weights": psw}):
        out = ops.embedding_bags(tables, indices, offsets, **kw)
        if "modes" in kw and kw["modes"] == "sum":  # int32 ids: the same runs
            assert np.array_equal(ops.embedding_bags(tables, indices.astype(np.int32), offsets.astype(np.int32)), out)
        # (float32 sums over bags of up to 17,000 rows: rounding grows with the length)
        testing.assert_close(out, testing.embedding_bags_ref(tables, indices, offsets, **kw), rtol=2e-3, atol=5e-2)
    bad = indices.copy()
    pos = int(offsets[2 * B + 6]) + 16_900  # in table 2's 17,000-id bag, past its first run
    bad[pos] = rows[2]
    with pytest.raises(IndexError, match=f"position {pos}"):
        ops.embedding_bags(tables, bad, offsets)


@needs_torch
def test_matches_torch_modules(rng):
    """What a torch user would do: one EmbeddingBag per table, concatenated."""
    import torch

    T, B = 4, 20
    rows, dims = [30, 40, 50, 60], [8, 16, 4, 32]
    W = [rng.standard_normal((r, d)).astype(np.float32) for r, d in zip(rows, dims)]
    indices, offsets = _kjt(rng, T, B, rows)
    out = ops.embedding_bags(W, indices, offsets)
    blocks = []
    with torch.no_grad():
        for t in range(T):
            off = offsets[t * B:(t + 1) * B + 1]
            eb = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(W[t]), mode="sum")
            blocks.append(eb(torch.from_numpy(indices[off[0]:off[-1]]), torch.from_numpy(off[:-1] - off[0])).numpy())
    testing.assert_close(out, np.concatenate(blocks, axis=1), rtol=1e-5, atol=1e-5)


def test_per_table_padding_idx(isa, rng):
    tables, rows, dims = _mixed_tables(rng)
    T, B = len(tables), 29
    indices, offsets = _kjt(rng, T, B, rows)
    pads = [1, None, -1, 0, None, 2]
    for t, p in enumerate(pads):  # make padding entries common
        if p is not None:
            lo, hi = offsets[t * B], offsets[(t + 1) * B]
            indices[lo:hi:3] = p % rows[t]
    for modes in ("sum", "mean", ["max", "mean", "sum", "max", "sum", "mean"]):
        out = ops.embedding_bags(tables, indices, offsets, modes=modes, padding_idx=pads)
        col = 0
        ms = [modes] * T if isinstance(modes, str) else modes
        for t in range(T):
            off = offsets[t * B:(t + 1) * B + 1]
            ref = testing.embedding_bag_ref(tables[t], indices[off[0]:off[-1]], off - off[0], mode=ms[t],
                                            padding_idx=pads[t])
            testing.assert_close(out[:, col:col + dims[t]], ref, rtol=1e-5, atol=1e-4)
            col += dims[t]


def test_per_table_padding_idx_errors(rng):
    tables, rows, dims = _mixed_tables(rng)
    indices, offsets = _kjt(rng, len(tables), 3, rows)
    with pytest.raises(ValueError, match="one entry per table"):
        ops.embedding_bags(tables, indices, offsets, padding_idx=[0])
    with pytest.raises(TypeError, match="one entry"):
        ops.embedding_bags(tables, indices, offsets, padding_idx=0)
    with pytest.raises(ValueError, match="padding_idx must be within"):
        ops.embedding_bags(tables, indices, offsets, padding_idx=[999, None, None, None, None, None])


def test_offsets_are_required():
    t = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="offsets is required"):  # (was a TypeError about dtype object)
        ops.embedding_bags([t], np.zeros((2, 1), np.int64), None)


def test_dims_adding_up_past_int64_are_refused():
    # 0-row tables cost no memory, so their dims could sum past 2**63 and wrap to a small
    # width: the output was allocated (B, 1) and the kernel wrote past it (a segfault).
    huge = np.empty((0, 2**62 - 1), np.float16)
    small = np.ones((3, 5), np.float32)
    with pytest.raises(ValueError, match="dims add up"):
        ops.embedding_bags([huge, huge, huge, huge, small], np.zeros(0, np.int64), np.zeros(6, np.int64))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8])
@pytest.mark.parametrize("alignment", [1, 64, 4096])
def test_aligned_tables(rng, dtype, alignment):
    a = fastrec.aligned_empty((1000, 64), dtype, alignment=alignment)
    assert a.shape == (1000, 64) and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % alignment == 0
    w = rng.standard_normal((50, 8)).astype(np.float32)
    c = fastrec.aligned_copy(w)
    assert c.ctypes.data % 64 == 0 and np.array_equal(c, w)
    ind = rng.integers(0, 50, 40)
    off = np.arange(0, 41, 4)
    assert np.array_equal(ops.embedding_bags([c], ind, off), ops.embedding_bags([w], ind, off))
    assert fastrec.aligned_empty(0).shape == (0,)
    for bad in (0, 3, 48, -64):
        with pytest.raises(ValueError, match="power of two"):
            fastrec.aligned_empty(4, alignment=bad)
    for bad in (True, 2.0, "64"):
        with pytest.raises(TypeError, match="alignment"):
            fastrec.aligned_empty(4, alignment=bad)
    with pytest.raises(ValueError, match="negative"):
        fastrec.aligned_empty((-1, 4))
