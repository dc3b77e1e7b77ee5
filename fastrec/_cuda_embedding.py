"""The CUDA path of ``fastrec.ops.embedding_bag`` / ``embedding_bags``, and QuantizedTables on the GPU.

``fastrec.ops`` sends a call here when any input is a CUDA array (a torch CUDA tensor or a CuPy
array) or a :class:`DeviceQuantizedTable`. Every array input must then be a CUDA array on one
device: ids, offsets and per-sample weights are read in place (zero-copy, a contiguous copy
only for strided inputs), the result is allocated by the indices' framework on their device,
and the kernel runs on that framework's current stream there. The call waits for the kernel:
the bounds check reads 16 bytes back per call, so a bad id raises IndexError (position, value,
table, bag: the CPU op's message) on the call that made it, and leaves the CUDA context usable.

Nothing here imports torch or CuPy: their arrays are only met when a caller passes them, and
``QuantizedTable.to_device`` imports the framework it is asked for.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from . import _C, _cuda
from ._arrays import check_index_dtype
from .tables import QuantizedTable, _refuse_reinit

MIXED_MESSAGE = (
    "{what} is a host array while other inputs are CUDA arrays: pass the ids, offsets, weights and "
    "tables all on one GPU (torch CUDA tensors / CuPy arrays, QuantizedTable.to_device()), or all on the host"
)

_KIND_F32, _KIND_F16, _KIND_Q8, _KIND_Q4, _KIND_Q2, _KIND_Q8_HALF = range(6)  # RowKind codes


def device_view(x, name: str) -> _cuda.DeviceArray:
    """A contiguous DeviceArray of a CUDA array (:func:`fastrec._cuda.view`, whose torch path
    skips ``__cuda_array_interface__``); TypeError naming ``name`` for anything else."""
    if _cuda._framework(x) is None:
        raise TypeError(MIXED_MESSAGE.format(what=name))
    return _cuda.view(x, name)


# ---- quantized tables on the GPU ------------------------------------------------------------


class DeviceQuantizedTable(QuantizedTable):
    """A :class:`fastrec.QuantizedTable` whose packed rows live in GPU memory (a torch CUDA
    tensor or a CuPy array, ``(R, row_stride)`` uint8, same byte layout as on the host).

    Made by :meth:`QuantizedTable.to_device` or by :meth:`QuantizedTable.from_fbgemm` on a CUDA
    array (zero-copy). ``data`` is that device array; ``device`` its device index; ``framework``
    "torch" or "cupy". :meth:`dequantize`, :meth:`to_fbgemm` and :meth:`to_host` copy to the host.
    """

    def __init__(self, data, bits, dim, layout="fbgemm"):
        _refuse_reinit(self)
        dev = device_view(data, "packed table data")
        if dev.dtype != np.uint8:
            raise TypeError(f"packed table data must be uint8, got {dev.dtype}")
        if len(dev.shape) != 2:
            raise ValueError(f"packed table data must be 2-D (rows, bytes per row), got shape {dev.shape}")
        # The C++ base checks bits, layout, dim and the row width on an empty host stand-in of
        # the same width; the rows themselves stay on the GPU.
        _C.PackedTable.__init__(self, np.empty((0, dev.shape[1]), dtype=np.uint8), int(bits), int(dim), layout)
        self._dev = dev
        # What the launcher takes, worked out once: the table cannot be re-initialised, so
        # these never change (a call then costs a tuple read per table, not ~3 us of lookups).
        tbe = self.layout == "tbe"
        kind = {8: _KIND_Q8_HALF if tbe else _KIND_Q8, 4: _KIND_Q4, 2: _KIND_Q2}[self.bits]
        self._head = (dev.ptr, int(dev.shape[0]), int(self.dim), int(self.row_stride), kind, tbe)

    @property
    def data(self):
        return self._dev.obj

    @property
    def num_rows(self) -> int:
        return int(self._dev.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self._dev.shape[0]) * int(self._dev.shape[1])

    @property
    def device(self) -> int:
        return self._dev.device

    @property
    def framework(self) -> str:
        return self._dev.framework

    def to_host(self) -> QuantizedTable:
        """The same table with its rows copied into host memory."""
        host = self._dev.obj.get() if self.framework == "cupy" else self._dev.obj.cpu().numpy()
        return QuantizedTable(host, self.bits, self.dim, self.layout)

    def to_device(self, like="torch", device=None) -> "DeviceQuantizedTable":
        fw, dev = _target(like, device)
        if fw == self.framework and dev == self.device:
            return self
        return DeviceQuantizedTable(_to_framework(self._dev.obj, fw, dev), self.bits, self.dim, self.layout)

    def _codes_and_qparams(self):
        return self.to_host()._codes_and_qparams()

    def dequantize(self) -> np.ndarray:
        """The float32 table on the host (the rows are copied back first)."""
        return self.to_host().dequantize()

    def to_fbgemm(self) -> np.ndarray:
        return self.to_host().to_fbgemm()

    def __repr__(self) -> str:
        return (f"QuantizedTable(num_rows={self.num_rows}, dim={self.dim}, bits={self.bits}, "
                f"layout={self.layout!r}, nbytes={self.nbytes}, device='cuda:{self.device}', "
                f"framework={self.framework!r})")


def _target(like, device):
    """(framework, device index) for to_device(like, device)."""
    if isinstance(like, str):
        if like not in ("torch", "cupy"):
            raise ValueError(f"like must be 'torch', 'cupy' or a CUDA array, got {like!r}")
        fw = like
        if fw == "torch":
            try:
                import torch
            except ImportError:
                raise RuntimeError("like='torch' needs torch, which is not installed") from None
            if not torch.cuda.is_available():  # (torch.cuda.current_device() asserts)
                raise RuntimeError("torch sees no CUDA device here (a CPU-only torch build, or no "
                                   "GPU or driver): to_device needs one")
            if device is None:
                device = torch.cuda.current_device()
        else:
            try:
                import cupy

                n = cupy.cuda.runtime.getDeviceCount()
            except Exception as exc:  # ImportError, or CuPy's CUDARuntimeError without a driver
                raise RuntimeError(f"like='cupy' needs CuPy and a CUDA device ({type(exc).__name__}: "
                                   f"{exc})") from None
            if n == 0:
                raise RuntimeError("CuPy sees no CUDA device here: to_device needs one")
            if device is None:
                device = cupy.cuda.Device().id
    else:
        arr = device_view(like, "like")
        fw = arr.framework
        if device is None:
            device = arr.device
    if isinstance(device, bool) or not isinstance(device, (int, np.integer)) or device < 0:
        raise TypeError(f"device must be a CUDA device index (int >= 0), got {device!r}")
    return fw, int(device)


def _to_framework(x, framework: str, device: int):
    """A copy (or, on the same device, a zero-copy view) of x (numpy, torch or CuPy) as a CUDA
    array of `framework` on `device`."""
    if framework == "torch":
        import torch

        if isinstance(x, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(x)).to(f"cuda:{device}")
        return torch.as_tensor(x, device=f"cuda:{device}")
    import cupy

    with cupy.cuda.Device(device):
        if _cuda._framework(x) == "cupy" and x.device.id == device:
            return x
        if _cuda._framework(x) is not None:  # another device or framework: through the host
            x = x.get() if _cuda._framework(x) == "cupy" else x.cpu().numpy()
        out = cupy.asarray(x)
        # The copy is queued on CuPy's current stream: wait for it, so that a first call on
        # another (non-blocking) stream cannot read the table before it has landed (torch's
        # .to() above returns after its copy).
        cupy.cuda.get_current_stream().synchronize()
        return out


def table_to_device(table: QuantizedTable, like="torch", device=None) -> DeviceQuantizedTable:
    """Implements :meth:`QuantizedTable.to_device` for a host table."""
    fw, dev = _target(like, device)
    return DeviceQuantizedTable(_to_framework(table.data, fw, dev), table.bits, table.dim, table.layout)


# ---- backend: the compiled module, or the CuPy RawKernel fallback (issue 6) --------------------

_cupy_fallback = None  # fastrec.kernels.cupy_embedding, once chosen because _C_cuda is unusable


def _embedding_backend():
    """The object whose ``embedding_bags(...)`` (the ``_C_cuda`` signature) runs the kernels.

    ``FASTREC_CUDA_BACKEND`` (read on every call): unset, "" or "auto": the compiled module
    (``fastrec._C_cuda``), else :mod:`fastrec.kernels.cupy_embedding` when CuPy sees a GPU,
    else the compiled module's RuntimeError; "compiled": the compiled module only; "cupy":
    the CuPy kernels even when the compiled module exists (to compare the two).
    """
    global _cupy_fallback
    choice = os.environ.get("FASTREC_CUDA_BACKEND", "").strip().lower()
    if choice in ("", "auto"):
        if _cupy_fallback is not None:
            return _cupy_fallback
        try:
            return _cuda.module()
        except RuntimeError as compiled_error:
            from .kernels import cupy_embedding

            if cupy_embedding.available() is not None:
                raise RuntimeError(f"{compiled_error} CuPy fallback: {cupy_embedding.available()}.") from None
            _cupy_fallback = cupy_embedding
            return _cupy_fallback
    if choice == "cupy":
        from .kernels import cupy_embedding

        reason = cupy_embedding.available()
        if reason is not None:
            raise RuntimeError(f"FASTREC_CUDA_BACKEND=cupy but {reason}")
        return cupy_embedding
    if choice == "compiled":
        return _cuda.module()
    raise ValueError(f"FASTREC_CUDA_BACKEND must be 'auto', 'compiled' or 'cupy', got {choice!r}")


# ---- routing --------------------------------------------------------------------------------


def is_device_input(x) -> bool:
    return type(x) is DeviceQuantizedTable or _cuda.is_device_array(x)


_HOST_TABLE_TYPES = frozenset((np.ndarray, QuantizedTable))


def any_device_table(tables) -> bool:
    """Whether any table of the list / tuple is on the GPU (cheap for numpy and host
    QuantizedTable inputs)."""
    if not isinstance(tables, (list, tuple)):
        tables = list(tables)  # iterated twice below
    if _HOST_TABLE_TYPES.issuperset(map(type, tables)):  # iterates in C: ~0.5 us for 26 tables, not 2
        return False
    for t in tables:
        if type(t) not in _HOST_TABLE_TYPES and is_device_input(t):
            return True
    return False


def _general_head(t, index: int, device: int):
    """(head, keep) for table ``index`` of any kind the GPU op takes: ``head`` is the
    launcher's (ptr, rows, dim, row_stride, kind, tbe), ``keep`` the array it points into (a
    contiguous copy of a strided table, or a bfloat16 table's float32 copy, must outlive the
    call). Raises the op's TypeError / ValueError for anything else."""
    if isinstance(t, DeviceQuantizedTable):
        _same_device(t._dev, f"table {index}", device)
        return t._head, t
    if isinstance(t, QuantizedTable):
        raise TypeError(MIXED_MESSAGE.format(what=f"table {index} (a host QuantizedTable; use .to_device())"))
    dev = device_view(t, f"table {index}")
    if dev.dtype == np.float32:
        kind = _KIND_F32
    elif dev.dtype == np.float16:
        kind = _KIND_F16
    else:
        raise TypeError(f"table {index} must be float32 or float16 (or a QuantizedTable), got {dev.dtype}")
    if len(dev.shape) != 2:
        raise ValueError(f"table {index} must be 2-D (rows, dim), got {len(dev.shape)}-D")
    _same_device(dev, f"table {index}", device)
    rows, dim = dev.shape
    return (dev.ptr, int(rows), int(dim), int(dim) * dev.dtype.itemsize, kind, False), dev


