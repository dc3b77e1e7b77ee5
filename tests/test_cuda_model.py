"""fastrec.load(path, device="cuda"): the whole model on the GPU, against the CPU model on the same
directory and inputs (fp32 within 1e-5 relative; int8 within 5e-3 absolute on probabilities: the
activation quantization of the top MLP may land one code step apart when the float inputs differ
in their last bits, so exact equality is not expected). Torch and CuPy models; host and device
inputs; errors. GPU tests skip cleanly without a GPU; the RuntimeError tests run everywhere."""

from __future__ import annotations

import sys
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastrec
from fastrec import _cuda, _cuda_model
from fastrec.io import write_model
from fastrec.testing import assert_topk_matches, topk_ref

from conftest import CUDA_SKIP_REASON, make_to_device, needs_cuda, to_host
from test_model_runtime import build_dlrm, build_two_tower, random_sparse, table_major


@pytest.fixture(params=["torch", "cupy", "emulated"])
def to_device(request, monkeypatch):
    """conftest's, plus "emulated" (conftest.make_to_device): the GPU model runtime over the real
    kernels compiled for the host, its torch "device" the CPU (index 0)."""
    make = make_to_device(request.param, monkeypatch)
    if getattr(make, "emulated", False):
        import torch

        from fastrec import _cuda_embedding

        class CpuTorch(_cuda_model._Torch):
            def __init__(self, index):
                super().__init__(index)
                self.device = torch.device("cpu")

        monkeypatch.setattr(_cuda_model, "_Torch", CpuTorch)
        monkeypatch.setattr(_cuda_model, "_torch_reason", lambda: None)
        monkeypatch.setattr(_cuda_model.CudaModel, "_sync", lambda self: None)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(_cuda_embedding, "_target", lambda like, device: ("torch", 0))
    return make


@pytest.fixture
def model_dir(tmp_path):
    counter = iter(range(10**6))

    def write(manifest, tensors):
        path = tmp_path / f"model{next(counter)}"
        write_model(path, manifest, tensors)
        return str(path)

    return write


@pytest.fixture
def dev(to_device):
    """(framework name, a function copying a numpy array to the GPU in that framework)."""
    return ("torch" if hasattr(to_device(np.zeros(1)), "detach") else "cupy"), to_device


def _framework_of(x) -> str:
    return "torch" if type(x).__module__.startswith("torch") else "cupy"


def _check_out(x, fw, shape, dtype=np.float32):
    assert _framework_of(x) == fw, type(x)
    assert _cuda.is_device_array(x)
    h = to_host(x)
    assert h.shape == shape and h.dtype == dtype
    return h


def _on_device(sparse, to_device, dtype=None):
    return {f: (to_device(i if dtype is None else i.astype(dtype)), to_device(o if dtype is None else o.astype(dtype)))
            for f, (i, o) in sparse.items()}


def _pair_on_device(pair, to_device):
    return to_device(pair[0]), to_device(pair[1])


# ---- DLRM ---------------------------------------------------------------------------------

@pytest.mark.parametrize("precision,storages", [("fp32", ("fp32", "fp32", "fp32", "fp32")),
                                                ("fp32", ("q4", "fp32", "q4", "fp16")),
                                                ("fp16", ("fp16", "fp16", "fp16")),
                                                ("fp16", ("fp32",))])
