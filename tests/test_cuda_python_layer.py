"""The Python layer of the CUDA ops and the GPU model runtime, on a machine without a
GPU: what it hands the launcher, checked by running those arguments through the CPU op.

CPU torch tensors stand in for CUDA tensors (``torch.Tensor.is_cuda`` reads True for the test's
duration), and the launcher is replaced by :class:`HostLauncher`, which rebuilds the tables,
ids, offsets and weights from the raw pointers and sizes it is given and pools them with the CPU
op into the output pointer. A wrong pointer, row count, stride, row kind, mode or padding code
changes the result, so these tests hold the argument marshalling (the torch fast path, the
general path's copies, DeviceQuantizedTable's precomputed launch arguments) to the CPU op.
The GPU model runtime (fastrec/_cuda_model.py) runs on the same stand-in with its torch device
set to the CPU, and int8 MLPs through :class:`HostInt8LinearPlan` (the CPU Int8MLP over host
pointers). The kernels themselves are tested on a GPU (tests/test_cuda_*.py).
"""

import ctypes

import numpy as np
import pytest

from fastrec import QuantizedTable, _cuda, _cuda_embedding, ops, testing
from test_embedding_bags import _kjt
from test_quantized_table import _to_tbe

torch = pytest.importorskip("torch")

_KIND_DTYPES = {0: np.float32, 1: np.float16}
_KIND_BITS = {2: 8, 3: 4, 4: 2, 5: 8}
_MODES = ("sum", "mean", "max")


def _host(ptr: int, nbytes: int) -> np.ndarray:
    """The nbytes of host memory at ptr, as a writable uint8 array (no copy)."""
    if nbytes == 0:
        return np.empty(0, np.uint8)
    return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=np.uint8)


class HostLauncher:
    """``_C_cuda.embedding_bags``'s signature, run by the CPU op on host pointers; and
    ``embedding_bags_deferred``'s, which runs it at once and keeps what it raises for
    ``check()``. ``events`` records "launch" and "check" in order."""

    def __init__(self):
        self.calls, self.events = [], []

    def embedding_bags_deferred(self, *args):
        self.events.append("launch")
        try:
            self.embedding_bags(*args)
            error = None
        except (IndexError, ValueError) as e:
            error = e
            # what a failed call leaves in the output is unspecified: NaN, so that checks the
            # caller queues behind it (an int8 MLP's) fire before the error is read
            tables, num_offsets, out = args[0], args[5], args[9]
            n = (num_offsets - 1) // len(tables) * sum(t[2] for t in tables)
            _host(out, 4 * n).view(np.float32)[:] = np.nan
        events = self.events

        class Pending:
            @staticmethod
            def check():
                events.append("check")
                if error is not None:
                    raise error

        return Pending()

    def embedding_bags(self, tables, indices, num_indices, indices_int64, offsets, num_offsets, offsets_int64,
                       fixed_len, per_sample_weights, out, device, stream):
        self.calls.append(tables)
        host_tables, modes, pads = [], [], []
        for ptr, rows, dim, stride, kind, tbe, mode, pad in tables:
            data = _host(ptr, rows * stride)
            if kind in _KIND_DTYPES:
                assert stride == dim * np.dtype(_KIND_DTYPES[kind]).itemsize
                host_tables.append(data.view(_KIND_DTYPES[kind]).reshape(rows, dim))
            else:
                # kind 5: 8-bit TBE rows (fp16 scale and bias); kind 2 (fp32 ones) is never TBE
                assert (tbe or kind != 5) and not (kind == 2 and tbe)
                layout = "tbe" if tbe else "fbgemm"
                host_tables.append(QuantizedTable(data.reshape(rows, stride), _KIND_BITS[kind], dim, layout))
            modes.append(_MODES[mode])
            pads.append(None if pad < 0 else pad)
        ids = _host(indices, num_indices * (8 if indices_int64 else 4)).view(np.int64 if indices_int64 else np.int32)
        psw = None if not per_sample_weights else _host(per_sample_weights, num_indices * 4).view(np.float32)
        if fixed_len >= 0:
            B = num_offsets - 1
            res = ops.embedding_bag(host_tables[0], ids.reshape(B, fixed_len), mode=modes[0],
                                    per_sample_weights=None if psw is None else psw.reshape(B, fixed_len),
                                    padding_idx=pads[0])
        else:
            off = _host(offsets, num_offsets * (8 if offsets_int64 else 4)).view(np.int64 if offsets_int64 else np.int32)
            res = ops.embedding_bags(host_tables, ids, off, modes=modes, per_sample_weights=psw, padding_idx=pads)
        _host(out, res.nbytes).view(np.float32)[:] = res.reshape(-1)


