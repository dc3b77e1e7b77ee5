"""Pickling (copy.deepcopy, multiprocessing, Ray's object store) of the objects users hold:
the copy must give bit-identical results and be independent of the original."""
from __future__ import annotations

import copy
import multiprocessing
import pickle

import numpy as np
import pytest

import fastrec
from fastrec import Int8Linear, Int8MLP, ItemIndex, QuantizedTable, ops
from fastrec.io import write_model

from conftest import needs_cuda, random_csr, to_host
from test_model_runtime import build_dlrm, build_two_tower, random_sparse

PROTOCOLS = sorted({2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL})


def _round_trips(obj):
    """The object through every pickle protocol, and through copy.deepcopy."""
    return [pickle.loads(pickle.dumps(obj, protocol=p)) for p in PROTOCOLS] + [copy.deepcopy(obj)]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_table(rng, bits):
    t = QuantizedTable.from_float(rng.standard_normal((97, 24)).astype(np.float32), bits=bits)
    idx, off = random_csr(rng, 40, 97)
    want = ops.embedding_bag(t, idx, off)
    for c in _round_trips(t):
        assert type(c) is QuantizedTable
        assert (c.bits, c.dim, c.num_rows, c.layout) == (t.bits, t.dim, t.num_rows, t.layout)
        np.testing.assert_array_equal(np.asarray(c.data), np.asarray(t.data))
        np.testing.assert_array_equal(ops.embedding_bag(c, idx, off), want)


def test_quantized_table_tbe_layout(rng):
    t = QuantizedTable.from_float(rng.standard_normal((30, 16)).astype(np.float32), bits=4)
    tbe = np.concatenate([t.data[:, -4:], t.data[:, :-4]], axis=1)  # fp16 scale, bias first
    t2 = QuantizedTable.from_fbgemm(tbe, 4, layout="tbe")
    (c,) = _round_trips(t2)[:1]
    assert c.layout == "tbe"
    np.testing.assert_array_equal(c.dequantize(), t.dequantize())


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_and_mlp(rng, bias):
    w1, w2 = rng.standard_normal((33, 20)).astype(np.float32), rng.standard_normal((1, 33)).astype(np.float32)
    b1 = rng.standard_normal(33).astype(np.float32) if bias else None
    lin = Int8Linear.from_float(w1, b1)
    mlp = Int8MLP([lin, Int8Linear.from_float(w2)], ["relu", "sigmoid"])
    x = rng.standard_normal((17, 20)).astype(np.float32)
    for c in _round_trips(lin):
        np.testing.assert_array_equal(c.weight_int8, lin.weight_int8)
        np.testing.assert_array_equal(c.weight_scale, lin.weight_scale)
        assert (c.bias is None) == (b1 is None)
        np.testing.assert_array_equal(c(x, "relu"), lin(x, "relu"))
    for c in _round_trips(mlp):
        assert c.activations == ["relu", "sigmoid"]
        np.testing.assert_array_equal(c(x), mlp(x))


@pytest.mark.parametrize("precision,rerank", [("int8", True), ("int8", False), ("fp16", True),
                                              ("fp16", False), ("fp32", True)])
def test_item_index_after_updates(rng, precision, rerank):
    D = 16
    items = rng.standard_normal((500, D)).astype(np.float32)
    index = ItemIndex(items, ids=np.arange(500) * 7 + 3, precision=precision, rerank=rerank)
    index.add(rng.standard_normal((60, D)).astype(np.float32), ids=np.arange(60) + 10_000)
    index.remove(np.arange(40) * 7 + 3)
    q = rng.standard_normal((9, D)).astype(np.float32)
    exclude = [index.ids[i::9][:5] for i in range(9)]
    want = index.search(q, 25, exclude=exclude)
    for c in _round_trips(index):
        assert (len(c), c.dim, c.precision, c.rerank) == (len(index), D, precision, rerank)
        np.testing.assert_array_equal(c.ids, index.ids)
        got = c.search(q, 25, exclude=exclude)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    # The copy is independent: removing from it leaves the original whole, and back.
    c = copy.deepcopy(index)
    c.remove(want[1][0, :1])
    assert len(c) == len(index) - 1
    np.testing.assert_array_equal(index.search(q, 25, exclude=exclude)[1], want[1])


def test_item_index_copy_keeps_the_exact_search_bound(rng):
    """max |x| of the original still counts a removed huge item, which sends large queries to
    the exact float64 search; the copy must decide the same way (it returned other items)."""
    items = rng.standard_normal((200, 8)).astype(np.float32)
    items[0] = 1e30
    index = ItemIndex(items, precision="int8", rerank=False)
    index.remove([0])
    q = (rng.standard_normal((5, 8)) * 1e7).astype(np.float32)
    want = index.search(q, 10)
    for c in _round_trips(index):
        got = c.search(q, 10)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


