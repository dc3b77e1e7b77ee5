"""The retrieval index: fused inner-product scoring + top-k over an item catalogue."""

from __future__ import annotations

import math
import mmap
import os
import threading
import warnings
import weakref
from dataclasses import dataclass, replace

import numpy as np

from . import _C, _cuda
from ._arrays import as_numpy, float_input
from .io import MAX_INT8_WIDTH

__all__ = ["ItemIndex"]

_PRECISIONS = {"int8": 0, "fp16": 1, "fp32": 2}
_MAX_SEGMENTS = 16  # more than this after an add: the catalogue is merged into one block


def float_matrix(x, name: str, dim: int | None = None, *, check_finite: bool = True) -> np.ndarray:
    """A C-contiguous float32 2-D array with finite values (TypeError / ValueError otherwise;
    ``check_finite=False`` leaves the NaN / Inf check to the caller, see ``_check_finite``)."""
    x = float_input(x, name)
    if x.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]}, the index has {dim}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column")
    x = np.ascontiguousarray(x)
    if check_finite:
        _check_finite(x, name)
    return x


def _check_finite(x: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(x)  # (one pass: scanning twice found nothing the second time when another
    if bad.any():          # thread rewrote x in between, and indexing the empty hit raised IndexError)
        where = np.argwhere(bad)[0]
        raise ValueError(f"{name} contain NaN or Inf (row {where[0]}, column {where[1]})")


def _id_array(ids, n: int) -> np.ndarray:
    ids = as_numpy(ids)
    if ids.size == 0:
        ids = ids.astype(np.int64)  # [] is float64 to numpy
    if ids.dtype == object and all(isinstance(i, int) and not isinstance(i, bool) for i in ids.reshape(-1)):
        big = [i for i in ids.reshape(-1) if not -2**63 <= i < 2**63]  # (Python ints past int64 make object arrays)
        if big:
            raise ValueError(f"ids must fit in int64, got {big[0]}")
        ids = ids.astype(np.int64)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers, got {ids.dtype}")
    if ids.dtype.kind == "u" and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"ids must fit in int64, got {int(ids.max())}")  # (they wrapped to negative ids)
    ids = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
    if ids.shape[0] != n:
        raise ValueError(f"ids must have one id per item ({n}), got {ids.shape[0]}")
    return ids


def _ids_1d(ids) -> np.ndarray:
    """ids (a list, array or tensor) as a numpy array, ValueError unless 1-D."""
    ids = as_numpy(ids)
    if ids.ndim > 1:
        raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
    return ids


def _item_ids(ids, n: int) -> np.ndarray:
    """The index's own copy of the ids of n new items: 1-D int64, unique, >= 0."""
    if ids is None:
        raise TypeError("ids are required (one unique int64 id per item)")
    # A copy: the index must not share the caller's buffer (a reused buffer changed the ids
    # that searches returned, but not the sorted copy that add / remove look up).
    ids = np.array(_id_array(_ids_1d(ids), n), dtype=np.int64, copy=True)
    _check_item_ids(ids)
    return ids


def _check_item_ids(ids: np.ndarray) -> None:
    """Item ids: unique and >= 0 (search results pad with id -1)."""
    if ids.size and int(ids.min()) < 0:
        raise ValueError(f"item ids must be >= 0 (search results pad with id -1), got {int(ids.min())}")
    _check_unique(ids)


def _abs_max(x: np.ndarray) -> float:
    """max |x| (0 for an empty array), without an |x| temporary the size of x."""
    return max(float(x.max()), -float(x.min())) if x.size else 0.0


_F16_MIN_NORMAL = 2.0 ** -14  # 6.1e-05: below, float16 keeps fewer significant bits (none below 6e-08)


