"""The GPU runtime behind ``fastrec.load(path, device="cuda")`` (fastrec/model.py keeps the CPU one).

    model = fastrec.load("ctr_model/", device="cuda")          # or "cuda:1", torch.device("cuda", 1)
    p = model.score(dense, {"C1": (ids, offsets), ...})        # a torch CUDA tensor (B,)

At load, once: every table goes to the GPU (fp32 / fp16 rows as device arrays of that dtype,
q8 / q4 through :meth:`fastrec.QuantizedTable.to_device`; a table shared by several features is
uploaded once), int8 MLPs upload their weights through Int8MLP's per-device cache (warmed here),
fp16 / fp32 MLPs become float32 device matrices run with the framework's matmul, and a two-tower
model's ItemIndex is laid out on the device. Device arrays belong to one framework, chosen by
``framework=`` ("torch" or "cupy"; default torch when it sees a GPU, else CuPy).

Per call, everything runs on the framework's current stream of the model's device: the inputs
may be device arrays (torch CUDA tensors or CuPy arrays on that device: zero-copy) or host
arrays (copied there first), and the results are device arrays of the model's framework.
DLRM: bottom MLP -> one ``embedding_bags`` call for all features -> dot interaction (batched
matmul of ``[x, e_1, ..., e_T]`` with itself, then a gather of the strictly lower triangle in
row-major order, as docs/FORMAT.md step 3 and the CPU runtime) -> top MLP with the sigmoid.

Host waits: everything is queued first, then the call waits once, at its end: an int8 top MLP /
tower MLP for its last quantization pass (NaN / Inf raise ValueError, as on the CPU; the int8
bottom MLP skips that check: a NaN there reaches the top MLP's), then for the stream, for the
embedding kernel's 16-byte bounds and offsets check (a bad id raises IndexError naming the
feature, as on the CPU) and, for an fp32 / fp16 top MLP or tower MLP, a flag saying whether any
row of the dense input held NaN / Inf or of the last layer's output overflowed float32 (after a
ReLU, before the sigmoid; on overflow the host MLPs name the layer, as on the CPU). Errors come
in the CPU runtime's order: a float model's NaN / Inf dense row, then a bad id or offsets, then
an overflow (an int8 model: the bad id first). So ``score`` and ``user_vectors`` /
``item_vectors`` return once their results are computed. (With the CuPy fallback, the embedding
kernel waits for its own check.)

The cheapest sparse input is one table-major ``(indices, offsets)`` pair on the device (TorchRec's
KeyedJaggedTensor layout): it goes to the kernel as it is. A ``{feature: (indices, offsets)}``
dict of device arrays is joined on the device (a few small ops and one 24-byte-per-feature
upload); a dict of host arrays is joined on the host and copied over.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings

import numpy as np

from . import _cuda, _cuda_embedding
from ._arrays import as_numpy, check_index_dtype, float_input
from .linear import Int8MLP
from .model import _FloatMLP, _Int8MLPRunner, _host_ids, _offsets_message, _sparse_name
from .tables import QuantizedTable

FRAMEWORKS = ("torch", "cupy")


# ---- device and framework -----------------------------------------------------------------

def _parse_device(device):
    """None for the CPU, else the CUDA device index (-1: the framework's current device)."""
    if device is None:
        return None
    if type(device).__module__ == "torch" and type(device).__name__ == "device":  # torch.device
        if device.type == "cpu":
            return None
        if device.type != "cuda":
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        return -1 if device.index is None else int(device.index)
    if not isinstance(device, str):
        raise TypeError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {type(device).__name__}")
    if device == "cpu":
        return None
    if device == "cuda":
        return -1
    head, _, tail = device.partition(":")
    if head == "cuda" and tail.isdigit():
        return int(tail)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _torch_reason() -> str | None:
    try:
        import torch
    except Exception as e:  # ImportError or a broken install
        return f"torch is not importable ({e})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


def _cupy_reason() -> str | None:
    from .kernels import cupy_embedding

    return cupy_embedding.available()


def _pick_framework(framework) -> str:
    reasons = {}
    for fw in ([framework] if framework else FRAMEWORKS):
        reasons[fw] = _torch_reason() if fw == "torch" else _cupy_reason()
        if reasons[fw] is None:
            return fw
    why = "; ".join(f"{fw}: {r}" for fw, r in reasons.items())
    raise RuntimeError(f"a model on the GPU needs {'torch with CUDA or CuPy' if not framework else framework} "
                       f"for its device arrays ({why}); see `python -m fastrec.info`.")


def target(device, framework):
    """None for a CPU ``device``, else ``(device index, framework)``.

    Raises RuntimeError when CUDA cannot be used here (no compiled CUDA module, no GPU, no
    framework that sees one), ValueError / TypeError for a bad ``device`` or ``framework``.
    """
    if framework is not None and framework not in FRAMEWORKS:
        raise ValueError(f"framework must be 'torch', 'cupy' or None, got {framework!r}")
    index = _parse_device(device)
    if index is None:
        return None
    mod = _cuda.module()  # RuntimeError: no fastrec._C_cuda, or no usable GPU
    fw = _pick_framework(framework)
    if index < 0:
        if fw == "torch":
            import torch

            index = torch.cuda.current_device()
        else:
            import cupy

            index = cupy.cuda.runtime.getDevice()
    n = mod.device_count()
    if index >= n:
        raise ValueError(f"device cuda:{index} does not exist: {n} CUDA device(s) here")
    return int(index), fw


# ---- the two frameworks -------------------------------------------------------------------

class _Torch:
    name = "torch"

    def __init__(self, index: int):
        import torch

        self.t = torch
        self.linear = torch.nn.functional.linear
        self.index = index
        self.device = torch.device("cuda", index)

    def context(self):
        return contextlib.nullcontext()

    def upload(self, a: np.ndarray):
        # torch.tensor copies (no warning for the read-only, memory-mapped arrays of the file)
        return self.t.tensor(np.ascontiguousarray(a), device=self.device)

    def adopt(self, x):
        """A CUDA array on this device (torch or CuPy) as a tensor, zero-copy."""
        if isinstance(x, self.t.Tensor):
            return x
        return self.t.as_tensor(x, device=self.device)

    @staticmethod
    def relu_(x):
        return x.relu_()

    @staticmethod
    def sigmoid_(x):
        return x.sigmoid_()

    def interaction(self, bottom, emb, T: int, pairs):
        t = self.t
        B, D = bottom.shape
        z = t.cat([bottom.unsqueeze(1), emb.view(B, T, D)], dim=1)  # (B, T+1, D)
        dots = t.bmm(z, z.transpose(1, 2)).view(B, (T + 1) * (T + 1))
        return t.cat([bottom, dots.index_select(1, pairs)], dim=1)

    @staticmethod
    def take_cols(x, cols):
        return x.index_select(1, cols)

    def finite_rows(self, x):
        """A device mask of the rows of x holding no NaN or Inf (queued, no wait)."""
        return self.t.isfinite(x).all(dim=1)

    @staticmethod
    def first_false(mask):
        """The first False index of a device mask, or None (waits for it)."""
        return None if bool(mask.all()) else int(mask.logical_not().nonzero()[0, 0])

    def normalize(self, x):
        return x / self.t.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)

    def cat(self, parts):
        return self.t.cat(parts)

    def table_major_offsets(self, offs, aux, B: int, total: int):
        """Per-feature offsets (B + 1 each, from 0) -> table-major offsets (T*B + 1), in four
        ops (a ``cat`` of inputs of mixed dtypes, or in CuPy of fewer than 9, may copy them one by
        one); ``aux`` holds each feature's start in the joined indices, then (0, its id
        count) per feature: what its first and last offsets must be. The last offset is
        ``total`` plus the number of those that are not, so the kernel's own offsets check
        raises for a feature whose offsets do not start at 0 or end at its id count (see
        _Bags.run, which then names it)."""
        t = self.t
        T = len(offs)
        full = t.cat(offs).view(T, B + 1)  # (int32 with int64: int64)
        out = t.empty(T * B + 1, dtype=t.int64, device=self.device)
        t.add(full[:, :B], aux[:T, None], out=out[:T * B].view(T, B))
        ends = full[:, ::B] if B else full.expand(T, 2)  # each feature's first and last offset
        t.add(t.ne(ends, aux[T:].view(T, 2)).sum(), total, out=out[T * B])
        return out