def test_dlrm_float_matches_cpu(rng, model_dir, dev, precision, storages):
    fw, to_device = dev
    m, tensors, ref = build_dlrm(rng, precision=precision, storages=storages, bottom=(32, 16), top=(24, 12))
    path = model_dir(m, tensors)
    cpu = fastrec.load(path)
    gpu = fastrec.load(path, device="cuda", framework=fw)
    assert gpu.device == "cuda:0" and gpu.framework == fw and cpu.device == "cpu" and cpu.framework is None
    for B in (0, 1, 3, 97):
        dense = rng.standard_normal((B, 5)).astype(np.float32)
        sparse = random_sparse(rng, ref["features"], ref["rows"], B)
        expect = cpu.score(dense, sparse)
        pair = table_major(sparse, ref["features"])
        for d, s in ((dense, sparse),                                               # host inputs
                     (to_device(dense), _on_device(sparse, to_device)),              # device dict
                     (to_device(dense), _pair_on_device(pair, to_device)),           # device KJT pair
                     (dense, pair)):                                                 # host KJT pair
            p = _check_out(gpu.score(d, s), fw, (B,))
            np.testing.assert_allclose(p, expect, rtol=1e-5, atol=1e-6)
    dense[B // 2, 1] = np.inf  # as on the CPU: ValueError naming the row (the GPU returned NaN)
    for model, d in ((cpu, dense), (gpu, dense), (gpu, to_device(dense))):
        with pytest.raises(ValueError, match=f"NaN or Inf \\(row {B // 2}\\)"):
            model.score(d, sparse)


@pytest.mark.parametrize("storages", [("q8", "q8", "q8", "q8"), ("q4", "fp32", "q4")])
def test_dlrm_int8_matches_cpu(rng, model_dir, dev, storages):
    fw, to_device = dev
    m, tensors, ref = build_dlrm(rng, precision="int8", storages=storages, bottom=(64, 32), top=(48, 16))
    path = model_dir(m, tensors)
    cpu, gpu = fastrec.load(path), fastrec.load(path, device="cuda", framework=fw)
    for B in (1, 7, 300):
        dense = rng.standard_normal((B, 5)).astype(np.float32)
        sparse = random_sparse(rng, ref["features"], ref["rows"], B)
        expect = cpu.score(dense, sparse)
        for d, s in ((dense, sparse), (to_device(dense), _on_device(sparse, to_device))):
            p = _check_out(gpu.score(d, s), fw, (B,))
            assert np.abs(p - expect).max() < 5e-3, np.abs(p - expect).max()
    dense[B // 2, 3] = np.nan  # as on the CPU: ValueError (found by the top MLP's check on the GPU)
    with pytest.raises(ValueError, match="NaN or Inf"):
        cpu.score(dense, sparse)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gpu.score(to_device(dense), sparse)


def test_dlrm_interaction_order_and_shared_tables(rng, model_dir, dev):
    """Six features (pair order matters from three on), two of them on one table (uploaded once),
    int32 ids and offsets."""
    fw, to_device = dev
    m, tensors, ref = build_dlrm(rng, storages=("fp32", "q8", "fp16", "fp32", "q8"))
    m["sparse_features"].append({"name": "C6", "table": "t1"})
    T = 6
    K = 8 + (T + 1) * T // 2
    m["dlrm"]["top_mlp"][0]["in"] = K
    tensors[m["dlrm"]["top_mlp"][0]["weight"]] = (rng.standard_normal((12, K)) / np.sqrt(K)).astype(np.float32)
    ref["features"].append("C6")
    ref["rows"].append(ref["rows"][1])
    path = model_dir(m, tensors)
    cpu, gpu = fastrec.load(path), fastrec.load(path, device="cuda", framework=fw)
    assert gpu._cuda.group.bags.tables[1] is gpu._cuda.group.bags.tables[5]
    dense = rng.standard_normal((33, 5)).astype(np.float32)
    sparse = random_sparse(rng, ref["features"], ref["rows"], 33)
    expect = cpu.score(dense, sparse)
    p = to_host(gpu.score(to_device(dense), _on_device(sparse, to_device, np.int32)))
    np.testing.assert_allclose(p, expect, rtol=1e-5, atol=1e-6)
    p = to_host(gpu.score(dense, {f: (i.astype(np.int32), o.astype(np.int32)) for f, (i, o) in sparse.items()}))
    np.testing.assert_allclose(p, expect, rtol=1e-5, atol=1e-6)


# ---- two-tower ----------------------------------------------------------------------------

@pytest.mark.parametrize("precision,storage,index_precision", [("fp32", "fp32", "fp32"), ("fp16", "q8", "fp32"),
                                                               ("int8", "q8", "int8"), ("int8", "q4", "fp16")])
def test_two_tower_matches_cpu(rng, model_dir, dev, precision, storage, index_precision):
    fw, to_device = dev
    m, tensors, ref = build_two_tower(rng, precision=precision, storage=storage, normalize=True,
                                      index_precision=index_precision, n_items=700,
                                      order=["age", "item_id", "user_id"], dims={"age": 4, "user_id": 12})
    path = model_dir(m, tensors)
    cpu, gpu = fastrec.load(path), fastrec.load(path, device="cuda", framework=fw)
    B = 29
    feats = list(cpu.user_features)
    sparse = random_sparse(rng, feats, [ref["rows"][f] for f in feats], B)
    tol = 5e-3 if precision == "int8" else 1e-5
    score_tol = 1e-2 if precision == "int8" else 1e-5  # |d score| <= |d u|_2 (unit-norm items)
    u_cpu = cpu.user_vectors(sparse)
    items, item_ids = tensors["index.items"], tensors["index.ids"]
    for s in (sparse, _on_device(sparse, to_device), _pair_on_device(table_major(sparse, feats), to_device)):
        u = _check_out(gpu.user_vectors(s), fw, u_cpu.shape)
        assert np.abs(u - u_cpu).max() < tol
        nz = np.abs(u).sum(1) > 0
        np.testing.assert_allclose(np.linalg.norm(u, axis=1)[nz], 1, rtol=1e-5)
        scores, ids = gpu.recommend(s, k=10)
        scores, ids = _check_out(scores, fw, (B, 10)), _check_out(ids, fw, (B, 10), np.int64)
        ref_s, ref_i = topk_ref(u, items, 10, ids=item_ids)  # rerank=True: exact scores of the returned ids
        assert_topk_matches(scores, ids, items, u, ref_s, ref_i, item_ids=item_ids)
        cs, _ = cpu.recommend(sparse, k=10)
        np.testing.assert_allclose(scores, cs, rtol=score_tol, atol=score_tol)
    seen = [item_ids[rng.integers(0, 700, size=4)] for _ in range(B)]
    _, ids = gpu.recommend(_on_device(sparse, to_device), k=20, exclude=seen)
    ids = to_host(ids)
    for r in range(B):
        assert not set(ids[r]) & set(seen[r])
    iv = _check_out(gpu.item_vectors({"item_id": (np.arange(5), np.arange(6))}), fw, (5, 8))
    np.testing.assert_allclose(iv, items[:5], rtol=tol, atol=tol)


def test_matrix_factorisation(rng, model_dir, dev):
    fw, to_device = dev
    m, tensors, ref = build_two_tower(rng, user_feats=("user_id",), item_feats=("item_id",), user_mlp=None,
                                      item_mlp=None, normalize=False, index_precision="fp32", n_items=500)
    path = model_dir(m, tensors)
    cpu, gpu = fastrec.load(path), fastrec.load(path, device="cuda", framework=fw)
    user_ids = rng.integers(0, ref["rows"]["user_id"], size=40)
    sparse = {"user_id": (user_ids, np.arange(41))}
    np.testing.assert_array_equal(to_host(gpu.user_vectors(_on_device(sparse, to_device))), cpu.user_vectors(sparse))
    s, i = gpu.recommend(sparse, k=5)
    cs, ci = cpu.recommend(sparse, k=5)
    np.testing.assert_allclose(to_host(s), cs, rtol=1e-5, atol=1e-5)


# ---- streams, threads, warm-up ------------------------------------------------------------

def _torch_int8_dlrm(rng, model_dir):
    """(torch, a small int8 DLRM loaded on cuda:0 with torch, its reference dict); skips
    where torch has no CUDA."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    m, tensors, ref = build_dlrm(rng, precision="int8", storages=("q8", "fp32", "q8"), bottom=(64,), top=(32,))
    return torch, fastrec.load(model_dir(m, tensors), device=torch.device("cuda", 0), framework="torch"), ref


@needs_cuda
def test_torch_side_stream_and_threads(rng, model_dir):
    torch, gpu, ref = _torch_int8_dlrm(rng, model_dir)
    gpu.warmup()
    cases = []
    for B in (1, 5, 64, 300):
        dense = rng.standard_normal((B, 5)).astype(np.float32)
        sparse = random_sparse(rng, ref["features"], ref["rows"], B)
        cases.append((torch.from_numpy(dense).cuda(), _on_device(sparse, lambda a: torch.from_numpy(a).cuda()),
                      to_host(gpu.score(dense, sparse))))
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        dense, sparse, expect = cases[2]
        dense, sparse = dense.clone(), {f: (i.clone(), o.clone()) for f, (i, o) in sparse.items()}
        p = gpu.score(dense, sparse)
    s.synchronize()
    np.testing.assert_array_equal(to_host(p), expect)
    with ThreadPoolExecutor(4) as pool:  # four threads share the model and its inputs
        got = list(pool.map(lambda j: to_host(gpu.score(*cases[j % len(cases)][:2])), range(80)))
    for j, p in enumerate(got):
        np.testing.assert_array_equal(p, cases[j % len(cases)][2], err_msg=f"call {j}")


@needs_cuda
def test_graph_capture_is_refused(rng, model_dir):
    torch, gpu, ref = _torch_int8_dlrm(rng, model_dir)
    dense = torch.from_numpy(rng.standard_normal((4, 5)).astype(np.float32)).cuda()
    sparse = _on_device(random_sparse(rng, ref["features"], ref["rows"], 4), lambda a: torch.from_numpy(a).cuda())
    expect = to_host(gpu.score(dense, sparse))
    with pytest.raises(ValueError, match="CUDA graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            gpu.score(dense, sparse)
    np.testing.assert_array_equal(to_host(gpu.score(dense, sparse)), expect)


@needs_cuda
def test_cross_framework_inputs(rng, model_dir):
    """A CuPy model takes torch CUDA tensors (and the other way round), zero-copy; results are in
    the model's framework."""
    torch = pytest.importorskip("torch")
    cupy = pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    m, tensors, ref = build_dlrm(rng, storages=("fp32", "q8"))
    path = model_dir(m, tensors)
    cpu = fastrec.load(path)
    dense = rng.standard_normal((9, 5)).astype(np.float32)
    sparse = random_sparse(rng, ref["features"], ref["rows"], 9)
    expect = cpu.score(dense, sparse)
    for fw, other in (("cupy", lambda a: torch.from_numpy(a).cuda()), ("torch", cupy.asarray)):
        gpu = fastrec.load(path, device="cuda:0", framework=fw)
        p = gpu.score(other(dense), _on_device(sparse, other))
        assert _framework_of(p) == fw
        np.testing.assert_allclose(to_host(p), expect, rtol=1e-5, atol=1e-6)


# ---- errors -------------------------------------------------------------------------------

def bad_id_request(sparse, ref):
    """(sparse with an id one past feature C2's table, the IndexError message that names it)."""
    rows = ref["rows"][1]
    bad = {**sparse, "C2": (np.array([0, rows]), np.array([0, 0, 1, 2]))}
    return bad, rf"feature 'C2' \(table 't1'\): id {rows} at position 1 of its indices"


def test_dlrm_errors_on_gpu(rng, model_dir, dev):
    fw, to_device = dev
    m, tensors, ref = build_dlrm(rng, storages=("fp32", "q8", "fp32"))
    gpu = fastrec.load(model_dir(m, tensors), device="cuda", framework=fw)
    dense = rng.standard_normal((3, 5)).astype(np.float32)
    sparse = random_sparse(rng, ref["features"], ref["rows"], 3)
    dsparse = _on_device(sparse, to_device)
    for d, s in ((dense, sparse), (to_device(dense), dsparse)):
        with pytest.raises(ValueError, match=r"\(B, 5\)"):
            gpu.score(d[:, :4], s)
        with pytest.raises(ValueError, match=r"missing sparse feature\(s\) \['C2'\]"):
            gpu.score(d, {"C1": s["C1"], "C3": s["C3"]})
        with pytest.raises(ValueError, match="unknown sparse feature 'C9'"):
            gpu.score(d, {**s, "C9": s["C1"]})
        with pytest.raises(ValueError, match="C2.*bags, expected 3"):
            gpu.score(d, {**s, "C2": (s["C2"][0], s["C2"][1][:3])})
    with pytest.raises(TypeError, match="float32"):
        gpu.score(dense.astype(np.float64), sparse)
    with pytest.raises(TypeError, match="float32"):
        gpu.score(to_device(dense.astype(np.float64)), dsparse)
    with pytest.raises(TypeError, match="int32 or int64"):
        gpu.score(dense, {**dsparse, "C1": (to_device(np.zeros(1, np.float32)), to_device(np.array([0, 1, 1, 1])))})
    # a bad id: IndexError naming the feature and table, for every input form
    bad, msg = bad_id_request(sparse, ref)
    with pytest.raises(IndexError, match=msg):
        gpu.score(dense, bad)
    with pytest.raises(IndexError, match=msg):
        gpu.score(to_device(dense), _on_device(bad, to_device))
    with pytest.raises(IndexError, match="feature 'C2'"):
        gpu.score(to_device(dense), _pair_on_device(table_major(bad, ref["features"]), to_device))
    with pytest.raises(IndexError, match="feature 'C1'"):
        gpu.score(dense, {**dsparse, "C1": (to_device(np.array([-1])), to_device(np.array([0, 1, 1, 1])))})
    # bad offsets in a device dict: ValueError naming the feature (ends, and decreasing)
    for off in ([1, 1, 2, 2], [0, 1, 1, 1], [0, 2, 1, 2]):
        with pytest.raises(ValueError, match="C3.*offsets"):
            gpu.score(dense, {**dsparse, "C3": (to_device(np.array([0, 1])), to_device(np.array(off)))})
    with pytest.raises(ValueError, match="T\\*B \\+ 1"):
        ind, off = table_major(sparse, ref["features"])
        gpu.score(dense, (to_device(ind), to_device(off[:-1])))
    # the model still works after all that
    np.testing.assert_allclose(to_host(gpu.score(dense, sparse)), fastrec.load(gpu.path).score(dense, sparse),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="two_tower"):
        gpu.recommend(sparse)


def test_two_tower_errors_on_gpu(rng, model_dir, dev):
    fw, to_device = dev
    m, tensors, ref = build_two_tower(rng, precision="int8", storage="q8")
    gpu = fastrec.load(model_dir(m, tensors), device="cuda", framework=fw)
    sparse = random_sparse(rng, ["user_id", "age"], [ref["rows"]["user_id"], ref["rows"]["age"]], 2)
    with pytest.raises(TypeError, match="'dlrm' model"):
        gpu.score(np.zeros((2, 5), np.float32), sparse)
    with pytest.raises(ValueError, match="missing"):
        gpu.recommend({"user_id": _on_device(sparse, to_device)["user_id"]})
    with pytest.raises(IndexError, match="feature 'age'"):
        gpu.recommend({**sparse, "age": (to_device(np.array([10**6])), to_device(np.array([0, 1, 1])))})
    with pytest.raises(ValueError, match="k must be"):
        gpu.recommend(sparse, k=0)


def test_device_argument_forms(rng, model_dir, dev):
    fw, _ = dev
    path = model_dir(*build_dlrm(rng, storages=("fp32",))[:2])
    for device in ("cuda", "cuda:0"):
        model = fastrec.load(path, device=device, framework=fw)
        assert model.device == "cuda:0" and f"device='cuda:0', framework='{fw}'" in repr(model)
    assert fastrec.load(path, device="cpu", framework=fw).device == "cpu"
    n = _cuda.module().device_count()
    with pytest.raises(ValueError, match="does not exist"):
        fastrec.load(path, device=f"cuda:{n}", framework=fw)


# ---- runs without a GPU too ---------------------------------------------------------------

def test_device_argument_errors(rng, model_dir):
    path = model_dir(*build_dlrm(rng, storages=("fp32",))[:2])
    for bad in ("gpu", "cuda:x", "cuda:", "CUDA", "cuda:-1"):
        with pytest.raises(ValueError, match="device must be"):
            fastrec.load(path, device=bad)
    with pytest.raises(TypeError, match="device must be"):
        fastrec.load(path, device=0)
    with pytest.raises(ValueError, match="framework must be"):
        fastrec.load(path, device="cuda", framework="jax")
    with pytest.raises(ValueError, match="framework must be"):
        fastrec.load(path, framework="jax")
    assert fastrec.load(path, device=None).device == "cpu"
    torch = pytest.importorskip("torch")
    assert fastrec.load(path, device=torch.device("cpu")).device == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        fastrec.load(path, device=torch.device("meta"))


@pytest.fixture
def cuda_missing(monkeypatch):
    """Makes ``import fastrec._C_cuda`` fail, as in a build without nvcc."""
    monkeypatch.setattr(_cuda, "_module", None)
    monkeypatch.delattr(fastrec, "_C_cuda", raising=False)
    monkeypatch.setitem(sys.modules, "fastrec._C_cuda", None)


@pytest.fixture
def no_gpu(monkeypatch):
    """A CUDA module that finds no device, as on a machine without a GPU or driver."""
    fake = types.ModuleType("fastrec._C_cuda")
    fake.device_count = lambda: 0
    monkeypatch.setattr(_cuda, "_module", None)
    monkeypatch.setattr(fastrec, "_C_cuda", fake, raising=False)
    monkeypatch.setitem(sys.modules, "fastrec._C_cuda", fake)


@pytest.mark.parametrize("how", ["cuda_missing", "no_gpu"])
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_load_on_cuda_without_cuda_raises_runtime_error(rng, model_dir, request, how, precision):
    request.getfixturevalue(how)
    path = model_dir(*build_dlrm(rng, precision=precision, storages=("q8", "fp32"))[:2])
    with pytest.raises(RuntimeError, match="_C_cuda" if how == "cuda_missing" else "no CUDA device") as info:
        fastrec.load(path, device="cuda")
    assert "python -m fastrec.info" in str(info.value)
    with pytest.raises(RuntimeError):
        fastrec.load(path, device="cuda:0", framework="cupy")
    assert fastrec.load(path).device == "cpu"  # the CPU path is unaffected
    tt = model_dir(*build_two_tower(rng)[:2])
    with pytest.raises(RuntimeError, match="python -m fastrec.info"):
        fastrec.load(tt, device="cuda")


def test_load_on_cuda_without_a_framework_raises_runtime_error(rng, model_dir, monkeypatch):
    fake = types.ModuleType("fastrec._C_cuda")
    fake.device_count = lambda: 1
    monkeypatch.setattr(_cuda, "_module", fake)
    monkeypatch.setattr(_cuda_model, "_torch_reason", lambda: "torch sees no CUDA device")
    monkeypatch.setattr(_cuda_model, "_cupy_reason", lambda: "CuPy is not importable")
    path = model_dir(*build_dlrm(rng, storages=("fp32",))[:2])
    with pytest.raises(RuntimeError, match="torch with CUDA or CuPy.*torch sees no CUDA.*CuPy is not importable"):
        fastrec.load(path, device="cuda")
    with pytest.raises(RuntimeError, match="needs cupy .*CuPy is not importable"):
        fastrec.load(path, device="cuda", framework="cupy")
    with pytest.raises(RuntimeError, match="needs torch .*torch sees no CUDA"):
        fastrec.load(path, device="cuda", framework="torch")


def test_here_without_gpu_load_cuda_raises(rng, model_dir):
    """Whatever this machine lacks (CUDA module, GPU, framework), asking for CUDA raises a
    RuntimeError, never anything else (skipped where CUDA works)."""
    if CUDA_SKIP_REASON is None and _cuda_model._torch_reason() is None:
        pytest.skip("CUDA works here")
    path = model_dir(*build_dlrm(rng, storages=("fp32",))[:2])
    if CUDA_SKIP_REASON is not None:
        with pytest.raises(RuntimeError):
            fastrec.load(path, device="cuda")
    with pytest.raises(RuntimeError):
        fastrec.load(path, device="cuda", framework="torch")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_float_overflow_and_host_inputs_on_gpu(rng, model_dir, dev, precision):
    """As on the CPU: a float MLP output that overflows float32 raises ValueError naming the
    layer (it came back NaN, or exactly 1.0); Python lists and byte-swapped float32 are dense
    inputs (both were TypeErrors on the GPU)."""
    fw, to_device = dev
    m, tensors, ref = build_dlrm(rng, precision=precision, storages=("fp32", "fp32"))
    gpu = fastrec.load(model_dir(m, tensors), device="cuda", framework=fw)
    cpu = fastrec.load(gpu.path)
    sparse = random_sparse(rng, ref["features"], ref["rows"], 4)
    dense = np.ones((4, 5), np.float32)
    want = cpu.score(dense, sparse)
    for d in (dense.tolist(), dense.astype(">f4")):
        np.testing.assert_allclose(to_host(gpu.score(d, sparse)), want, rtol=1e-5, atol=1e-6)
    dense[2] = 3e38
    for d in (dense, to_device(dense)):
        with pytest.raises(ValueError, match="layer 0 of the bottom MLP .*row 2"):
            gpu.score(d, sparse)
    for t in m["tables"]:
        tensors[t["tensor"]] = np.full_like(tensors[t["tensor"]], 1e20)
    gpu = fastrec.load(model_dir(m, tensors), device="cuda", framework=fw)
    with pytest.raises(ValueError, match="of the top MLP"):
        gpu.score(np.ones((4, 5), np.float32), sparse)
    m, tensors, ref = build_two_tower(rng, precision=precision)
    tensors["tables.user_id"] = np.full_like(tensors["tables.user_id"], 3e38)
    gpu = fastrec.load(model_dir(m, tensors), device="cuda", framework=fw)
    user = random_sparse(rng, ["user_id", "age"], [ref["rows"]["user_id"], ref["rows"]["age"]], 3)
    with pytest.raises(ValueError, match="layer 0 of the user tower MLP"):
        gpu.user_vectors(user)
