"""Feature hashing: raw integer ids and strings to embedding rows, identical on every backend.

The hash (stable: a model exported today must hash the same ids to the same rows forever;
changing anything below is a format change)::

    GOLDEN = 0x9E3779B97F4A7C15
    mix64(z):                           # splitmix64's finaliser ("Mix13"), all arithmetic mod 2**64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

    key(salt)      = mix64((salt mod 2**64) + GOLDEN)      # once per feature
    hash64(x, salt) = mix64((x mod 2**64) ^ key(salt))      # x: an integer id
    row            = hash64(x, salt) % num_rows            # unsigned 64-bit modulo

``x mod 2**64`` is the id's two's-complement bit pattern, so ``-1`` (any signed dtype) and
``2**64 - 1`` (uint64) hash alike; ids are compared by value, not by dtype (int32 ``7`` and
int64 ``7`` give the same row).

Strings (and bytes) are first reduced to an integer with 64-bit FNV-1a over their UTF-8 bytes
(``h = 0xCBF29CE484222325; for each byte b: h = (h ^ b) * 0x100000001B3``), then hashed as
that integer: ``row = hash64(fnv1a64(s.encode("utf-8")), salt) % num_rows``. Bytes are hashed
as they are; a str with no UTF-8 encoding (a lone surrogate such as ``"\\ud800"``) is a
ValueError, as a salt or as a value.

``salt`` is an int (any size: taken mod 2**64) or a string, which stands for the integer
``fnv1a64(salt.encode("utf-8"))``, so a feature's name can serve as its salt.

Backends, bit-identical:

* :func:`hash_ids_ref` / :func:`hash_strings_ref`: NumPy (uint64 arithmetic wraps), the reference.
* :func:`hash_ids_numba` / :func:`hash_strings_numba`: Numba CPU kernels
  (``@numba.njit(nogil=True, cache=True)``), compiled on first call; Numba is optional.
* :func:`hash_ids_cupy`: a CuPy ElementwiseKernel (compiled by NVRTC on first call) for
  integer CuPy arrays; torch CUDA tensors go through it zero-copy.

:func:`hash_ids` dispatches on the input: CuPy arrays and torch CUDA tensors to the GPU kernel
(result in the same framework and device, on the current stream), strings to the string path,
and other integer array-likes to Numba (the NumPy reference when Numba is not installed).
Results are int64 arrays of the input's shape, each value in ``[0, num_rows)``.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from . import numba_jit, renew_after_fork

__all__ = [
    "hash_ids", "hash_strings", "hash_ids_ref", "hash_strings_ref", "hash_ids_numba",
    "hash_strings_numba", "hash_ids_cupy", "salt_key", "numba_available",
]

GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1
_MAX_ROWS = (1 << 63) - 1  # rows are returned as int64


# ---- argument checks ---------------------------------------------------------------------------


def _fnv1a64_py(data: bytes, h: int = FNV_OFFSET) -> int:
    """FNV-1a 64 of ``data``, continuing from state ``h``."""
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & _MASK
    return h


def _mix64_py(z: int) -> int:
    z &= _MASK
    z = ((z ^ (z >> 30)) * MIX1) & _MASK
    z = ((z ^ (z >> 27)) * MIX2) & _MASK
    return z ^ (z >> 31)


def _no_utf8(what: str, e: UnicodeEncodeError) -> ValueError:
    return ValueError(f"{what} is a str with no UTF-8 encoding ({e.reason} at index {e.start})")


def _salt_int(salt) -> int:
    if isinstance(salt, bool):
        raise TypeError("salt must be an int or a string, got bool")
    if isinstance(salt, (int, np.integer)):
        return int(salt) & _MASK
    if isinstance(salt, str):
        try:
            return _fnv1a64_py(salt.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise _no_utf8("salt", e) from None
    if isinstance(salt, bytes):
        return _fnv1a64_py(salt)
    raise TypeError(f"salt must be an int or a string, got {type(salt).__name__}")


def salt_key(salt=0) -> int:
    """``key(salt) = mix64(salt + GOLDEN)`` as a Python int in [0, 2**64)."""
    return _mix64_py(_salt_int(salt) + GOLDEN)


def _check_rows(num_rows) -> int:
    if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)):
        raise TypeError(f"num_rows must be an int, got {type(num_rows).__name__}")
    n = int(num_rows)
    if n < 1:
        raise ValueError(f"num_rows must be >= 1, got {n}")
    if n > _MAX_ROWS:
        raise ValueError(f"num_rows must be < 2**63, got {n}")
    return n


def _int_ids(ids) -> np.ndarray:
    """ids as a NumPy integer array (TypeError for anything else)."""
    if not isinstance(ids, np.ndarray):
        if hasattr(ids, "detach") and hasattr(ids, "cpu"):  # a CPU torch tensor
            ids = ids.detach().cpu().numpy()
        else:
            given = ids
            try:
                ids = np.asarray(ids)
            except OverflowError:
                raise TypeError("ids must fit in int64 or uint64") from None
            if ids.size == 0 and ids.dtype == np.float64:  # [] -> float64 by default
                ids = ids.astype(np.int64)
            elif ids.dtype.kind in "fO" and isinstance(given, (list, tuple)) and all(
                    isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in given):
                # Python ints that no one integer dtype holds (e.g. [2**64 - 1, -1]) become a
                # float64 or object array: say so, rather than "got float64".
                raise TypeError("ids hold Python ints that no single integer dtype holds (e.g. >= 2**63 "
                                "together with < 0, or >= 2**64); pass an int64 or uint64 array")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers (any int/uint dtype), got {ids.dtype}")
    return ids


def _as_u64(ids: np.ndarray) -> np.ndarray:
    """The ids' values mod 2**64, as a flat contiguous uint64 array."""
    if ids.dtype.itemsize == 8:  # int64 / uint64: same bits, no copy when contiguous
        if not ids.dtype.isnative:  # byte-swapped: the view would read the swapped bytes
            ids = ids.astype(ids.dtype.newbyteorder("="))
        return np.ascontiguousarray(ids).view(np.uint64).reshape(-1)
    return ids.astype(np.uint64).reshape(-1)  # C casts: sign-extends, then wraps