@pytest.fixture
def launcher(monkeypatch):
    """CPU tensors pass for CUDA tensors on 'device' -1 (their get_device()); the launcher is a
    HostLauncher; no stream or graph capture to ask torch about."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True), raising=False)
    monkeypatch.setattr(_cuda, "stream", lambda a: 0)
    monkeypatch.setattr(_cuda, "refuse_capture_for", lambda x, what: None)
    monkeypatch.setattr(_cuda, "refuse_capture", lambda framework, device, what: None)
    host = HostLauncher()
    monkeypatch.setattr(_cuda_embedding, "_embedding_backend", lambda: host)
    return host


def _tables(rng):
    """(host tables, the same tables as the GPU op takes them) in every format: torch float32 and
    float16, a strided and a bfloat16 tensor (copied by the general path), a Parameter, and
    8/4/2-bit QuantizedTables in both layouts on the 'device'."""
    dims = [8, 3, 64, 16, 5, 12, 7, 9, 24, 6]
    Ws = [rng.standard_normal((int(rng.integers(5, 40)), d)).astype(np.float32) for d in dims]
    host, dev = [], []
    host.append(Ws[0]); dev.append(torch.from_numpy(Ws[0].copy()))
    host.append(Ws[1].astype(np.float16)); dev.append(torch.from_numpy(Ws[1].astype(np.float16)))
    wide = np.zeros((Ws[2].shape[0], 2 * Ws[2].shape[1]), np.float32)
    wide[:, ::2] = Ws[2]
    host.append(Ws[2]); dev.append(torch.from_numpy(wide)[:, ::2])  # strided: a contiguous copy
    bf = torch.from_numpy(Ws[3]).to(torch.bfloat16)
    host.append(bf.float().numpy()); dev.append(bf)  # bfloat16: a float32 copy, as on the CPU
    host.append(Ws[4]); dev.append(torch.nn.Parameter(torch.from_numpy(Ws[4].copy())))
    for W, bits, tbe in zip(Ws[5:], (8, 4, 2, 8, 4), (False, False, False, True, True)):
        qt = QuantizedTable.from_float(W, bits=bits)
        if tbe:
            qt = QuantizedTable.from_fbgemm(_to_tbe(qt.to_fbgemm(), bits, qt.dim, 16), bits, layout="tbe", dim=qt.dim)
        host.append(qt)
        dev.append(_cuda_embedding.DeviceQuantizedTable(torch.from_numpy(qt.data.copy()), qt.bits, qt.dim, qt.layout))
    return host, dev


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_many_tables_reach_the_launcher_as_the_cpu_op_reads_them(launcher, rng, dtype, weighted):
    host, dev = _tables(rng)
    T, B = len(host), 7
    rows = [t.shape[0] if isinstance(t, np.ndarray) else t.num_rows for t in host]
    idx, off = _kjt(rng, T, B, rows, dtype=dtype)
    psw = rng.standard_normal(idx.shape[0]).astype(np.float32) if weighted else None
    modes = "sum" if weighted else [_MODES[t % 3] for t in range(T)]
    pads = [None if t % 4 else int(rng.integers(0, rows[t])) for t in range(T)]
    want = ops.embedding_bags(host, idx, off, modes=modes, per_sample_weights=psw, padding_idx=pads)
    got = ops.embedding_bags(dev, torch.from_numpy(idx), torch.from_numpy(off), modes=modes,
                             per_sample_weights=None if psw is None else torch.from_numpy(psw), padding_idx=pads)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    testing.assert_close(got.numpy(), want, rtol=1e-6, atol=1e-6)
    assert len(launcher.calls) == 1 and len(launcher.calls[0]) == T
    # Tensors the op can read in place are passed in place; the strided and bfloat16 ones are copies.
    ptrs = [head[0] for head in launcher.calls[0]]
    assert ptrs[0] == dev[0].data_ptr() and ptrs[1] == dev[1].data_ptr() and ptrs[4] == dev[4].data_ptr()
    assert ptrs[2] != dev[2].data_ptr() and ptrs[3] != dev[3].data_ptr()
    assert all(ptrs[t] == dev[t].data.data_ptr() for t in range(5, T))


@pytest.mark.parametrize("kind", ["f32", "f16", "q8", "q4-tbe"])
def test_one_table_with_2d_ids_and_with_offsets(launcher, rng, kind):
    W = rng.standard_normal((30, 10)).astype(np.float32)
    if kind == "f32":
        host, dev = W, torch.from_numpy(W.copy())
    elif kind == "f16":
        host = W.astype(np.float16)
        dev = torch.from_numpy(host.copy())
    else:
        host = QuantizedTable.from_float(W, bits=int(kind[1]))
        if kind.endswith("tbe"):
            host = QuantizedTable.from_fbgemm(_to_tbe(host.to_fbgemm(), host.bits, host.dim, 16), host.bits,
                                              layout="tbe", dim=host.dim)
        dev = _cuda_embedding.DeviceQuantizedTable(torch.from_numpy(host.data.copy()), host.bits, host.dim, host.layout)
    ids2 = rng.integers(0, 30, size=(6, 4))
    for mode in _MODES:
        want = ops.embedding_bag(host, ids2, mode=mode, padding_idx=3)
        got = ops.embedding_bag(dev, torch.from_numpy(ids2), mode=mode, padding_idx=3)
        testing.assert_close(got.numpy(), want, rtol=1e-6, atol=1e-6)
    idx = rng.integers(0, 30, size=17)
    off = np.array([0, 0, 5, 9, 17])
    want = ops.embedding_bag(host, idx, off, mode="mean")
    got = ops.embedding_bag(dev, torch.from_numpy(idx), torch.from_numpy(off), mode="mean")
    testing.assert_close(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_errors_of_the_general_path_are_kept(launcher):
    idx, off = torch.tensor([1, 2]), torch.tensor([0, 1, 2])
    W = torch.zeros((4, 3))
    with pytest.raises(TypeError, match="table 1 must be float32 or float16"):
        ops.embedding_bags([W, W.double()], idx, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="table 0 must be 2-D"):
        ops.embedding_bag(W.reshape(-1), idx, off)
    with pytest.raises(TypeError, match="host QuantizedTable"):
        ops.embedding_bags([W, QuantizedTable.from_float(np.zeros((4, 3), np.float32))], idx, off)
    with pytest.raises(TypeError, match="indices must be int32 or int64"):
        ops.embedding_bag(W, idx.float(), off)
    assert not launcher.calls  # refused before anything reached the launcher


def test_tensor_subclasses_from_outside_torch_are_not_read_as_device_tables(launcher):
    # (as before the fast path: fastrec takes torch's own tensor types, not a library's wrapper
    # that may hold no storage of its own)
    class Wrapped(torch.Tensor):
        pass

    W = torch.zeros((4, 3)).as_subclass(Wrapped)
    with pytest.raises(TypeError, match="table 0 is a host array"):
        ops.embedding_bags([W], torch.tensor([1]), torch.tensor([0, 1]))
    assert not launcher.calls


def test_a_quantized_tables_launch_arguments_are_worked_out_once(launcher):
    qt = QuantizedTable.from_float(np.ones((4, 8), np.float32), bits=4)
    dev = _cuda_embedding.DeviceQuantizedTable(torch.from_numpy(qt.data.copy()), 4, 8)
    head = dev._head
    assert head == (dev.data.data_ptr(), 4, 8, qt.row_stride, 3, False)
    ops.embedding_bag(dev, torch.tensor([[0, 3]]))
    ops.embedding_bag(dev, torch.tensor([[1, 2]]))
    assert [c[0][:6] for c in launcher.calls] == [head, head]


# ---- the GPU model runtime (fastrec/_cuda_model.py) on the stand-in --------------------------


@pytest.fixture
def standin_model(launcher, monkeypatch):
    """A function making the GPU runtime of a loaded (CPU) model on the stand-in: its torch
    device is the CPU, its 'device' index -1, quantized tables become DeviceQuantizedTables on
    CPU tensors. Only float MLPs: an int8 MLP needs the compiled CUDA module."""
    from fastrec import _cuda_model

    class HostTorch(_cuda_model._Torch):
        def __init__(self, index):
            super().__init__(0)
            self.index, self.device = index, torch.device("cpu")

    monkeypatch.setattr(_cuda_model, "_Torch", HostTorch)
    monkeypatch.setattr(_cuda_model.CudaModel, "_sync", lambda self: None)
    monkeypatch.setattr(QuantizedTable, "to_device", lambda self, like="torch", device=None:
                        _cuda_embedding.DeviceQuantizedTable(torch.from_numpy(self.data.copy()), self.bits,
                                                             self.dim, self.layout))
    return lambda model: _cuda_model.CudaModel(model, -1, "torch")


def _dlrm(rng, tmp_path, precision="fp32", storages=("fp32", "q8", "fp32")):
    import fastrec
    from fastrec.io import write_model
    from test_model_runtime import build_dlrm

    m, tensors, ref = build_dlrm(rng, precision=precision, storages=storages, bottom=(16,), top=(12,))
    for i, t in enumerate(m["tables"]):  # one pooling per table, mixed: the launch args keep their order
        t["pooling"] = ("mean", "sum", "max")[i % 3]
    write_model(tmp_path / "m", m, tensors)
    return fastrec.load(str(tmp_path / "m")), ref


def _tensors(sparse):
    return {f: (torch.from_numpy(i), torch.from_numpy(o)) for f, (i, o) in sparse.items()}


@pytest.mark.parametrize("precision,storages", [("fp32", ("fp32", "q8", "fp32")),
                                                ("fp32", ("q4", "fp32", "q4", "fp16")),
                                                ("fp16", ("fp16", "fp16", "fp16"))])
def test_gpu_dlrm_runtime_matches_the_cpu_model(standin_model, launcher, rng, tmp_path, precision, storages):
    from test_model_runtime import random_sparse, table_major

    cpu, ref = _dlrm(rng, tmp_path, precision, storages)
    gpu = standin_model(cpu)
    for B in (0, 1, 3, 17):
        dense = rng.standard_normal((B, 5)).astype(np.float32)
        sparse = random_sparse(rng, ref["features"], ref["rows"], B)
        want = cpu.score(dense, sparse)
        pair = table_major(sparse, ref["features"])
        for d, s in ((dense, sparse), (torch.from_numpy(dense), _tensors(sparse)),
                     (torch.from_numpy(dense), tuple(torch.from_numpy(a) for a in pair)),
                     (torch.from_numpy(dense), {f: (torch.from_numpy(i.astype(np.int32)),  # int32 and int64 mixed
                                                    torch.from_numpy(o.astype((np.int32, np.int64)[n % 2])))
                                                for n, (f, (i, o)) in enumerate(sparse.items())})):
            got = gpu.score(d, s)
            assert isinstance(got, torch.Tensor) and got.shape == (B,)
            testing.assert_close(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # one kernel call per score, over every table
    assert len(launcher.calls) == 16 and all(len(c) == len(storages) for c in launcher.calls)


def test_gpu_dlrm_runtime_names_the_feature_of_a_bad_input(standin_model, rng, tmp_path):
    from test_cuda_model import bad_id_request
    from test_model_runtime import random_sparse, table_major

    cpu, ref = _dlrm(rng, tmp_path)
    gpu = standin_model(cpu)
    dense = torch.from_numpy(rng.standard_normal((3, 5)).astype(np.float32))
    sparse = random_sparse(rng, ref["features"], ref["rows"], 3)
    bad, msg = bad_id_request(sparse, ref)
    with pytest.raises(IndexError, match=msg):
        gpu.score(dense, bad)
    with pytest.raises(IndexError, match=msg):
        gpu.score(dense, _tensors(bad))
    with pytest.raises(IndexError, match="feature 'C2'"):
        gpu.score(dense, tuple(torch.from_numpy(a) for a in table_major(bad, ref["features"])))
    for off in ([1, 1, 2, 2], [0, 1, 1, 1], [0, 2, 1, 2]):
        with pytest.raises(ValueError, match="C3.*offsets"):
            gpu.score(dense, {**_tensors(sparse), "C3": (torch.tensor([0, 1]), torch.tensor(off))})
    with pytest.raises(TypeError, match=r"sparse\['C1'\] indices must be int32 or int64"):
        gpu.score(dense, {**_tensors(sparse), "C1": (torch.zeros(1), torch.tensor([0, 1, 1, 1]))})
    with pytest.raises(ValueError, match="C2.*bags, expected 3"):
        gpu.score(dense, {**_tensors(sparse), "C2": (torch.tensor([0]), torch.tensor([0, 1, 1]))})
    with pytest.raises(ValueError, match="1-D"):
        gpu.score(dense, {**_tensors(sparse), "C1": (torch.zeros((1, 1), dtype=torch.int64),
                                                     torch.tensor([0, 1, 1, 1]))})


@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_joining_per_feature_offsets_on_the_device(framework, rng):
    """``table_major_offsets`` (a dict of device (indices, offsets) pairs -> one table-major
    offsets array) against the host join, for both frameworks (CuPy's on NumPy, whose API it
    uses): int32 and int64 mixed, B = 0; offsets that do not start at 0 or end at their
    feature's id count leave the last offset off the id total, which the kernel refuses."""
    from fastrec import _cuda_model

    if framework == "torch":
        fw = _cuda_model._Torch.__new__(_cuda_model._Torch)
        fw.t, fw.device = torch, torch.device("cpu")
        dev = torch.from_numpy
    else:
        fw = _cuda_model._Cupy.__new__(_cuda_model._Cupy)
        fw.cp, dev = np, np.asarray

    def join(offs, lens):
        starts = np.concatenate([[0], np.cumsum(lens[:-1])]).astype(np.int64)
        aux = np.concatenate([starts, np.stack([np.zeros_like(lens), lens], 1).ravel()]).astype(np.int64)
        out = fw.table_major_offsets([dev(o) for o in offs], dev(aux), len(offs[0]) - 1, int(sum(lens)))
        return np.asarray(out), starts

    for B in (0, 1, 5):
        offs = [np.sort(rng.integers(0, 9, B + 1)) for _ in range(4)]
        for o in offs:
            o[0] = 0
        lens = np.array([o[-1] for o in offs])
        offs = [o.astype((np.int32, np.int64)[i % 2]) for i, o in enumerate(offs)]
        got, starts = join(offs, lens)
        want = np.concatenate([o[:-1] + s for o, s in zip(offs, starts)] + [[lens.sum()]])
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
        if B:
            for f, pos, delta in ((1, 0, 1), (2, -1, 1), (3, -1, -1)):  # a wrong first or last offset
                bad = [o.copy() for o in offs]
                bad[f][pos] += delta
                got, _ = join(bad, lens)
                assert got[-1] != lens.sum()
        else:
            got, _ = join(offs, lens + np.array([0, 0, 2, 0]))  # B = 0 with ids
            assert got[-1] != lens.sum() + 2


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_gpu_float_model_checks_nan_and_overflow_in_one_wait(standin_model, launcher, rng, tmp_path,
                                                              monkeypatch):
    """A float model's score / user_vectors queue everything, then read the embedding kernel's
    check and their NaN / Inf masks (the dense input's rows joined with the top MLP's) at the
    end, in one wait, and still raise what the CPU runtime raises, in its order: the dense row
    holding NaN / Inf, then the bad id, then the layer that overflowed float32."""
    import fastrec
    from fastrec import _cuda_model
    from fastrec.io import write_model
    from test_model_runtime import build_dlrm, build_two_tower, random_sparse

    from test_cuda_model import bad_id_request

    waits = []
    monkeypatch.setattr(_cuda_model.CudaModel, "_read", staticmethod(lambda flag: waits.append(1) or bool(flag)))
    sigmoid = _cuda_model._Torch.sigmoid_
    monkeypatch.setattr(_cuda_model._Torch, "sigmoid_",
                        staticmethod(lambda x: launcher.events.append("top MLP") or sigmoid(x)))

    def load(m, tensors, name):
        write_model(tmp_path / name, m, tensors)
        cpu = fastrec.load(str(tmp_path / name))
        return cpu, standin_model(cpu)

    m, tensors, ref = build_dlrm(rng, storages=("fp32", "fp32"))
    cpu, gpu = load(m, tensors, "m")
    sparse = _tensors(random_sparse(rng, ref["features"], ref["rows"], 4))
    dense = np.ones((4, 5), np.float32)
    testing.assert_close(gpu.score(torch.from_numpy(dense), sparse).numpy(), cpu.score(dense, sparse),
                         rtol=1e-5, atol=1e-6)
    assert len(waits) == 1 and launcher.events == ["launch", "top MLP", "check"]
    bad_ids, msg = bad_id_request(random_sparse(rng, ref["features"], ref["rows"], 3), ref)
    nan = np.ones((3, 5), np.float32)
    nan[1, 0] = np.nan
    for model in (cpu, gpu):  # a float model: the NaN dense row first
        with pytest.raises(ValueError, match="input contains NaN or Inf \\(row 1\\)"):
            model.score(torch.from_numpy(nan) if model is gpu else nan, _tensors(bad_ids) if model is gpu else bad_ids)
    with pytest.raises(IndexError, match=msg):
        gpu.score(torch.from_numpy(np.ones((3, 5), np.float32)), _tensors(bad_ids))
    for value, msg in ((np.nan, "input contains NaN or Inf \\(row 2\\)"), (np.inf, "input .*\\(row 2\\)"),
                       (3e38, "layer 0 of the bottom MLP .*row 2")):
        bad = dense.copy()
        bad[2, 1] = value
        for model in (cpu, gpu):
            with pytest.raises(ValueError, match=msg):
                model.score(torch.from_numpy(bad) if model is gpu else bad, sparse)
    for t in m["tables"]:
        tensors[t["tensor"]] = np.full_like(tensors[t["tensor"]], 1e20)
    _, gpu = load(m, tensors, "m_big")
    with pytest.raises(ValueError, match="of the top MLP"):
        gpu.score(torch.from_numpy(dense), sparse)
    from fastrec import _cuda_topk

    monkeypatch.setattr(_cuda_topk, "upload", lambda index, like: None)  # (the item index is not used here)
    m, tensors, ref = build_two_tower(rng)
    user = _tensors(random_sparse(rng, ["user_id", "age"], [ref["rows"]["user_id"], ref["rows"]["age"]], 3))
    cpu, gpu = load(m, tensors, "tt")
    waits.clear()
    testing.assert_close(gpu.user_vectors(user).numpy(), cpu.user_vectors(user), rtol=1e-5, atol=1e-6)
    assert len(waits) == 1
    tensors["tables.user_id"] = np.full_like(tensors["tables.user_id"], 3e38)
    _, gpu = load(m, tensors, "tt_big")
    with pytest.raises(ValueError, match="layer 0 of the user tower MLP"):
        gpu.user_vectors(user)


