"""The functional API. Each op validates and normalises its inputs, then calls the backend.

Sparse input uses CSR offsets of length ``B + 1`` (TorchRec / FBGEMM convention: ``offsets[0]
== 0``, non-decreasing, ``offsets[-1] == len(indices)``); for several tables, table-major
offsets of length ``T*B + 1`` (the layout of TorchRec's KeyedJaggedTensor).
"""

from __future__ import annotations

import numpy as np

from . import _C, _cuda, _cuda_embedding
from ._arrays import as_numpy, check_index_dtype, float_input, native
from .tables import QuantizedTable

__all__ = ["embedding_bag", "embedding_bags", "int8_linear", "topk"]

_MODES = {"sum": 0, "mean": 1, "max": 2}


def _mode_code(mode) -> int:
    if not isinstance(mode, str):
        raise TypeError(f"mode must be one of 'sum', 'mean', 'max', got {type(mode).__name__} {mode!r}")
    try:
        return _MODES[mode]
    except (KeyError, TypeError):
        raise ValueError(f"mode must be one of 'sum', 'mean', 'max', got {mode!r}") from None


def _index_array(x, name: str) -> np.ndarray:
    """An int32/int64 ndarray (no copy when it already is one; ndarray subclasses as plain arrays)."""
    if type(x) is not np.ndarray:
        x = as_numpy(x)
        if x.size == 0 and x.dtype == np.float64:  # [] -> float64 by default
            x = x.astype(np.int64)
    if x.dtype != np.int64 and x.dtype != np.int32:
        x = native(x)  # byte-swapped int32 / int64 (as tables are): one native copy
        check_index_dtype(x.dtype, name)
    return x


def _check_bag_shapes(indices_shape, offsets_shape) -> None:
    """The 2-D (B, L) form when offsets_shape is None, else 1-D indices with CSR offsets."""
    if offsets_shape is None:
        if len(indices_shape) != 2:
            raise ValueError(f"indices must be 2-D (B, L) when offsets is None, got {len(indices_shape)}-D")
        return
    if len(indices_shape) != 1:
        raise ValueError(f"indices must be 1-D when offsets are given, got {len(indices_shape)}-D")
    if len(offsets_shape) != 1:
        raise ValueError(f"offsets must be 1-D, got {len(offsets_shape)}-D")
    if offsets_shape[0] < 1:
        raise ValueError("offsets must have length B + 1 >= 1 (CSR), got an empty array")


def _check_weights(dtype, shape, n: int, indices_shape=None) -> None:
    """per_sample_weights: float32, shaped like the indices or 1-D with one weight per index
    (a (3, 2) array for (2, 3) indices would pair weights and ids in an order nobody meant)."""
    if dtype != np.float32:
        raise TypeError(f"per_sample_weights must be float32, got {dtype}")
    shape = tuple(shape)
    if shape != (n,) and (indices_shape is None or shape != tuple(indices_shape)):
        like = f" or {tuple(indices_shape)} (the shape of indices)" if indices_shape not in (None, (n,)) else ""
        raise ValueError(f"per_sample_weights must have shape ({n},){like}, one weight per index, got shape {shape}")


def _weights_array(x, n: int, indices_shape) -> np.ndarray:
    x = float_input(x, "per_sample_weights")  # (lists of numbers: float32)
    _check_weights(x.dtype, x.shape, n, tuple(indices_shape))
    return x.reshape(-1)


def _table(t):
    """A QuantizedTable or a 2-D float32/float16 ndarray (dtype checks happen in C++)."""
    if type(t) is np.ndarray or isinstance(t, QuantizedTable):
        return t
    if isinstance(t, np.ndarray):
        return as_numpy(t)  # (a subclass: np.matrix, a masked array, a memmap) as a plain array
    if _cuda.is_device_array(t):
        raise TypeError(_cuda_embedding.MIXED_MESSAGE.format(what="an embedding table"))
    if hasattr(t, "detach") and hasattr(t, "cpu"):
        return as_numpy(t)
    raise TypeError(f"an embedding table must be a numpy array or a fastrec.QuantizedTable, got {type(t).__name__}")


def _on_device(*arrays) -> bool:
    """Whether any input is a CUDA array (torch / CuPy) or a QuantizedTable on the GPU; cheap
    for numpy inputs, so the CPU path pays next to nothing for the check."""
    for x in arrays:
        if x is not None and type(x) is not np.ndarray and _cuda_embedding.is_device_input(x):
            return True
    return False