def _check_range(items: np.ndarray, amax: float, precision: str, stacklevel: int = 3) -> None:
    """fp16 stores items as float16: a value beyond +-65504 would become inf, and the scores
    inf - inf = NaN, so the item would silently drop out of every result. An item whose every
    value lies below float16's normal range keeps few significant bits (none below 6e-08): its
    scores are coarse (or 0), and so is its rank; a rerank rescores only the candidates the
    coarse scores picked (recall@10 0.76 on items ~4e-8 in a review's test), so it warns too."""
    if precision != "fp16" or items.size == 0:
        return
    if amax > 65504.0:
        raise ValueError(f"items hold {amax:.6g}, beyond float16's range (+-65504): use precision 'fp32' or 'int8'")
    row_max = np.maximum(items.max(axis=1), -items.min(axis=1))
    tiny = int(np.count_nonzero((row_max > 0) & (row_max < _F16_MIN_NORMAL)))
    if tiny:
        warnings.warn(f"{tiny} item(s) have every value below float16's normal range (|x| < 6.1e-05): stored as "
                      "float16 they keep few significant bits (none below 6e-08), so their first-pass scores and "
                      "ranks are coarse (a rerank rescores only the candidates picked from them); use precision "
                      "'int8' (a scale per item) or 'fp32', or scale the items up",
                      RuntimeWarning, stacklevel=stacklevel)


# Every partial sum of q . x is at most D * max|q| * max|x| in magnitude; below this bound
# (2**126, a quarter of float32's range) no float32 score, partial sum or int8 rescaling overflows.
_SAFE_BOUND = 2.0**126


def _checked_queries(q: np.ndarray, item_amax: float):
    """Checks the queries for NaN / Inf; returns the indices of the queries whose float32
    scoring could overflow (D * max|q| * max|x| >= 2**126), or None when there are none.

    Those queries are searched exactly in float64 instead (:func:`_exact_search`): a product of
    two float32 values can neither overflow nor underflow there. (Scores past ~3.4e38 used to
    come back inf for every item, in no order, and a partial sum that overflowed made an item
    score inf though its true score was small. Scaling such a query down by a power of two
    instead flushed its small components to zero.)

    The common case costs one BLAS dot: sum(q**2) is finite only when every value is, and its
    root bounds max |q|."""
    flat = q.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        sumsq = float(np.dot(flat, flat))
    if math.isfinite(sumsq):
        if math.sqrt(sumsq) * item_amax * q.shape[1] < _SAFE_BOUND:
            return None
    else:
        _check_finite(q, "queries")  # (or a sum of squares past float32's range: q > ~1.8e19)
    if item_amax == 0.0 or _abs_max(q) * item_amax * q.shape[1] < _SAFE_BOUND:
        return None
    bound = np.maximum(q.max(axis=1), -q.min(axis=1)).astype(np.float64) * (item_amax * q.shape[1])
    return np.flatnonzero(bound >= _SAFE_BOUND)