# ---- int8 MLPs on the stand-in ---------------------------------------------------------------


class HostInt8LinearWeights:
    """``_C_cuda.Int8LinearWeights`` on the host: one layer, kept as a CPU Int8Linear."""

    def __init__(self, device, weight_int8, weight_scale, bias=None):
        from fastrec import Int8Linear

        self.lin, self.device = Int8Linear(weight_int8, weight_scale, bias), device
        self.out_features, self.in_features = weight_int8.shape


class HostInt8LinearPlan:
    """``_C_cuda.Int8LinearPlan`` on the host: the CPU Int8MLP over host pointers, with the
    GPU's NaN / Inf contract (check_finite: ValueError naming the first such input row; without
    it, such rows come out NaN)."""

    def __init__(self, layers, activations):
        from fastrec import Int8MLP

        self.mlp = Int8MLP([w.lin for w in layers], [(None, "relu", "sigmoid")[c] for c in activations])
        self.calls = 0

    def scratch_bytes(self, rows):
        return 16 * rows

    def forward(self, x, rows, y, scratch, scratch_bytes, stream, check_finite=True):
        assert scratch_bytes >= self.scratch_bytes(rows)
        self.calls += 1
        K = self.mlp.in_features
        xa = _host(x, rows * K * 4).view(np.float32).reshape(rows, K).copy()
        bad = ~np.isfinite(xa).all(axis=1)
        if check_finite and bad.any():
            raise ValueError(f"input contains NaN or Inf (row {int(np.flatnonzero(bad)[0])})")
        xa[bad] = 0
        out = self.mlp(xa)
        out[bad] = np.nan
        _host(y, out.nbytes).view(np.float32)[:] = out.reshape(-1)


