"""fastrec.load / fastrec.Model: model directories built from numpy weights with write_model,
scored against an independent float64 numpy reference of the same architecture (docs/FORMAT.md).

The builders here (build_dlrm, build_two_tower) are also used by test_model_format.py.
"""

import json
import mmap
import os
import threading
import types

import numpy as np
import pytest

import fastrec
from fastrec import QuantizedTable, testing
from fastrec.io import read_model, write_model
from fastrec.linear import quantize_weight
from test_linear import _ref_quantize_rows


# ---- builders -----------------------------------------------------------------------------

def make_table(rng, rows, dim, storage):
    """(tensor stored in the file, float64 table it stands for)."""
    w = (rng.standard_normal((rows, dim)) * 0.5).astype(np.float32)
    if storage == "fp32":
        return w, w.astype(np.float64)
    if storage == "fp16":
        w16 = w.astype(np.float16)
        return w16, w16.astype(np.float64)
    qt = QuantizedTable.from_float(w, bits=8 if storage == "q8" else 4)
    return qt.data, testing.dense_table_f64(qt)


def make_layers(rng, prefix, dims, acts, precision, tensors, *, bias=True):
    """LAYER dicts for widths ``dims`` (in, h1, ..., out); returns (layers, reference layers
    [(W float64, b float64 or None, activation)] on the weights as stored)."""
    layers, ref = [], []
    for i, act in enumerate(acts):
        K, N = dims[i], dims[i + 1]
        W = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
        b = (rng.standard_normal(N) * 0.1).astype(np.float32) if bias else None
        name = f"{prefix}.{i}"
        layer = {"in": K, "out": N, "activation": act, "weight": f"{name}.weight",
                 "bias": f"{name}.bias" if bias else None}
        if precision == "int8":
            q, s = quantize_weight(W)
            tensors[f"{name}.weight"] = q
            tensors[f"{name}.weight_scale"] = s
            layer["weight_scale"] = f"{name}.weight_scale"
            W64 = q.astype(np.float64) * s.astype(np.float64)[:, None]
        elif precision == "fp16":
            tensors[f"{name}.weight"] = W.astype(np.float16)
            W64 = W.astype(np.float16).astype(np.float64)
        else:
            tensors[f"{name}.weight"] = W
            W64 = W.astype(np.float64)
        if bias:
            tensors[f"{name}.bias"] = b
        layers.append(layer)
        ref.append((W64, None if b is None else b.astype(np.float64), act))
    return layers, ref


def _manifest(kind, precision, storages, tables, features, **extra):
    bits = {"q8": 8, "q4": 4}
    quant = {bits[s] for s in storages if s in bits}
    m = {"format": "fastrec-model", "format_version": 1, "kind": kind, "producer": "tests",
         "precision": precision, "embedding_bits": quant.pop() if quant else None,
         "tables": tables, "sparse_features": features, "featurizer": None, "metadata": {"test": "yes"}}
    m.update(extra)
    return m


def build_dlrm(rng, *, precision="fp32", storages=("fp32", "fp32", "fp32"), D=8, dense=5, bottom=(16,),
               top=(12,), rows=None, pooling="sum", bias=True):
    T = len(storages)
    rows = rows or [50 + 17 * t for t in range(T)]
    tensors, tables, features, tables64 = {}, [], [], []
    for t, storage in enumerate(storages):
        data, w64 = make_table(rng, rows[t], D, storage)
        tensors[f"tables.t{t}"] = data
        tables.append({"name": f"t{t}", "rows": rows[t], "dim": D, "pooling": pooling, "storage": storage,
                       "tensor": f"tables.t{t}"})
        features.append({"name": f"C{t + 1}", "table": f"t{t}"})
        tables64.append(w64)
    bl, bref = make_layers(rng, "dlrm.bottom", [dense, *bottom, D], ["relu"] * (len(bottom) + 1), precision,
                           tensors, bias=bias)
    top_in = D + (T + 1) * T // 2
    tl, tref = make_layers(rng, "dlrm.top", [top_in, *top, 1], ["relu"] * len(top) + ["sigmoid"], precision,
                           tensors, bias=bias)
    m = _manifest("dlrm", precision, storages, tables, features, dense_features=dense,
                  dlrm={"bottom_mlp": bl, "interaction": "dot", "top_mlp": tl})
    ref = {"tables": tables64, "bottom": bref, "top": tref, "features": [f["name"] for f in features],
           "pooling": pooling, "int8": precision == "int8", "rows": rows}
    return m, tensors, ref


def _quantize_rows(x):
    """The kernels' per-row activation quantization (tests/test_linear.py's), as float64."""
    q, s = _ref_quantize_rows(np.asarray(x, dtype=np.float32))
    return q.astype(np.float64), s.astype(np.float64)


def mlp_ref(x, layers, *, int8=False):
    x = np.asarray(x, dtype=np.float64)
    for W, b, act in layers:
        if int8:  # what the int8 kernel computes: quantized activations, exact accumulation
            q, s = _quantize_rows(x)
            x = (q @ W.T) * s[:, None]
        else:
            x = x @ W.T
        if b is not None:
            x = x + b
        if act == "relu":
            x = np.maximum(x, 0)
        elif act == "sigmoid":
            x = 1 / (1 + np.exp(-x))
    return x


def dlrm_ref(ref, dense, sparse, *, int8_acts=None):
    int8 = ref["int8"] if int8_acts is None else int8_acts
    x = mlp_ref(dense, ref["bottom"], int8=int8)
    embs = [testing.embedding_bag_ref(w, *sparse[f], mode=ref["pooling"])
            for w, f in zip(ref["tables"], ref["features"])]
    Z = [x] + embs
    dots = [(Z[i] * Z[j]).sum(axis=1) for i in range(len(Z)) for j in range(i)]  # i > j, row-major
    top_in = np.concatenate([x, np.stack(dots, axis=1)], axis=1)
    return mlp_ref(top_in, ref["top"], int8=int8)[:, 0]