class _Cupy:
    name = "cupy"

    def __init__(self, index: int):
        import cupy

        self.cp = cupy
        self.index = index

    def context(self):
        return self.cp.cuda.Device(self.index)

    def upload(self, a: np.ndarray):
        with self.context():
            return self.cp.asarray(np.ascontiguousarray(a))

    def adopt(self, x):
        if isinstance(x, self.cp.ndarray):
            return x
        with self.context():
            return self.cp.asarray(x)  # a torch CUDA tensor, through __cuda_array_interface__

    @staticmethod
    def linear(x, W, b):
        y = x @ W.T
        if b is not None:
            y += b
        return y

    def relu_(self, x):
        return self.cp.maximum(x, 0, out=x)

    def sigmoid_(self, x):
        cp = self.cp  # the CPU runtime's form: exact in relative terms for small probabilities
        e = cp.exp(-cp.abs(x))
        return cp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)

    def interaction(self, bottom, emb, T: int, pairs):
        cp = self.cp
        B, D = bottom.shape
        z = cp.concatenate([bottom[:, None, :], emb.reshape(B, T, D)], axis=1)
        dots = cp.matmul(z, z.transpose(0, 2, 1)).reshape(B, (T + 1) * (T + 1))
        return cp.concatenate([bottom, cp.take(dots, pairs, axis=1)], axis=1)

    def take_cols(self, x, cols):
        return self.cp.take(x, cols, axis=1)

    def finite_rows(self, x):
        return self.cp.isfinite(x).all(axis=1)

    def first_false(self, mask):
        return None if bool(mask.all()) else int(self.cp.argmin(mask))  # (argmin: the first False)

    def normalize(self, x):
        n = self.cp.linalg.norm(x, axis=1, keepdims=True)
        return (x / self.cp.maximum(n, np.float32(1e-12))).astype(np.float32, copy=False)

    def cat(self, parts):
        return self.cp.concatenate(parts)

    def table_major_offsets(self, offs, aux, B: int, total: int):
        cp = self.cp  # see _Torch.table_major_offsets
        T = len(offs)
        full = cp.concatenate(offs).reshape(T, B + 1)
        out = cp.empty(T * B + 1, dtype=cp.int64)
        cp.add(full[:, :B], aux[:T, None], out=out[:T * B].reshape(T, B))
        ends = full[:, ::B] if B else cp.broadcast_to(full, (T, 2))
        cp.add((ends != aux[T:].reshape(T, 2)).sum().reshape(1), total, out=out[T * B:])
        return out


