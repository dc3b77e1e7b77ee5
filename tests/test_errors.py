"""Every documented bad input raises the documented exception, and nothing crashes."""

import numpy as np
import pytest

import fastrec
from fastrec import QuantizedTable, _C, ops

W = np.arange(40, dtype=np.float32).reshape(10, 4)
IDX = np.array([1, 2, 3], dtype=np.int64)
OFF = np.array([0, 1, 3], dtype=np.int64)


@pytest.mark.parametrize("bad", [11, 10, -1, -100, 2**40])
def test_out_of_range_index(isa, bad):
    idx = np.array([1, 2, bad, 4, 5], dtype=np.int64)
    with pytest.raises(IndexError, match=rf"index {bad} at position 2"):
        ops.embedding_bag(W, idx, np.array([0, 2, 5]))


def test_out_of_range_reports_first_position(isa):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 10, size=50_000)
    idx[31_337] = 99
    idx[40_000] = -7
    off = np.arange(0, 50_001, 50)
    with pytest.raises(IndexError, match=r"index 99 at position 31337"):
        ops.embedding_bag(W, idx, off)


def test_out_of_range_int32_and_quantized(isa):
    qt = QuantizedTable.from_float(W, bits=4)
    with pytest.raises(IndexError, match="position 1"):
        ops.embedding_bag(qt, np.array([0, 10], dtype=np.int32), np.array([0, 2], dtype=np.int32))


def test_out_of_range_multi_table_names_table():
    idx = np.array([0, 1, 2, 30], dtype=np.int64)
    off = np.array([0, 2, 4], dtype=np.int64)
    with pytest.raises(IndexError, match=r"position 3 \(table 1"):
        ops.embedding_bags([W, W], idx, off)


@pytest.mark.parametrize("offsets, msg", [
    ([1, 1, 3], "offsets\\[0\\] must be 0"),
    ([0, 2, 1, 3], "non-decreasing"),
    ([0, 1, 2], "must equal len\\(indices\\)"),
    ([0, 1, 4], "must equal len\\(indices\\)"),
    ([], "length B \\+ 1"),
])
def test_bad_offsets(offsets, msg):
    with pytest.raises(ValueError, match=msg):
        ops.embedding_bag(W, IDX, np.array(offsets, dtype=np.int64))


def test_bad_offsets_length_multi_table():
    with pytest.raises(ValueError, match="T\\*B \\+ 1"):
        ops.embedding_bags([W, W], IDX, np.array([0, 1, 2, 3], dtype=np.int64))


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.uint8, np.int8])
def test_wrong_weight_dtype(dtype):
    with pytest.raises(TypeError, match="float32 or float16"):
        ops.embedding_bag(W.astype(dtype), IDX, OFF)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint32, np.int16, np.uint64])
def test_wrong_index_dtype(dtype):
    with pytest.raises(TypeError, match="indices must be int32 or int64"):
        ops.embedding_bag(W, IDX.astype(dtype), OFF)
    with pytest.raises(TypeError, match="offsets must be int32 or int64"):
        ops.embedding_bag(W, IDX, OFF.astype(dtype))


def test_wrong_shapes():
    with pytest.raises(ValueError, match="2-D"):
        ops.embedding_bag(W[0], IDX, OFF)
    with pytest.raises(ValueError, match="2-D"):
        ops.embedding_bag(W.reshape(2, 5, 4), IDX, OFF)
    with pytest.raises(ValueError, match="indices must be 1-D"):
        ops.embedding_bag(W, IDX.reshape(3, 1), OFF)
    with pytest.raises(ValueError, match="indices must be 2-D"):
        ops.embedding_bag(W, IDX)
    with pytest.raises(ValueError, match="offsets must be 1-D"):
        ops.embedding_bag(W, IDX, OFF.reshape(3, 1))


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        ops.embedding_bag(W, IDX, OFF, mode="median")
    with pytest.raises(ValueError, match="modes"):
        ops.embedding_bags([W, W], IDX, np.array([0, 1, 2, 2, 3]), modes=["sum"])


