"""fastrec.torch: reference DLRM / two-tower modules, training, distillation and export."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")

import fastrec  # noqa: E402
from fastrec.torch import DLRM, TwoTower, distill, export, train  # noqa: E402

HAS_TQDM = importlib.util.find_spec("tqdm") is not None


# --------------------------------------------------------------------------- helpers

def csr(gen, T, B, rows, max_len=3):
    """Random table-major CSR: T features x B samples, some bags empty; rows[t] per feature."""
    lengths = torch.randint(0, max_len + 1, (T * B,), generator=gen)
    lengths[::4] = 0
    offsets = torch.zeros(T * B + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    idx = []
    for t in range(T):
        n = int(offsets[(t + 1) * B] - offsets[t * B])
        idx.append(torch.randint(0, rows[t], (n,), generator=gen))
    return torch.cat(idx), offsets


def small_dlrm(seed=0, bottom=(8, 4), top=(6, 1), dim=4):
    torch.manual_seed(seed)
    return DLRM(3, [("t_a", 11, dim), ("t_b", 5, dim)], {"C1": "t_a", "C2": "t_b", "C3": "t_a"},
                list(bottom), list(top))


def dlrm_inputs(model, B=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    rows = {n: r for n, r, _ in model.tables}
    idx, off = csr(gen, len(model.sparse_features), B,
                   [rows[t] for _, t in model.sparse_features])
    return torch.randn(B, model.num_dense, generator=gen), idx, off


def np_bags(w, idx, off):
    w = np.asarray(w, np.float64)
    out = np.zeros((len(off) - 1, w.shape[1]))
    for b in range(len(off) - 1):
        for p in range(int(off[b]), int(off[b + 1])):
            out[b] += w[int(idx[p])]
    return out


def np_mlp(x, layers, relu_last):
    for k, (w, b) in enumerate(layers):
        x = x @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)
        if relu_last or k + 1 < len(layers):
            x = np.maximum(x, 0)
    return x


def sd64(model):
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def np_dlrm_logits(model, sd, dense, idx, off, order="lower"):
    """float64 reference of docs/FORMAT.md steps 1-4 (before the sigmoid), from a state dict in
    TorchRec's names; order="upper" is TorchRec's InteractionArch order."""
    T = len(model.sparse_features)
    B = dense.shape[0]
    nb, nt = len(model.bottom_mlp), len(model.top_mlp)
    bottom = [(sd[f"dense_arch.model._mlp.{i}._linear.weight"],
               sd[f"dense_arch.model._mlp.{i}._linear.bias"]) for i in range(nb)]
    top = [(sd[f"over_arch.model.0._mlp.{i}._linear.weight"],
            sd[f"over_arch.model.0._mlp.{i}._linear.bias"]) for i in range(nt - 1)]
    top.append((sd["over_arch.model.1.weight"], sd["over_arch.model.1.bias"]))
    x = np_mlp(dense.double().numpy(), bottom, relu_last=True)
    vecs = [x]
    for t, (_, table) in enumerate(model.sparse_features):
        w = sd[f"sparse_arch.embedding_bag_collection.embedding_bags.{table}.weight"]
        o = off[t * B:(t + 1) * B + 1]
        vecs.append(np_bags(w, idx[int(o[0]):int(o[-1])], (o - o[0]).numpy()))
    if order == "lower":
        pairs = [(i, j) for i in range(T + 1) for j in range(i)]
    else:
        pairs = [(i, j) for i in range(T + 1) for j in range(i + 1, T + 1)]
    dots = np.stack([(vecs[i] * vecs[j]).sum(1) for i, j in pairs], axis=1)
    return np_mlp(np.concatenate([x, dots], axis=1), top, relu_last=False)[:, 0]


# --------------------------------------------------------------------------- the local checker

DTYPES = {"fp32": "F32", "fp16": "F16", "int8": "I8"}


class Checker:
    """A small validator of docs/FORMAT.md version 1 (what fastrec.torch.export must write)."""

    def __init__(self, path):
        self.path = path
        names = sorted(p.name for p in path.iterdir())
        assert names == ["manifest.json", "model.safetensors"], names
        with open(path / "manifest.json", encoding="utf-8") as f:
            self.m = json.load(f)
        self.file = safetensors.safe_open(str(path / "model.safetensors"), framework="numpy")
        self.used = set()

    def tensor(self, name, dtype, shape):
        assert isinstance(name, str) and name in self.file.keys(), name
        s = self.file.get_slice(name)
        assert s.get_dtype() == dtype, (name, s.get_dtype(), dtype)
        assert list(s.get_shape()) == list(shape), (name, s.get_shape(), shape)
        self.used.add(name)
        return self.file.get_tensor(name)

    def layers(self, layers, n_in, activations):
        assert isinstance(layers, list) and len(layers) == len(activations)
        prec = self.m["precision"]
        for L, act in zip(layers, activations):
            assert set(L) >= {"in", "out", "activation", "weight", "bias"}
            assert L["in"] == n_in and isinstance(L["out"], int) and L["out"] >= 1
            assert L["activation"] == act
            self.tensor(L["weight"], DTYPES[prec], [L["out"], L["in"]])
            if prec == "int8":
                self.tensor(L["weight_scale"], "F32", [L["out"]])
            else:
                assert "weight_scale" not in L or L["weight_scale"] is None
            if L["bias"] is not None:
                self.tensor(L["bias"], "F32", [L["out"]])
            n_in = L["out"]
        return n_in

    def check(self):
        m = self.m
        assert m["format"] == "fastrec-model" and m["format_version"] == 1
        assert m["kind"] in ("dlrm", "two_tower")
        assert isinstance(m["producer"], str) and m["producer"].startswith("fastrec ")
        assert m["precision"] in ("int8", "fp16", "fp32")
        bits = m["embedding_bits"]
        assert bits in (8, 4, None) and not isinstance(bits, bool)
        dims = {}
        for t in m["tables"]:
            assert set(t) == {"name", "rows", "dim", "pooling", "storage", "tensor"}
            assert t["name"] not in dims and t["pooling"] == "sum"
            R, D = t["rows"], t["dim"]
            dims[t["name"]] = D
            if bits == 8:
                assert t["storage"] == "q8"
                self.tensor(t["tensor"], "U8", [R, D + 8])
            elif bits == 4:
                assert t["storage"] == "q4"
                self.tensor(t["tensor"], "U8", [R, math.ceil(D / 2) + 4])
            else:
                assert t["storage"] in ("fp32", "fp16")
                self.tensor(t["tensor"], DTYPES[t["storage"]], [R, D])
        feats = {}
        for f in m["sparse_features"]:
            assert set(f) == {"name", "table"} and f["table"] in dims and f["name"] not in feats
            feats[f["name"]] = f["table"]
        if m["kind"] == "dlrm":
            d = m["dlrm"]
            assert "two_tower" not in m and d["interaction"] == "dot"
            assert isinstance(m["dense_features"], int) and m["dense_features"] >= 1
            nb, nt = len(d["bottom_mlp"]), len(d["top_mlp"])
            D = self.layers(d["bottom_mlp"], m["dense_features"], ["relu"] * nb)
            assert all(dims[t] == D for t in feats.values())
            T = len(feats)
            out = self.layers(d["top_mlp"], D + (T + 1) * T // 2, ["relu"] * (nt - 1) + ["sigmoid"])
            assert out == 1
        else:
            tt = m["two_tower"]
            assert "dlrm" not in m and "dense_features" not in m
            outs = []
            for side in ("user", "item"):
                tw = tt[side]
                assert tw["combine"] == "concat" and isinstance(tw["normalize"], bool)
                assert tw["features"] and all(f in feats for f in tw["features"])
                n = len(tw["mlp"])
                outs.append(self.layers(tw["mlp"], sum(dims[feats[f]] for f in tw["features"]),
                                        ["relu"] * (n - 1) + ["none"] if n else []))
            assert outs[0] == outs[1]
            ix = tt["index"]
            assert ix["precision"] in ("int8", "fp16", "fp32") and isinstance(ix["rerank"], bool)
            N = self.file.get_slice(ix["ids"]).get_shape()[0]
            self.tensor(ix["items"], "F32", [N, outs[0]])
            ids = self.tensor(ix["ids"], "I64", [N])
            assert len(np.unique(ids)) == N
        assert m["featurizer"] is None
        assert isinstance(m["metadata"], dict)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in m["metadata"].items())
        # Besides the referenced tensors, only the writer's gap fillers (FORMAT.md), all zeros.
        pads = {k for k in self.file.keys() if k.startswith("__fastrec_pad.")}
        assert self.used == set(self.file.keys()) - pads, set(self.file.keys()) - pads - self.used
        for k in pads:
            pad = self.file.get_tensor(k)
            assert pad.dtype == np.uint8 and 1 <= pad.size < 64 and not pad.any(), (k, pad)
        return m, {k: self.file.get_tensor(k) for k in self.file.keys() if k not in pads}


def check_export(path):
    return Checker(path).check()


# --------------------------------------------------------------------------- import hygiene

def test_import_fastrec_does_not_import_torch(tmp_path):
    code = "import sys, fastrec; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)


# --------------------------------------------------------------------------- DLRM

def test_dlrm_torchrec_parameter_names():
    m = small_dlrm(bottom=(8, 4), top=(6, 3, 1))
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    ebc = "sparse_arch.embedding_bag_collection.embedding_bags"
    assert got == {
        f"{ebc}.t_a.weight": (11, 4), f"{ebc}.t_b.weight": (5, 4),
        "dense_arch.model._mlp.0._linear.weight": (8, 3),
        "dense_arch.model._mlp.0._linear.bias": (8,),
        "dense_arch.model._mlp.1._linear.weight": (4, 8),
        "dense_arch.model._mlp.1._linear.bias": (4,),
        "over_arch.model.0._mlp.0._linear.weight": (6, 4 + 6),
        "over_arch.model.0._mlp.0._linear.bias": (6,),
        "over_arch.model.0._mlp.1._linear.weight": (3, 6),
        "over_arch.model.0._mlp.1._linear.bias": (3,),
        "over_arch.model.1.weight": (1, 3),
        "over_arch.model.1.bias": (1,),
    }


@pytest.mark.parametrize("top", [(6, 1), (1,), (5, 3, 1)])
def test_dlrm_forward_matches_float64_reference(top):
    m = small_dlrm(top=top)
    dense, idx, off = dlrm_inputs(m, B=7)
    logits = m(dense, idx, off)
    assert logits.shape == (7,) and logits.dtype == torch.float32
    ref = np_dlrm_logits(m, sd64(m), dense, idx, off)
    np.testing.assert_allclose(logits.detach().numpy(), ref, rtol=1e-5, atol=1e-6)
    p = m.predict(dense, idx, off)
    assert not p.requires_grad
    np.testing.assert_allclose(p.numpy(), 1 / (1 + np.exp(-ref)), rtol=1e-5)


def test_dlrm_interaction_order_is_the_strict_lower_triangle():
    m = small_dlrm(bottom=(4,))
    B, D = 2, 4
    x = torch.randn(B, D)
    e = [torch.randn(B, D) for _ in range(3)]
    out = m.inter_arch(x, e)
    vecs = [x, *e]
    expect = [x] + [(vecs[i] * vecs[j]).sum(1, keepdim=True) for i in range(4) for j in range(i)]
    torch.testing.assert_close(out, torch.cat(expect, dim=1))
    assert out.shape == (B, D + 6)


def test_dlrm_dict_input_and_numpy_input_match_table_major():
    m = small_dlrm()
    dense, idx, off = dlrm_inputs(m, B=5)
    ref = m(dense, idx, off)
    B = 5
    sparse = {}
    for t, name in enumerate(m.feature_names):
        o = off[t * B:(t + 1) * B + 1]
        sparse[name] = (idx[int(o[0]):int(o[-1])], o - o[0])
    torch.testing.assert_close(m(dense, sparse), ref)
    torch.testing.assert_close(m(dense.numpy(), idx.numpy().astype(np.int32), off.numpy()), ref)


def test_empty_batches():
    m = small_dlrm()
    empty = torch.zeros(0, dtype=torch.long)
    assert m(torch.zeros(0, 3), empty, torch.zeros(1, dtype=torch.long)).shape == (0,)
    tt = small_two_tower()  # its item table is named "items", like a ModuleDict method
    assert tt.user_vectors(empty, [0]).shape == (0, 3)


def test_dlrm_load_torchrec_state_dict():
    """A state dict in TorchRec's interaction order (upper triangle) gives the same logits."""
    m = small_dlrm(seed=3, top=(5, 1))
    dense, idx, off = dlrm_inputs(m, B=4)
    torchrec_sd = {k: v.clone() for k, v in small_dlrm(seed=9, top=(5, 1)).state_dict().items()}
    expect = np_dlrm_logits(m, {k: v.double().numpy() for k, v in torchrec_sd.items()},
                            dense, idx, off, order="upper")
    m.load_torchrec_state_dict(torchrec_sd)
    np.testing.assert_allclose(m(dense, idx, off).detach().numpy(), expect, rtol=1e-5, atol=1e-6)