def random_sparse(rng, features, rows, B, max_len=6):
    out = {}
    for f, R in zip(features, rows):
        lengths = rng.integers(0, max_len + 1, size=B)
        off = np.zeros(B + 1, np.int64)
        off[1:] = np.cumsum(lengths)
        out[f] = (rng.integers(0, R, size=int(off[-1])).astype(np.int64), off)
    return out


def table_major(sparse, features):
    """{feature: (ids, offsets)} -> one KeyedJaggedTensor-style (indices, offsets) pair."""
    idx, offs, base = [], [], 0
    for f in features:
        ind, off = sparse[f]
        idx.append(ind)
        offs.append(off[:-1] + base)
        base += len(ind)
    return np.concatenate(idx), np.concatenate(offs + [np.array([base])]).astype(np.int64)


def build_two_tower(rng, *, precision="fp32", storage="fp32", user_feats=("user_id", "age"),
                    item_feats=("item_id",), order=None, dims=None, user_mlp=(16,), item_mlp=(16,), out=8,
                    normalize=True, n_items=300, index_precision="fp32", rerank=True):
    """A two-tower model; ``order`` is the sparse_features order (default user then item
    features); ``dims`` maps a feature to its table dim. The index holds the item tower applied
    (in float64) to item ids 0..n_items-1 under external ids 1000 + 3*i."""
    order = list(order or (list(user_feats) + list(item_feats)))
    dims = dims or {}
    rows = {f: (n_items if f == "item_id" else 40 + 7 * i) for i, f in enumerate(order)}
    tensors, tables, features, tables64 = {}, [], [], {}
    for f in order:
        d = dims.get(f, 8)
        data, w64 = make_table(rng, rows[f], d, storage)
        tensors[f"tables.{f}"] = data
        tables.append({"name": f"t_{f}", "rows": rows[f], "dim": d, "pooling": "mean" if f == "age" else "sum",
                       "storage": storage, "tensor": f"tables.{f}"})
        features.append({"name": f, "table": f"t_{f}"})
        tables64[f] = w64

    def tower(side, feats, hidden):
        width = sum(dims.get(f, 8) for f in feats)
        if hidden is None:
            return {"features": list(feats), "combine": "concat", "mlp": [], "normalize": normalize}, []
        acts = ["relu"] * len(hidden) + ["none"]
        layers, ref = make_layers(rng, f"two_tower.{side}.mlp", [width, *hidden, out], acts, precision, tensors)
        return {"features": list(feats), "combine": "concat", "mlp": layers, "normalize": normalize}, ref

    ut, uref = tower("user", user_feats, user_mlp)
    it, iref = tower("item", item_feats, item_mlp)
    ref = {"tables": tables64, "user": (list(user_feats), uref, normalize), "item": (list(item_feats), iref, normalize),
           "pooling": {t["name"][2:]: t["pooling"] for t in tables}, "int8": precision == "int8", "rows": rows}
    ids = np.arange(n_items, dtype=np.int64)
    item_sparse = {f: (ids if f == "item_id" else ids % rows[f], np.arange(n_items + 1, dtype=np.int64))
                   for f in item_feats}
    items = tower_ref(ref, "item", item_sparse).astype(np.float32)
    tensors["index.items"] = items
    tensors["index.ids"] = 1000 + 3 * ids
    m = _manifest("two_tower", precision, [storage], tables, features,
                  two_tower={"user": ut, "item": it, "index": {"items": "index.items", "ids": "index.ids",
                                                                 "precision": index_precision, "rerank": rerank}})
    return m, tensors, ref


def tower_ref(ref, side, sparse):
    feats, layers, normalize = ref[side]
    x = np.concatenate([testing.embedding_bag_ref(ref["tables"][f], *sparse[f], mode=ref["pooling"][f])
                        for f in feats], axis=1)
    x = mlp_ref(x, layers, int8=ref["int8"]) if layers else x
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


@pytest.fixture
def model_dir(tmp_path):
    counter = iter(range(10**6))

    def write(manifest, tensors, **kw):
        path = tmp_path / f"model{next(counter)}"
        write_model(path, manifest, tensors, **kw)
        return str(path)

    return write


# ---- DLRM ---------------------------------------------------------------------------------

@pytest.mark.parametrize("storages", [("fp32", "fp32", "fp32"), ("fp16", "fp16"), ("q8", "fp32", "q8", "fp16"),
                                      ("q4", "q4", "fp32"), ("fp32",)])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_dlrm_float_mlps_match_reference(rng, model_dir, storages, precision, pooling):
    m, tensors, ref = build_dlrm(rng, precision=precision, storages=storages, pooling=pooling)
    model = fastrec.load(model_dir(m, tensors))
    assert (model.kind, model.precision, model.dense_features) == ("dlrm", precision, 5)
    assert model.features == tuple(ref["features"])
    for B in (0, 1, 3, 97):
        dense = rng.standard_normal((B, 5)).astype(np.float32)
        sparse = random_sparse(rng, ref["features"], ref["rows"], B)
        p = model.score(dense, sparse)
        assert p.dtype == np.float32 and p.shape == (B,)
        np.testing.assert_allclose(p, dlrm_ref(ref, dense, sparse), rtol=1e-5, atol=1e-6)
        # the same request as one table-major (KeyedJaggedTensor) pair
        assert np.array_equal(model.score(dense, table_major(sparse, ref["features"])), p)