def test_per_sample_weights_errors():
    psw = np.ones(3, dtype=np.float32)
    for mode in ("mean", "max"):
        with pytest.raises(ValueError, match="only supported with mode 'sum'"):
            ops.embedding_bag(W, IDX, OFF, mode=mode, per_sample_weights=psw)
    with pytest.raises(ValueError, match="one weight per index"):
        ops.embedding_bag(W, IDX, OFF, per_sample_weights=np.ones(2, dtype=np.float32))
    with pytest.raises(TypeError, match="float32"):
        ops.embedding_bag(W, IDX, OFF, per_sample_weights=np.ones(3, dtype=np.float64))
    # Shaped like the indices or 1-D: other shapes with the right count are refused, not
    # paired with the ids in flattened order.
    with pytest.raises(ValueError, match="one weight per index"):
        ops.embedding_bag(W, IDX, OFF, per_sample_weights=np.ones((1, 3), dtype=np.float32))
    ids2d = np.array([[0, 1, 2], [3, 4, 0]])
    w2d = np.arange(6, dtype=np.float32).reshape(2, 3)
    with pytest.raises(ValueError, match=r"shape \(6,\) or \(2, 3\)"):
        ops.embedding_bag(W, ids2d, per_sample_weights=w2d.reshape(3, 2))
    np.testing.assert_array_equal(ops.embedding_bag(W, ids2d, per_sample_weights=w2d),
                                  ops.embedding_bag(W, ids2d, per_sample_weights=w2d.reshape(-1)))
    with pytest.raises(ValueError, match="every mode"):
        ops.embedding_bags([W], IDX, OFF, modes=["max"], per_sample_weights=psw)


def test_padding_idx_errors():
    with pytest.raises(ValueError, match="padding_idx"):
        ops.embedding_bag(W, IDX, OFF, padding_idx=10)
    with pytest.raises(ValueError, match="padding_idx"):
        ops.embedding_bag(W, IDX, OFF, padding_idx=-11)
    with pytest.raises(TypeError, match="padding_idx"):
        ops.embedding_bag(W, IDX, OFF, padding_idx=1.0)


def test_tables_argument_errors():
    with pytest.raises(TypeError, match="list or tuple"):
        ops.embedding_bags(W, IDX, OFF)
    with pytest.raises(ValueError, match="must not be empty"):
        ops.embedding_bags([], IDX, OFF)
    with pytest.raises(TypeError, match="numpy array or a fastrec.QuantizedTable"):
        ops.embedding_bags(["not a table"], IDX, OFF)


def test_quantized_table_errors():
    with pytest.raises(ValueError, match="bits"):
        QuantizedTable.from_float(W, bits=3)
    with pytest.raises(TypeError, match="floating-point"):
        QuantizedTable.from_float(W.astype(np.int64))
    with pytest.raises(ValueError, match="2-D"):
        QuantizedTable.from_float(W[0])
    bad = W.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        QuantizedTable.from_float(bad)
    with pytest.raises(TypeError, match="uint8"):
        QuantizedTable.from_fbgemm(np.zeros((3, 12), dtype=np.int8), 8)
    with pytest.raises(ValueError, match="too short"):
        QuantizedTable.from_fbgemm(np.zeros((3, 12), dtype=np.uint8), 8, dim=8)
    for dim in (2**63 - 1, 2**62, 5):  # 5 at 8 bits: no overflow, but rows of 12 bytes hold 4
        with pytest.raises(ValueError, match="too short"):
            QuantizedTable.from_fbgemm(np.zeros((3, 12), dtype=np.uint8), 4 if dim > 5 else 8, dim=dim)
    with pytest.raises(ValueError, match="too short"):  # the constructor checks too, before any overflow
        QuantizedTable(np.zeros((3, 12), dtype=np.uint8), 4, 2**63 - 1)
    # FBGEMM rows keep scale and bias right after the codes: a smaller dim would read them from
    # inside the codes. Only TBE rows may be padded.
    packed = QuantizedTable.from_float(W, 8).to_fbgemm()
    for make in (lambda: QuantizedTable.from_fbgemm(packed, 8, dim=W.shape[1] - 1),
                 lambda: QuantizedTable(packed, 8, W.shape[1] - 1)):
        with pytest.raises(ValueError, match="only layout 'tbe' rows may be padded"):
            make()
    q4 = QuantizedTable.from_float(np.ones((2, 5), np.float32), 4).to_fbgemm()  # 3 code bytes + 4
    assert QuantizedTable.from_fbgemm(q4, 4, dim=5).dim == 5 and QuantizedTable.from_fbgemm(q4, 4).dim == 6
    with pytest.raises(ValueError, match="hold no values"):
        QuantizedTable.from_fbgemm(np.zeros((3, 8), dtype=np.uint8), 8)
    with pytest.raises(ValueError, match="layout"):
        QuantizedTable.from_fbgemm(np.zeros((3, 12), dtype=np.uint8), 8, layout="gpu")
    with pytest.raises(ValueError, match="2-D"):
        QuantizedTable.from_fbgemm(np.zeros(12, dtype=np.uint8), 8)


