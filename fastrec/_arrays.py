"""Input normalisation shared by the Python layer."""

from __future__ import annotations

import numpy as np


def check_index_dtype(dtype, name: str) -> None:
    """TypeError unless ``dtype`` is int32 or int64 (ids and offsets, host or device)."""
    if dtype != np.int64 and dtype != np.int32:
        raise TypeError(f"{name} must be int32 or int64, got {dtype}")


def as_numpy(x):
    """A numpy array for x: torch tensors (any device) are moved to the CPU without a copy
    when already there, bfloat16 (which numpy lacks) becomes float32; anything else goes
    through ``np.asarray``. ndarray subclasses become plain arrays (``np.matrix`` multiplies as
    matrices, and a masked array's arithmetic broadcast its mask into a misleading shape error);
    a masked array with masked values is a TypeError (which values it stands for is unknown)."""
    if type(x) is np.ndarray:
        return x
    if isinstance(x, np.ndarray):
        if isinstance(x, np.ma.MaskedArray) and np.ma.is_masked(x):
            raise TypeError("masked arrays with masked values are not accepted: fill them first "
                            "(x.filled(value))")
        return np.asarray(x)
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        if getattr(getattr(x, "device", None), "type", None) == "meta":
            raise ValueError("a tensor on the 'meta' device holds no values")
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


_F32 = np.dtype(np.float32)


def float_input(x, name: str = "input") -> np.ndarray:
    """A float input (dense features, queries, activations) as a numpy array in native byte
    order; Python lists and tuples (which have no dtype) become float32. Other dtypes are left
    for the caller to refuse."""
    if type(x) is np.ndarray and x.dtype is _F32:  # the common case, first
        return x
    if isinstance(x, (list, tuple)):
        a = np.asarray(x)
        if a.dtype.kind not in "fiu":  # strings, bools, None (object), complex: refused as arrays are
            raise TypeError(f"expected a list of numbers, got one numpy reads as {a.dtype}")
        with np.errstate(over="ignore"):
            out = a.astype(np.float32)
        if a.dtype.kind == "f" and not np.isfinite(out).all():
            _raise_if_overflowed(a, out, name)
        return out
    return native(as_numpy(x))


def _raise_if_overflowed(src: np.ndarray, out: np.ndarray, name: str) -> None:
    """ValueError naming the first finite value of ``src`` that became inf in its float32 copy
    ``out`` (past float32's range); nothing when there is none."""
    over = np.isinf(out) & np.isfinite(src)
    if over.any():
        raise ValueError(f"{name} holds {float(src[over][0]):g} at {tuple(int(i) for i in np.argwhere(over)[0])}, "
                         "beyond float32's range (+-3.4e38)")


def finite_float32(a: np.ndarray, name: str) -> np.ndarray:
    """A float array (weights, biases, table rows) as C-contiguous float32, checked finite:
    ValueError for NaN / Inf, and for finite values past float32's range (which became inf)."""
    with np.errstate(over="ignore"):
        w = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(w).all():
        _raise_if_overflowed(np.asarray(a), w, name)
        raise ValueError(f"{name} contains NaN or Inf")
    return w


def native(x: np.ndarray) -> np.ndarray:
    """x in native byte order (a copy only when it is not)."""
    return x if x.dtype.isnative else x.astype(x.dtype.type)  # (the canonical native dtype)


def aligned_empty(shape, dtype=np.float32, *, alignment: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``alignment``-byte boundary.

    numpy's large arrays start 16 bytes past a page boundary, so a 256-byte float32 row of an
    embedding table (D=64) spans five cache lines instead of four; a gather from memory then
    moves 25% more bytes than it needs. Build tables with ``aligned_empty`` (or
    :func:`aligned_copy`) to read four: in ``benches/ab_alignment.py`` (same contents, 16 bytes off
    against aligned) fp32 gathers were 1.13-1.21x faster on a 2-core Zen 4 VM, and fp16 D=64 ones
    1.42x; DRAM-bound runs swing more with the machine's load (BENCHMARKS.md).
    """
    dtype = np.dtype(dtype)
    if isinstance(alignment, bool) or not isinstance(alignment, (int, np.integer)):
        raise TypeError(f"alignment must be an int, got {type(alignment).__name__}")
    if alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two >= 1, got {alignment!r}")
    shape = (shape,) if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool) else shape
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"shape must be an int or a sequence of ints, got {type(shape).__name__}")
    shape = tuple(shape)
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape):
        raise TypeError(f"shape must hold ints, got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must not have negative sizes, got {shape}")
    nbytes = dtype.itemsize
    for s in shape:  # Python ints: no int64 wrap-around for absurd shapes
        nbytes *= s
    if nbytes > np.iinfo(np.intp).max - alignment:
        raise MemoryError(f"an array of shape {shape} and dtype {dtype} takes {nbytes} bytes, more than any "
                          "machine can address")
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_copy(a, *, alignment: int = 64) -> np.ndarray:
    """A C-contiguous copy of ``a`` whose data starts on an ``alignment``-byte boundary."""
    a = as_numpy(a)
    out = aligned_empty(a.shape, a.dtype, alignment=alignment)
    out[...] = a
    return out


def cache_line_aligned(a):
    """``a`` itself when it is not a numpy array or already starts on a 64-byte boundary, else
    :func:`aligned_copy` of it (unpickled tables: the gathers rely on aligned rows for speed)."""
    if isinstance(a, np.ndarray) and a.ctypes.data % 64:
        return aligned_copy(a)
    return a