@pytest.mark.parametrize("storages", [("fp32", "fp32", "fp32"), ("q8", "q8", "q8", "q8", "q8"), ("q4", "fp16")])
@pytest.mark.parametrize("bias", [True, False])
def test_dlrm_int8_mlps(rng, model_dir, storages, bias):
    m, tensors, ref = build_dlrm(rng, precision="int8", storages=storages, bottom=(32, 16), top=(24, 12), bias=bias)
    model = fastrec.load(model_dir(m, tensors))
    assert model.precision == "int8"
    dense = rng.standard_normal((64, 5)).astype(np.float32)
    sparse = random_sparse(rng, ref["features"], ref["rows"], 64)
    p = model.score(dense, sparse)
    # float64 evaluation of exactly what the int8 kernels compute (quantized activations per row):
    # equal up to float rounding, except where float32 vs float64 inputs land on opposite sides
    # of an activation-quantization step (rare; one code step then moves p a little)
    err = np.abs(p - dlrm_ref(ref, dense, sparse))
    assert np.mean(err < 1e-5) >= 0.9 and err.max() < 5e-3, (np.mean(err < 1e-5), err.max())
    # and the float64 model on the dequantized int8 weights: activation quantization error only
    assert np.abs(p - dlrm_ref(ref, dense, sparse, int8_acts=False)).max() < 0.02


def test_dlrm_int8_top_mlp_is_the_int8_mlp(rng, model_dir):
    """Model.score's last stage is exactly Int8MLP on the stored int8 weights."""
    m, tensors, ref = build_dlrm(rng, precision="int8", storages=("fp32", "fp32"))
    model = fastrec.load(model_dir(m, tensors))
    lins = [fastrec.Int8Linear.from_int8(tensors[l["weight"]], tensors[l["weight_scale"]], tensors[l["bias"]])
            for l in m["dlrm"]["top_mlp"]]
    top = fastrec.Int8MLP(lins, [l["activation"] for l in m["dlrm"]["top_mlp"]])
    # a batch whose bottom output and embeddings are all zero: top input is then [0, ..., 0]
    for l in m["dlrm"]["bottom_mlp"]:
        tensors[l["weight"]] = np.zeros_like(tensors[l["weight"]])
        tensors[l["bias"]] = np.zeros_like(tensors[l["bias"]])
    model0 = fastrec.load(model_dir(m, tensors))
    B = 4
    sparse = {f: (np.zeros(0, np.int64), np.zeros(B + 1, np.int64)) for f in ref["features"]}
    p = model0.score(rng.standard_normal((B, 5)).astype(np.float32), sparse)
    top_in = np.zeros((B, m["dlrm"]["top_mlp"][0]["in"]), np.float32)
    assert np.array_equal(p, top(top_in)[:, 0])
    assert model.nbytes > model0.nbytes - 1


def _score_op_by_op(model, dense, sparse):
    """Model.score's stages one at a time (what _C.dlrm_forward fuses)."""
    emb, _ = model._group.pool(sparse, dense.shape[0])
    top_in = fastrec._C.dot_interaction(model._bottom(dense), emb, len(model.features))
    return model._top(top_in)[:, 0]


@pytest.mark.parametrize("B", [1, 7, 13, 71, 150, 1000])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_dlrm_fused_forward_equals_op_by_op(rng, model_dir, B, threads, pooling):
    m, tensors, ref = build_dlrm(rng, precision="int8", storages=("q8", "fp32", "q8", "fp16"), bottom=(32, 16),
                                 top=(40, 12), pooling=pooling)
    model = fastrec.load(model_dir(m, tensors))
    assert model._fused is not None
    dense = rng.standard_normal((B, 5)).astype(np.float32)
    sparse = random_sparse(rng, ref["features"], ref["rows"], B)
    before = fastrec.get_num_threads()
    try:
        fastrec.set_num_threads(threads)
        p = model.score(dense, sparse)
        p_pair = model.score(dense, table_major(sparse, ref["features"]))
    finally:
        fastrec.set_num_threads(before)
    assert p.shape == (B,) and p.dtype == np.float32
    assert np.array_equal(p, _score_op_by_op(model, dense, sparse))
    assert np.array_equal(p, p_pair)


def test_dlrm_fused_forward_errors(rng, model_dir):
    m, tensors, ref = build_dlrm(rng, precision="int8", storages=("q8", "fp32", "q8"))
    model = fastrec.load(model_dir(m, tensors))
    B = 600
    dense = rng.standard_normal((B, 5)).astype(np.float32)
    sparse = random_sparse(rng, ref["features"], ref["rows"], B)
    bad_dense = dense.copy()
    bad_dense[433, 2] = np.nan
    bad_dense[590, 0] = np.inf
    with pytest.raises(ValueError, match="row 433"):
        model.score(bad_dense, sparse)
    ind, off = sparse["C2"]
    ind = ind.copy()
    ind[-1] = ref["rows"][1] + 5
    with pytest.raises(IndexError, match=rf"feature 'C2' \(table 't1'\): id {ref['rows'][1] + 5} at position "
                                         rf"{len(ind) - 1} of its indices"):
        model.score(bad_dense, {**sparse, "C2": (ind, off)})  # the id error wins over the NaN
    off = off.copy()
    off[300] = off[-1]
    with pytest.raises(ValueError, match="C2.*non-decreasing"):
        model.score(dense, {**sparse, "C2": (sparse["C2"][0], off)})
    assert np.array_equal(model.score(dense, sparse), _score_op_by_op(model, dense, sparse))