def test_dlrm_constructor_errors():
    tables = [("t", 10, 4)]
    with pytest.raises(ValueError, match="bottom_mlp"):
        DLRM(3, tables, ["t"], [8, 5], [1])
    with pytest.raises(ValueError, match="width 1"):
        DLRM(3, tables, ["t"], [4], [4, 2])
    with pytest.raises(ValueError, match="not in tables"):
        DLRM(3, tables, {"f": "missing"}, [4], [1])
    with pytest.raises(ValueError, match="more than once"):
        DLRM(3, tables + [("t", 5, 4)], ["t"], [4], [1])
    with pytest.raises(ValueError, match="without '.'"):
        DLRM(3, [("a.b", 10, 4)], ["a.b"], [4], [1])
    with pytest.raises(TypeError, match="num_dense"):
        DLRM(3.0, tables, ["t"], [4], [1])
    with pytest.raises(ValueError, match="rows"):
        DLRM(3, [("t", 0, 4)], ["t"], [4], [1])
    with pytest.raises(ValueError, match="at least one layer"):
        DLRM(3, tables, ["t"], [], [1])


def test_dlrm_input_errors():
    m = small_dlrm()
    dense, idx, off = dlrm_inputs(m, B=4)
    with pytest.raises(ValueError, match="T \\* B \\+ 1"):
        m(dense, idx, off[:-1])
    with pytest.raises(ValueError, match="dense must have shape"):
        m(dense[:, :2], idx, off)
    with pytest.raises(TypeError, match="int32 or int64"):
        m(dense, idx.float(), off)
    with pytest.raises(ValueError, match="offsets\\[0\\]"):
        m(dense, idx, off + 1)
    with pytest.raises(ValueError, match="len\\(indices\\)"):
        m(dense, idx[:-1], off)
    with pytest.raises(ValueError, match="non-decreasing"):
        m(dense[:2], torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 1, 3, 3, 4, 4]))
    big = idx.clone()
    big[-1] = 100
    with pytest.raises(IndexError, match="out of range"):
        m(dense, big, off)
    with pytest.raises(ValueError, match="missing"):
        m(dense, {"C1": (idx[:1], torch.tensor([0, 1, 1, 1, 1]))})