# ---- NumPy reference -----------------------------------------------------------------------------


def _mix64_np(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    return z ^ (z >> np.uint64(31))


def _rows_np(x: np.ndarray, num_rows: int, key: int) -> np.ndarray:
    h = _mix64_np(x ^ np.uint64(key))
    return (h % np.uint64(num_rows)).astype(np.int64)


def hash_ids_ref(ids, num_rows: int, salt=0) -> np.ndarray:
    """NumPy reference of :func:`hash_ids` for integer ids (int64 result, ids' shape)."""
    num_rows = _check_rows(num_rows)
    key = salt_key(salt)
    ids = _int_ids(ids)
    return _rows_np(_as_u64(ids), num_rows, key).reshape(ids.shape)


def _utf8_buffer(strings):
    """(uint8 bytes of every string back to back, int64 CSR offsets, shape) of a sequence or
    array of str / bytes."""
    if isinstance(strings, np.ndarray):
        shape = strings.shape
        items = strings.reshape(-1).tolist()  # 'U' -> str, 'S' -> bytes, object as is
    else:
        items = list(strings)
        shape = (len(items),)
    encoded = []
    try:
        for i, s in enumerate(items):
            if isinstance(s, str):
                encoded.append(s.encode("utf-8"))
            elif isinstance(s, (bytes, bytearray)):
                encoded.append(bytes(s))
            else:
                raise TypeError(f"strings must be str or bytes, got {type(s).__name__} at position {i}")
    except UnicodeEncodeError as e:
        raise _no_utf8(f"strings[{len(encoded)}]", e) from None
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return buf, offsets, shape


# Below this many strings still being hashed, _fnv_np finishes them one by one in Python: a
# NumPy step per byte costs microseconds whatever the width, so one 1 MB string in a batch took
# ~5 s that way against ~0.1 s in the plain loop.
_FNV_NP_MIN_WIDTH = 16


def _fnv_np(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    n = len(offsets) - 1
    h = np.full(n, FNV_OFFSET, dtype=np.uint64)
    lengths = np.diff(offsets)
    by_length = np.argsort(-lengths, kind="stable")  # longest first
    neg_desc = -lengths[by_length]  # ascending, for searchsorted
    k = 0
    while n and k < -int(neg_desc[0]):  # byte k of every string at least k + 1 bytes long
        live = by_length[:int(np.searchsorted(neg_desc, -k, side="left"))]
        if live.shape[0] < _FNV_NP_MIN_WIDTH:
            for i in live.tolist():
                h[i] = _fnv1a64_py(buf[offsets[i] + k:offsets[i + 1]].tobytes(), int(h[i]))
            break
        h[live] = (h[live] ^ buf[offsets[live] + k].astype(np.uint64)) * np.uint64(FNV_PRIME)
        k += 1
    return h


def hash_strings_ref(strings, num_rows: int, salt=0) -> np.ndarray:
    """NumPy reference of :func:`hash_strings`."""
    num_rows = _check_rows(num_rows)
    key = salt_key(salt)
    buf, offsets, shape = _utf8_buffer(strings)
    return _rows_np(_fnv_np(buf, offsets), num_rows, key).reshape(shape)


# ---- Numba CPU kernels (compiled on first call) --------------------------------------------------


def _hash_u64_loop(x, num_rows, key, out):  # compiled by Numba; plain Python otherwise
    n = np.uint64(num_rows)
    k = np.uint64(key)
    m1 = np.uint64(MIX1)
    m2 = np.uint64(MIX2)
    s30 = np.uint64(30)
    s27 = np.uint64(27)
    s31 = np.uint64(31)
    for i in range(x.shape[0]):
        z = x[i] ^ k
        z = (z ^ (z >> s30)) * m1
        z = (z ^ (z >> s27)) * m2
        z = z ^ (z >> s31)
        out[i] = np.int64(z % n)


def _fnv_loop(buf, offsets, out):  # compiled by Numba; plain Python otherwise
    prime = np.uint64(FNV_PRIME)
    for i in range(offsets.shape[0] - 1):
        h = np.uint64(FNV_OFFSET)
        for p in range(offsets[i], offsets[i + 1]):
            h = (h ^ np.uint64(buf[p])) * prime
        out[i] = h


_numba_lock = threading.Lock()
renew_after_fork(globals(), "_numba_lock")
_numba_kernels: dict = {}
_numba_missing: str | None = None


def _numba(name: str):
    """The Numba kernel ``name`` (compiled on first use), or None when Numba is not installed."""
    global _numba_missing
    fn = _numba_kernels.get(name)
    if fn is not None or _numba_missing is not None:
        return fn
    with _numba_lock:
        if not _numba_kernels and _numba_missing is None:
            try:
                import numba
            except ImportError as e:
                _numba_missing = str(e)
                return None
            built = {"ids": numba_jit(numba, _hash_u64_loop), "fnv": numba_jit(numba, _fnv_loop)}
            _numba_kernels.update(built)  # all at once (a fork in between left a child with some)
    return _numba_kernels.get(name)


def numba_available() -> bool:
    """Whether Numba is installed (the kernels themselves compile on first call)."""
    return _numba("ids") is not None


def _require_numba(name: str):
    fn = _numba(name)
    if fn is None:
        raise ImportError(f"numba is not installed ({_numba_missing}); use hash_ids / hash_ids_ref")
    return fn


def hash_ids_numba(ids, num_rows: int, salt=0) -> np.ndarray:
    """The Numba CPU kernel of :func:`hash_ids` (ImportError without Numba)."""
    num_rows = _check_rows(num_rows)
    key = salt_key(salt)
    ids = _int_ids(ids)
    fn = _require_numba("ids")
    out = np.empty(ids.size, dtype=np.int64)
    fn(_as_u64(ids), np.uint64(num_rows), np.uint64(key), out)
    return out.reshape(ids.shape)


def _fnv_numba(buf, offsets):
    out = np.empty(len(offsets) - 1, dtype=np.uint64)
    _require_numba("fnv")(buf, offsets, out)
    return out


def hash_strings_numba(strings, num_rows: int, salt=0) -> np.ndarray:
    """The Numba CPU kernels of :func:`hash_strings` (ImportError without Numba)."""
    num_rows = _check_rows(num_rows)
    key = salt_key(salt)
    buf, offsets, shape = _utf8_buffer(strings)
    h = _fnv_numba(buf, offsets)
    out = np.empty(h.size, dtype=np.int64)
    _require_numba("ids")(h, np.uint64(num_rows), np.uint64(key), out)
    return out.reshape(shape)


# ---- CuPy kernel (NVRTC, compiled on first call) -------------------------------------------------

_CUPY_BODY = """
unsigned long long z = ((unsigned long long)x) ^ key;
z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
z = z ^ (z >> 31);
y = (long long)(z % num_rows);
"""
_cupy_kernel = None


def _cupy_hash_kernel():
    global _cupy_kernel
    if _cupy_kernel is None:
        import cupy

        # T: any integer dtype; the C++ conversion to unsigned long long is "value mod 2**64",
        # exactly what _as_u64 does on the host.
        _cupy_kernel = cupy.ElementwiseKernel(
            "T x, uint64 key, uint64 num_rows", "int64 y", _CUPY_BODY, "fastrec_hash_ids")
    return _cupy_kernel


def hash_ids_cupy(ids, num_rows: int, salt=0):
    """The CuPy kernel of :func:`hash_ids`: ids an integer CuPy array; returns an int64 CuPy
    array of the same shape on the same device, computed on the current stream."""
    import cupy

    num_rows = _check_rows(num_rows)
    key = salt_key(salt)
    if not isinstance(ids, cupy.ndarray):
        raise TypeError(f"hash_ids_cupy takes a CuPy array, got {type(ids).__name__}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers (any int/uint dtype), got {ids.dtype}")
    with cupy.cuda.Device(ids.device.id):
        out = cupy.empty(ids.shape, dtype=cupy.int64)
        if ids.size:
            _cupy_hash_kernel()(ids, np.uint64(key), np.uint64(num_rows), out)
    return out


def _torch_cuda_hash(ids, num_rows: int, salt):
    """A torch CUDA tensor through the CuPy kernel, zero-copy, on torch's current stream."""
    import cupy
    import torch

    if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"ids must be integers (any int/uint dtype), got {ids.dtype}")
    ids = ids.contiguous()
    dev = ids.device.index
    ptr = torch.cuda.current_stream(dev).cuda_stream
    with cupy.cuda.Device(dev), (cupy.cuda.ExternalStream(ptr) if ptr else cupy.cuda.Stream.null):
        out = hash_ids_cupy(cupy.asarray(ids), num_rows, salt)
        return torch.as_tensor(out, device=ids.device)


# ---- public entry points -------------------------------------------------------------------------


def _is_strings(x) -> bool:
    if isinstance(x, (str, bytes)):
        raise TypeError("pass a sequence of strings (e.g. [s]), not a single string")
    text = (str, bytes, bytearray)  # a bytearray element was taken as a row of integer ids
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "US":
            return True
        return x.dtype == object and x.size > 0 and isinstance(x.reshape(-1)[0], text)
    if isinstance(x, (list, tuple)) and x:
        return isinstance(x[0], text)
    return False


def _device_framework(x) -> str | None:
    mod = type(x).__module__
    if mod.startswith("cupy") and "cupy" in sys.modules:
        import cupy

        if isinstance(x, cupy.ndarray):
            return "cupy"
    if mod.startswith("torch") and "torch" in sys.modules:
        import torch

        if isinstance(x, torch.Tensor) and x.is_cuda:
            return "torch"
    return None


def hash_strings(strings, num_rows: int, salt=0) -> np.ndarray:
    """Rows for a sequence (or array) of str / bytes: ``hash64(fnv1a64(utf8), salt) % num_rows``.

    Numba kernels when Numba is installed, else the NumPy reference (bit-identical).
    Returns int64 of the input's shape. TypeError for items that are not str or bytes,
    ValueError for a str with no UTF-8 encoding (a lone surrogate) or such a salt.
    """
    if _numba("ids") is None:
        return hash_strings_ref(strings, num_rows, salt)
    return hash_strings_numba(strings, num_rows, salt)


def hash_ids(ids, num_rows: int, salt=0):
    """Hash raw ids to rows in ``[0, num_rows)`` (see the module docstring for the definition).

    Args:
        ids: integer ids (any int/uint dtype, any shape): a NumPy array or array-like, a torch
            tensor, or a CuPy array; or strings (a list / array of str or bytes).
        num_rows: the table's row count, an int >= 1.
        salt: per-feature salt, an int or a string (e.g. the feature's name).

    Returns:
        int64 rows of the ids' shape: a NumPy array for host input, a CuPy array / torch CUDA
        tensor on the same device for GPU input.

    Raises:
        TypeError: ids that are not integers (floats, bools) or strings; a non-int num_rows or
        a salt that is neither an int nor a string. ValueError: num_rows < 1 or >= 2**63, or
        a string (id or salt) with no UTF-8 encoding (a lone surrogate).
    """
    fw = _device_framework(ids)
    if fw == "cupy":
        return hash_ids_cupy(ids, num_rows, salt)
    if fw == "torch":
        return _torch_cuda_hash(ids, num_rows, salt)
    if _is_strings(ids):
        return hash_strings(ids, num_rows, salt)
    if _numba("ids") is None:
        return hash_ids_ref(ids, num_rows, salt)
    return hash_ids_numba(ids, num_rows, salt)