# ---- the model on the GPU -----------------------------------------------------------------

class _DeviceFloatMLP:
    """A float MLP's layers on the device, and the host MLP they came from: when an output
    overflows float32 on the device, the host MLP names the layer, as on the CPU."""

    def __init__(self, layers, host: _FloatMLP):
        self.layers = layers  # (W, b or None, activation) device arrays
        self.host = host


class _DeviceGroup:
    """A model._Group's tables on the device (and its tower's column order, if any)."""

    def __init__(self, group, tables, fw):
        self.group = group
        self.bags = _cuda_embedding.PreparedBags(tables, list(group.modes), fw.index)
        self.columns = None if group.columns is None else fw.upload(group.columns.astype(np.int64))


def _host(x) -> np.ndarray:
    if _cuda.is_device_array(x):
        a = _cuda.view(x)
        return a.obj.cpu().numpy() if a.framework == "torch" else a.obj.get()
    return as_numpy(x)


def _is_device_sparse(sparse) -> bool:
    if isinstance(sparse, dict):
        return any(isinstance(p, (tuple, list)) and any(_cuda.is_device_array(a) for a in p)
                   for p in sparse.values())
    return isinstance(sparse, (tuple, list)) and any(_cuda.is_device_array(a) for a in sparse)


def _on_device(fw, x, what: str):
    """A device array (either framework) on fw's device, as fw's array: ``(view, array)``."""
    a = _cuda.view(x, what)
    if a.device != fw.index:
        raise ValueError(f"{what} is on cuda:{a.device}, the model on cuda:{fw.index}")
    return a, fw.adopt(a.obj)


def _ids(fw, x, what: str):
    """One id or offset array of a request as ``(device int32/int64 1-D array, its length)``
    on fw's device (host arrays are uploaded)."""
    if not _cuda.is_device_array(x):
        h, n = _host_ids(x, what)
        return fw.upload(h), n
    a, d = _on_device(fw, x, what)
    check_index_dtype(a.dtype, what)
    if len(a.shape) != 1:
        raise ValueError(f"{what} must be 1-D, got shape {a.shape}")
    return d, a.shape[0]