@pytest.mark.parametrize("B", [6, 600])  # op by op (< 4 rows a thread on 2 threads) and row tasks
def test_dlrm_overflow_inside_the_model_is_not_blamed_on_the_input(rng, model_dir, B):
    # Finite tables whose dot products overflow float32: the op-by-op path (online batch sizes
    # on several threads) said "input contains NaN or Inf", as if the caller's dense were bad.
    m, tensors, ref = build_dlrm(rng, precision="int8", storages=("fp32", "fp32"))
    for t in m["tables"]:  # the dot of the two features' bags is ~1e40
        tensors[t["tensor"]] = np.full_like(tensors[t["tensor"]], 1e20)
    model = fastrec.load(model_dir(m, tensors))
    dense = np.ones((B, 5), np.float32)
    sparse = random_sparse(rng, ref["features"], ref["rows"], B)
    before = fastrec.get_num_threads()
    try:
        for threads in (1, 2):
            fastrec.set_num_threads(threads)
            with pytest.raises(ValueError, match="top MLP .*embedding table"):
                model.score(dense, sparse)
    finally:
        fastrec.set_num_threads(before)


def _misaligned(a):
    buf = np.zeros(a.nbytes + 1, np.uint8)
    out = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1)
    out[...] = a
    return out


class _Dict(dict):
    """A dict subclass: Model's requests then take the Python packing path."""


def test_dict_requests_packed_in_cpp_equal_the_python_path(rng, model_dir):
    """_Group.pack sends dicts of numpy int arrays to _C.pack_bags; anything else (other
    containers, byte-swapped or non-array ids, inconsistent offsets) to the Python path. Both
    must give the same pair, and the same errors."""
    m, tensors, ref = build_dlrm(rng, storages=("fp32", "q8", "fp16"))
    model = fastrec.load(model_dir(m, tensors))
    g = model._group
    forms = [lambda a: a, lambda a: a.astype(np.int32), lambda a: np.repeat(a, 2)[::2], _misaligned,
             lambda a: a.astype(">i8"), lambda a: a.tolist()]
    for B in (0, 1, 2, 37):
        sparse = random_sparse(rng, ref["features"], ref["rows"], B)
        for trial in range(12):
            req = {f: (forms[rng.integers(len(forms))](i), forms[rng.integers(len(forms))](o))
                   for f, (i, o) in sparse.items()}
            fast, slow = g.pack(req, None), g.pack(_Dict(req), None)
            for a, b in zip(fast[:2], slow[:2]):
                np.testing.assert_array_equal(a, b)
            assert fast[2:] == slow[2:] == (B, fast[3])
            np.testing.assert_array_equal(model.score(np.ones((B, 5), np.float32), req),
                                          model.score(np.ones((B, 5), np.float32), _Dict(req)))
    sparse = random_sparse(rng, ref["features"], ref["rows"], 3)
    assert fastrec._C.pack_bags([sparse[f] for f in g.features], -1) is not None  # the fast path runs
    f0 = ref["features"][0]
    n0 = len(sparse[f0][0])
    sparse[f0] = (np.concatenate([sparse[f0][0], [0, 0]]).astype(np.int64), sparse[f0][1])
    sparse[f0][1][1:] = [n0 + 2, n0 + 2, n0 + 2]  # bag 0 holds every id of f0 ...
    bad_cases = [  # (request change, error type, message) - the Python path's words in both
        (lambda r: r.update({f0: (r[f0][0], r[f0][1][:-1])}), ValueError, "bags, expected 3"),
        (lambda r: r.update({f0: (r[f0][0][:-1], r[f0][1])}), ValueError, "end at len\\(indices\\)"),
        (lambda r: r.update({f0: (r[f0][0], r[f0][1] + 1)}), ValueError, "start at 0"),
        (lambda r: r.update({f0: (r[f0][0].astype(np.float64), r[f0][1])}), TypeError, "int32 or int64"),
        (lambda r: r.update({f0: (r[f0][0].reshape(1, -1), r[f0][1])}), ValueError, "1-D"),
        (lambda r: r.update({f0: [r[f0][0], r[f0][1]]}), None, None),  # a list pair is fine
        (lambda r: r.update({f0: (r[f0][0] + 10**6, r[f0][1])}), IndexError, f"sparse feature {f0!r}"),
        (lambda r: r.update({f0: (r[f0][0], np.array([0, 2, 1, n0 + 2]))}), ValueError,  # ... decreasing
         f"sparse\\[{f0!r}\\] offsets"),
    ]
    for change, exc, match in bad_cases:
        req = dict(sparse)
        change(req)
        for r in (req, _Dict(req)):
            if exc is None:
                model.score(np.ones((3, 5), np.float32), r)
            else:
                with pytest.raises(exc, match=match):
                    model.score(np.ones((3, 5), np.float32), r)