def test_failed_call_leaves_inputs_unchanged():
    w = W.copy()
    idx = np.array([1, 99], dtype=np.int64)
    off = np.array([0, 2], dtype=np.int64)
    with pytest.raises(IndexError):
        ops.embedding_bag(w, idx, off)
    assert np.array_equal(w, W) and idx.tolist() == [1, 99] and off.tolist() == [0, 2]


def test_objects_whose_init_never_ran_raise_instead_of_crashing():
    # cls.__new__(cls) without __init__: pybind11 would hand out unconstructed storage.
    from fastrec import _C

    t = QuantizedTable.__new__(QuantizedTable)
    for attr in ("data", "bits", "dim", "num_rows", "layout", "row_stride"):
        with pytest.raises(TypeError, match="not initialised"):
            getattr(t, attr)
    with pytest.raises(TypeError, match="not initialised"):
        ops.embedding_bags([t], np.array([0]), np.array([0, 1]))
    layer = _C.Int8LayerCore.__new__(_C.Int8LayerCore)
    x = np.ones((2, 3), np.float32)
    for call in (lambda: layer.in_features, lambda: _C.int8_linear(x, layer, 0),
                 lambda: _C.int8_linear_int32(x.astype(np.int8), layer)):
        with pytest.raises(TypeError, match="not initialised"):
            call()
    with pytest.raises(TypeError, match="None"):
        _C.int8_mlp(x, [None], [0])
    with pytest.raises(TypeError, match="not initialised"):  # inside a list too (was a RuntimeError)
        _C.int8_mlp(x, [layer], [0])
    block = _C.ItemBlock.__new__(_C.ItemBlock)
    for call in (lambda: block.to_float(), lambda: block.nbytes, lambda: block.precision, lambda: len(block),
                 lambda: _C.topk_search([block], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)],
                                        np.ones((1, 4), np.float32), 1, 1, False)):
        with pytest.raises(TypeError, match="not initialised"):
            call()
    with pytest.raises(TypeError, match="expected a Int8LayerCore"):
        _C.int8_linear(x, 5, 0)


def test_reinitialising_a_quantized_table_is_refused(rng):
    # pybind11 ignores a second __init__: the call used to return quietly, the table unchanged
    W = rng.standard_normal((10, 8)).astype(np.float32)
    t = QuantizedTable.from_float(W, bits=8)
    other = QuantizedTable.from_float(np.zeros((5, 8), np.float32), bits=4)
    before = t.data.copy()
    with pytest.raises(TypeError, match="already initialised"):
        t.__init__(other.data, 4, 8)
    assert (t.bits, t.num_rows, t.dim) == (8, 10, 8) and np.array_equal(t.data, before)
    fresh = QuantizedTable.__new__(QuantizedTable)  # a first __init__ on a bare instance still works
    fresh.__init__(other.data, 4, 8)
    assert (fresh.bits, fresh.num_rows) == (4, 5)


def test_reinitialising_a_device_quantized_table_is_refused(rng, monkeypatch):
    # The device table's __init__ set its device rows even though the C++ side ignored the
    # second __init__: new rows read with the old row format. Checked without a GPU: the
    # device-array view is stubbed with the host array.
    from types import SimpleNamespace

    from fastrec import _cuda_embedding

    monkeypatch.setattr(_cuda_embedding, "device_view",
                        lambda x, name: SimpleNamespace(dtype=x.dtype, shape=x.shape, obj=x, device=0,
                                                        ptr=x.ctypes.data))
    a = QuantizedTable.from_float(rng.standard_normal((10, 8)).astype(np.float32), bits=8).data
    b = QuantizedTable.from_float(rng.standard_normal((1000, 64)).astype(np.float32), bits=4).data
    t = _cuda_embedding.DeviceQuantizedTable(a, 8, 8)
    with pytest.raises(TypeError, match="DeviceQuantizedTable is already initialised"):
        t.__init__(b, 4, 64)
    assert (t.bits, t.dim, t.num_rows) == (8, 8, 10) and t.data is a
    assert t._head == (a.ctypes.data, 10, 8, a.shape[1], 2, False)  # what the launcher gets: a's rows, 8-bit