def embedding_bag(weight, indices, offsets=None, *, mode="sum", per_sample_weights=None,
                  padding_idx=None):
    """Pool rows of one embedding table per bag.

    Args:
        weight: float32 or float16 array ``(R, D)``, or a :class:`fastrec.QuantizedTable`.
        indices: int32 or int64 ids; 1-D with ``offsets``, or 2-D ``(B, L)`` (B bags of L ids)
            with ``offsets=None``.
        offsets: CSR offsets, length ``B + 1``, ``offsets[0] == 0``, non-decreasing,
            ``offsets[-1] == len(indices)``.
        mode: ``"sum"``, ``"mean"`` or ``"max"``. An empty bag gives zeros. ``"max"`` ignores NaN
            values in the table, as ``np.fmax`` does (a column that is NaN in every row of a bag
            gives -inf); sum and mean propagate them.
        per_sample_weights: float32, one weight per index, only with ``mode="sum"``.
        padding_idx: an id whose entries are skipped (negative counts from the end, as in torch);
            ``mean`` divides by the number of the other entries; an all-padding bag gives zeros.

    On the GPU: pass CUDA arrays (torch CUDA tensors or CuPy arrays, zero-copy) for the ids,
    offsets and weights, and a CUDA float table or a :meth:`QuantizedTable.to_device` table,
    all on one device. The result is a float32 array of the indices' framework on that device,
    computed on the caller's current stream; the call waits for the kernel (the bounds check
    reads 16 bytes back), so it raises IndexError / ValueError exactly like the CPU op.

    Returns:
        float32 array ``(B, D)``.

    Raises:
        TypeError: wrong dtype or type, or host and GPU inputs mixed. ValueError: wrong shape
        or value (offsets, mode, weights with a mode other than sum, inputs on two GPUs).
        IndexError: an id < 0 or >= R (names its position and value).
    """
    code = _mode_code(mode)
    if per_sample_weights is not None and code != 0:
        raise ValueError(f"per_sample_weights is only supported with mode 'sum', got mode {mode!r}")
    if _on_device(indices, offsets, per_sample_weights, weight):
        return _cuda_embedding.embedding_bag(weight, indices, offsets, code, per_sample_weights, padding_idx)
    weight = _table(weight)
    indices = _index_array(indices, "indices")
    indices_shape = indices.shape
    if offsets is None:
        _check_bag_shapes(indices.shape, None)
        B, L = indices.shape
        offsets = np.arange(B + 1, dtype=np.int64) * L
        indices = indices.reshape(-1)
    else:
        offsets = _index_array(offsets, "offsets")
        _check_bag_shapes(indices.shape, offsets.shape)
    if per_sample_weights is not None:
        per_sample_weights = _weights_array(per_sample_weights, indices.shape[0], indices_shape)
    pad = _padding_code(padding_idx, _num_rows(weight))
    return _C.embedding_bags((weight,), indices, offsets, (code,), per_sample_weights, (pad,), _table)


def _padding_code(padding_idx, rows: int) -> int:
    if padding_idx is None:
        return -1
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)):
        raise TypeError(f"padding_idx must be an int, got {type(padding_idx).__name__}")
    pad = int(padding_idx) + rows if padding_idx < 0 else int(padding_idx)
    if not 0 <= pad < rows:
        raise ValueError(f"padding_idx must be within [-{rows}, {rows}), got {padding_idx}")
    return pad


def _num_rows(table) -> int:
    return table.num_rows if isinstance(table, QuantizedTable) else np.shape(table)[0]


def _mode_codes(modes, T: int) -> tuple:
    if isinstance(modes, str):
        return (_mode_code(modes),) * T
    if not isinstance(modes, (list, tuple)):
        raise TypeError(f"modes must be a string or a list of one string per table, got {type(modes).__name__}")
    codes = tuple(_mode_code(m) for m in modes)
    if len(codes) != T:
        raise ValueError(f"modes must be one string or one per table ({T}), got {len(codes)}")
    return codes


def _padding_codes(padding_idx, T: int, rows_of) -> tuple:
    """One padding code per table (-1 for none); rows_of(t) gives table t's row count."""
    if padding_idx is None:
        return (-1,) * T
    if isinstance(padding_idx, (int, np.integer)) or not isinstance(padding_idx, (list, tuple)):
        raise TypeError("padding_idx must be None or a list with one entry (an int or None) per table")
    if len(padding_idx) != T:
        raise ValueError(f"padding_idx must have one entry per table ({T}), got {len(padding_idx)}")
    return tuple(_padding_code(p, rows_of(t)) for t, p in enumerate(padding_idx))


