"""CUDA plumbing shared by the ops: the lazily imported module, device arrays and streams.

fastrec takes device arrays from torch (CUDA tensors) and CuPy, zero-copy, through
``__cuda_array_interface__``. Results are allocated by the caller's framework on the same device
and the kernels run on the caller's current stream, so ordering with the caller's own work is
the framework's usual one.

Nothing here imports torch or CuPy unless the caller already passed one of their arrays.
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import numpy as np

_module = None


def module():
    """The compiled CUDA module, or a RuntimeError that says why it cannot be used."""
    global _module
    if _module is None:
        try:
            from . import _C_cuda
        except ImportError as e:
            raise RuntimeError(
                "fastrec's CUDA module (fastrec._C_cuda) is not available in this build "
                f"({e}). It is built when nvcc is found at install time (FASTREC_CUDA=AUTO|ON); "
                "see `python -m fastrec.info`."
            ) from None
        if _C_cuda.device_count() == 0:
            raise RuntimeError(
                "fastrec's CUDA module is built but no CUDA device is usable here (no GPU or no "
                "driver); see `python -m fastrec.info`."
            )
        _module = _C_cuda
    return _module


def _framework(x) -> str | None:
    """'torch' or 'cupy' for a device array of that framework, else None (host arrays)."""
    mod = type(x).__module__
    if mod.startswith("torch") and "torch" in sys.modules:
        import torch

        if isinstance(x, torch.Tensor) and x.is_cuda:
            return "torch"
        return None
    if mod.startswith("cupy") and "cupy" in sys.modules:
        import cupy

        if isinstance(x, cupy.ndarray):
            return "cupy"
    return None


def is_device_array(x) -> bool:
    """True for a torch CUDA tensor or a CuPy array."""
    return _framework(x) is not None


class DeviceArray(NamedTuple):
    """A C-contiguous device array, seen through ``__cuda_array_interface__`` (or, for torch,
    read off the tensor). A named tuple: made on every op call, and a frozen dataclass took
    ~1 us to build."""

    obj: object          # the framework's array (kept alive while the view is used)
    framework: str       # "torch" or "cupy"
    ptr: int
    shape: tuple
    dtype: np.dtype
    device: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # (Python ints: no overflow; np.prod costs ~3 us a call)


def _contiguous(x, framework: str):
    if framework == "torch":
        return x.contiguous()
    import cupy

    with cupy.cuda.Device(x.device.id):  # (CuPy launches the copy on the current device)
        return cupy.ascontiguousarray(x)


def _device_index(x, framework: str) -> int:
    return int(x.device.index) if framework == "torch" else int(x.device.id)


_TORCH_NP: dict = {}  # torch dtype -> numpy dtype, filled on first use (_torch_dtypes)
_NP_TORCH: dict = {}  # and back


def _torch_dtypes() -> None:
    """Fills _TORCH_NP and _NP_TORCH (torch is imported by then: the caller passed a tensor)."""
    import torch

    names = ("float32", "float16", "int8", "uint8", "int32", "int64", "float64", "int16", "bool")
    _NP_TORCH.update({np.dtype(n): getattr(torch, n) for n in names})
    _TORCH_NP.update({t: n for n, t in _NP_TORCH.items()})


def _torch_view(x) -> DeviceArray:
    # The hot path of every op on torch tensors: no __cuda_array_interface__ (it builds a dict
    # and costs several microseconds a call).
    if not _TORCH_NP:
        _torch_dtypes()
    if x.requires_grad:  # fastrec only reads it: no autograd graph
        x = x.detach()
    if x.dtype not in _TORCH_NP:
        if str(x.dtype) != "torch.bfloat16":
            raise TypeError(f"unsupported torch dtype {x.dtype}")
        x = x.float()
    if not x.is_contiguous():
        x = x.contiguous()
    return DeviceArray(obj=x, framework="torch", ptr=x.data_ptr(), shape=tuple(x.shape),
                       dtype=_TORCH_NP[x.dtype], device=x.get_device())


def view(x, name: str = "array") -> DeviceArray:
    """A contiguous view of a device array (copied on its device only if it is strided)."""
    fw = _framework(x)
    if fw is None:
        raise TypeError(f"{name} must be a CUDA array (torch CUDA tensor or CuPy array), got {type(x).__name__}")
    if fw == "torch":
        return _torch_view(x)
    x = _contiguous(x, fw)
    cai = x.__cuda_array_interface__
    return DeviceArray(obj=x, framework=fw, ptr=int(cai["data"][0]), shape=tuple(cai["shape"]),
                       dtype=np.dtype(cai["typestr"]), device=_device_index(x, fw))


def stream(a: DeviceArray) -> int:
    """The caller's current stream on ``a``'s device, as an integer handle (0: legacy default)."""
    if a.framework == "torch":
        import torch

        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # fast; same value as below
        if raw is not None:
            return int(raw(a.device))
        return int(torch.cuda.current_stream(a.device).cuda_stream)
    import cupy

    with cupy.cuda.Device(a.device):
        return int(cupy.cuda.get_current_stream().ptr)


def capturing(framework: str, device: int) -> bool:
    """Whether the caller's current stream on ``device`` is capturing a CUDA graph."""
    if framework == "torch":
        import torch

        with torch.cuda.device(device):
            return bool(torch.cuda.is_current_stream_capturing())
    import cupy

    with cupy.cuda.Device(device):
        return bool(cupy.cuda.get_current_stream().is_capturing())


def refuse_capture(framework: str, device: int, what: str) -> None:
    """ValueError when the caller is capturing a CUDA graph on ``device``. Called before anything
    is enqueued, so the capture stays valid: ``what`` reads a result back to the host (a bounds,
    NaN / Inf or overflow check) or copies host inputs, and a capture cannot wait for the GPU."""
    if capturing(framework, device):
        raise ValueError(f"{what} waits for the GPU (it reads its checks back to the host), which a CUDA graph "
                         "capture cannot do: call it outside the capture (only Int8Linear / Int8MLP with "
                         "check_finite=False can be captured)")


def refuse_capture_for(x, what: str) -> None:
    """refuse_capture on the device of x, a caller's array, before anything (a view's copy
    kernel, say) is queued for it; nothing for host arrays."""
    fw = _framework(x)
    if fw is not None:
        refuse_capture(fw, _device_index(x, fw), what)


def empty(like: DeviceArray, shape, dtype) -> DeviceArray:
    """An uninitialised array of ``like``'s framework on ``like``'s device."""
    dtype = np.dtype(dtype)
    shape = tuple(map(int, shape))
    if like.framework == "torch":
        if not _NP_TORCH:
            _torch_dtypes()
        t = like.obj.new_empty(shape, dtype=_NP_TORCH[dtype])  # (like's device; ~1 us, torch.empty ~3)
        return DeviceArray(t, "torch", t.data_ptr(), shape, dtype, like.device)  # (new: contiguous)
    else:
        import cupy

        with cupy.cuda.Device(like.device):
            t = cupy.empty(shape, dtype=dtype)
    return view(t)


def from_host(like: DeviceArray, arr: np.ndarray) -> DeviceArray:
    """Copy a host array to ``like``'s device, in ``like``'s framework."""
    arr = np.ascontiguousarray(arr)
    if like.framework == "torch":
        import torch

        t = torch.from_numpy(arr).to(like.obj.device)
    else:
        import cupy

        with cupy.cuda.Device(like.device):
            t = cupy.asarray(arr)
    return view(t)