def test_internal_entry_points_check_their_arguments(rng):
    # fastrec's Python layer never makes these calls; _C must still refuse them cleanly
    t = np.ones((5, 4), np.float32)
    with pytest.raises(ValueError, match="one mode per table"):  # (read past the modes list)
        _C.embedding_bags([t, t], np.array([1, 2]), np.array([0, 1, 2]), [0], np.ones(2, np.float32), [-1, -1])
    with pytest.raises(ValueError, match="emb must be"):  # (T * (T + 1) overflowed int64)
        _C.dot_interaction(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), 2**32)
    # an int8 block next to a float one in one search (the float scoring tile had been freed)
    items = rng.standard_normal((40, 16)).astype(np.float32)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    blocks = [_C.ItemBlock(items[:20], 0, True), _C.ItemBlock(items[20:], 2, True)]
    ids = [np.arange(20, dtype=np.int64), np.arange(20, 40, dtype=np.int64)]
    s, i = _C.topk_search(blocks, ids, [None, None], q, 3, 40, True, None, None)
    want = np.argsort(-(q.astype(np.float64) @ items.T.astype(np.float64)), axis=1, kind="stable")[:, :3]
    assert np.array_equal(i, want)
    # an empty block is accepted at every precision (int8 used to say "an int8 layer needs N >= 1")
    for code in (0, 1, 2):
        empty = _C.ItemBlock(np.zeros((0, 16), np.float32), code, True)
        assert len(empty) == 0
        s, i = _C.topk_search([empty, blocks[1]], [np.zeros(0, np.int64), ids[1]], [None, None], q, 3, 40, True,
                              None, None)
        assert np.array_equal(i, 20 + np.argsort(-(q.astype(np.float64) @ items[20:].T.astype(np.float64)), axis=1,
                                                 kind="stable")[:, :3])


def test_misaligned_inputs_are_copied_not_read_in_place(rng, monkeypatch):
    # A C-contiguous view at an odd byte offset is misaligned: reading it as int64 / float32 in
    # place is undefined behaviour (UBSan flagged it; x86 itself does not fault), so such inputs
    # are copied first, through np.require, which this test counts: aligned inputs must not be
    # copied (the hot path), misaligned ones must. Results match aligned ones.
    calls = []
    real_require = np.require

    def counting_require(*args, **kwargs):
        calls.append(args[0].ctypes.data % 8)
        return real_require(*args, **kwargs)

    monkeypatch.setattr(np, "require", counting_require)
    def misaligned(a):
        buf = np.zeros(a.nbytes + 1, np.uint8)
        out = np.ndarray(a.shape, a.dtype, buffer=buf, offset=1)
        out[...] = a
        assert not out.flags.aligned and out.flags.c_contiguous
        return out

    W = rng.standard_normal((50, 8)).astype(np.float32)
    idx = rng.integers(0, 50, 30)
    off = np.array([0, 10, 30])
    want = ops.embedding_bag(W, idx, off)
    lin = fastrec.Int8Linear.from_float(rng.standard_normal((3, 8)).astype(np.float32))
    x = rng.standard_normal((4, 8)).astype(np.float32)
    want_lin = lin(x)
    assert calls == []  # aligned inputs: no copy
    assert np.array_equal(ops.embedding_bag(misaligned(W), misaligned(idx), misaligned(off)), want)
    assert len(calls) == 3 and all(a % 4 for a in calls)
    assert np.array_equal(lin(misaligned(x)), want_lin)
    assert len(calls) == 4


def test_byte_swapped_ids_offsets_and_weights_are_converted(rng):
    # tables in non-native byte order were already converted; ids, offsets and weights were
    # refused ("indices must be int32 or int64, got >i8") though they hold int64 values
    idx = rng.integers(0, 10, 6)
    off = np.array([0, 2, 6])
    w = rng.standard_normal(6).astype(np.float32)
    want = ops.embedding_bag(W, idx, off, per_sample_weights=w)
    for dt in (">i8", ">i4"):
        got = ops.embedding_bag(W, idx.astype(dt), off.astype(dt), per_sample_weights=w.astype(">f4"))
        assert np.array_equal(got, want)
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.embedding_bag(W, idx.astype(">u8"), off)