def _part_reader(fw):
    """The ``ids`` of ``_Group.split`` for a model on fw's device: :func:`_ids`, after, for torch,
    the common case read off the tensor: a contiguous 1-D int32 / int64 CUDA tensor on that
    device (a dict request reads 2 per feature). (Holds fw, not the CudaModel: a reference to
    the model would be a cycle, and its GPU memory would wait for the cycle collector.)"""
    if fw.name != "torch":
        return lambda x, feature, part: _ids(fw, x, _sparse_name(feature, part))
    Tensor, i64, i32, index = fw.t.Tensor, fw.t.int64, fw.t.int32, fw.index

    def ids(x, feature, part: str):
        if type(x) is Tensor:
            dtype = x.dtype
            if ((dtype is i64 or dtype is i32) and x.is_cuda and x.dim() == 1 and x.is_contiguous()
                    and x.get_device() == index):
                return x, x.shape[0]
        return _ids(fw, x, _sparse_name(feature, part))

    return ids


class _Bags:
    """One call's embedding kernel, and the errors it may report, named by feature: ``run``
    calls the launcher, ``check`` reads its deferred bounds and offsets check (once). As a
    context manager around the work queued after the kernel: when that raises (an int8 MLP's
    NaN / Inf check), the kernel's check runs first, so a bad id or bad offsets are reported
    first, as on the CPU."""

    __slots__ = ("g", "sparse", "starts", "pending")

    def __init__(self, g: _DeviceGroup, sparse, starts):
        self.g, self.sparse, self.starts, self.pending = g, sparse, starts, None

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None:
            self.check()
        return False

    def check(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            self.run(pending.check)

    def run(self, fn, *args):
        group = self.g.group
        try:
            return fn(*args)
        except IndexError as exc:
            raise IndexError(group._index_message(str(exc), self.starts)) from None
        except ValueError:
            if self.starts is not None:  # name the feature whose offsets are wrong
                for f in group.features:
                    ind, off = self.sparse[f]
                    off = _host(off)
                    if off[0] != 0 or off[-1] != np.shape(ind)[0] or np.any(off[1:] < off[:-1]):
                        raise ValueError(_offsets_message(f, ind)) from None
            raise


class CudaModel:
    """What a :class:`fastrec.Model` on a GPU holds and runs; built once at load, then read only.
    (It keeps no reference to the Model, so the GPU memory goes with the Model's last reference.)"""

    def __init__(self, model, index: int, framework: str):
        self.index = index
        self.framework = framework
        fw = self.fw = _Torch(index) if framework == "torch" else _Cupy(index)
        uploaded = {}  # id(host table) -> its device copy: a table shared by features goes up once

        def table(t):
            if id(t) not in uploaded:
                if isinstance(t, QuantizedTable):
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message=".*not writable.*")
                        uploaded[id(t)] = t.to_device(framework, index)
                else:
                    uploaded[id(t)] = fw.upload(t)
            return uploaded[id(t)]

        def group(g):
            return _DeviceGroup(g, [table(t) for t in g.tables], fw)

        with fw.context():
            if model.kind == "dlrm":
                self.dense_width, self.T = model.dense_features, len(model.features)
                self.group = group(model._group)
                self.bottom = self._mlp(model._bottom)
                self.top = self._mlp(model._top)
                n = len(model.features) + 1
                li, lj = np.tril_indices(n, -1)  # docs/FORMAT.md step 3: i > j, row-major (the CPU's order)
                self.pairs = fw.upload((li * n + lj).astype(np.int64))  # into the flattened (T+1)^2 dots
            else:
                self.user, self.item = group(model._user), group(model._item)
                self.user_norm, self.item_norm, self.item_index = model._user_norm, model._item_norm, model._index
                self.user_mlp, self.item_mlp = self._mlp(model._user_mlp), self._mlp(model._item_mlp)
                from . import _cuda_topk

                _cuda_topk.upload(model._index, fw.upload(np.zeros(1, np.float32)))
            self._sync()
        self._read_ids = _part_reader(fw)

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"

    def _sync(self):
        if self.framework == "torch":
            self.fw.t.cuda.current_stream(self.index).synchronize()
        else:
            self.fw.cp.cuda.get_current_stream().synchronize()

    # ---- MLPs ----------------------------------------------------------------------------
    def _mlp(self, mlp):
        """None (no layers), an Int8MLP (its device weights uploaded now) or float32 layers."""
        from . import _cuda_linear

        if isinstance(mlp, _Int8MLPRunner):
            m = mlp.mlp
            _cuda_linear._plan(m, self.index, self.index, m.layers, m._codes)  # warm the device cache
            return m
        if isinstance(mlp, _FloatMLP):
            return _DeviceFloatMLP([(self.fw.upload(W), None if b is None else self.fw.upload(b), act)
                                    for W, b, act in mlp.layers], mlp)
        return None

    def _run_mlp(self, mlp, x, *, check_finite: bool = True):
        """``(y, ok)``: the MLP's output, and for a float MLP with ``check_finite`` a queued
        device mask of the rows whose last layer's output (after a ReLU, before a sigmoid) holds
        no NaN or Inf, as the CPU's ``_FloatMLP`` checks; None otherwise (an int8 MLP checks
        itself). Read the mask with :meth:`_finish` after the rest of the call is queued."""
        if mlp is None:
            return x, None
        if isinstance(mlp, Int8MLP):
            return mlp(x, check_finite=check_finite), None
        fw, ok, last = self.fw, None, len(mlp.layers) - 1
        for i, (W, b, act) in enumerate(mlp.layers):
            x = fw.linear(x, W, b)
            if act == "relu":
                x = fw.relu_(x)
            if check_finite and i == last:
                ok = fw.finite_rows(x)
            if act == "sigmoid":
                x = fw.sigmoid_(x)
        return x, ok

    def _finish(self, bags, inputs_ok, outputs_ok, steps) -> None:
        """The call's one host wait, after everything else is queued, and its errors in the CPU
        runtime's order: ValueError naming the first row of ``inputs_ok`` (a float model's dense
        input: a queued mask of finite rows, or None) holding NaN or Inf; then what ``bags`` (a
        :class:`_Bags`) found in the embedding kernel (a bad id or offsets); then, when
        ``outputs_ok`` (the last float layer's, or None) has a False row, ValueError naming the
        layer that overflowed: each of ``steps`` (a float MLP, or None, and its device input) runs
        again on the host, in order, through ``_FloatMLP.locate`` (a DLRM's bottom MLP first,
        whose overflow reaches the top)."""
        fw = self.fw
        if inputs_ok is None or outputs_ok is None:
            ok = outputs_ok if inputs_ok is None else inputs_ok
        else:
            ok = inputs_ok & outputs_ok
        flag = None if ok is None else ok.all()  # queued: the read below waits for nothing else
        try:
            bags.check()  # waits for the stream
            found = None
        except (IndexError, ValueError) as exc:
            found = exc
        if found is not None:
            self._raise_if_bad_input(inputs_ok)  # (as the CPU's float runtime: the dense rows first)
            raise found
        if flag is None or self._read(flag):
            return
        self._raise_if_bad_input(inputs_ok)
        row = fw.first_false(outputs_ok)
        for mlp, x in steps:
            if isinstance(mlp, _DeviceFloatMLP):
                mlp.host.locate(_host(x))
        raise ValueError(f"an MLP's output holds NaN or Inf (row {row}): float32 overflowed (the model's inputs, "
                         "weights or tables are too large for float32)")

    def _raise_if_bad_input(self, inputs_ok) -> None:
        row = None if inputs_ok is None else self.fw.first_false(inputs_ok)
        if row is not None:
            raise ValueError(f"input contains NaN or Inf (row {row})")

    @staticmethod
    def _read(flag) -> bool:
        """A queued device boolean, read (the call's wait for its NaN / Inf masks)."""
        return bool(flag)

    # ---- inputs --------------------------------------------------------------------------
    def _dense(self, dense, width: int):
        on_device = _cuda.is_device_array(dense)
        if on_device:
            name = str(dense.dtype)
            if name == "torch.bfloat16":  # as the CPU runtime (as_numpy) and Int8Linear take it
                dense, name = dense.float(), "torch.float32"
            if name not in ("float32", "torch.float32"):
                raise TypeError(f"dense must be float32, got {name}")
            a, x = _on_device(self.fw, dense, "dense")
            shape = a.shape
        else:
            x = float_input(dense, "dense")  # (lists become float32 and byte-swapped arrays native, as on the CPU)
            if x.dtype != np.float32:
                raise TypeError(f"dense must be float32, got {x.dtype}")
            shape = x.shape
        if len(shape) != 2 or shape[1] != width:
            raise ValueError(f"dense must have shape (B, {width}), got {tuple(shape)}")
        return x if on_device else self.fw.upload(x)

    def _pack(self, g: _DeviceGroup, sparse, B):
        """(indices, offsets) on the device, table-major, B and each feature's start (dicts)."""
        if not _is_device_sparse(sparse):
            indices, offsets, B, starts = g.group.pack(sparse, B)  # the CPU runtime's checks
            return self.fw.upload(indices), self.fw.upload(offsets), B, starts
        pair, parts, B = g.group.split(sparse, B, self._read_ids)  # the CPU runtime's checks, on shapes
        if pair is not None:
            return pair[0], pair[1], B, None
        if len(parts) == 1:  # the kernel checks offsets[0] == 0 and offsets[-1] == len(indices) itself
            return parts[0][0], parts[0][1], B, [0]
        lens = [n for _, _, n in parts]
        starts = list(itertools.accumulate(lens[:-1], initial=0))
        aux = self.fw.upload(np.array(starts + [v for n in lens for v in (0, n)], dtype=np.int64))
        offsets = self.fw.table_major_offsets([off for _, off, _ in parts], aux, B, sum(lens))
        return self.fw.cat([ind for ind, _, _ in parts]), offsets, B, starts

    def _embed(self, g: _DeviceGroup, sparse, indices, offsets, starts):
        """``(pooled, bags)``: the pooled float32 (B, width) device array in the group's concat
        order, queued, and the :class:`_Bags` whose ``check()`` raises what the kernel found."""
        bags = _Bags(g, sparse, starts)
        out, bags.pending = bags.run(g.bags.deferred, indices, offsets)
        if g.columns is not None:
            with bags:
                out = self.fw.take_cols(out, g.columns)
        return out, bags

    # ---- the public calls (Model's methods branch here) ----------------------------------
    def score(self, dense, sparse):
        fw, g = self.fw, self.group
        _cuda.refuse_capture(fw.name, fw.index, "Model.score")
        with fw.context():
            x = self._dense(dense, self.dense_width)
            B = x.shape[0]
            # A float model refuses NaN / Inf dense rows as the CPU runtime does (an int8 top MLP
            # finds them while quantizing). The mask is queued now and read with the top MLP's
            # at the end, in one wait, so the check adds no wait in the middle of the forward.
            dense_ok = None if isinstance(self.top, Int8MLP) else fw.finite_rows(x)
            indices, offsets, B, starts = self._pack(g, sparse, B)  # inputs first: a host copy may wait
            # (unchecked: its overflow reaches the top MLP's check)
            bottom, _ = self._run_mlp(self.bottom, x, check_finite=False)
            emb, bags = self._embed(g, sparse, indices, offsets, starts)
            with bags:  # (an int8 top MLP waits for its NaN / Inf check, and may raise)
                top_in = fw.interaction(bottom, emb, self.T, self.pairs)
                out, out_ok = self._run_mlp(self.top, top_in)
            self._finish(bags, dense_ok, out_ok, [(self.bottom, x), (self.top, top_in)])
            return out.reshape(B)

    def _tower(self, g, mlp, normalize: bool, sparse):
        _cuda.refuse_capture(self.fw.name, self.fw.index, "Model.user_vectors / item_vectors")
        with self.fw.context():
            indices, offsets, _, starts = self._pack(g, sparse, None)
            x, bags = self._embed(g, sparse, indices, offsets, starts)
            with bags:
                y, ok = self._run_mlp(mlp, x)
            self._finish(bags, None, ok, [(mlp, x)])
            return self.fw.normalize(y) if normalize else y

    def user_vectors(self, sparse):
        return self._tower(self.user, self.user_mlp, self.user_norm, sparse)

    def item_vectors(self, sparse):
        return self._tower(self.item, self.item_mlp, self.item_norm, sparse)

    def recommend(self, sparse, k, exclude):
        q = self.user_vectors(sparse)
        with self.fw.context():
            return self.item_index.search(q, k, exclude=exclude)