def test_pack_bags_edge_cases():
    """_C.pack_bags (ASan/UBSan fuzz): hands unusual input to the Python path (None), refuses
    sizes no memory can hold, and keeps numpy's reference counts right from many threads."""
    import sys
    import threading

    pack = fastrec._C.pack_bags
    a, b = np.array([1, 2], np.int64), np.array([3], np.int64)
    # an offset near 2**63, moved by the earlier feature's ids, wrapped (signed overflow)
    assert pack([(a, np.array([0, 1, 2])), (b, np.array([0, 2**63 - 1, 1]))], -1) is None

    class Pair(tuple):  # a subclass may override item access: not the fast path
        def __getitem__(self, i):
            return (a, np.array([0, 2]))[i]

    assert pack([Pair((b, np.array([0, 1])))], -1) is None
    huge = np.broadcast_to(np.int32(0), (2**61 - 1,))  # stride 0: ids no memory could hold
    with pytest.raises(MemoryError):
        pack([(huge, np.array([0, huge.shape[0]], np.int64))] * 5, -1)
    # pybind11's itemsize() increments the dtype's reference count: it was called without the GIL
    dt = np.dtype(np.int64, metadata={"test": "pack_bags"})  # (a dtype of its own: no one else counts it)
    pairs = [(np.zeros(64, dt), np.array([0, 16, 32, 48, 64], dt)) for _ in range(64)]
    before = sys.getrefcount(dt)

    def run():
        for _ in range(5000):
            pack(pairs, -1)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = sys.getrefcount(dt)  # (outside the assert: pytest's rewriting holds extra references)
    assert after == before


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_float_dlrm_overflow_raises_as_int8_does(rng, model_dir, precision):
    """A float MLP layer whose output overflows float32 raised nothing: the score came back NaN
    (or exactly 1.0 past the sigmoid). It now raises ValueError naming the layer, as int8 does."""
    m, tensors, ref = build_dlrm(rng, precision=precision, storages=("fp32", "fp32"))
    model = fastrec.load(model_dir(m, tensors))
    sparse = random_sparse(rng, ref["features"], ref["rows"], 4)
    dense = np.ones((4, 5), np.float32)
    assert np.isfinite(model.score(dense, sparse)).all()
    dense[2] = 3e38  # finite, but the bottom MLP's first layer overflows on row 2
    with pytest.raises(ValueError, match="layer 0 of the bottom MLP .*row 2"):
        model.score(dense, sparse)
    for t in m["tables"]:  # interaction dots of ~1e40: the top MLP's first layer sees inf
        tensors[t["tensor"]] = np.full_like(tensors[t["tensor"]], 1e20)
    model = fastrec.load(model_dir(m, tensors))
    with pytest.raises(ValueError, match="of the top MLP"):
        model.score(np.ones((4, 5), np.float32), sparse)
    if precision == "fp32":  # (fp16 weights cannot hold 1e20)
        # -inf before a ReLU is 0 after it, as the true (very negative) value would be: no error
        m, tensors, ref = build_dlrm(rng, precision=precision, storages=("fp32",), D=4, dense=2, bottom=(4,),
                                     top=(4,))
        tensors["dlrm.bottom.0.weight"] = np.full((4, 2), 1e20, np.float32)
        tensors["dlrm.bottom.1.weight"] = np.full((4, 4), -1e20, np.float32)
        one = {"C1": (np.array([1, 2]), np.array([0, 1, 2]))}
        assert np.isfinite(fastrec.load(model_dir(m, tensors)).score(np.ones((2, 2), np.float32), one)).all()
        tensors["dlrm.bottom.1.weight"] = np.full((4, 4), 1e20, np.float32)  # +inf stays: named in the bottom
        with pytest.raises(ValueError, match="layer 1 of the bottom MLP"):
            fastrec.load(model_dir(m, tensors)).score(np.ones((2, 2), np.float32), one)
    m, tensors, ref = build_two_tower(rng, precision=precision)
    tensors["tables.user_id"] = np.full_like(tensors["tables.user_id"], 3e38)
    model = fastrec.load(model_dir(m, tensors))
    user = random_sparse(rng, ["user_id", "age"], [ref["rows"]["user_id"], ref["rows"]["age"]], 3)
    with pytest.raises(ValueError, match="layer 0 of the user tower MLP"):
        model.user_vectors(user)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_gpu_runtime_float_mlp_overflow_logic_on_host_tensors(rng, model_dir):
    """The GPU runtime's float-MLP overflow check (a mask of the last layer's rows after its
    ReLU, before the sigmoid, read at the end; the host MLPs then name the layer), run through
    its torch code path on CPU tensors: no GPU here, so this holds the logic, not the device."""
    torch = pytest.importorskip("torch")
    from fastrec._cuda_model import CudaModel, _Torch

    m, tensors, ref = build_dlrm(rng, precision="fp32", storages=("fp32", "fp32"))
    model = fastrec.load(model_dir(m, tensors))
    fw = _Torch.__new__(_Torch)
    fw.t, fw.linear, fw.device = torch, torch.nn.functional.linear, torch.device("cpu")
    cm = CudaModel.__new__(CudaModel)
    cm.fw = fw
    no_bags = types.SimpleNamespace(check=lambda: None)  # (no embedding kernel here)
    bottom, top = cm._mlp(model._bottom), cm._mlp(model._top)
    dense = torch.ones((4, 5))
    y, ok = cm._run_mlp(bottom, dense)
    cm._finish(no_bags, None, ok, [(bottom, dense)])  # finite: nothing to report
    assert cm._run_mlp(bottom, dense, check_finite=False)[1] is None
    dense[2] = 3e38
    _, ok = cm._run_mlp(bottom, dense)
    with pytest.raises(ValueError, match="layer 0 of the bottom MLP .*row 2"):
        cm._finish(no_bags, None, ok, [(bottom, dense), (top, None)])
    top_in = torch.full((3, model._top.layers[0][0].shape[1]), 1e20)
    top_in[1, 0] = float("inf")  # as the interaction gives when two 1e20 rows meet
    p, ok = cm._run_mlp(top, top_in)  # overflows; past the sigmoid it reads 1.0 or NaN
    with pytest.raises(ValueError, match="of the top MLP"):
        cm._finish(no_bags, None, ok, [(bottom, torch.ones((3, 5))), (top, top_in)])