_TORCH_FAST: dict = {}  # once torch is imported: "types" (Tensor, Parameter), "kinds" (dtype -> (kind, bytes))


def _torch_fast():
    """The torch types and dtypes :func:`_torch_float_head` reads, or None before torch is
    imported (a CuPy caller's tables are no tensors, and fastrec never imports torch itself)."""
    if not _TORCH_FAST:
        if "torch" not in sys.modules:
            return None
        import torch  # (waits for another thread's import of torch to finish)

        _TORCH_FAST.update(types=(torch.Tensor, torch.nn.Parameter),
                           kinds={torch.float32: (_KIND_F32, 4), torch.float16: (_KIND_F16, 2)})
    return _TORCH_FAST


def _torch_float_head(t, device: int, kinds):
    """The launcher's head of a 2-D contiguous float32 / float16 CUDA tensor on ``device``, read
    straight off the tensor (~0.6 us, against ~3.5 us through a DeviceArray); None for any other
    tensor, which then takes :func:`_general_head` (its copies, checks and messages)."""
    kind = kinds.get(t.dtype)
    if kind is None or not t.is_cuda or t.dim() != 2 or not t.is_contiguous() or t.get_device() != device:
        return None
    rows, dim = t.shape
    return (t.data_ptr(), rows, dim, dim * kind[1], kind[0], False)


