"""CUDA path of Int8Linear / Int8MLP: device arrays in (torch CUDA tensors, CuPy arrays,
zero-copy), a result of the caller's framework on the same device, computed on the caller's
current stream.

Per layer: one pass quantizes the activations per row (the CPU's exact float operations, so the
int8 codes, the int32 sums and the float outputs equal the CPU op's), then an int8 tensor-core
GEMM applies the dequantization, bias and ReLU / sigmoid in its epilogue. An MLP's layers run back
to back on the stream with no host synchronisation between them.

The weights are uploaded to a device once, on first use there, and cached on the Int8Linear
(shared by every Int8MLP using it). Scratch (quantized activations, row scales, the MLP's
hidden layers) and the output are allocated by the caller's framework, so its caching allocator
and stream semantics apply.

NaN / Inf: with ``check_finite=True`` (the default) each quantization pass flags rows holding
NaN or Inf, and the call raises ValueError naming the first one, as the CPU op does. That costs
one host wait per call: for the last layer's quantization pass (so also for everything queued
before it on the stream); the last GEMM is already queued then and overlaps the return to Python.
``check_finite=False`` skips the wait: the call returns as soon as the kernels are queued, and a
row holding NaN or Inf comes out as a row of NaN.

CUDA graphs: with ``check_finite=False`` a call only enqueues kernels, so torch.cuda.graph / CuPy
stream capture can record it (call it once before capturing, so the weights are uploaded); with
``check_finite=True`` a call inside a capture raises ValueError before enqueueing anything.
A captured graph holds the device weights' addresses: keep the Int8Linear / Int8MLP alive for
as long as the graph may be replayed (the device copy is freed with the object, after a
device-wide synchronize).
"""

from __future__ import annotations

import threading

import numpy as np

from . import _cuda
from .kernels import renew_after_fork

__all__ = ["int8_linear", "int8_mlp"]

_upload_lock = threading.RLock()  # re-entered: a plan uploads its layers
renew_after_fork(globals(), "_upload_lock", threading.RLock)


def _input(x, in_features: int) -> _cuda.DeviceArray:
    """x as a contiguous float32 (B, in_features) device array, with the CPU op's errors."""
    a = _cuda.view(x, "x")  # torch bfloat16 becomes float32 here, as on the CPU path
    if a.dtype != np.float32:
        raise TypeError(f"x must be float32, got {a.dtype}")
    if len(a.shape) != 2:
        raise ValueError(f"x must be 2-D (batch, in_features), got shape {a.shape}")
    if a.shape[1] != in_features:
        raise ValueError(f"x has {a.shape[1]} features, the layer expects {in_features}")
    return a


def _cached(cache: dict, key, make):
    """cache[key], made once under a lock (other threads wait for the first upload)."""
    value = cache.get(key)
    if value is None:
        with _upload_lock:
            value = cache.get(key)
            if value is None:
                value = make()
                cache[key] = value
    return value


def layer_weights(lin, device: int):
    """``lin``'s weights on ``device`` (an _C_cuda.Int8LinearWeights), uploaded on first use."""
    return _cached(lin._cuda_weights, device, lambda: _cuda.module().Int8LinearWeights(
        device, lin.weight_int8, lin.weight_scale, lin.bias))


def _plan(obj, key, device: int, layers, codes, framework: str | None = None):
    """The C++ plan for ``layers`` on ``device``, cached on ``obj`` under ``key``. Making it uploads
    the weights (an allocation and a host copy): refused inside a CUDA graph capture on
    ``framework``'s current stream, where it would invalidate the capture."""
    if framework is not None and obj._cuda_plans.get(key) is None and _cuda.capturing(framework, device):
        raise ValueError("the first call on a device uploads the weights, which a CUDA graph capture cannot "
                         "record: call it once before capturing")
    return _cached(obj._cuda_plans, key, lambda: _cuda.module().Int8LinearPlan(
        [layer_weights(lin, device) for lin in layers], list(codes)))


def _run(plan, a: _cuda.DeviceArray, out_features: int, check_finite: bool):
    rows = a.shape[0]
    y = _cuda.empty(a, (rows, out_features), np.float32)
    if rows:
        scratch = _cuda.empty(a, (plan.scratch_bytes(rows),), np.uint8)
        plan.forward(a.ptr, rows, y.ptr, scratch.ptr, scratch.size, _cuda.stream(a), bool(check_finite))
    return y.obj


def int8_linear(x, lin, activation=None, *, check_finite: bool = True):
    """``activation(x @ W.T + b)`` for a device array x (float32 (B, K)); see the module doc."""
    from .linear import _activation_code

    code = _activation_code(activation)
    a = _input(x, lin.in_features)
    plan = _plan(lin, (a.device, code), a.device, [lin], [code], a.framework)
    return _run(plan, a, lin.out_features, check_finite)


def int8_mlp(x, mlp, *, check_finite: bool = True):
    """The MLP's layers on a device array x (float32 (B, in_features)), back to back on the stream."""
    a = _input(x, mlp.in_features)
    plan = _plan(mlp, a.device, a.device, mlp.layers, mlp._codes, a.framework)
    return _run(plan, a, mlp.out_features, check_finite)


# ---- test hooks ------------------------------------------------------------------------------

def int8_linear_int32(q, lin):
    """Exact int32 sums ``q @ W.T`` for int8 activations q (B, K) on the device (test hook)."""
    a = _cuda.view(q, "q")
    if a.dtype != np.int8 or len(a.shape) != 2 or a.shape[1] != lin.in_features:
        raise ValueError(f"q must be int8 (B, {lin.in_features}), got {a.dtype} {a.shape}")
    w = layer_weights(lin, a.device)
    rows = a.shape[0]
    padded = _pad_columns(a, w.padded_in_features)
    y = _cuda.empty(a, (rows, lin.out_features), np.int32)
    _cuda.module().int8_gemm_int32(w, padded.ptr, rows, y.ptr, _cuda.stream(a))
    return y.obj


def quantize_rows(x):
    """The CUDA quantization pass alone: (q (B, K) int8, scale (B,) float32) (test hook)."""
    a = _cuda.view(x, "x")
    if a.dtype != np.float32 or len(a.shape) != 2 or a.shape[1] < 1:
        raise ValueError(f"x must be float32 (B, K >= 1), got {a.dtype} {a.shape}")
    rows, K = a.shape
    Kp = (K + 63) // 64 * 64
    q = _cuda.empty(a, (rows, Kp), np.int8)
    scale = _cuda.empty(a, (rows,), np.float32)
    _cuda.module().quantize_rows_int8(a.device, a.ptr, rows, K, Kp, q.ptr, scale.ptr, _cuda.stream(a))
    return q.obj[:, :K], scale.obj


def _pad_columns(a: _cuda.DeviceArray, width: int) -> _cuda.DeviceArray:
    """A zero-padded copy of a 2-D device array, ``width`` columns wide, in a's framework."""
    rows, cols = a.shape
    if a.framework == "torch":
        import torch

        out = torch.zeros((rows, width), dtype=a.obj.dtype, device=a.obj.device)
    else:
        import cupy

        with cupy.cuda.Device(a.device):
            out = cupy.zeros((rows, width), dtype=a.dtype)
            out[:, :cols] = a.obj
            return _cuda.view(out)
    out[:, :cols] = a.obj
    return _cuda.view(out)