def test_from_int8_round_trip(rng):
    W = rng.standard_normal((7, 5)).astype(np.float32)
    a = fastrec.Int8Linear.from_float(W)
    b = fastrec.Int8Linear.from_int8(a.weight_int8, a.weight_scale)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    assert np.array_equal(a(x), b(x))
    with pytest.raises(TypeError):
        fastrec.Int8Linear.from_int8(W, a.weight_scale)
    with pytest.raises(ValueError, match="-128"):
        fastrec.Int8Linear.from_int8(np.full((7, 5), -128, np.int8), a.weight_scale)
    with pytest.raises(ValueError, match="shape"):
        fastrec.Int8Linear.from_int8(a.weight_int8, a.weight_scale[:3])
    with pytest.raises(ValueError, match="NaN"):
        fastrec.Int8Linear.from_int8(a.weight_int8, np.full(7, np.nan, np.float32))


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # (np.matrix's)
def test_dlrm_shared_table_and_int32_inputs(rng, model_dir):
    """Two features on one table (TorchRec shared tables); int32 ids and offsets."""
    m, tensors, ref = build_dlrm(rng, storages=("q8", "fp32"))
    m["sparse_features"].append({"name": "C3", "table": "t0"})
    T = 3
    m["dlrm"]["top_mlp"][0]["in"] = 8 + (T + 1) * T // 2
    K = m["dlrm"]["top_mlp"][0]["in"]
    W = (rng.standard_normal((12, K)) / np.sqrt(K)).astype(np.float32)
    tensors[m["dlrm"]["top_mlp"][0]["weight"]] = W
    ref["top"][0] = (W.astype(np.float64), ref["top"][0][1], "relu")
    ref["tables"].append(ref["tables"][0])
    ref["features"].append("C3")
    ref["rows"].append(ref["rows"][0])
    model = fastrec.load(model_dir(m, tensors))
    dense = rng.standard_normal((9, 5)).astype(np.float32)
    sparse = random_sparse(rng, ref["features"], ref["rows"], 9)
    p = model.score(dense, sparse)
    np.testing.assert_allclose(p, dlrm_ref(ref, dense, sparse), rtol=1e-5, atol=1e-6)
    s32 = {f: (i.astype(np.int32), o.astype(np.int32)) for f, (i, o) in sparse.items()}
    assert np.array_equal(model.score(dense, s32), p)
    swapped = {f: (i.astype(">i8"), o.astype(">i4")) for f, (i, o) in sparse.items()}  # big-endian
    assert np.array_equal(model.score(dense.astype(">f4"), swapped), p)
    assert np.array_equal(model.score(dense.tolist(), sparse), p)  # lists are float32
    with pytest.raises(TypeError, match="float32"):
        model.score(dense.astype(np.float64), sparse)
    # ndarray subclasses are read as plain arrays (a masked array broadcast its mask in the fp32
    # MLP: "operands could not be broadcast together"); masked values are refused
    assert np.array_equal(model.score(np.ma.masked_array(dense), sparse), p)
    assert np.array_equal(model.score(np.asmatrix(dense), sparse), p)
    with pytest.raises(TypeError, match="masked"):
        model.score(np.ma.masked_array(dense, mask=dense > 1), sparse)


def test_dlrm_errors(rng, model_dir):
    m, tensors, ref = build_dlrm(rng, storages=("fp32", "q8"))
    model = fastrec.load(model_dir(m, tensors))
    dense = rng.standard_normal((3, 5)).astype(np.float32)
    sparse = random_sparse(rng, ref["features"], ref["rows"], 3)
    with pytest.raises(TypeError, match="float32"):
        model.score(dense.astype(np.float64), sparse)
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        model.score(dense[:, :4], sparse)
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        model.score(dense[0], sparse)
    bad = dense.copy()
    bad[2, 1] = np.nan  # the fp32 forward returned NaN for that row; the int8 one raised
    for precision in ("fp32", "int8"):
        mp, tp, refp = build_dlrm(rng, precision=precision, storages=("fp32", "q8"))
        with pytest.raises(ValueError, match=r"NaN or Inf \(row 2\)"):
            fastrec.load(model_dir(mp, tp)).score(bad, random_sparse(rng, refp["features"], refp["rows"], 3))
    with pytest.raises(ValueError, match="unknown sparse feature 'C9'"):
        model.score(dense, {**sparse, "C9": sparse["C1"]})
    with pytest.raises(ValueError, match=r"missing sparse feature\(s\) \['C2'\]"):
        model.score(dense, {"C1": sparse["C1"]})
    with pytest.raises(ValueError, match="C2.*bags, expected 3"):
        model.score(dense, {"C1": sparse["C1"], "C2": (np.array([0]), np.array([0, 1]))})
    with pytest.raises(ValueError, match="C1.*non-decreasing"):
        model.score(dense, {**sparse, "C1": (np.array([0, 1]), np.array([0, 2, 1, 2]))})
    with pytest.raises(TypeError, match="int32 or int64"):
        model.score(dense, {**sparse, "C1": (np.array([0.0]), np.array([0, 1, 1, 1]))})
    with pytest.raises(TypeError, match="pair"):
        model.score(dense, {**sparse, "C1": np.array([0, 1])})
    with pytest.raises(TypeError, match="dict"):
        model.score(dense, "C1")
    ind, off = table_major(sparse, ref["features"])
    with pytest.raises(ValueError, match="T\\*B \\+ 1"):
        model.score(dense, (ind, off[:-1]))
    with pytest.raises(ValueError, match="3 bags per feature, expected 6"):
        model.score(np.concatenate([dense, dense]), (ind, off))
    bad = dict(sparse)
    bad["C2"] = (np.array([0, ref["rows"][1]]), np.array([0, 0, 1, 2]))
    with pytest.raises(IndexError, match=r"feature 'C2' \(table 't1'\): id 67 at position 1 of its indices"):
        model.score(dense, bad)
    with pytest.raises(IndexError, match="feature 'C2'"):
        model.score(dense, table_major(bad, ref["features"]))
    with pytest.raises(IndexError, match="feature 'C1'"):
        model.score(dense, {**sparse, "C1": (np.array([-1]), np.array([0, 1, 1, 1]))})
    with pytest.raises(TypeError, match="two_tower"):
        model.recommend(sparse)
    with pytest.raises(TypeError, match="two_tower"):
        model.user_vectors(sparse)