def _table_heads(tables, device: int):
    """(heads, keep): the launcher's head of every table, and the arrays to keep alive."""
    fast = _torch_fast()
    types = fast["types"] if fast else ()
    heads, keep = [], []
    for i, t in enumerate(tables):
        if type(t) is DeviceQuantizedTable and t._dev.device == device:
            heads.append(t._head)
            continue
        if type(t) in types:  # plain tensors and Parameters; other subclasses take the general path
            head = _torch_float_head(t, device, fast["kinds"])
            if head is not None:
                heads.append(head)
                continue
        head, k = _general_head(t, i, device)
        heads.append(head)
        keep.append(k)
    return heads, keep


def _same_device(a: _cuda.DeviceArray, name: str, device: int) -> None:
    if a.device != device:
        raise ValueError(f"{name} is on cuda:{a.device} but the indices are on cuda:{device}; "
                         "pass every input on one GPU")


def _index_view(x, name: str) -> _cuda.DeviceArray:
    v = device_view(x, name)
    check_index_dtype(v.dtype, name)
    return v


def _launch(args, width: int, idx, off, fixed_len, num_offsets, per_sample_weights, deferred=False):
    """Runs the kernel for normalised inputs (``args``: a :func:`_table_heads` head + (mode code,
    padding code) per table; ``width``: the sum of their dims); returns the output array of
    idx's framework, once the kernel's bounds and offsets check has been read. ``deferred``:
    returns ``(output, pending)`` as soon as the kernel is queued, where ``pending.check()``
    waits and raises what the check found (None: already checked, as the CuPy fallback does)."""
    n = idx.size
    psw = None
    if per_sample_weights is not None:
        from .ops import _check_weights

        psw = device_view(per_sample_weights, "per_sample_weights")
        _check_weights(psw.dtype, psw.shape, n, idx.shape)
        _same_device(psw, "per_sample_weights", idx.device)
    T = len(args)
    if (num_offsets - 1) % T != 0:
        raise ValueError(f"offsets must have length T*B + 1 (T={T} tables), got length {num_offsets}")
    B = (num_offsets - 1) // T
    out = _cuda.empty(idx, (B, width), np.float32)
    backend = _embedding_backend()
    launch = backend.embedding_bags
    if deferred:
        launch = getattr(backend, "embedding_bags_deferred", launch)
    pending = launch(args, idx.ptr, n, idx.dtype == np.int64,
                     0 if off is None else off.ptr, num_offsets, off is not None and off.dtype == np.int64,
                     -1 if fixed_len is None else fixed_len, 0 if psw is None else psw.ptr, out.ptr,
                     idx.device, _cuda.stream(idx))
    if not deferred:
        return out.obj
    if pending is not None:  # (a contiguous copy made here is the only reference to what check() reads)
        pending = _Pending(pending, (idx.obj, None if off is None else off.obj, None if psw is None else psw.obj))
    return out.obj, pending