def test_inputs_are_read_alike_across_entry_points():
    """Findings of an input-consistency audit of the public API: each failed before (a garbage
    message, a wrong exception type, a silently truncated value, or a refused valid input)."""
    torch = pytest.importorskip("torch")
    X = np.eye(4, dtype=np.float32)
    index = fastrec.ItemIndex(X, precision="fp32")
    # an (ids, offsets) exclude of torch tensors (np.size of a tensor is its .size method)
    got = index.search(X[:2], 2, exclude=(torch.tensor([0, 1]), torch.tensor([0, 1, 2])))[1]
    assert np.array_equal(got, index.search(X[:2], 2, exclude=[[0], [1]])[1])
    # object arrays of in-range ints (pandas' nullable Int64 gives them) are ids
    assert fastrec.ItemIndex(X[:2], ids=np.array([1, 2], dtype=object)).ids.tolist() == [1, 2]
    with pytest.raises(ValueError, match="ids must be 1-D"):
        index.remove([[1], [2]])
    with pytest.raises(TypeError, match="got set"):
        index.search(X[:2], 2, exclude={1, 2})
    # meta tensors hold no values: ValueError, as fastrec.torch.export says (not NotImplementedError)
    with pytest.raises(ValueError, match="'meta' device"):
        ops.embedding_bag(torch.zeros((3, 4), device="meta"), np.array([0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="'meta' device"):
        fastrec.Int8Linear.from_float(np.ones((2, 2), np.float32))(torch.zeros((1, 2), device="meta"))
    # shapes and dims are ints, not truncated floats or strings
    from fastrec._arrays import aligned_empty

    for shape in ("12", (2.7, 3), 5.0):
        with pytest.raises(TypeError, match="shape"):
            aligned_empty(shape)
    for shape in ((2**33, 2**31), (2**32 + 1, 2**32)):  # element counts past int64: no wrap-around
        with pytest.raises(MemoryError, match="more than any machine can address"):
            aligned_empty(shape)
    for dim in (6.9, "6"):
        with pytest.raises(TypeError, match="dim must be an int"):
            QuantizedTable(np.zeros((3, 12), np.uint8), 8, dim)
    with pytest.raises(ValueError, match="dim must be in"):
        QuantizedTable(np.zeros((3, 12), np.uint8), 8, 2**70)
    # wrong types of the small arguments: TypeError (DESIGN.md), wrong values: ValueError
    with pytest.raises(TypeError, match="modes"):
        ops.embedding_bags([np.zeros((3, 4), np.float32)], np.array([0]), np.array([0, 1]), modes=None)
    with pytest.raises(TypeError, match="mode"):
        ops.embedding_bag(np.ones((2, 2), np.float32), np.array([0]), np.array([0, 1]), mode=0)
    with pytest.raises(TypeError, match="bits"):
        QuantizedTable.from_float(np.ones((2, 2), np.float32), bits=8.0)
    with pytest.raises(ValueError, match="bits"):
        QuantizedTable.from_float(np.ones((2, 2), np.float32), bits=3)
    lin = fastrec.Int8Linear.from_float(np.ones((2, 2), np.float32))
    with pytest.raises(TypeError, match="activations must be a sequence"):
        fastrec.Int8MLP([lin], "relu")  # (its letters were read as four activations)
    with pytest.raises(TypeError, match="layer 0 must be a \\(weight, bias\\) pair"):
        fastrec.Int8MLP.from_float([np.ones((2, 2), np.float32)], ["relu"])
    with pytest.raises(ValueError, match="at least one row and one column"):
        fastrec.Int8Linear.from_int8(np.zeros((0, 5), np.int8), np.zeros(0, np.float32))
    # finite float64 weights past float32's range are named as such, not as NaN / Inf
    for build in (fastrec.Int8Linear.from_float, QuantizedTable.from_float):
        with pytest.raises(ValueError, match="beyond float32's range"):
            build(np.full((2, 2), 1e39))
    with pytest.raises(ValueError, match="queries holds 1e\\+39"):
        index.search([[1e39, 0, 0, 0]], 1)
    # metrics read torch tensors as the rest of the package does
    from fastrec import metrics

    s = torch.tensor([0.1, 0.9, 0.4], requires_grad=True)
    assert metrics.auc([0, 1, 0], s) == metrics.auc(torch.tensor([0, 1, 0]), s.to(torch.bfloat16)) == 1.0
    assert metrics.recall_at_k(torch.tensor([[1, 2, 3], [4, 5, 6]]), [torch.tensor([2]), torch.tensor([9])], 2) == 0.5
    with pytest.raises(ValueError, match="2-D"):
        metrics.recall_at_k(torch.zeros((2, 3, 2), dtype=torch.int64), [[1], [2]], 2)