# ---- two-tower ----------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("storage", ["fp32", "q8", "q4"])
def test_two_tower_matches_reference(rng, model_dir, precision, storage):
    m, tensors, ref = build_two_tower(rng, precision=precision, storage=storage)
    model = fastrec.load(model_dir(m, tensors))
    assert model.kind == "two_tower" and model.user_features == ("user_id", "age")
    B = 17
    sparse = random_sparse(rng, ["user_id", "age"], [ref["rows"]["user_id"], ref["rows"]["age"]], B)
    u = model.user_vectors(sparse)
    assert u.dtype == np.float32 and u.shape == (B, 8)
    tol = 5e-3 if precision == "int8" else 1e-5  # int8: see test_dlrm_int8_mlps
    err = np.abs(u - tower_ref(ref, "user", sparse))
    assert err.max() < tol and (precision != "int8" or np.mean(err < 1e-5) >= 0.9), err.max()
    np.testing.assert_allclose(np.linalg.norm(u, axis=1)[np.abs(u).sum(1) > 0], 1, rtol=1e-5)
    scores, ids = model.recommend(sparse, k=10)
    assert scores.shape == ids.shape == (B, 10) and ids.dtype == np.int64
    items = tensors["index.items"]
    ref_s, ref_i = testing.topk_ref(u, items, 10, ids=tensors["index.ids"])
    testing.assert_topk_matches(scores, ids, items, u, ref_s, ref_i, item_ids=tensors["index.ids"])
    assert np.array_equal(model.recommend(table_major(sparse, model.user_features), k=10)[1], ids)
    # the item tower reproduces the catalogue
    item_sparse = {"item_id": (np.arange(5), np.arange(6))}
    np.testing.assert_allclose(model.item_vectors(item_sparse), items[:5], rtol=tol, atol=tol)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("index_precision", ["int8", "fp16", "fp32"])
def test_matrix_factorisation(rng, model_dir, normalize, index_precision):
    m, tensors, ref = build_two_tower(rng, user_feats=("user_id",), item_feats=("item_id",), user_mlp=None,
                                      item_mlp=None, normalize=normalize, index_precision=index_precision,
                                      n_items=500)
    model = fastrec.load(model_dir(m, tensors))
    B = 33
    user_ids = rng.integers(0, ref["rows"]["user_id"], size=B)
    sparse = {"user_id": (user_ids, np.arange(B + 1))}
    u = model.user_vectors(sparse)
    expect = ref["tables"]["user_id"][user_ids]
    if normalize:
        expect = expect / np.linalg.norm(expect, axis=1, keepdims=True)
    np.testing.assert_allclose(u, expect, rtol=1e-5, atol=1e-6)
    seen = [tensors["index.ids"][rng.integers(0, 500, size=3)] for _ in range(B)]
    scores, ids = model.recommend(sparse, k=20, exclude=seen)
    ref_s, ref_i = testing.topk_ref(u, tensors["index.items"], 20, ids=tensors["index.ids"], exclude=seen)
    testing.assert_topk_matches(scores, ids, tensors["index.items"], u, ref_s, ref_i,
                                item_ids=tensors["index.ids"], exclude=seen)
    for r in range(B):
        assert not set(ids[r]) & set(seen[r])


@pytest.mark.parametrize("index_precision", ["int8", "fp16"])
def test_two_tower_index_reranks_from_the_mapped_model_file(rng, model_dir, index_precision):
    """An int8 / fp16 catalogue with a rerank reads the float32 rows from the model file's
    read-only mapping (shared by every process that loads the model) instead of keeping a private
    copy (122 MiB for 1M x 32 items per process); results equal an index over a writable copy."""
    m, tensors, ref = build_two_tower(rng, index_precision=index_precision, n_items=500)
    model = fastrec.load(model_dir(m, tensors))
    index = model._index
    assert [seg.rows is not None for seg in index._snap.segments] == [True]
    copy = fastrec.ItemIndex(np.array(tensors["index.items"]), ids=tensors["index.ids"], precision=index_precision)
    assert index.nbytes < copy.nbytes - tensors["index.items"].nbytes // 2
    sparse = random_sparse(rng, ["user_id", "age"], [ref["rows"]["user_id"], ref["rows"]["age"]], 9)
    u = model.user_vectors(sparse)
    for got, want in zip(model.recommend(sparse, k=25), copy.search(u, 25)):
        np.testing.assert_array_equal(got, want)


def test_two_tower_feature_order_and_dims(rng, model_dir):
    """Tower features in another order than sparse_features, with different dims: a pair is in
    sparse_features order, the concat in the tower's order."""
    m, tensors, ref = build_two_tower(rng, user_feats=("user_id", "age"), order=["age", "item_id", "user_id"],
                                      dims={"age": 4, "user_id": 12, "item_id": 6}, user_mlp=(10,), item_mlp=())
    model = fastrec.load(model_dir(m, tensors))
    assert model.user_features == ("age", "user_id")
    assert model.features == ("age", "item_id", "user_id")
    sparse = random_sparse(rng, ["user_id", "age"], [ref["rows"]["user_id"], ref["rows"]["age"]], 11)
    u = model.user_vectors(sparse)
    np.testing.assert_allclose(u, tower_ref(ref, "user", sparse), rtol=1e-5, atol=1e-6)
    assert np.array_equal(model.user_vectors(table_major(sparse, ["age", "user_id"])), u)
    with pytest.raises(ValueError, match="unknown sparse feature 'item_id'"):
        model.user_vectors({**sparse, "item_id": sparse["age"]})