# --------------------------------------------------------------------------- two-tower

def small_two_tower(seed=0, normalize=True, mlp=((6, 3), (5, 3))):
    torch.manual_seed(seed)
    return TwoTower({"user_id": "users", "country": "countries"},
                    {"item_id": "items", "category": "cats"},
                    [("users", 9, 4), ("countries", 3, 2), ("items", 12, 4), ("cats", 4, 3)],
                    user_mlp=list(mlp[0]), item_mlp=list(mlp[1]), normalize=normalize)


def tower_inputs(model, side, B, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = {n: r for n, r, _ in model.tables}
    feats = model.user_features if side == "user" else model.item_features
    return csr(gen, len(feats), B, [rows[t] for _, t in feats])


def np_tower(model, side, idx, off):
    sd = sd64(model)
    feats = model.user_features if side == "user" else model.item_features
    proj = "query_proj" if side == "user" else "candidate_proj"
    n = len(model.user_mlp if side == "user" else model.item_mlp)
    B = (len(off) - 1) // len(feats)
    cols = []
    for t, (_, table) in enumerate(feats):
        o = off[t * B:(t + 1) * B + 1]
        cols.append(np_bags(sd[f"ebc.embedding_bags.{table}.weight"], idx[int(o[0]):int(o[-1])],
                            (o - o[0]).numpy()))
    layers = [(sd[f"{proj}._mlp.{i}._linear.weight"], sd[f"{proj}._mlp.{i}._linear.bias"])
              for i in range(n)]
    x = np_mlp(np.concatenate(cols, axis=1), layers, relu_last=False)
    if model.normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


@pytest.mark.parametrize("normalize", [True, False])
def test_two_tower_matches_float64_reference(normalize):
    m = small_two_tower(normalize=normalize)
    ui, uo = tower_inputs(m, "user", 5, 1)
    ii, io = tower_inputs(m, "item", 5, 2)
    u, v = m.user_vectors(ui, uo), m.item_vectors(ii, io)
    assert u.shape == (5, 3) and v.shape == (5, 3)
    nu, nv = np_tower(m, "user", ui, uo), np_tower(m, "item", ii, io)
    np.testing.assert_allclose(u.detach().numpy(), nu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v.detach().numpy(), nv, rtol=1e-5, atol=1e-6)
    scores = m(ui, uo, ii, io)
    assert scores.shape == (5, 5)
    np.testing.assert_allclose(scores.detach().numpy(), nu @ nv.T, rtol=1e-5, atol=1e-6)


def test_two_tower_names_and_matrix_factorisation():
    m = small_two_tower()
    assert set(m.state_dict()) == {
        "ebc.embedding_bags.users.weight", "ebc.embedding_bags.countries.weight",
        "ebc.embedding_bags.items.weight", "ebc.embedding_bags.cats.weight",
        "query_proj._mlp.0._linear.weight", "query_proj._mlp.0._linear.bias",
        "query_proj._mlp.1._linear.weight", "query_proj._mlp.1._linear.bias",
        "candidate_proj._mlp.0._linear.weight", "candidate_proj._mlp.0._linear.bias",
        "candidate_proj._mlp.1._linear.weight", "candidate_proj._mlp.1._linear.bias",
    }
    mf = TwoTower({"user_id": "u"}, {"item_id": "i"}, [("u", 6, 3), ("i", 8, 3)], normalize=False)
    assert set(mf.state_dict()) == {"ebc.embedding_bags.u.weight", "ebc.embedding_bags.i.weight"}
    s = mf(torch.tensor([1, 2]), torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]),
           torch.tensor([0, 1, 2, 3]))
    W, H = mf.ebc.embedding_bags.u.weight, mf.ebc.embedding_bags.i.weight
    torch.testing.assert_close(s, W[[1, 2]] @ H[[3, 4, 5]].T)


