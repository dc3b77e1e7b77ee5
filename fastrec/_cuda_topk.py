"""CUDA path of ItemIndex.search and ops.topk: device queries in (torch CUDA tensors, CuPy arrays,
zero-copy), ``(scores, ids)`` of the caller's framework out, on the same device, computed on the
caller's current stream.

How to use it: nothing changes in the API. ``ItemIndex.search(queries, k)`` with device queries
searches a device copy of the index; the first such search on a device (and the first after an
``add`` / ``remove``) uploads the current catalogue snapshot there, in the queries' framework,
and later searches reuse it (the copy lives as long as the snapshot). ``upload(index, like)``
does that upload ahead of time, on ``like``'s device and framework.
``_cuda_topk.topk(queries, items, k)`` is the functional form for device items (exact fp32).

Algorithm (csrc/cuda/topk.h): the Q x N score matrix is never written. Items live on the device
in ascending-id order (so ties by id are ties by row, and a candidate is one 64-bit key). Per
query chunk, the first items are scored and kept, an exact radix select gives each query a
threshold (the keep-th best score so far: a lower bound of the final keep-th best), then
geometrically growing ranges of the catalogue are scored in one fused pass each (int8 IMMA /
fp16 HMMA tensor cores, fp32 FMA) keeping only scores >= the threshold, and the threshold is
raised after each range. The last selection reranks the kept candidates in float64 over the
float32 rows (int8 / fp16 with ``rerank=True``; fp32 always rescored when reranking), sorts them
and writes the k best. Exclusions are dropped before every selection.

A candidate buffer that overflows (a catalogue ordered so that the first items are poor) is
detected per query and those queries are re-run with a 4x larger buffer, until none overflows:
results are never dropped. The call waits for the stream once (to read those flags and the
NaN / Inf check of the queries), like ``Int8Linear`` with ``check_finite=True``.

Limits: k (after min(keep, len(index))) up to ``_C_cuda.topk_max_keep()`` kept candidates
(16384: k up to 10,900 for int8 with rerank, 16384 for fp32 without); D up to 3200 (int8),
1600 (fp16), 3200 (fp32). Those are H100 / H200 figures: the scoring and selection kernels
need shared memory in proportion to D and to the kept candidates, and a GPU with less a block
(an A100 163 KiB, sm_86 / sm_89 99 KiB) takes proportionally less; beyond, a ValueError says
how much was needed. fp16 queries are scaled per row by a power of two before the fp16
conversion the tensor cores need (undone on the scores), so queries of any magnitude work;
components below ~2^-39 of their row's largest still round to zero there. That conversion also
rounds each query component to fp16's 11 bits (the CPU scores float32 queries against the fp16
items): with ``rerank=False`` an fp16 index's scores differ from the CPU's by ~1e-3 relative, so
near-ties may come out in another order; with ``rerank=True`` the scores returned are
recomputed from the float32 rows (only the choice of kept candidates saw the rounding). Queries whose
float32 scores could overflow (D * max|q| * max|x| >= 2**126) are searched exactly in float64
on the host, as on the CPU (one reduction and a copy of Q floats per call tell which).
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import numpy as np

from . import _C, _cuda
from .kernels import renew_after_fork

__all__ = ["search", "topk", "upload"]

_PREC = {"int8": 0, "fp16": 1, "fp32": 2}
_lock = threading.RLock()
renew_after_fork(globals(), "_lock", threading.RLock)
_cache: dict = {}  # (id(snapshot), device, framework) -> _DeviceIndex


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class _DeviceIndex:
    """One snapshot of a catalogue on one device: framework arrays and the C++ view of them."""

    def __init__(self, arrays, view, n: int, dim: int, precision: str, rerank: bool):
        self.arrays = arrays  # keeps the device memory alive
        self.view = view
        self.n = n
        self.dim = dim
        self.precision = precision
        self.rerank = rerank


def _build(like: _cuda.DeviceArray, rows: np.ndarray, ids: np.ndarray, precision: str, rerank: bool) -> _DeviceIndex:
    """Lays out float32 rows (n, D) (ascending ids) on like's device, in like's framework."""
    n, D = rows.shape
    np_ = _round_up(max(n, 1), 512)
    up = lambda a: _cuda.from_host(like, a)  # noqa: E731
    arrays = {"ids": up(np.ascontiguousarray(ids, dtype=np.int64) if n else np.zeros(1, np.int64))}
    scales = rows_arr = None
    stride_item = stride_d = 0
    if precision == "fp32":
        D4 = _round_up(D, 4)
        xt = np.zeros((D4, np_), np.float32)
        xt[:D, :n] = rows.T
        arrays["codes"] = codes = up(xt)
        row_bytes = 0
        rows_arr, stride_item, stride_d = codes, 1, np_
    else:
        if precision == "int8":
            row_bytes = _round_up(D, 64)
            # The CPU's per-item symmetric rounding (csrc/cpu/topk.cpp), by the CPU's own quantizer.
            c = np.zeros((np_, row_bytes), np.int8)
            s = np.zeros(np_, np.float32)
            if n:
                c[:n, :D], s[:n] = _C.quantize_rows_int8(np.ascontiguousarray(rows, dtype=np.float32))
            arrays["scales"] = scales = up(s)
        else:
            row_bytes = _round_up(D, 32) * 2
            c = np.zeros((np_, row_bytes // 2), np.float16)
            c[:n, :D] = rows.astype(np.float16)
        arrays["codes"] = codes = up(c)
        if rerank:
            arrays["rows"] = rows_arr = up(np.ascontiguousarray(rows) if n else np.zeros((1, D), np.float32))
            stride_item, stride_d = D, 1
    view = _cuda.module().TopkIndexView(
        _PREC[precision], n, np_, D, row_bytes, codes.ptr, 0 if scales is None else scales.ptr,
        0 if rows_arr is None else rows_arr.ptr, stride_item, stride_d, arrays["ids"].ptr)
    _sync(like)  # uploads from pageable memory may still be in flight on this stream
    return _DeviceIndex(arrays, view, n, D, precision, rerank)


def _sync(a: _cuda.DeviceArray) -> None:
    if a.framework == "torch":
        import torch

        torch.cuda.current_stream(a.device).synchronize()
    else:
        import cupy

        with cupy.cuda.Device(a.device):
            cupy.cuda.get_current_stream().synchronize()


def _snapshot_rows(snap) -> np.ndarray:
    """The live float32 rows of a snapshot, in ascending-id order (snap.sorted_ids)."""
    from .index import _float_rows  # (index imports this module lazily, on a device search)

    n = snap.live
    dim = snap.segments[0].block.dim if snap.segments else 0
    rows = np.empty((n, dim), np.float32)
    for s, seg in enumerate(snap.segments):
        sel = snap.where[:, 0] == s
        if sel.any():
            rows[sel] = _float_rows(seg)[snap.where[sel, 1]]
    return rows


def _device_index(index, snap, like: _cuda.DeviceArray) -> _DeviceIndex:
    key = (id(snap), like.device, like.framework)
    dev = _cache.get(key)
    if dev is None:
        with _lock:
            dev = _cache.get(key)
            if dev is None:
                rows = _snapshot_rows(snap) if snap.live else np.zeros((0, index.dim), np.float32)
                dev = _build(like, rows, snap.sorted_ids, index.precision, index.rerank)
                _cache[key] = dev
                weakref.finalize(snap, _cache.pop, key, None)
    return dev


def upload(index, like) -> None:
    """Uploads ``index``'s current snapshot to the device (and framework) of array ``like``."""
    _device_index(index, index._snap, _cuda.view(like, "like"))