class _Pending:
    """A deferred launch's check (``_C_cuda.PendingBags``) and the arrays its kernel reads,
    kept until the check has run: on an error, the check reads the ids and offsets back."""

    __slots__ = ("pending", "keep")

    def __init__(self, pending, keep):
        self.pending, self.keep = pending, keep

    def check(self) -> None:
        try:
            self.pending.check()  # (the C++ object checks once; later calls return at once)
        finally:
            self.keep = None


def embedding_bag(weight, indices, offsets, code: int, per_sample_weights, padding_idx):
    """ops.embedding_bag on the GPU (mode already parsed, weights/mode already checked)."""
    from .ops import _check_bag_shapes, _padding_code

    _cuda.refuse_capture_for(indices, "embedding_bag")
    idx = _index_view(indices, "indices")
    if offsets is None:
        _check_bag_shapes(idx.shape, None)
        B, L = idx.shape
        off, fixed_len, num_offsets = None, L, B + 1
    else:
        off = _index_view(offsets, "offsets")
        _check_bag_shapes(idx.shape, off.shape)
        _same_device(off, "offsets", idx.device)
        fixed_len, num_offsets = None, off.shape[0]
    heads, keep = _table_heads((weight,), idx.device)
    args = [heads[0] + (code, _padding_code(padding_idx, heads[0][1]))]
    out = _launch(args, heads[0][2], idx, off, fixed_len, num_offsets, per_sample_weights)
    del keep  # (alive until the launcher, which waits for the kernel, has returned)
    return out