def _exact_search(snap: _Snapshot, q: np.ndarray, rows: np.ndarray, k: int, ex_ids, ex_off,
                  chunk: int | None = None):
    """Top-k for the queries ``q[rows]`` in float64 over every live item (the stored float32
    rows, or the dequantized codes where only those are kept): scores rounded to float32, ids
    ranked by them with ties to the smaller id (as the kernels rank), and where the rounded
    score is +-inf (past float32's range) by the float64 score. Items go through
    in chunks of about 2**22 / R (so each (R, chunk) array stays ~32 MB whatever R is); each
    segment's rows are copied out once."""
    qf = q[rows].astype(np.float64)  # (R, D)
    R = rows.shape[0]
    if chunk is None:
        chunk = int(min(1 << 16, max(256, (1 << 22) // max(R, 1))))
    best_s = np.empty((R, 0), np.float64)
    best_i = np.empty((R, 0), np.int64)
    for seg in snap.segments:
        x = _float_rows(seg)
        for c0 in range(0, x.shape[0], chunk):
            ids = seg.ids[c0:c0 + chunk]
            score = qf @ x[c0:c0 + chunk].astype(np.float64).T  # (R, chunk)
            dead = np.zeros(score.shape, bool)
            if seg.removed is not None:
                dead |= seg.removed[c0:c0 + chunk].astype(bool)[None, :]
            if ex_ids is not None:
                for n, r in enumerate(rows):
                    dead[n] |= np.isin(ids, ex_ids[ex_off[r]:ex_off[r + 1]])
            score[dead] = -np.inf  # (a live item's float64 score is always finite)
            cand_s = np.concatenate([best_s, score], axis=1)
            cand_i = np.concatenate([best_i, np.broadcast_to(ids, score.shape)], axis=1)
            # Best first by the float32 score the caller gets, ties by the smaller id, as the
            # kernels rank; scores past float32's range (+-inf there) by the float64 score.
            with np.errstate(over="ignore"):
                s32 = cand_s.astype(np.float32).astype(np.float64)
            beyond = np.where(np.isinf(s32), cand_s, 0.0)
            order = np.lexsort((cand_i, -beyond, -s32), axis=1)[:, :k]
            best_s = np.take_along_axis(cand_s, order, 1)
            best_i = np.take_along_axis(cand_i, order, 1)
    out_s = np.full((R, k), -np.inf, np.float32)
    out_i = np.full((R, k), -1, np.int64)
    n = best_s.shape[1]
    with np.errstate(over="ignore"):
        out_s[:, :n] = best_s.astype(np.float32)
    out_i[:, :n] = np.where(np.isneginf(best_s), -1, best_i)  # removed / excluded: padding
    return out_s, out_i


def _check_unique(ids: np.ndarray) -> None:
    s = np.sort(ids)
    dup = s[1:][s[1:] == s[:-1]]
    if dup.size:
        raise ValueError(f"ids must be unique; {int(dup[0])} appears more than once")


def _candidates(k: int, precision: str, rerank: bool) -> int:
    """How many first-pass candidates to keep per query."""
    if not rerank:
        return k
    if precision == "fp32":
        return k + 16  # only float32 rounding to undo
    if precision == "fp16":
        return k + k // 8 + 16
    # int8: on 1M random D=64 items, k + 10 already gives recall@100 0.9998 and 1.25 k gives 1.0;
    # 1.5 k leaves a margin for catalogues whose best scores lie closer together.
    return k + k // 2 + 16


@dataclass(frozen=True)
class _Segment:
    block: object            # _C.ItemBlock
    ids: np.ndarray          # int64, one per item
    removed: np.ndarray | None  # uint8 flags, or None when nothing is removed
    amax: float              # max |x| over the segment's float32 rows (removed ones included)
    rows: np.ndarray | None = None  # the caller's read-only float32 rows, borrowed for the rerank
    pin: object = None       # a memoryview holding the borrowed rows' mapping open (see _immutable_owner)


def _float_rows(seg: _Segment) -> np.ndarray:
    """The segment's items as float32 rows: the borrowed ones, the block's kept ones, or the
    dequantized codes."""
    return seg.rows if seg.rows is not None else seg.block.to_float()


def _immutable_owner(a: np.ndarray):
    """A pin on the memory of ``a`` when nobody can change its values, else None. That is: a
    read-only view whose memory, through every numpy base and memoryview, belongs to bytes or
    to an mmap opened read-only (ACCESS_READ, as :func:`fastrec.load` maps a model, or
    ``np.memmap(mode="r")``). The pin (a memoryview of that owner) keeps the mapping from being
    closed while an index reads it (``mmap.close()`` then raises BufferError). A read-only
    array that owns its memory, a read-only memoryview of writable memory, any other buffer:
    None (they may change under the index)."""
    if a.flags.writeable:
        return None
    base = a
    while True:
        if isinstance(base, np.ndarray):
            if base.base is None:
                return None
            base = base.base
        elif isinstance(base, memoryview):
            base = base.obj
        else:
            break
    if isinstance(base, bytes):
        return memoryview(base)
    if isinstance(base, mmap.mmap):
        try:
            pin = memoryview(base)
        except ValueError:  # (closed)
            return None
        return pin if pin.readonly else None
    return None


@dataclass(frozen=True)
class _Snapshot:
    """An immutable view of the catalogue; a search holds one for its whole duration."""

    segments: tuple
    sorted_ids: np.ndarray   # live ids, sorted
    where: np.ndarray        # (segment, row) of each sorted id, shape (n, 2)
    amax: float              # max |x| over all segments

    @property
    def live(self) -> int:
        return int(self.sorted_ids.shape[0])


def _snapshot(segments) -> _Snapshot:
    ids, where = [], []
    for s, seg in enumerate(segments):
        rows = np.arange(seg.ids.shape[0], dtype=np.int64)
        if seg.removed is not None:
            rows = rows[seg.removed == 0]
        ids.append(seg.ids[rows])
        where.append(np.stack([np.full(rows.shape[0], s, dtype=np.int64), rows], axis=1))
    all_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
    all_where = np.concatenate(where) if where else np.empty((0, 2), np.int64)
    order = np.argsort(all_ids, kind="stable")
    amax = max((seg.amax for seg in segments), default=0.0)
    return _Snapshot(tuple(segments), all_ids[order], all_where[order], amax)


def _locate(snap: _Snapshot, ids: np.ndarray):
    """Positions of ``ids`` in ``snap.sorted_ids`` and whether each is there."""
    if snap.live == 0:
        return np.zeros(ids.shape[0], np.int64), np.zeros(ids.shape[0], bool)
    pos = np.minimum(np.searchsorted(snap.sorted_ids, ids), snap.live - 1)
    return pos, snap.sorted_ids[pos] == ids


def exclude_csr(exclude, Q: int):
    """``exclude`` (a list of Q id arrays, or a tuple ``(ids, offsets)`` in CSR) as int64 CSR."""
    if exclude is None:
        return None, None
    if isinstance(exclude, (dict, set, frozenset, str, bytes)):  # a dict's keys would be taken as the id lists
        raise TypeError(f"exclude must be a list of Q id arrays or an (ids, offsets) tuple, got {type(exclude).__name__}")
    if isinstance(exclude, tuple):
        if len(exclude) != 2:
            raise ValueError("exclude as a tuple must be (exclude_ids, exclude_offsets)")
        first = as_numpy(exclude[0])  # (np.size of a torch tensor is its .size method)
        ids = _id_array(first, first.size)
        off = as_numpy(exclude[1])
        if off.dtype.kind not in "iu":
            raise TypeError(f"exclude offsets must be integers, got {off.dtype}")
        off = np.ascontiguousarray(off.reshape(-1), dtype=np.int64)
        if off.shape[0] != Q + 1:
            raise ValueError(f"exclude offsets must have Q + 1 = {Q + 1} entries, got {off.shape[0]}")
        if off[0] != 0 or off[-1] != ids.shape[0] or np.any(np.diff(off) < 0):
            raise ValueError("exclude offsets must start at 0, be non-decreasing and end at len(exclude_ids)")
        return ids, off
    if hasattr(exclude, "__len__"):  # a list (or array) of Q id arrays
        if not isinstance(exclude, (list, tuple, np.ndarray)):
            exclude = as_numpy(exclude)  # a torch tensor (its items would be 0-d tensors)
        if isinstance(exclude, np.ndarray) and exclude.dtype != object:
            flat = exclude.ndim < 2  # (a 2-D array: one row of ids per query)
        else:  # a list of ids, not of id lists, has a number first (one check, not one per query)
            first = None
            for e in exclude:
                if e is not None:
                    first = e
                    break
            flat = isinstance(first, (int, float, np.generic)) or (isinstance(first, np.ndarray) and first.ndim == 0)
        if flat:
            # A flat list of ids of length Q was read as one id per query: already-seen items
            # of every other query came back.
            raise TypeError("exclude must hold one id array per query (a list of Q arrays) or be an "
                            "(ids, offsets) tuple, got a flat sequence of ids (for one query: [ids])")
        if len(exclude) != Q:
            raise ValueError(f"exclude must have one id list per query ({Q}), got {len(exclude)}")
        parts = [np.empty(0, np.int64) if e is None else _id_array(a := as_numpy(e), a.size)  # (torch too)
                 for e in exclude]
        off = np.zeros(Q + 1, dtype=np.int64)
        off[1:] = np.cumsum([p.shape[0] for p in parts])
        ids = np.concatenate(parts) if parts else np.empty(0, np.int64)
        return np.ascontiguousarray(ids, dtype=np.int64), off
    raise TypeError("exclude must be a list of id arrays (one per query) or a tuple (ids, offsets)")


class ItemIndex:
    """Exact or int8/fp16 inner-product top-k over an item catalogue.

    Args:
        items: float32 ``(N, D)``. For cosine similarity, L2-normalise items and queries first.
        ids: optional unique int64 external ids (default ``0..N-1``).
        precision: ``"int8"`` (one float32 scale per item), ``"fp16"`` or ``"fp32"``.
        rerank: keep the float32 rows and rescore the first pass's best candidates in float64
            (1.5k + 16 of them for int8, k + k/8 + 16 for fp16, k + 16 for fp32). Rows nobody can
            change (read-only views of a read-only buffer: a file mapped with ACCESS_READ, as
            :func:`fastrec.load` maps a model, ``np.memmap(mode="r")``, bytes) are read where they
            are, not copied; ``nbytes`` counts only what the index owns. Such a file must not be
            rewritten in place while an index reads it (as for a loaded model's tables), and its
            mapping cannot be closed until the index is gone (``mmap.close()`` raises
            BufferError). Results then equal an exact search up to ties whenever the true top k
            are among those candidates: on every embedding set measured (Gaussian, log-normal
            norms, cosine, MovieLens), but not when items differ by far less than what they share.
            int8 keeps one scale per item, so a large common component (uncentred embeddings, a
            mean 100x the spread) leaves few levels for the differences (recall@10 0.65 in such a
            test), as does one column far larger than the rest (a folded item bias 60x the other
            columns: recall@100 0.97 over 50,000 items); fp32 loses order only where float32
            rounding cancels (query and item terms ~1e8 times the scores). Centre such items
            (subtract the mean item: every score of a query shifts by the same amount, the
            ranking does not change) or use fp16 / fp32.
            ``rerank=False`` saves the float32 copy for int8 / fp16.

    ``search`` is safe to call from many threads, also while another thread calls ``add`` or
    ``remove``: each search sees the catalogue either before or after an update.
    """

    def __init__(self, items, *, ids=None, precision: str = "int8", rerank: bool = True, _trim: bool = True):
        if not isinstance(precision, str):
            raise TypeError(f"precision must be a str, got {type(precision).__name__}")
        if not isinstance(rerank, (bool, np.bool_)):
            raise TypeError(f"rerank must be a bool, got {type(rerank).__name__}")
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
        items = float_matrix(items, "items")
        if precision == "int8" and items.shape[1] > MAX_INT8_WIDTH:
            raise ValueError(f"precision 'int8' takes items of dimension at most {MAX_INT8_WIDTH} (the int32 "
                             f"sums of 127 * 127 * D must not overflow), got {items.shape[1]}: use 'fp16' or 'fp32'")
        self._precision = precision
        self._rerank = bool(rerank)
        self._dim = int(items.shape[1])
        self._lock = threading.Lock()  # serialises writers; readers take a snapshot
        _live_indexes.add(self)  # (a forked child gets a fresh lock: _renew_locks)
        amax = _abs_max(items)
        _check_range(items, amax, precision)
        ids = np.arange(items.shape[0], dtype=np.int64) if ids is None else _item_ids(ids, items.shape[0])
        segments = (self._segment(items, ids, amax),) if items.shape[0] else ()
        self._snap = _snapshot(segments)
        del segments, ids
        if _trim:  # (False: a one-shot index, ops.topk's, whose next build would reuse that heap)
            _trim_after_build(items.nbytes)  # (a float32 copy of float64 / strided input is still alive here)

    def _segment(self, items: np.ndarray, ids: np.ndarray, amax: float) -> _Segment:
        keep = self._rerank or self._precision == "fp32"
        # int8 / fp16 + rerank over rows nobody can change (a model file mapped read-only): the
        # rerank reads them where they are instead of a private float32 copy (122 MiB for 1M x
        # 32 items in every serving process that loads the model).
        pin = None
        if keep and self._precision != "fp32" and items.flags.c_contiguous and items.flags.aligned:
            pin = _immutable_owner(items)
        borrow = pin is not None
        block = _C.ItemBlock(items, _PRECISIONS[self._precision], keep and not borrow)
        return _Segment(block, ids, None, amax, items if borrow else None, pin)

    # ---- properties ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._snap.live

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def rerank(self) -> bool:
        return self._rerank

    @property
    def nbytes(self) -> int:
        snap = self._snap
        n = sum(s.block.nbytes + s.ids.nbytes + (0 if s.removed is None else s.removed.nbytes)
                for s in snap.segments)
        return int(n + snap.sorted_ids.nbytes + snap.where.nbytes)

    @property
    def ids(self) -> np.ndarray:
        """The live ids, sorted."""
        return self._snap.sorted_ids.copy()

    def __repr__(self) -> str:
        return (f"ItemIndex(n={len(self)}, dim={self._dim}, precision={self._precision!r}, "
                f"rerank={self._rerank}, segments={len(self._snap.segments)})")

    # ---- search ----------------------------------------------------------------------------
    def search(self, queries, k: int, *, exclude=None):
        """The ``k`` best items per query by inner product.

        Args:
            queries: float32 ``(Q, D)`` (or ``(D,)`` for one query: results are then 1-D).
            k: >= 1; larger than the catalogue is fine (see Returns).
            exclude: items to leave out per query (already seen): a list of Q id arrays, or a
                tuple ``(exclude_ids, exclude_offsets)`` in CSR (offsets of length Q + 1). Ids not
                in the index are ignored. A flat list / 1-D array of ids is a TypeError (it is
                not one list per query; for a single query pass ``[ids]``).

        Returns:
            ``(scores, ids)``: float32 and int64 ``(Q, k)``, best first, ties broken by the smaller
            id; where fewer than k items remain the tail is id -1 with score -inf. A query
            whose float32 scoring could overflow (D * max|q| * max|x| >= 2**126) is searched
            exactly in float64 instead (on the host, for device queries too; slower); a score beyond float32's range
            (~3.4e38) is returned as +-inf, its item still ranked by the true score. Device queries
            (torch CUDA tensor / CuPy array) give device arrays of their framework, computed on the
            caller's current stream from a device copy of the index made on first use (see
            ``fastrec/_cuda_topk.py``).
        """
        # ---- CUDA: device queries (torch CUDA / CuPy) search a device copy of this snapshot,
        # uploaded on first use; results are device arrays (fastrec/_cuda_topk.py).
        if _cuda.is_device_array(queries):
            from . import _cuda_topk

            return _cuda_topk.search(self, self._snap, queries, k, exclude)
        # ---- CPU
        single = False
        q = float_input(queries, "queries")
        if q.ndim == 1:
            single, q = True, q.reshape(1, -1)
        q = float_matrix(q, "queries", self._dim, check_finite=False)
        k = _check_k(k)
        _check_result_size(q.shape[0], k)
        ex_ids, ex_off = exclude_csr(exclude, q.shape[0])
        snap = self._snap
        segs = snap.segments
        exact = _checked_queries(q, snap.amax)
        scores, ids = _C.topk_search(
            [s.block for s in segs], [s.ids for s in segs], [s.removed for s in segs], q, k,
            _candidates(k, self._precision, self._rerank), self._rerank, ex_ids, ex_off, [s.rows for s in segs])
        if exact is not None:  # queries whose float32 scoring could overflow (rare, and slower)
            scores[exact], ids[exact] = _exact_search(snap, q, exact, k, ex_ids, ex_off)
        if single:
            return scores[0], ids[0]
        return scores, ids

    # ---- updates ---------------------------------------------------------------------------
    def add(self, items, ids) -> None:
        """Adds items with new unique ids (ValueError if an id is already in the index)."""
        if self._add(items, ids):  # merged: trim once the old segments are gone (see _trim_after_build)
            _C._trim_heap()

    def _add(self, items, ids) -> bool:
        items = float_matrix(items, "items", self._dim)
        amax = _abs_max(items)
        _check_range(items, amax, self._precision, stacklevel=4)
        ids = _item_ids(ids, items.shape[0])
        if items.shape[0] == 0:
            return False
        seg = self._segment(items, ids, amax)  # the packing runs outside the lock
        with self._lock:
            snap = self._snap
            _, hit = _locate(snap, ids)
            if hit.any():
                raise ValueError(f"id {int(ids[np.argmax(hit)])} is already in the index")
            segments = snap.segments + (seg,)
            merged = len(segments) > _MAX_SEGMENTS
            if merged:
                segments = (self._merged(segments),)
            self._snap = _snapshot(segments)
        return merged  # (no trim after every add: the next add reuses the heap it left, 15-35% faster)

    def remove(self, ids) -> None:
        """Removes items by id (KeyError naming the first id that is not in the index)."""
        if self._remove(ids):  # rebuilt: trim once the old segments are gone
            _C._trim_heap()

    def _remove(self, ids) -> bool:
        ids = _ids_1d(ids)
        ids = _id_array(ids, ids.size)
        _check_unique(ids)
        with self._lock:
            snap = self._snap
            pos, ok = _locate(snap, ids)
            if not ok.all():
                raise KeyError(int(ids[np.argmin(ok)]))
            where = snap.where[pos]
            segments = list(snap.segments)
            for s in np.unique(where[:, 0]):
                seg = segments[s]
                removed = np.zeros(seg.ids.shape[0], np.uint8) if seg.removed is None else seg.removed.copy()
                removed[where[where[:, 0] == s, 1]] = 1
                segments[s] = replace(seg, removed=removed)
            total = sum(s.ids.shape[0] for s in segments)
            rebuilt = snap.live - ids.shape[0] < total // 2  # mostly tombstones: rebuild
            if rebuilt:
                merged = self._merged(segments)
                segments = [] if merged is None else [merged]
            self._snap = _snapshot(tuple(segments))
        return rebuilt

    def _merged(self, segments) -> _Segment | None:
        """One segment holding the live items of ``segments`` (None if there are none)."""
        items, ids = _live_rows(segments, self._dim)
        if items.shape[0] == 0:
            return None
        return self._segment(items, ids, _abs_max(items))

    def __reduce__(self):
        """Pickling (``copy.deepcopy``, multiprocessing, Ray) carries the live items as float32
        rows (the kept originals, or the dequantized codes when ``rerank=False``, which pack back
        to the same codes) and their ids: the copy returns the same results. Updates made to
        the copy do not reach the original, nor the other way round."""
        items, ids = self._live_rows()
        return (_restore_index, (type(self), items, ids, self._precision, self._rerank, self._snap.amax))

    def _live_rows(self):
        """The live items as float32 ``(n, dim)`` rows and their ids (see :func:`_live_rows`)."""
        return _live_rows(self._snap.segments, self._dim)


def _restore_index(cls, items, ids, precision: str, rerank: bool, amax: float) -> "ItemIndex":
    index = cls(items, ids=ids, precision=precision, rerank=rerank)
    # max |x| still counts removed rows in the original (it decides which queries are searched
    # exactly in float64): the copy keeps it, so that it returns the same results.
    segments = tuple(replace(s, amax=max(s.amax, amax)) for s in index._snap.segments)
    index._snap = _snapshot(segments)
    return index


# Every ItemIndex, for _renew_locks. A fork while another thread held an index's writer lock
# (an add or remove: ~20 ms at 1M items) left the child's copy of the lock held forever, and
# the child's first add / remove hung. The snapshot is swapped in one assignment, so the child
# sees a whole catalogue either way.
_live_indexes: weakref.WeakSet = weakref.WeakSet()


def _renew_locks() -> None:
    for index in list(_live_indexes):
        index._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_locks)


def _live_rows(segments, dim: int):
    """The live rows of ``segments`` as float32 ``(n, dim)`` and their ids. Lossless: re-packing
    the kept float32 rows, or the dequantized codes, gives the same codes."""
    rows, ids = [np.empty((0, dim), np.float32)], [np.empty(0, np.int64)]
    for s in segments:
        x = _float_rows(s)
        live = slice(None) if s.removed is None else s.removed == 0
        rows.append(x[live])
        ids.append(s.ids[live])
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32), np.concatenate(ids)


def _trim_after_build(nbytes: int) -> None:
    """Building a large index frees temporaries of about its own size (quantized copies, id
    sorts); glibc keeps freed chunks below its mmap threshold in the heap, so every serving
    process that built a 1M x 32 index held ~70 MiB more than the index itself. Hand them back
    (after a build, a merge or a rebuild; not after each add, whose successor reuses them)."""
    if nbytes >= 16 << 20:
        _C._trim_heap()


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # (no sysconf on this platform)
        return None


def _cgroup_memory_limit(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """The smallest memory limit of this process's cgroup and its ancestors (v2 ``memory.max``,
    v1 ``memory.limit_in_bytes``), or None where there is none or it cannot be read. A
    container's limit is what the OOM killer enforces, not the host's physical memory. Best
    effort: anything unreadable or odd (not a positive decimal number) is skipped."""
    try:
        with open(proc_cgroup, "rb") as f:  # (cgroup names may be any bytes)
            lines = f.read().splitlines()
    except OSError:
        return None
    broot = os.fsencode(root)
    candidates = []  # (folders the hierarchy may be mounted at, the process's path in it, limit file)
    for line in lines:
        parts = line.split(b":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == b"":
            candidates.append(([broot], path, b"memory.max"))
        elif b"memory" in controllers.split(b","):
            folders = [os.path.join(broot, b"memory"), os.path.join(broot, controllers)]  # (co-mounted: "cpu,memory")
            candidates.append((folders, path, b"memory.limit_in_bytes"))
    limits = []
    for folders, path, name in candidates:
        # Walk from the process's own cgroup up to the hierarchy's root; a container that sees
        # its own cgroup as the root (a cgroup namespace) finds it at the top.
        parts = [p for p in path.split(b"/") if p not in (b"", b".", b"..")]
        for folder in dict.fromkeys(folders):
            for depth in range(len(parts), -1, -1):
                try:
                    with open(os.path.join(folder, *parts[:depth], name), "rb") as f:
                        text = f.read(64).strip()
                except OSError:
                    continue
                if text.isdigit() and int(text) > 0:  # (bytes: ASCII digits only; "max" is no limit)
                    limits.append(int(text))
    return min(limits) if limits else None


_memory_limit_cache: tuple | None = None  # (limit, pid)


def _memory_limit() -> int | None:
    """The memory this process may use: physical memory, or less under a cgroup limit (read once
    per process: the files cost ~80 us)."""
    global _memory_limit_cache
    cached = _memory_limit_cache
    if cached is not None and cached[1] == os.getpid():
        return cached[0]
    known = [m for m in (_physical_memory(), _cgroup_memory_limit()) if m is not None]
    limit = min(known) if known else None
    _memory_limit_cache = (limit, os.getpid())
    return limit


def _check_result_size(Q: int, k: int) -> None:
    """MemoryError up front when the (Q, k) results alone exceed the memory this process may use
    (physical memory, or a container's cgroup limit): the allocation succeeds under overcommit,
    and filling it got the process killed (k = 2**31 - 1 on a 50-item index: 24 GB of padding)."""
    need = Q * k * 12  # float32 scores + int64 ids
    if need < 1 << 30:  # (no machine that runs fastrec lacks 1 GiB: skip the look-up)
        return
    total = _memory_limit()
    if total is not None and need > total:
        raise MemoryError(f"the results of {Q} queries x k={k} take {need / 2**30:.1f} GiB, more than the "
                          f"{total / 2**30:.1f} GiB of memory this process may use (every row has k entries, "
                          "padded with id -1 beyond the catalogue)")


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > 2**31 - 1:  # (2**63 overflowed the candidate count inside: a raw pybind11 TypeError)
        raise ValueError(f"k must be < 2**31, got {k}")
    return int(k)