def _host(x):
    """Exclude id arrays may be device arrays: bring them to the host."""
    if x is None:
        return None
    if _cuda.is_device_array(x):
        return _to_host(_cuda.view(x, "exclude"))
    return x


def _to_host(a: _cuda.DeviceArray) -> np.ndarray:
    return a.obj.cpu().numpy() if a.framework == "torch" else a.obj.get()


def _exclude_host(exclude, Q: int):
    """``exclude`` as host int64 CSR ``(ids, offsets)``, or (None, None), as the CPU path reads it."""
    from .index import exclude_csr

    if exclude is None:
        return None, None
    if isinstance(exclude, (tuple, list)):  # (ids, offsets), or one id array per query: each may be on the device
        exclude = (tuple if isinstance(exclude, tuple) else list)(_host(e) for e in exclude)  # (namedtuples too)
    else:  # one array (a 2-D one holds a list per row; a flat one is refused): whole, as the CPU path reads it
        exclude = _host(exclude)
    return exclude_csr(exclude, Q)


def _exclude(exclude, Q: int, like: _cuda.DeviceArray):
    """Device CSR (ids sorted within each query, offsets) or (None, None)."""
    ids, off = _exclude_host(exclude, Q)
    if ids is None or ids.shape[0] == 0:
        return None, None, None
    if Q == 1:
        ids = np.sort(ids)
    else:
        seg = np.repeat(np.arange(Q, dtype=np.int64), np.diff(off))
        ids = ids[np.lexsort((ids, seg))]
    n = ids.shape[0]
    both = _cuda.from_host(like, np.concatenate([ids, off]).astype(np.int64, copy=False)).obj  # (one copy)
    return _cuda.view(both[:n]), _cuda.view(both[n:]), (ids, off)


