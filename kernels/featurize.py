"""The featurizer's hot loops: dense transforms, exact vocabulary lookup and bucketizing.

Each kernel has a Numba CPU version (``@numba.njit(nogil=True, cache=True)``, compiled on first
call, GIL released while it runs) and a vectorised NumPy version that gives bit-identical
results; :func:`fastrec.featurizer.Featurizer` picks Numba when it is installed. Hashing of raw
ids and strings is :mod:`fastrec.kernels.hashing`.

Definitions (every backend)::

    dense_transform: v = x if isfinite(x) else fill[j]            (float64)
                     op IDENTITY:    y = v
                     op LOG1P:       y = log1p(v if v >= 0 else 0)
                     op STANDARDIZE: y = (v - mean[j]) / std[j]
                     out = float32(y), or float32(y of fill[j]) where float32(y) is +-inf
                     (a finite float64 beyond float32's range counts as missing too)
    lookup:          row of the id in a sorted key array (exact int64 match), else oov
    bucketize:       number of boundaries <= x (binary search, boundaries strictly increasing);
                     missing_row when x is not finite
"""

from __future__ import annotations

import threading

import numpy as np

from . import hashing as _hashing
from . import numba_jit, renew_after_fork

__all__ = [
    "OP_IDENTITY", "OP_LOG1P", "OP_STANDARDIZE", "BACKENDS", "numba_available",
    "dense_transform", "lookup", "bucketize", "hash_rows",
]

OP_IDENTITY = 0
OP_LOG1P = 1
OP_STANDARDIZE = 2
BACKENDS = ("auto", "numba", "numpy")


# ---- loops compiled by Numba (plain Python otherwise; never run uncompiled on real data) ---------


def _dense_loop(x, ops, fill, mean, std, out):
    for b in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[b, j]
            if not np.isfinite(v):
                v = fill[j]
            op = ops[j]
            if op == 1:
                if not v >= 0.0:
                    v = 0.0
                v = np.log1p(v)
            elif op == 2:
                v = (v - mean[j]) / std[j]
            out[b, j] = np.float32(v)