def test_two_tower_constructor_errors():
    tables = [("u", 5, 4), ("i", 5, 4)]
    with pytest.raises(ValueError, match="same width"):
        TwoTower(["u"], ["i"], tables, user_mlp=[3])
    with pytest.raises(ValueError, match="differ between the towers"):
        TwoTower({"x": "u"}, {"x": "i"}, tables)
    with pytest.raises(TypeError, match="normalize"):
        TwoTower(["u"], ["i"], tables, normalize=1)
    with pytest.raises(ValueError, match="at least one feature"):
        TwoTower([], ["i"], tables)


# --------------------------------------------------------------------------- training / distillation

def ranking_problem(n_batches=6, B=32, seed=0):
    """Labels from a fixed hidden rule over one dense feature and one id feature."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        dense = torch.randn(B, 3, generator=gen)
        ids = torch.randint(0, 11, (B,), generator=gen)
        ids2 = torch.randint(0, 5, (B,), generator=gen)
        ids3 = torch.randint(0, 11, (B,), generator=gen)
        idx = torch.cat([ids, ids2, ids3])
        off = torch.arange(3 * B + 1)
        labels = ((dense[:, 0] + (ids % 3 == 0).float() * 1.5) > 0.5).float()
        batches.append({"dense": dense, "indices": idx, "offsets": off, "labels": labels})
    return batches


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_train_and_distill_dlrm_reduce_the_loss(capsys):
    batches = ranking_problem()
    teacher = small_dlrm(seed=1, bottom=(16, 4), top=(16, 1))
    hist = train(teacher, batches, epochs=8, lr=2e-2, progress=False)
    assert [h["epoch"] for h in hist] == list(range(1, 9))
    assert hist[-1]["loss"] < hist[0]["loss"] * 0.8
    before = state(teacher)
    student = small_dlrm(seed=2, bottom=(4,), top=(1,))
    hist = distill(teacher, student, batches, epochs=6, lr=2e-2, progress=False)
    assert set(hist[0]) == {"epoch", "loss", "soft_loss", "hard_loss"}
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["soft_loss"] < hist[0]["soft_loss"]
    for k, v in state(teacher).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert student is not teacher and student.training and teacher.training
    assert not {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    assert capsys.readouterr().err == ""
    # labels may be left out when alpha == 1 (tuples work as well as dicts)
    tuples = [(b["dense"], b["indices"], b["offsets"]) for b in batches[:2]]
    h = distill(teacher, student, tuples, alpha=1.0, progress=False)
    assert math.isnan(h[0]["hard_loss"]) and h[0]["loss"] == h[0]["soft_loss"]


def tower_problem(n_batches=5, B=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        users = torch.randperm(9, generator=gen)[:8].repeat(2)[:B]
        items = (users * 5 + 1) % 12  # each user's item
        out.append({"user_indices": users, "user_offsets": torch.arange(B + 1),
                    "item_indices": items, "item_offsets": torch.arange(B + 1)})
    return out


def test_train_and_distill_two_tower_reduce_the_loss():
    batches = tower_problem()
    torch.manual_seed(0)
    tables = [("u", 9, 8), ("i", 12, 8)]
    teacher = TwoTower({"user": "u"}, {"item": "i"}, tables, user_mlp=[8], item_mlp=[8],
                       normalize=False)
    hist = train(teacher, batches, epochs=6, lr=5e-2, progress=False)
    assert hist[-1]["loss"] < hist[0]["loss"]
    before = state(teacher)
    student = TwoTower({"user": "u"}, {"item": "i"}, [("u", 9, 4), ("i", 12, 4)], normalize=False)
    tuples = [(b["user_indices"], b["user_offsets"], b["item_indices"], b["item_offsets"])
              for b in batches]
    hist = distill(teacher, student, tuples, epochs=6, lr=5e-2, temperature=1.0, progress=False)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["soft_loss"] < hist[0]["soft_loss"]
    for k, v in state(teacher).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.skipif(HAS_TQDM, reason="tqdm installed: the bar replaces the printed lines")
def test_progress_prints_one_line_per_epoch(capsys):
    m = small_dlrm()
    train(m, ranking_problem(n_batches=2, B=4), epochs=2, lr=1e-3)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("epoch 1/2: loss ") and "2 batches" in err[0]
    distill(small_dlrm(seed=1), m, ranking_problem(n_batches=1, B=4), progress=True)
    line = capsys.readouterr().err.strip()
    assert line.startswith("epoch 1/1: loss ") and "soft_loss" in line and "hard_loss" in line


def test_training_errors():
    batches = ranking_problem(n_batches=2, B=4)
    teacher, student = small_dlrm(seed=0), small_dlrm(seed=1)
    with pytest.raises(TypeError, match="one-shot iterator"):
        distill(teacher, student, iter(batches), epochs=2, progress=False)
    with pytest.raises(ValueError, match="no batch"):
        train(student, [], progress=False)
    with pytest.raises(ValueError, match="different modules"):
        distill(teacher, teacher, batches, progress=False)
    with pytest.raises(ValueError, match="shares parameters"):
        shared = small_dlrm(seed=2)
        shared.dense_arch = teacher.dense_arch
        distill(teacher, shared, batches, progress=False)
    with pytest.raises(ValueError, match="alpha"):
        distill(teacher, student, batches, alpha=1.5, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        distill(teacher, student, batches, temperature=0, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train(student, batches, epochs=0, progress=False)
    with pytest.raises(ValueError, match="lacks the keys"):
        distill(teacher, student, [{"dense": batches[0]["dense"]}], progress=False)
    with pytest.raises(ValueError, match="lacks the keys"):  # labels needed unless alpha == 1
        distill(teacher, student, [{k: v for k, v in batches[0].items() if k != "labels"}],
                progress=False)
    with pytest.raises(TypeError, match="same kind"):
        distill(small_two_tower(), student, batches, progress=False)
    with pytest.raises(ValueError, match="teacher parameters"):
        opt = torch.optim.SGD(list(student.parameters()) + list(teacher.parameters()), lr=0.1)
        distill(teacher, student, batches, optimizer=opt, progress=False)
    with pytest.raises(ValueError, match="labels must have shape"):
        bad = dict(batches[0], labels=torch.zeros(3))
        train(student, [bad], progress=False)
    with pytest.raises(ValueError, match="batch 0 holds no samples"):  # (the loss was NaN)
        empty = {k: (v[:1] if k == "offsets" else v[:0]) for k, v in batches[0].items()}
        train(student, [empty], progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(student, batches, lr=float("inf"), progress=False)
    b = batches[0]
    with pytest.raises(ValueError, match="labels are missing"):
        train(student, [(b["dense"], b["indices"], b["offsets"], None)], progress=False)
    for labels in (b["labels"] * 5, b["labels"] - 1, torch.full_like(b["labels"], float("nan"))):
        with pytest.raises(ValueError, match="labels must be in \\[0, 1\\]"):
            train(student, [dict(b, labels=labels)], progress=False)
    with pytest.raises(TypeError, match="labels must be numbers"):
        train(student, [dict(b, labels=np.array(["1"] * len(b["labels"])))], progress=False)
    for t in (2e19, 10**200, float("nan")):  # T^2 past float32 made the loss inf
        with pytest.raises(ValueError, match="temperature"):
            distill(teacher, student, batches, temperature=t, progress=False)
    with pytest.raises(TypeError, match="labels must be numbers"):
        train(student, [dict(b, labels=b["labels"].to(torch.complex64))], progress=False)
    # wrongly typed numbers: TypeError (they were ValueErrors), as everywhere else
    for kwargs in ({"epochs": 2.0}, {"epochs": "2"}, {"lr": "0.1"}, {"lr": None}):
        with pytest.raises(TypeError, match=next(iter(kwargs))):
            train(student, batches, progress=False, **kwargs)
    for kwargs in ({"temperature": "2"}, {"alpha": None}, {"alpha": True}):
        with pytest.raises(TypeError, match=next(iter(kwargs))):
            distill(teacher, student, batches, progress=False, **kwargs)


def test_training_takes_numpy_scalars_and_dict_indices_without_offsets():
    batches = ranking_problem(n_batches=2, B=4)
    teacher, student = small_dlrm(seed=0), small_dlrm(seed=1)
    train(student, batches, epochs=np.int64(1), lr=np.float32(1e-3), progress=False)
    distill(teacher, student, batches, temperature=np.float32(2), alpha=np.float64(0.5), progress=False)
    b = batches[0]
    names = [f for f, _ in student.sparse_features]
    per_feature = dict(zip(names, student._split(b["indices"], b["offsets"], names)[1]))
    hist = train(student, [{"dense": b["dense"], "indices": per_feature, "labels": b["labels"]}],
                 progress=False)
    assert np.isfinite(hist[0]["loss"])
    tt = small_two_tower()  # two-tower dict batches: user_offsets / item_offsets left out too
    sides = {}
    for side in ("user", "item"):
        names = [f for f, _ in getattr(tt, f"{side}_features")]
        ind, off = tower_inputs(tt, side, 6, 0)
        sides[f"{side}_indices"] = dict(zip(names, tt._split(ind, off, names)[1]))
    hist = train(tt, [sides], progress=False)
    assert np.isfinite(hist[0]["loss"])


# --------------------------------------------------------------------------- export

@pytest.mark.parametrize("precision", ["int8", "fp16", "fp32"])
@pytest.mark.parametrize("bits", [8, 4, None])
def test_export_dlrm_follows_the_format(tmp_path, precision, bits):
    m = small_dlrm(top=(6, 3, 1))
    out = export(m, tmp_path / "model", precision=precision, embedding_bits=bits,
                 metadata={"dataset": "synthetic"})
    assert out == tmp_path / "model"
    man, t = check_export(out)
    assert man["kind"] == "dlrm" and man["precision"] == precision and man["embedding_bits"] == bits
    assert man["metadata"] == {"dataset": "synthetic"}
    assert [f["name"] for f in man["sparse_features"]] == ["C1", "C2", "C3"]
    assert man["dense_features"] == 3
    sd = m.state_dict()
    linears = [("dense_arch.model._mlp.0._linear", "dlrm.bottom.0"),
               ("dense_arch.model._mlp.1._linear", "dlrm.bottom.1"),
               ("over_arch.model.0._mlp.0._linear", "dlrm.top.0"),
               ("over_arch.model.0._mlp.1._linear", "dlrm.top.1"),
               ("over_arch.model.1", "dlrm.top.2")]
    for src, dst in linears:
        w, b = sd[f"{src}.weight"].numpy(), sd[f"{src}.bias"].numpy()
        if precision == "int8":
            q = fastrec.Int8Linear.from_float(w, b)
            assert t[f"{dst}.weight"].tobytes() == q.weight_int8.tobytes()
            assert t[f"{dst}.weight_scale"].tobytes() == q.weight_scale.tobytes()
        else:
            np.testing.assert_array_equal(t[f"{dst}.weight"],
                                          w.astype(np.float16 if precision == "fp16" else np.float32))
        np.testing.assert_array_equal(t[f"{dst}.bias"], b)
    for name in ("t_a", "t_b"):
        w = sd[f"sparse_arch.embedding_bag_collection.embedding_bags.{name}.weight"].numpy()
        if bits is None:
            np.testing.assert_array_equal(t[f"tables.{name}"],
                                          w.astype(np.float16 if precision == "fp16" else np.float32))
        else:
            expect = fastrec.QuantizedTable.from_float(w, bits=bits).data
            assert t[f"tables.{name}"].tobytes() == np.ascontiguousarray(expect).tobytes()


def test_export_two_tower_includes_the_index(tmp_path):
    m = small_two_tower()
    N = 7
    ii, io = tower_inputs(m, "item", N, 5)
    ids = np.array([70, 3, 12, 99, 5, 8, 1000], dtype=np.int64)
    out = export(m, tmp_path / "tt", items={"indices": ii, "offsets": io, "ids": ids},
                 batch_size=3, index_precision="fp16", rerank=False)
    man, t = check_export(out)
    tt = man["two_tower"]
    assert tt["user"]["features"] == ["user_id", "country"]
    assert tt["item"]["features"] == ["item_id", "category"]
    assert tt["index"] == {"items": "index.items", "ids": "index.ids", "precision": "fp16",
                           "rerank": False}
    assert [f["name"] for f in man["sparse_features"]] == ["user_id", "country", "item_id", "category"]
    np.testing.assert_array_equal(t["index.ids"], ids)
    with torch.no_grad():
        expect = m.item_vectors(ii, io).numpy()
    np.testing.assert_allclose(t["index.items"], expect, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(t["index.items"], np_tower(m, "item", ii, io), rtol=1e-5, atol=1e-6)
    assert m.training  # the export leaves the mode as it was
    # a tuple works too, and ids default to 0..N-1
    man, t = check_export(export(m, tmp_path / "tt2", items=(ii, io), precision="fp32"))
    np.testing.assert_array_equal(t["index.ids"], np.arange(N))


def test_export_matrix_factorisation_defaults_to_every_item_row(tmp_path):
    torch.manual_seed(0)
    mf = TwoTower({"user_id": "u"}, {"item_id": "i"}, [("u", 6, 3), ("i", 8, 3)], normalize=False)
    man, t = check_export(export(mf, tmp_path / "mf", precision="fp32", embedding_bits=None))
    assert man["two_tower"]["user"]["mlp"] == [] and man["two_tower"]["user"]["normalize"] is False
    np.testing.assert_array_equal(t["index.ids"], np.arange(8))
    np.testing.assert_array_equal(t["index.items"], mf.ebc.embedding_bags.i.weight.detach().numpy())
    np.testing.assert_array_equal(t["tables.u"], mf.ebc.embedding_bags.u.weight.detach().numpy())


def test_export_replaces_an_earlier_export(tmp_path):
    m = small_dlrm()
    export(m, tmp_path / "m", precision="fp32")
    man, _ = check_export(export(m, tmp_path / "m", precision="int8"))
    assert man["precision"] == "int8"


def test_export_errors(tmp_path):
    m = small_dlrm()
    with pytest.raises(ValueError, match="precision"):
        export(m, tmp_path / "a", precision="int4")
    for kwargs in ({"precision": None}, {"precision": 8}, {"batch_size": 2.0}, {"batch_size": "4"}):
        with pytest.raises(TypeError, match=next(iter(kwargs))):
            export(m, tmp_path / "a", **kwargs)
    with pytest.raises(ValueError, match="embedding_bits"):
        export(m, tmp_path / "a", embedding_bits=2)
    for bad in (True, 8.0, "8"):
        with pytest.raises(TypeError, match="embedding_bits"):
            export(m, tmp_path / "a", embedding_bits=bad)
    with pytest.raises(ValueError, match="items="):
        export(m, tmp_path / "a", items=(torch.arange(2), torch.arange(3)))
    with pytest.raises(TypeError, match="DLRM or fastrec.torch.TwoTower"):
        export(torch.nn.Linear(2, 2), tmp_path / "a")
    with pytest.raises(TypeError, match="metadata"):
        export(m, tmp_path / "a", metadata={"n": 1})
    assert not (tmp_path / "a").exists()  # nothing written on a bad argument
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        export(m, tmp_path / "file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="notes.txt"):
        export(m, tmp_path / "busy")
    with torch.no_grad():
        m.dense_arch.model._mlp[0]._linear.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        export(m, tmp_path / "nan")
    tt = small_two_tower()
    with pytest.raises(ValueError, match="items="):
        export(tt, tmp_path / "b")  # two item features: the catalogue must be given
    ii, io = tower_inputs(tt, "item", 3, 0)
    with pytest.raises(ValueError, match="unique"):
        export(tt, tmp_path / "b", items=(ii, io, [1, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        export(tt, tmp_path / "b", items=(ii, io, [1, 2]))
    with pytest.raises(ValueError, match="T \\* B \\+ 1"):
        export(tt, tmp_path / "b", items=(ii, io[:-1]))
    with pytest.raises(ValueError, match="index_precision"):
        export(tt, tmp_path / "b", items=(ii, io), index_precision="int4")
    with pytest.raises(TypeError, match="index_precision"):
        export(tt, tmp_path / "b", items=(ii, io), index_precision=None)
    with pytest.raises(ValueError, match="'indices', 'offsets'"):
        export(tt, tmp_path / "b", items={"idx": ii})
    # what ItemIndex refuses at load is refused at export (it used to write a model load refused)
    with pytest.raises(ValueError, match=">= 0"):
        export(tt, tmp_path / "b", items=(ii, io, [5, -1, 7]))
    tt = small_two_tower(normalize=False)
    with torch.no_grad():
        for p in tt.parameters():
            p.fill_(30.0)
    with pytest.raises(ValueError, match="float16"):
        export(tt, tmp_path / "b", items=(ii, io), index_precision="fp16")
    assert not (tmp_path / "b").exists()
    with warnings.catch_warnings():  # (torch.ao.quantization is deprecated)
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(small_dlrm(), {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(TypeError, match="export the float model"):
        export(q, tmp_path / "c")
    with pytest.raises(ValueError, match="row 0 .*float16"):  # q4's fp16 scale and bias
        m = small_dlrm()
        with torch.no_grad():
            m._ebc.embedding_bags[m.tables[0][0]].weight[0] = -7e4
        export(m, tmp_path / "c", embedding_bits=4)


# --------------------------------------------------------------------------- round trip

needs_load = pytest.mark.skipif(not hasattr(fastrec, "load"), reason="fastrec.load not in this build")


@needs_load
def test_round_trip_dlrm_fp32_matches_torch(tmp_path):
    m = small_dlrm(top=(6, 3, 1))
    dense, idx, off = dlrm_inputs(m, B=9)
    p = m.predict(dense, idx, off).numpy()
    model = fastrec.load(export(m, tmp_path / "m", precision="fp32", embedding_bits=None))
    got = model.score(dense.numpy(), (idx.numpy(), off.numpy()))
    np.testing.assert_allclose(got, p, rtol=1e-5)
    sparse = {}
    for t, name in enumerate(m.feature_names):
        o = off[t * 9:(t + 1) * 9 + 1]
        sparse[name] = (idx[int(o[0]):int(o[-1])].numpy(), (o - o[0]).numpy())
    np.testing.assert_allclose(model.score(dense.numpy(), sparse), p, rtol=1e-5)


@needs_load
@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_dlrm_int8_close_to_torch(tmp_path, bits):
    m = small_dlrm(top=(6, 3, 1))
    dense, idx, off = dlrm_inputs(m, B=16)
    p = m.predict(dense, idx, off).numpy()
    model = fastrec.load(export(m, tmp_path / "m", precision="int8", embedding_bits=bits))
    got = model.score(dense.numpy(), (idx.numpy(), off.numpy()))
    assert got.shape == p.shape
    np.testing.assert_allclose(got, p, atol=5e-3)


@needs_load
def test_round_trip_two_tower_fp32_matches_torch(tmp_path):
    m = small_two_tower()
    ii, io = tower_inputs(m, "item", 10, 5)
    ids = np.arange(100, 110, dtype=np.int64)
    model = fastrec.load(export(m, tmp_path / "tt", precision="fp32", embedding_bits=None,
                                items=(ii, io, ids), index_precision="fp32"))
    ui, uo = tower_inputs(m, "user", 4, 6)
    with torch.no_grad():
        u, v = m.user_vectors(ui, uo).numpy(), m.item_vectors(ii, io).numpy()
    np.testing.assert_allclose(model.user_vectors((ui.numpy(), uo.numpy())), u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.item_vectors((ii.numpy(), io.numpy())), v, rtol=1e-5, atol=1e-6)
    scores, got_ids = model.recommend((ui.numpy(), uo.numpy()), k=3)
    expect = u.astype(np.float64) @ v.T.astype(np.float64)
    np.testing.assert_allclose(scores, np.sort(expect, axis=1)[:, ::-1][:, :3], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.sort(expect, axis=1)[:, ::-1][:, :3],
                                  np.take_along_axis(expect, got_ids - 100, axis=1))


# --------------------------------------------------------------------------- bag settings, names

@needs_load
@pytest.mark.parametrize("modes", [("mean", "sum"), ("max", "mean")])
def test_export_keeps_each_bags_pooling_mode(tmp_path, modes):
    """A bag switched to mean or max pooling is exported as such (export wrote "sum" for every
    table, and the loaded model silently scored differently from torch)."""
    m = small_dlrm(top=(6, 3, 1))
    for (name, _, _), mode in zip(m.tables, modes):
        m._ebc.embedding_bags[name].mode = mode
    tt = small_two_tower()
    tt._ebc.embedding_bags["countries"].mode = "mean"
    model = _fp32_exports_score_as_torch(tmp_path, m, tt)
    assert [t.pooling for t in model.tables] == list(modes)


def _fp32_exports_score_as_torch(tmp_path, m, tt):
    """Exports DLRM m and two-tower tt in fp32, checks that the loaded models score as torch
    does; returns the loaded DLRM."""
    dense, idx, off = dlrm_inputs(m, B=9)
    p = m.predict(dense, idx, off).numpy()
    model = fastrec.load(export(m, tmp_path / "m", precision="fp32", embedding_bits=None))
    np.testing.assert_allclose(model.score(dense.numpy(), (idx.numpy(), off.numpy())), p, rtol=1e-5)
    ii, io = tower_inputs(tt, "item", 10, 5)
    loaded = fastrec.load(export(tt, tmp_path / "tt", precision="fp32", embedding_bits=None, items=(ii, io)))
    ui, uo = tower_inputs(tt, "user", 4, 6)
    with torch.no_grad():
        u = tt.user_vectors(ui, uo).numpy()
    np.testing.assert_allclose(loaded.user_vectors((ui.numpy(), uo.numpy())), u, rtol=1e-5, atol=1e-6)
    return model


@needs_load
def test_export_keeps_each_layers_activation(tmp_path):
    """A layer whose relu flag was switched after construction is exported as its forward runs
    (export wrote the constructor's pattern: the loaded model scored 0.02 off torch's fp32)."""
    m = small_dlrm(top=(6, 3, 1))
    m.over_arch.model[0]._mlp[0].relu = False
    m.dense_arch.model._mlp[1].relu = False
    tt = small_two_tower()
    tt.query_proj._mlp[1].relu = True  # the last layer, linear by default
    _fp32_exports_score_as_torch(tmp_path, m, tt)


def test_int8_width_limit_is_checked_when_writing(tmp_path):
    """Item vectors or int8 layer inputs wider than 133,144 (int32 sums of 127 * 127 * width):
    export wrote a two-tower model with an int8 index that load then refused, and write_model
    accepted an int8 layer that load refused with a bare ValueError (not a ModelFormatError)."""
    from fastrec.io import read_model, write_model

    wide = 2**31 // (127 * 127) + 1
    torch.manual_seed(0)
    mf = TwoTower({"user_id": "users"}, {"item_id": "items"}, [("users", 2, wide), ("items", 3, wide)])
    with pytest.raises(fastrec.ModelFormatError, match=r"\$\.two_tower\.index\.precision.*133144"):
        export(mf, tmp_path / "mf", precision="fp32", embedding_bits=None)
    assert len(fastrec.load(export(mf, tmp_path / "mf", precision="fp32", embedding_bits=None,
                                   index_precision="fp16")).index) == 3
    m = DLRM(wide, [("a", 3, 1)], ["a"], [1], [1])
    man, t = read_model(export(m, tmp_path / "d", precision="fp32", embedding_bits=None))
    t, man["precision"] = dict(t), "int8"
    for layer in man["dlrm"]["bottom_mlp"] + man["dlrm"]["top_mlp"]:
        t[layer["weight"]] = np.ones(t[layer["weight"]].shape, np.int8)
        layer["weight_scale"] = layer["weight"] + "_scale"
        t[layer["weight_scale"]] = np.ones(t[layer["weight"]].shape[0], np.float32)
    with pytest.raises(fastrec.ModelFormatError, match=r"\$\.dlrm\.bottom_mlp\[0\]\.in.*133144"):
        write_model(tmp_path / "d8", man, t)


def test_export_refuses_bag_settings_the_format_lacks(tmp_path):
    for attr, value, match in (("padding_idx", 0, "padding_idx"), ("max_norm", 1.0, "max_norm"),
                               ("include_last_offset", False, "include_last_offset")):
        m = small_dlrm()
        setattr(m._ebc.embedding_bags["t_b"], attr, value)
        with pytest.raises(ValueError, match=f"'t_b'.*{match}"):
            export(m, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_export_refuses_a_model_on_the_meta_device(tmp_path):
    with torch.device("meta"):
        m = DLRM(2, [("a", 5, 4)], ["a"], [4], [3, 1])
    with pytest.raises(ValueError, match="meta"):
        export(m, tmp_path / "a")


def test_export_takes_numpy_embedding_bits(tmp_path):
    m = small_dlrm()
    model = fastrec.load(export(m, tmp_path / "a", embedding_bits=np.int64(4)))
    assert [t.storage for t in model.tables] == ["q4", "q4"]


def test_a_table_named_training():
    """nn.Module.train() sets ``self.training`` on every submodule, also on the bag container
    whose table was called "training" (TypeError: cannot assign 'bool' as child module)."""
    m = DLRM(2, [("training", 5, 4)], ["training"], [4], [3, 1])
    m.eval()
    assert not m.training and not m._ebc.embedding_bags.training
    m.train()
    assert m._ebc.embedding_bags["training"].weight.shape == (5, 4)
    assert "sparse_arch.embedding_bag_collection.embedding_bags.training.weight" in m.state_dict()
    tt = TwoTower(["users"], ["training"], [("users", 5, 4), ("training", 6, 4)])
    batch = (torch.arange(4), torch.arange(5), torch.arange(4), torch.arange(5))
    train(tt, [batch], progress=False)
    assert tt.training


def test_a_wrapped_two_tower_model_trains_and_distils():
    """Any module with ``kind = "two_tower"`` is trained as one (it was taken for a ranking model)."""
    class Wrapped(torch.nn.Module):
        kind = "two_tower"

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ui, uo, ii, io):
            return self.inner(ui, uo, ii, io)

    def make(seed):
        torch.manual_seed(seed)
        return TwoTower(["users"], ["items"], [("users", 10, 4), ("items", 10, 4)])

    batch = (torch.arange(4), torch.arange(5), torch.arange(4), torch.arange(5))
    h = train(Wrapped(make(0)), [batch], progress=False)
    assert math.isfinite(h[0]["loss"])
    h = distill(Wrapped(make(0)), make(1), [batch], progress=False)
    assert math.isfinite(h[0]["soft_loss"])