def _queries(queries, dim: int):
    a = _cuda.view(queries, "queries")
    single = len(a.shape) == 1
    if single:
        a = _cuda.view(a.obj.reshape(1, -1), "queries")
    if a.dtype != np.float32:
        raise TypeError(f"queries must be float32, got {a.dtype}")
    if len(a.shape) != 2:
        raise ValueError(f"queries must be 2-D, got shape {a.shape}")
    if a.shape[1] != dim:
        raise ValueError(f"queries have dimension {a.shape[1]}, the index has {dim}")
    return a, single


def _run(dev: _DeviceIndex, a: _cuda.DeviceArray, k: int, keep: int, ex, growth: int):
    """One search of all rows of a; returns (scores, ids, overflowed query indices)."""
    mod = _cuda.module()
    Q = a.shape[0]
    scores = _cuda.empty(a, (Q, k), np.float32)
    ids = _cuda.empty(a, (Q, k), np.int64)
    if Q == 0:
        return scores, ids, []
    keep = max(keep, k)
    cap = mod.topk_cap(keep, dev.n, growth)
    nbytes = mod.topk_scratch_bytes(dev.view, Q, cap)
    scratch = _cuda.empty(a, (nbytes,), np.uint8)
    ex_ids, ex_off = (0, 0) if ex[0] is None else (ex[0].ptr, ex[1].ptr)
    bad, over = mod.topk_search(a.device, dev.view, a.ptr, Q, k, keep, cap, dev.rerank, ex_ids, ex_off,
                                scores.ptr, ids.ptr, scratch.ptr, scratch.size, _cuda.stream(a))
    if bad >= 0:
        raise ValueError(f"queries contain NaN or Inf (row {bad})")
    return scores, ids, over


def _search_dev(dev: _DeviceIndex, a: _cuda.DeviceArray, k: int, keep: int, exclude, skip=None):
    """``(scores, ids, skipped)``: the device search of every row of a; the rows ``skip()`` gives
    (host indices or None; ``skip`` is called once the first search has waited for the stream:
    see :func:`_overflow_check`) are not re-run when their candidate buffers overflow (the
    caller redoes them on the host: a row whose float32 scores overflow to -inf passes every
    threshold and would overflow again at any size short of the whole catalogue)."""
    from .index import _check_k

    k = _check_k(k)
    Q = a.shape[0]
    d_ids, d_off, host_ex = _exclude(exclude, Q, a)
    if dev.n and min(keep, dev.n) > _cuda.module().topk_max_keep():
        raise ValueError(f"k = {k} is too large for the CUDA top-k (at most {_cuda.module().topk_max_keep()} "
                         "candidates per query); search with host queries instead")
    scores, ids, over = _run(dev, a, k, keep, (d_ids, d_off), 1)
    skip = None if skip is None else skip()
    if skip is not None and over:
        over = sorted(set(over).difference(skip.tolist()))
    growth = 1
    while over:  # candidate buffers overflowed: re-run those queries with 4x the room
        growth *= 4
        sel = np.asarray(over, dtype=np.int64)
        with _device_of(a):  # (CuPy's gather runs on the current device)
            sub = _cuda.view(a.obj[_cuda.from_host(a, sel).obj], "queries")
        sub_ex = (None, None)
        if host_ex is not None:
            ids_h, off_h = host_ex
            parts = [ids_h[off_h[q]:off_h[q + 1]] for q in sel]
            s_off = np.zeros(len(sel) + 1, np.int64)
            s_off[1:] = np.cumsum([p.shape[0] for p in parts])
            s_ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            if s_ids.shape[0]:
                sub_ex = (_cuda.from_host(a, s_ids), _cuda.from_host(a, s_off))
        s_scores, s_ids_out, s_over = _run(dev, sub, k, keep, sub_ex, growth)
        idx = _cuda.from_host(a, sel).obj
        with _device_of(a):  # (CuPy's scatter runs on the current device)
            scores.obj[idx] = s_scores.obj
            ids.obj[idx] = s_ids_out.obj
        over = [int(sel[i]) for i in s_over]
    return scores.obj, ids.obj, skip


def _overflow_check(a: _cuda.DeviceArray, item_amax: float):
    """A function giving the host indices of the rows of the device queries ``a`` whose float32
    scoring could overflow (the CPU's rule, ``index._checked_queries``: D * max|q| * max|x| >=
    2**126), or None. The reduction is queued now; the function copies its Q floats back, so
    called after the search has waited for the stream, it adds no wait of its own. (NaN rows
    compare False: the device search refuses them.)"""
    from .index import _SAFE_BOUND

    if a.shape[0] == 0 or item_amax == 0.0:
        return lambda: None
    with _device_of(a):
        row_max = a.obj.abs().amax(dim=1) if a.framework == "torch" else abs(a.obj).max(axis=1)

    def rows():
        host = row_max.cpu().numpy() if a.framework == "torch" else row_max.get()
        found = np.flatnonzero(host.astype(np.float64) * (item_amax * a.shape[1]) >= _SAFE_BOUND)
        return found if found.size else None

    return rows