def _lookup_loop(ids, keys, rows, oov, out):
    n = keys.shape[0]
    for i in range(ids.shape[0]):
        x = ids[i]
        lo = 0
        hi = n
        while lo < hi:
            mid = (lo + hi) >> 1
            if keys[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        if lo < n and keys[lo] == x:
            out[i] = rows[lo]
        else:
            out[i] = oov


def _bucketize_loop(x, boundaries, missing_row, out):
    n = boundaries.shape[0]
    for i in range(x.shape[0]):
        v = x[i]
        if not np.isfinite(v):
            out[i] = missing_row
            continue
        lo = 0
        hi = n
        while lo < hi:  # first boundary > v
            mid = (lo + hi) >> 1
            if boundaries[mid] <= v:
                lo = mid + 1
            else:
                hi = mid
        out[i] = lo


_lock = threading.Lock()
renew_after_fork(globals(), "_lock")
_kernels: dict = {}
_missing: str | None = None


def _numba(name: str):
    """The Numba kernel ``name`` (compiled on first use), or None without Numba."""
    global _missing
    fn = _kernels.get(name)
    if fn is not None or _missing is not None:
        return fn
    with _lock:
        if not _kernels and _missing is None:
            try:
                import numba
            except ImportError as e:
                _missing = str(e)
                return None
            built = {"dense": numba_jit(numba, _dense_loop), "lookup": numba_jit(numba, _lookup_loop),
                     "bucketize": numba_jit(numba, _bucketize_loop)}
            _kernels.update(built)  # all at once (a fork in between left a child with some)
    return _kernels.get(name)


def numba_available() -> bool:
    """Whether Numba is installed (the kernels compile on first call)."""
    return _numba("dense") is not None


def use_numba(backend: str) -> bool:
    """Whether ``backend`` ("auto" | "numba" | "numpy") runs the Numba kernels."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "numpy":
        return False
    if _numba("dense") is None:
        if backend == "numba":
            raise ImportError(f"numba is not installed ({_missing}); use backend='numpy'")
        return False
    return True


# ---- entry points ------------------------------------------------------------------------------


def dense_transform(x, ops, fill, mean, std, *, backend: str = "auto") -> np.ndarray:
    """float32 (B, n) from float64 x (B, n) and per-column ops / fill / mean / std (n,)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    ops = np.ascontiguousarray(ops, dtype=np.int64)
    fill = np.ascontiguousarray(fill, dtype=np.float64)
    mean = np.ascontiguousarray(mean, dtype=np.float64)
    std = np.ascontiguousarray(std, dtype=np.float64)
    out = np.empty(x.shape, dtype=np.float32)
    with np.errstate(over="ignore"):  # past float32's range: handled below
        if use_numba(backend):
            _numba("dense")(x, ops, fill, mean, std, out)
        else:
            _dense_numpy(x, ops, fill, mean, std, out)
    if out.size and not np.isfinite(out).all():
        # 1e300 is finite in float64 but inf in float32: such a value counts as missing, as
        # NaN does, rather than making the model refuse the whole batch
        fill_out = np.empty((1, x.shape[1]), dtype=np.float32)
        with np.errstate(over="ignore"):
            _dense_numpy(fill[None, :], ops, fill, mean, std, fill_out)
        out = np.where(np.isfinite(out), out, fill_out)
    return out


def _dense_numpy(x, ops, fill, mean, std, out) -> None:
    for j in range(x.shape[1]):
        v = x[:, j]
        v = np.where(np.isfinite(v), v, fill[j])
        if ops[j] == OP_LOG1P:
            v = np.log1p(np.where(v >= 0.0, v, 0.0))
        elif ops[j] == OP_STANDARDIZE:
            v = (v - mean[j]) / std[j]
        out[:, j] = v


def lookup(ids, keys, rows, oov: int, *, backend: str = "auto") -> np.ndarray:
    """int64 rows of int64 ``ids`` in the sorted unique int64 ``keys`` (``rows[k]`` for a match,
    ``oov`` otherwise)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    keys = np.ascontiguousarray(keys, dtype=np.int64).reshape(-1)
    rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    if rows.shape[0] != keys.shape[0]:  # (the Numba loop reads rows[k] for a matching key k)
        raise ValueError(f"rows must have one entry per key ({keys.shape[0]}), got {rows.shape[0]}")
    out = np.empty(ids.shape[0], dtype=np.int64)
    if use_numba(backend):
        _numba("lookup")(ids, keys, rows, np.int64(oov), out)
        return out
    n = keys.shape[0]
    if n == 0:
        out[:] = oov
        return out
    pos = np.searchsorted(keys, ids, side="left")
    pos_c = np.minimum(pos, n - 1)
    hit = (pos < n) & (keys[pos_c] == ids)
    out[:] = np.where(hit, rows[pos_c], np.int64(oov))
    return out


def bucketize(x, boundaries, missing_row: int, *, backend: str = "auto") -> np.ndarray:
    """int64 bucket of each float64 value: the number of ``boundaries`` <= x; ``missing_row``
    for NaN / inf."""
    x = np.ascontiguousarray(x, dtype=np.float64).reshape(-1)
    boundaries = np.ascontiguousarray(boundaries, dtype=np.float64)
    out = np.empty(x.shape[0], dtype=np.int64)
    if use_numba(backend):
        _numba("bucketize")(x, boundaries, np.int64(missing_row), out)
        return out
    b = np.searchsorted(boundaries, x, side="right").astype(np.int64)
    out[:] = np.where(np.isfinite(x), b, np.int64(missing_row))
    return out


def hash_rows(ids: np.ndarray, num_rows: int, key: int, *, backend: str = "auto") -> np.ndarray:
    """int64 rows ``hash64(ids) % num_rows`` of a 1-D integer array, with the salt's key
    (:func:`fastrec.kernels.hashing.salt_key`) computed once by the caller: the per-call work of
    :func:`fastrec.kernels.hashing.hash_ids` without its argument checks, for the featurizer's
    already-validated features. Same kernels, same results."""
    u = _hashing._as_u64(ids)
    if use_numba(backend):
        out = np.empty(u.shape[0], dtype=np.int64)
        _hashing._require_numba("ids")(u, np.uint64(num_rows), np.uint64(key), out)
        return out
    return _hashing._rows_np(u, num_rows, key)