def test_two_tower_errors(rng, model_dir):
    m, tensors, ref = build_two_tower(rng)
    model = fastrec.load(model_dir(m, tensors))
    sparse = random_sparse(rng, ["user_id", "age"], [ref["rows"]["user_id"], ref["rows"]["age"]], 2)
    with pytest.raises(TypeError, match="'dlrm' model"):
        model.score(np.zeros((2, 5), np.float32), sparse)
    with pytest.raises(ValueError, match="missing"):
        model.recommend({"user_id": sparse["user_id"]})
    with pytest.raises(IndexError, match="feature 'age'"):
        model.recommend({**sparse, "age": (np.array([10**6]), np.array([0, 1, 1]))})
    with pytest.raises(ValueError, match="k must be"):
        model.recommend(sparse, k=0)


# ---- memory, threads, warm-up, repr -------------------------------------------------------

def _base_is_mmap(a) -> bool:
    while a is not None:
        if isinstance(a, mmap.mmap):
            return True
        a = getattr(a, "base", None) if not isinstance(a, memoryview) else a.obj
    return False


def test_tables_are_memory_mapped_not_copied(rng, model_dir):
    m, tensors, ref = build_dlrm(rng, storages=("fp32", "q4", "fp16", "q4"))
    path = model_dir(m, tensors)
    manifest, t1 = read_model(path)
    _, t2 = read_model(path)
    for name, a in t1.items():
        assert not a.flags.owndata and not a.flags.writeable, name
        assert _base_is_mmap(a), name
        assert np.array_equal(a, t2[name])
    model = fastrec.Model(manifest, t1, path=path)
    model2 = fastrec.Model(manifest, t1, path=path)
    for info, data in zip(model.tables, model._table_data):
        assert np.shares_memory(data, t1[m["tables"][[t["name"] for t in m["tables"]]
                                                     .index(info.name)]["tensor"]])
    for g1, g2 in zip(model._group.tables, model2._group.tables):  # two models, one copy of the rows
        d1 = g1.data if isinstance(g1, QuantizedTable) else g1
        d2 = g2.data if isinstance(g2, QuantizedTable) else g2
        assert np.shares_memory(d1, d2)
    if os.path.exists("/proc/self/maps"):
        fastrec.load(path)
        with open("/proc/self/maps") as f:
            assert os.path.realpath(os.path.join(path, "model.safetensors")) in f.read()


def test_score_from_four_threads_equals_serial(rng, model_dir):
    m, tensors, ref = build_dlrm(rng, precision="int8", storages=("q8", "fp32", "q8"), bottom=(64,), top=(32,))
    model = fastrec.load(model_dir(m, tensors))
    cases = []
    for i in range(12):
        B = [1, 5, 64, 300][i % 4]
        dense = rng.standard_normal((B, 5)).astype(np.float32)
        sparse = random_sparse(rng, ref["features"], ref["rows"], B)
        cases.append((dense, sparse, model.score(dense, sparse)))
    errors = []

    def worker(k):
        try:
            for rep in range(25):
                dense, sparse, expected = cases[(k * 7 + rep) % len(cases)]
                if not np.array_equal(model.score(dense, sparse), expected):
                    errors.append(f"thread {k} rep {rep}: result differs")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]


def test_recommend_from_four_threads_equals_serial(rng, model_dir):
    m, tensors, ref = build_two_tower(rng, precision="int8", storage="q8", index_precision="int8")
    model = fastrec.load(model_dir(m, tensors))
    cases = []
    for B in (1, 4, 50):
        sparse = random_sparse(rng, ["user_id", "age"], [ref["rows"]["user_id"], ref["rows"]["age"]], B)
        cases.append((sparse, model.recommend(sparse, k=7)))
    errors = []

    def worker(k):
        for rep in range(20):
            sparse, (s, i) = cases[(k + rep) % len(cases)]
            s2, i2 = model.recommend(sparse, k=7)
            if not (np.array_equal(s, s2) and np.array_equal(i, i2)):
                errors.append(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors


def test_warmup_properties_repr(rng, model_dir):
    m, tensors, ref = build_dlrm(rng, precision="fp16", storages=("q8", "fp32"))
    model = fastrec.load(model_dir(m, tensors), num_threads=2)
    assert fastrec.get_num_threads() == 2
    model.warmup()
    model.warmup(tables=True)
    assert [t.name for t in model.tables] == ["t0", "t1"]
    assert model.tables[0].storage == "q8" and model.tables[0].nbytes == tensors["tables.t0"].nbytes
    assert model.nbytes >= sum(t.nbytes for t in model.tables)
    r = repr(model)
    assert "dlrm" in r and "fp16" in r and "dense_features=5" in r
    assert model.manifest == json.loads(json.dumps(m))
    tt = fastrec.load(model_dir(*build_two_tower(rng)[:2]))
    tt.warmup(tables=True)
    assert "two_tower" in repr(tt) and "items=300" in repr(tt)
    assert tt.index is not None and len(tt.index) == 300


# ---- fastrec inspect ----------------------------------------------------------------------

def test_cli_inspect(rng, model_dir, capsys):
    from fastrec.cli import main

    path = model_dir(*build_dlrm(rng, precision="int8", storages=("q8", "q8"))[:2])
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    for word in ("dlrm", "int8", "t0", "q8", "bottom_mlp: 5 -> 16 relu -> 8 relu", "top_mlp", "total"):
        assert word in out, word
    assert main(["inspect", "--json", path]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kind"] == "dlrm" and r["tables"][0]["rows"] == 50 and r["total_bytes"] > 0
    path = model_dir(*build_two_tower(rng)[:2])
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "two_tower" in out and "300 items x 8" in out
    assert main(["inspect", str(os.path.join(path, "nope"))]) == 2
    assert "nope" in capsys.readouterr().err
    # a model's strings come from its file: control characters are printed escaped
    m, tensors, _ = build_dlrm(rng, precision="fp32", storages=("fp32",))
    m["metadata"] = {"note": "red\x1b[31m\u200etext"}
    assert main(["inspect", model_dir(m, tensors)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u200e" not in out and "red\\x1b[31m\\u200etext" in out