def _put_rows(a: _cuda.DeviceArray, scores, ids, rows: np.ndarray, s: np.ndarray, i: np.ndarray) -> None:
    """scores[rows], ids[rows] = s, i (host results into the device arrays)."""
    sel = _cuda.from_host(a, rows).obj
    with _device_of(a):
        scores[sel] = _cuda.from_host(a, s).obj
        ids[sel] = _cuda.from_host(a, i).obj


def _device_of(a: _cuda.DeviceArray):
    """CuPy runs a kernel only on the current device: make it a's (torch needs nothing)."""
    if a.framework == "torch":
        return contextlib.nullcontext()
    import cupy

    return cupy.cuda.Device(a.device)


def search(index, snap, queries, k, exclude):
    """ItemIndex.search for device queries (the hook in fastrec/index.py calls this)."""
    from .index import _candidates, _check_k, _exact_search

    _cuda.refuse_capture_for(queries, "ItemIndex.search")
    a, single = _queries(queries, index.dim)
    k = _check_k(k)
    dev = _device_index(index, snap, a)
    keep = _candidates(k, index.precision, index.rerank)
    # the rows searched again on the host below: queued first, read after the search's wait
    scores, ids, rows = _search_dev(dev, a, k, keep, exclude, _overflow_check(a, snap.amax))  # (refuses NaN / Inf)
    if rows is not None:  # as on the CPU: searched exactly in float64 on the host (rare, slower)
        ex_ids, ex_off = _exclude_host(exclude, a.shape[0])
        s, i = _exact_search(snap, _to_host(a), rows, k, ex_ids, ex_off)
        _put_rows(a, scores, ids, rows, s, i)
    if single:
        return scores[0], ids[0]
    return scores, ids


def topk(queries, items, k: int, *, exclude=None):
    """ops.topk for device arrays: exact fp32 top-k of queries (Q, D) against items (N, D)."""
    from .index import _candidates

    _cuda.refuse_capture_for(queries, "topk")
    _cuda.refuse_capture_for(items, "topk")
    x = _cuda.view(items, "items")
    if x.dtype != np.float32:
        raise TypeError(f"items must be float32, got {x.dtype}")
    if len(x.shape) != 2:
        raise ValueError(f"items must be 2-D, got shape {x.shape}")
    if x.shape[1] < 1:
        raise ValueError("items must have at least one column")
    a, single = _queries(queries, x.shape[1])
    if a.device != x.device:
        raise ValueError(f"queries are on device {a.device}, items on device {x.device}")
    n, D = x.shape
    # Device-side layout (no host round trip): transposed, padded fp32 rows; ids 0..n-1.
    np_ = _round_up(max(n, 1), 512)
    D4 = _round_up(D, 4)
    amax = 0.0
    if n:  # one pass: max |x| is NaN / inf exactly when an item is, and decides the float64 rows
        with _device_of(x):
            amax = float(abs(x.obj).max())
        if not np.isfinite(amax):
            raise ValueError("items contain NaN or Inf")
    if x.framework == "torch":
        import torch

        xt = torch.zeros((D4, np_), dtype=torch.float32, device=x.obj.device)
        xt[:D, :n] = x.obj.T
        ids = torch.arange(max(n, 1), dtype=torch.int64, device=x.obj.device)
    else:
        import cupy

        with cupy.cuda.Device(x.device):
            xt = cupy.zeros((D4, np_), dtype=cupy.float32)
            xt[:D, :n] = x.obj.T
            ids = cupy.arange(max(n, 1), dtype=cupy.int64)
    xt_v, ids_v = _cuda.view(xt), _cuda.view(ids)
    view = _cuda.module().TopkIndexView(_PREC["fp32"], n, np_, D, 0, xt_v.ptr, 0, xt_v.ptr, 1, np_, ids_v.ptr)
    dev = _DeviceIndex({"codes": xt_v, "ids": ids_v}, view, n, D, "fp32", True)
    from .index import _check_k

    k = _check_k(k)
    check = _overflow_check(a, amax) if n else None  # (these rows are searched again on the host below)
    scores, out, rows = _search_dev(dev, a, k, _candidates(k, "fp32", True), exclude, check)
    if n:
        if rows is not None:  # as ops.topk on the CPU: these queries exactly in float64, on the host
            from .index import ItemIndex

            ex_ids, ex_off = _exclude_host(exclude, a.shape[0])
            sub_ex = None if ex_ids is None else [ex_ids[ex_off[r]:ex_off[r + 1]] for r in rows]
            s, i = ItemIndex(_to_host(x), precision="fp32", _trim=False).search(_to_host(a)[rows], k, exclude=sub_ex)
            _put_rows(a, scores, out, rows, s, i)
    if single:
        return scores[0], out[0]
    return scores, out