@pytest.fixture
def int8_module(launcher, monkeypatch):
    """The compiled CUDA module as the stand-in sees it: int8 layers and the embedding launcher."""
    from types import SimpleNamespace

    monkeypatch.setattr(_cuda, "_module", SimpleNamespace(
        device_count=lambda: 1, Int8LinearWeights=HostInt8LinearWeights, Int8LinearPlan=HostInt8LinearPlan,
        embedding_bags=launcher.embedding_bags))


def test_gpu_int8_dlrm_runtime_matches_the_cpu_model(standin_model, int8_module, launcher, rng, tmp_path):
    from test_model_runtime import random_sparse, table_major

    cpu, ref = _dlrm(rng, tmp_path, "int8", ("q4", "fp32", "q4"))
    gpu = standin_model(cpu)
    for B in (1, 7, 40):
        dense = rng.standard_normal((B, 5)).astype(np.float32)
        sparse = random_sparse(rng, ref["features"], ref["rows"], B)
        want = cpu.score(dense, sparse)
        pair = tuple(torch.from_numpy(a) for a in table_major(sparse, ref["features"]))
        for s in (sparse, _tensors(sparse), pair):
            got = gpu.score(torch.from_numpy(dense), s)
            # (the interaction runs in torch here: the top MLP's activation codes may differ by
            # one step from the CPU's, as on a GPU)
            assert np.abs(got.numpy() - want).max() < 5e-3
    plans = [gpu.bottom._cuda_plans[-1], gpu.top._cuda_plans[-1]]
    assert [p.calls for p in plans] == [9, 9]  # one launch plan per MLP, one call per score
    dense[B // 2, 3] = np.nan  # the bottom MLP does not check; its NaN row reaches the top MLP's check
    with pytest.raises(ValueError, match=f"NaN or Inf \\(row {B // 2}\\)"):
        gpu.score(torch.from_numpy(dense), sparse)
    with pytest.raises(ValueError, match="NaN or Inf"):
        cpu.score(dense, sparse)
    from test_cuda_model import bad_id_request

    bad_ids, msg = bad_id_request(random_sparse(rng, ref["features"], ref["rows"], 3), ref)
    nan = np.ones((3, 5), np.float32)
    nan[1, 0] = np.nan
    for model in (cpu, gpu):  # an int8 model: the bad id first (the GPU's top MLP check raises first)
        with pytest.raises(IndexError, match=msg):
            model.score(torch.from_numpy(nan) if model is gpu else nan, _tensors(bad_ids) if model is gpu else bad_ids)


def test_gpu_int8_tower_reports_a_bad_id_before_nan(standin_model, int8_module, launcher, rng, tmp_path,
                                                   monkeypatch):
    # An int8 tower MLP finds NaN rows (here from a table row holding NaN) while quantizing and
    # raises before the call reads the embedding check: the bad id is still reported first, as
    # the CPU runtime (which pools first) does.
    import fastrec
    from fastrec import _cuda_topk
    from fastrec.io import write_model
    from test_model_runtime import build_two_tower, random_sparse

    monkeypatch.setattr(_cuda_topk, "upload", lambda index, like: None)
    m, tensors, ref = build_two_tower(rng, precision="int8")
    tensors["tables.user_id"][0] = np.nan
    write_model(tmp_path / "tt", m, tensors)
    cpu = fastrec.load(str(tmp_path / "tt"))
    gpu = standin_model(cpu)
    user = random_sparse(rng, ["user_id", "age"], [ref["rows"]["user_id"], ref["rows"]["age"]], 2)
    user["user_id"] = (np.array([0, 1]), np.array([0, 1, 2]))  # row 0 holds NaN
    for model, req in ((cpu, user), (gpu, _tensors(user))):
        with pytest.raises(ValueError, match="NaN or Inf"):
            model.user_vectors(req)
    user["age"] = (np.array([0, 999]), np.array([0, 1, 2]))
    for model, req in ((cpu, user), (gpu, _tensors(user))):
        with pytest.raises(IndexError, match="feature 'age'"):
            model.user_vectors(req)


def test_gpu_model_runtime_without_the_deferred_launcher(standin_model, launcher, rng, tmp_path, monkeypatch):
    # The CuPy fallback has no embedding_bags_deferred: the launch then checks at once, and the
    # runtime goes on as with a check already read.
    from test_cuda_model import bad_id_request
    from test_model_runtime import random_sparse

    monkeypatch.delattr(HostLauncher, "embedding_bags_deferred")
    cpu, ref = _dlrm(rng, tmp_path)
    gpu = standin_model(cpu)
    dense = rng.standard_normal((3, 5)).astype(np.float32)
    sparse = random_sparse(rng, ref["features"], ref["rows"], 3)
    testing.assert_close(gpu.score(torch.from_numpy(dense), _tensors(sparse)).numpy(), cpu.score(dense, sparse),
                         rtol=1e-5, atol=1e-6)
    assert launcher.events == []
    bad, msg = bad_id_request(sparse, ref)
    with pytest.raises(IndexError, match=msg):
        gpu.score(torch.from_numpy(dense), _tensors(bad))


def test_a_gpu_model_is_freed_with_its_last_reference(standin_model, rng, tmp_path):
    # (no reference cycle through the model: its device tables go when it does, not at the
    # cycle collector's next run)
    import gc
    import weakref

    cpu, _ = _dlrm(rng, tmp_path)
    gpu = standin_model(cpu)
    ref = weakref.ref(gpu)
    gc.disable()
    try:
        del gpu
        assert ref() is None
    finally:
        gc.enable()


# ---- GPU top-k: the retry loop of fastrec/_cuda_topk.py -------------------------------------


def test_gpu_topk_reruns_overflowed_queries_except_those_the_host_redoes(launcher, monkeypatch):
    # A query whose candidate buffer overflowed is searched again with 4x the room, and its new
    # results are written back in its row; one whose float32 scores overflow (the host redoes it
    # in float64) must not be: its scores all tie at -inf, and it would overflow again at any
    # size short of the whole catalogue.
    from types import SimpleNamespace

    from fastrec import _cuda_topk

    Q, k = 5, 3
    runs = []

    def run(dev, a, k_, keep, ex, growth):
        rows = [int(r) for r in a.obj[:, 0]]  # (row r of the queries holds r)
        runs.append((rows, growth))
        scores = torch.tensor([[r + 100.0 * growth] * k_ for r in rows])  # which run wrote a row
        over = [i for i, r in enumerate(rows) if r in (1, 3) and growth < 16]  # until 16x the room
        return _cuda.view(scores), _cuda.view(torch.zeros((len(rows), k_), dtype=torch.int64)), over

    monkeypatch.setattr(_cuda_topk, "_run", run)
    monkeypatch.setattr(_cuda, "_module", SimpleNamespace(topk_max_keep=lambda: 4096))
    a = _cuda.view(torch.arange(Q, dtype=torch.float32)[:, None].repeat(1, 4))
    dev = SimpleNamespace(n=100)
    scores, _, skip = _cuda_topk._search_dev(dev, a, k, 8, None, lambda: np.array([3]))
    assert skip.tolist() == [3] and runs == [([0, 1, 2, 3, 4], 1), ([1], 4), ([1], 16)]
    assert scores[:, 0].tolist() == [100, 1601, 102, 103, 104]
    runs.clear()
    scores, _, _ = _cuda_topk._search_dev(dev, a, k, 8, None, None)  # nothing to skip: row 3 is re-run too
    assert runs == [([0, 1, 2, 3, 4], 1), ([1, 3], 4), ([1, 3], 16)]
    assert scores[:, 0].tolist() == [100, 1601, 102, 1603, 104]


def test_gpu_topk_hands_the_rows_it_redoes_on_the_host_to_the_device_search(launcher, monkeypatch, rng):
    # ops.topk on the GPU: the rows _overflow_check finds are the device search's skip list, read
    # by it after its first search (one wait), and their results come from the host's exact search.
    from types import SimpleNamespace

    from fastrec import _cuda_topk

    seen = {}

    def search_dev(dev, a, k, keep, exclude, skip=None):
        seen["skip"] = skip = skip()
        Q = a.shape[0]
        return torch.full((Q, k), -5.0), torch.full((Q, k), -7, dtype=torch.int64), skip

    monkeypatch.setattr(_cuda, "_module", SimpleNamespace(TopkIndexView=lambda *args: None))
    monkeypatch.setattr(_cuda_topk, "_search_dev", search_dev)
    monkeypatch.setattr(_cuda_topk, "_overflow_check", lambda a, amax: lambda: np.array([1, 3]))
    items = rng.standard_normal((50, 8)).astype(np.float32)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    scores, ids = ops.topk(torch.from_numpy(q), torch.from_numpy(items), 5)
    assert seen["skip"].tolist() == [1, 3]
    want_s, want_i = ops.topk(q, items, 5)
    assert ids[[0, 2]].eq(-7).all() and (ids[[1, 3]].numpy() == want_i[[1, 3]]).all()
    testing.assert_close(scores[[1, 3]].numpy(), want_s[[1, 3]], rtol=1e-6, atol=1e-6)