def embedding_bags(tables, indices, offsets, *, modes="sum", per_sample_weights=None,
                   padding_idx=None):
    """Pool T tables in one call (one parallel pass over every (table, bag) pair).

    Args:
        tables: a sequence of T tables, each a float32/float16 array ``(R_t, D_t)`` or a
            :class:`fastrec.QuantizedTable`, in any mix.
        indices: 1-D int32/int64, all features' ids concatenated table-major.
        offsets: table-major CSR offsets of length ``T*B + 1`` (KeyedJaggedTensor layout): bag b
            of table t is ``indices[offsets[t*B + b] : offsets[t*B + b + 1]]``.
        modes: one mode for all tables, or one per table.
        per_sample_weights: float32, one per index; requires every mode to be ``"sum"``.
        padding_idx: None, or one id per table (None for a table without one); entries equal
            to it are skipped, as in :func:`embedding_bag`.

    GPU inputs as for :func:`embedding_bag` (every table on the GPU too); all tables are
    pooled by one kernel launch per row format present.

    Returns:
        float32 ``(B, sum(D_t))``, table t's block in column order.
    """
    if not isinstance(tables, (list, tuple)):
        raise TypeError("tables must be a list or tuple of tables")
    if len(tables) == 0:
        raise ValueError("tables must not be empty")
    T = len(tables)  # tables are checked in C++, which calls _table only for non-numpy inputs
    codes = _mode_codes(modes, T)
    if per_sample_weights is not None and any(c != 0 for c in codes):
        raise ValueError("per_sample_weights is only supported when every mode is 'sum'")
    if offsets is None:  # (embedding_bag's 2-D (B, L) form has no many-table counterpart)
        raise ValueError("offsets is required: table-major CSR offsets of length T*B + 1")
    if _on_device(indices, offsets, per_sample_weights) or _cuda_embedding.any_device_table(tables):
        return _cuda_embedding.embedding_bags(tables, indices, offsets, codes, per_sample_weights, padding_idx)
    indices = _index_array(indices, "indices")
    offsets = _index_array(offsets, "offsets")
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D, got {indices.ndim}-D")
    if offsets.ndim != 1:
        raise ValueError(f"offsets must be 1-D, got {offsets.ndim}-D")
    if per_sample_weights is not None:
        per_sample_weights = _weights_array(per_sample_weights, indices.shape[0], indices.shape)
    pads = _padding_codes(padding_idx, T, lambda t: _num_rows(_table(tables[t])))
    return _C.embedding_bags(tables, indices, offsets, codes, per_sample_weights, pads, _table)


def _linear_input(x, in_features: int) -> np.ndarray:
    x = float_input(x, "x")
    if x.dtype != np.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (batch, in_features), got shape {x.shape}")
    if x.shape[1] != in_features:
        raise ValueError(f"x has {x.shape[1]} features, the layer expects {in_features}")
    return x


def int8_linear(x, lin, activation=None, *, check_finite: bool = True):
    """``activation(x @ W.T + b)`` through an :class:`fastrec.Int8Linear`.

    x: float32 ``(B, K)``, any B >= 0: a numpy array (or CPU tensor), or a CUDA array (torch
    CUDA tensor / CuPy array; the result is then one of the same framework and device).
    Activations are quantized per row inside the kernel (NaN or Inf in x raises ValueError,
    found in that same pass); int32 accumulation; bias, ReLU/sigmoid and dequantization in the
    epilogue. Returns float32 ``(B, N)``. ``check_finite=False`` (GPU only) skips the host wait
    the NaN/Inf check costs there; such rows then come out as NaN.
    """
    from .linear import Int8Linear, _activation_code

    if not isinstance(lin, Int8Linear):
        raise TypeError(f"lin must be a fastrec.Int8Linear, got {type(lin).__name__}")
    code = _activation_code(activation)
    if _cuda.is_device_array(x):
        from ._cuda_linear import int8_linear as cuda_int8_linear

        return cuda_int8_linear(x, lin, activation, check_finite=check_finite)
    x = _linear_input(x, lin.in_features)
    return _C.int8_linear(x, lin._core, code)


def topk(queries, items, k: int, *, exclude=None):
    """Exact inner-product top-k of float32 ``queries (Q, D)`` (or one query ``(D,)``, which
    gives 1-D results) against ``items (N, D)``.

    The functional form of :class:`fastrec.ItemIndex` with ``precision="fp32"``: packs the items
    on every call, so build an ``ItemIndex`` once for repeated searches over one catalogue.
    For cosine similarity, L2-normalise both sides first. Returns ``(scores, ids)``, float32 and
    int64 ``(Q, k)``, best first, ties broken by the smaller id; where ``k > N`` the tail is id
    -1 with score -inf. ``exclude`` as in :meth:`fastrec.ItemIndex.search`. CUDA arrays (torch
    CUDA tensors / CuPy arrays) run on their GPU and return arrays of the same framework.
    """
    if _cuda.is_device_array(queries) or _cuda.is_device_array(items):
        from ._cuda_topk import topk as cuda_topk

        return cuda_topk(queries, items, k, exclude=exclude)
    from .index import ItemIndex

    return ItemIndex(items, precision="fp32", rerank=True, _trim=False).search(queries, k, exclude=exclude)