def test_subclasses_and_alignment(rng):
    class MyLinear(Int8Linear):
        pass

    class MyIndex(ItemIndex):
        pass

    lin = MyLinear.from_float(rng.standard_normal((4, 6)).astype(np.float32))
    assert type(copy.deepcopy(lin)) is MyLinear
    assert type(copy.deepcopy(Int8MLP([lin], [None]))) is Int8MLP
    assert type(copy.deepcopy(MyIndex(np.ones((2, 3), np.float32)))) is MyIndex
    t = QuantizedTable.from_float(rng.standard_normal((1000, 64)).astype(np.float32), bits=8)
    for c in _round_trips(t):  # rows on cache lines, as from_float makes them
        assert np.asarray(c.data).ctypes.data % 64 == 0


def test_empty_item_index():
    index = ItemIndex(np.ones((3, 4), np.float32), precision="fp16")
    index.remove([0, 1, 2])
    for c in _round_trips(index):
        assert len(c) == 0 and c.dim == 4
        scores, ids = c.search(np.ones(4, np.float32), 2)
        np.testing.assert_array_equal(ids, [-1, -1])


@pytest.mark.parametrize("precision,storages", [("fp32", ("fp32", "fp16")), ("int8", ("q8", "fp32", "q8")), ("fp16", ("q4", "fp16"))])
def test_dlrm_model(rng, tmp_path, precision, storages):
    m, tensors, ref = build_dlrm(rng, precision=precision, storages=storages)
    write_model(tmp_path / "m", m, tensors)
    model = fastrec.load(tmp_path / "m")
    dense = rng.standard_normal((31, m["dense_features"])).astype(np.float32)
    sparse = random_sparse(rng, ref["features"], ref["rows"], 31)
    want = model.score(dense, sparse)
    for c in _round_trips(model):
        assert (c.kind, c.precision, c.features, c.path) == (model.kind, model.precision, model.features, model.path)
        np.testing.assert_array_equal(c.score(dense, sparse), want)
        for info in c.tables:  # rebuilt tables start on cache lines, as in a model file
            if info.storage in ("fp32", "fp16"):
                assert c._group.tables[c._group.table_names.index(info.name)].ctypes.data % 64 == 0


def test_two_tower_model(rng, tmp_path):
    m, tensors, ref = build_two_tower(rng, precision="int8", storage="q8", index_precision="int8")
    write_model(tmp_path / "m", m, tensors)
    model = fastrec.load(tmp_path / "m")
    feats = ["user_id", "age"]
    sparse = random_sparse(rng, feats, [ref["rows"][f] for f in feats], 6)
    want = model.recommend(sparse, k=7)
    for c in _round_trips(model):
        got = c.recommend(sparse, k=7)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    # The catalogue travels as it is now: items removed from / added to model.index stay so.
    model.index.remove(np.unique(want[1][:, 0]))
    model.index.add(rng.standard_normal((3, model.index.dim)).astype(np.float32), [7, 8, 9])
    want = model.recommend(sparse, k=7)
    for c in _round_trips(model):
        assert len(c.index) == len(model.index)
        np.testing.assert_array_equal(c.recommend(sparse, k=7)[1], want[1])


def _score_in_child(model, dense, sparse):
    return model.score(dense, sparse)


def test_model_to_a_spawned_process():
    """What Ray and ProcessPoolExecutor do: the model pickled into a fresh interpreter."""
    from concurrent.futures import ProcessPoolExecutor

    from fastrec.demo import demo_model_path

    rng = np.random.default_rng(5)
    with demo_model_path("ranking") as path:
        model = fastrec.load(path)
    dense = rng.standard_normal((8, model.dense_features)).astype(np.float32)
    rows = {t.name: t.rows for t in model.tables}
    table_of = {f["name"]: f["table"] for f in model.manifest["sparse_features"]}
    sparse = {f: (rng.integers(0, rows[table_of[f]], 8).astype(np.int64), np.arange(9, dtype=np.int64))
              for f in model.features}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        got = pool.submit(_score_in_child, model, dense, sparse).result(timeout=120)
    np.testing.assert_array_equal(got, model.score(dense, sparse))


# ---- GPU objects (skip without a GPU) --------------------------------------------------------

def test_device_table(rng, to_device):
    t = QuantizedTable.from_float(rng.standard_normal((50, 16)).astype(np.float32), bits=8)
    d = QuantizedTable.from_fbgemm(to_device(np.asarray(t.data)), 8)
    idx, off = random_csr(rng, 20, 50)
    want = to_host(ops.embedding_bag(d, to_device(idx), to_device(off)))
    for c in _round_trips(d):
        assert type(c) is type(d)
        np.testing.assert_array_equal(to_host(ops.embedding_bag(c, to_device(idx), to_device(off))), want)


@needs_cuda
def test_gpu_model(rng, tmp_path):
    m, tensors, ref = build_dlrm(rng, precision="int8", storages=("q8", "fp32"))
    write_model(tmp_path / "m", m, tensors)
    model = fastrec.load(tmp_path / "m", device="cuda")
    dense = rng.standard_normal((9, m["dense_features"])).astype(np.float32)
    sparse = random_sparse(rng, ref["features"], ref["rows"], 9)
    want = to_host(model.score(dense, sparse))
    for c in _round_trips(model):
        assert (c.device, c.framework) == (model.device, model.framework)
        np.testing.assert_array_equal(to_host(c.score(dense, sparse)), want)