def _bags_inputs(indices, offsets):
    """(idx, off) DeviceArrays of embedding_bags' 1-D ids and table-major offsets, on one device."""
    _cuda.refuse_capture_for(indices, "embedding_bags")
    idx = _index_view(indices, "indices")
    off = _index_view(offsets, "offsets")
    if len(idx.shape) != 1:
        raise ValueError(f"indices must be 1-D, got {len(idx.shape)}-D")
    if len(off.shape) != 1:
        raise ValueError(f"offsets must be 1-D, got {len(off.shape)}-D")
    _same_device(off, "offsets", idx.device)
    return idx, off


def embedding_bags(tables, indices, offsets, codes, per_sample_weights, padding_idx):
    """ops.embedding_bags on the GPU (tables, modes and weights/mode already checked)."""
    from .ops import _padding_codes

    idx, off = _bags_inputs(indices, offsets)
    heads, keep = _table_heads(tables, idx.device)
    pads = _padding_codes(padding_idx, len(heads), lambda t: heads[t][1])
    args = [h + (c, p) for h, c, p in zip(heads, codes, pads)]
    out = _launch(args, sum(h[2] for h in heads), idx, off, None, off.shape[0], per_sample_weights)
    del keep  # (alive until the launcher, which waits for the kernel, has returned)
    return out


class PreparedBags:
    """``embedding_bags`` over fixed device tables, their launch arguments worked out once.

    For tables nothing changes after they are made: a loaded model's (fastrec._cuda_model keeps
    them to itself). A call then costs what ``ops.embedding_bags`` costs without its per-table
    work (~0.6 us a table on the host, per call). The tables must all be on ``device``.
    """

    def __init__(self, tables, modes, device: int):
        from .ops import _mode_codes

        if not tables:
            raise ValueError("tables must not be empty")
        self.tables = list(tables)  # (the args point into them)
        heads, self._keep = _table_heads(self.tables, device)
        self.args = [h + (c, -1) for h, c in zip(heads, _mode_codes(modes, len(heads)))]
        self.width = sum(h[2] for h in heads)
        self.device = device

    def __call__(self, indices, offsets):
        """The pooled (B, width) float32 array of the ids' framework (ops.embedding_bags' checks)."""
        return self._run(indices, offsets, False)

    def deferred(self, indices, offsets):
        """``(pooled, pending)`` as soon as the kernel is queued; ``pending.check()`` (when not
        None) waits for the stream and raises the IndexError / ValueError ``__call__`` would
        have. Until then, keep ``indices`` and ``offsets`` alive and unchanged; the pooled
        array's values are only meaningful once the check has passed."""
        return self._run(indices, offsets, True)

    def _run(self, indices, offsets, deferred: bool):
        idx, off = _bags_inputs(indices, offsets)
        if idx.device != self.device:
            raise ValueError(f"indices are on cuda:{idx.device}, the tables on cuda:{self.device}")
        return _launch(self.args, self.width, idx, off, None, off.shape[0], None, deferred)
