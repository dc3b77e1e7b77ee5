"""Raw features to model inputs: the ``featurizer`` of a model directory (docs/FORMAT.md).

A :class:`Featurizer` turns raw records (ids, strings, counts) into what a DLRM / two-tower model
takes: a float32 dense matrix and table-major sparse CSR (TorchRec's KeyedJaggedTensor layout).
It is described by a JSON-serialisable spec, stored as the ``featurizer`` field of
``manifest.json``::

    {
      "version": 1,
      "dense": [                                   # output column j = dense[j], in this order
        {"name": "I1", "kind": "log1p", "fill": 0.0},
        {"name": "age_z", "source": "age", "kind": "standardize", "mean": 34.1, "std": 12.2},
        {"name": "price", "kind": "identity", "fill": 0.0}
      ],
      "sparse": [                                  # KJT key order; one embedding table each
        {"name": "C1", "kind": "hash", "num_rows": 100000, "salt": "C1"},
        {"name": "movie_id", "kind": "lookup", "vocab": [50, 258, 100], "oov_row": 3,
         "num_rows": 4},
        {"name": "genres", "kind": "lookup", "multi": true, "vocab": ["Drama", "Comedy"]},
        {"name": "age_bucket", "source": "age", "kind": "bucketize",
         "boundaries": [18, 25, 35, 45, 56], "num_rows": 7}
      ]
    }

Common fields: ``name`` (unique over dense and sparse), ``source`` (the input column or record
key; defaults to ``name``), ``kind``. Unknown fields are errors.

Dense kinds (each value is read as float64; NaN, +-inf, integers too large for float64 (e.g.
``2**1024``) and missing values (``None``, an absent record key) are *missing* and replaced by
``fill`` before the transform; the result is float32, and a value whose result lies beyond
float32's range (e.g. 1e300) counts as missing too):

* ``identity``: ``x``; ``fill`` defaults to 0.
* ``log1p``: ``log(1 + max(x, 0))``, as DLRM does for Criteo's counts; ``fill`` defaults to 0
  (so missing -> 0).
* ``standardize``: ``(x - mean) / std`` (``std > 0``); ``fill`` defaults to ``mean`` (missing -> 0).

Sparse kinds (each produces rows of its own embedding table, ``0 <= row < num_rows``):

* ``hash``: raw integer ids (any int dtype, compared by value mod 2**64) or strings to
  ``hash64(id, salt) % num_rows`` with :mod:`fastrec.kernels.hashing` (stable forever): a str
  is hashed as its UTF-8 bytes, a bytes value as its raw bytes (any bytes).
  ``num_rows`` is required; ``salt`` (int or string) defaults to the feature's name.
* ``lookup``: exact vocabulary (all ints or all strings, unique): ``vocab[k]`` -> row ``k``.
  Values not in it go to ``oov_row`` (default ``len(vocab)``); ``"oov_row": null`` makes an
  unknown value a ValueError instead. ``num_rows`` defaults to ``max(len(vocab), oov_row + 1)``.
  A string vocabulary holds text (JSON strings): a bytes value is decoded as UTF-8
  (``b"caf\\xc3\\xa9"`` matches ``"café"``); bytes that are not valid UTF-8 are a ValueError,
  in :meth:`~Featurizer.transform` and :meth:`~Featurizer.fit` alike (no entry can match them).
* ``bucketize``: a number to the count of ``boundaries`` (strictly increasing) that are <= it,
  ``0 .. len(boundaries)``; missing / non-finite values to row ``len(boundaries) + 1``. So a
  bucketized feature is a *sparse* feature with ``num_rows = len(boundaries) + 2`` (one bag of
  one row per record), which a model embeds like any categorical feature: the usual way to feed
  bucketized numbers to DLRM / two-tower models. Single-valued only.

Strings are Unicode text: a str with no UTF-8 encoding (a lone surrogate such as ``"\\ud800"``)
is neither a valid value (a ValueError naming the feature, hash and lookup alike) nor a valid
spec string (name, source, salt, vocabulary entry).

``multi`` (default false; hash and lookup): each record holds a list of values (a bag). Without
it each record holds one value; a missing value (``None``, an absent record key) is an empty bag
(its embedding bag pools to zeros).

:meth:`Featurizer.transform` returns ``(dense, (indices, offsets))``: dense float32
``(B, n_dense)``; indices int64 and offsets int64 of length ``T * B + 1`` (T sparse features),
table-major: all B bags of sparse feature 0, then those of feature 1, ... -- exactly the
``(indices, offsets)`` pair :meth:`fastrec.Model.score` takes for its ``sparse_features``.

Specs are untrusted input: :meth:`Featurizer.from_spec` checks every field and raises
:class:`FeaturizerSpecError` (a ``ValueError``) naming the JSON path of the bad field.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Mapping, Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np

from ._arrays import as_numpy
from .kernels import featurize as _fk
from .kernels import hashing as _hashing

__all__ = ["Featurizer", "FeaturizerSpecError", "SPEC_VERSION"]

SPEC_VERSION = 1
DENSE_KINDS = ("identity", "log1p", "standardize")
SPARSE_KINDS = ("hash", "lookup", "bucketize")
_OPS = {"identity": _fk.OP_IDENTITY, "log1p": _fk.OP_LOG1P, "standardize": _fk.OP_STANDARDIZE}
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_U64_MASK = (1 << 64) - 1
_MAX_ROWS = (1 << 63) - 1


class FeaturizerSpecError(ValueError):
    """A featurizer spec that is not valid; the message names the JSON path of the bad field."""


# ---- spec validation ---------------------------------------------------------------------------


def _tname(v) -> str:
    return "null" if v is None else type(v).__name__


def _short(v) -> str:
    try:
        s = repr(v)
    except ValueError:  # an int too long for str() (sys.get_int_max_str_digits)
        return f"<int of {v.bit_length()} bits>"
    return s if len(s) <= 60 else s[:57] + "..."


def _fail(path: str, expected: str, got) -> None:
    raise FeaturizerSpecError(f"featurizer spec: {path}: expected {expected}, got {got}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _int(v, path, lo=None, hi=None) -> int:
    if not _is_int(v):
        _fail(path, "an integer", f"{_tname(v)} {_short(v)}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        _fail(path, f"an integer {rng}", _short(v))
    return v


def _num(v, path) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        _fail(path, "a number", f"{_tname(v)} {_short(v)}")
    try:
        f = float(v)
    except OverflowError:  # an int beyond float64's range
        _fail(path, "a finite number", _short(v))
    if not math.isfinite(f):
        _fail(path, "a finite number", f)
    return f


def _is_utf8(s: str) -> bool:
    """Whether a str has a UTF-8 encoding (it has none with a lone surrogate such as '\\ud800')."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(v: str, path) -> str:
    """A spec string, which must be Unicode text: the hash and the manifest use its UTF-8 form."""
    if not _is_utf8(v):
        _fail(path, "a string of Unicode text (no lone surrogates)", _short(v))
    return v


def _str(v, path) -> str:
    if not isinstance(v, str) or not v:
        _fail(path, "a non-empty string", f"{_tname(v)} {_short(v)}")
    return _text(v, path)


def _keys(d: dict, path: str, required, optional) -> None:
    for k in required:
        if k not in d:
            raise FeaturizerSpecError(f"featurizer spec: {path}.{k}: required field is missing")
    allowed = set(required) | set(optional)
    for k in d:
        if k not in allowed:
            raise FeaturizerSpecError(
                f"featurizer spec: {path}.{k}: unknown field (allowed: {sorted(allowed)})")


@dataclass(frozen=True)
class _Dense:
    name: str
    source: str
    kind: str
    fill: float
    mean: float = 0.0
    std: float = 1.0

    def spec(self) -> dict:
        d = {"name": self.name, "kind": self.kind}
        if self.source != self.name:
            d["source"] = self.source
        if self.kind == "standardize":
            d["mean"] = self.mean
            d["std"] = self.std
        d["fill"] = self.fill
        return d


@dataclass(frozen=True)
class _Sparse:
    name: str
    source: str
    kind: str
    num_rows: int
    multi: bool = False
    salt: object = None
    vocab: tuple = ()
    oov_row: int | None = None
    boundaries: tuple = ()
    key: int = 0  # hash: salt_key(salt)
    # derived lookup tables (read-only, shared by every thread)
    str_rows: dict = field(default=None, repr=False, compare=False)
    keys: np.ndarray = field(default=None, repr=False, compare=False)
    key_rows: np.ndarray = field(default=None, repr=False, compare=False)
    bounds: np.ndarray = field(default=None, repr=False, compare=False)

    def spec(self) -> dict:
        d = {"name": self.name, "kind": self.kind}
        if self.source != self.name:
            d["source"] = self.source
        if self.multi:
            d["multi"] = True
        if self.kind == "hash":
            d["salt"] = self.salt
        elif self.kind == "lookup":
            d["vocab"] = list(self.vocab)
            d["oov_row"] = self.oov_row
        else:
            d["boundaries"] = list(self.boundaries)
        d["num_rows"] = self.num_rows
        return d


def _kind(d, path, kinds) -> str:
    if not isinstance(d, dict):
        _fail(path, "an object", _tname(d))
    kind = d.get("kind")
    if kind not in kinds:
        _fail(path + ".kind", f"one of {list(kinds)}", _short(kind))
    return kind


def _parse_dense(d, path) -> _Dense:
    kind = _kind(d, path, DENSE_KINDS)
    req = ("name", "kind") + (("mean", "std") if kind == "standardize" else ())
    _keys(d, path, req, ("source", "fill"))
    name = _str(d["name"], path + ".name")
    source = _str(d.get("source", name), path + ".source")
    mean, std = 0.0, 1.0
    if kind == "standardize":
        mean = _num(d["mean"], path + ".mean")
        std = _num(d["std"], path + ".std")
        if not std > 0:
            _fail(path + ".std", "a number > 0", std)
    fill = _num(d["fill"], path + ".fill") if "fill" in d else (mean if kind == "standardize" else 0.0)
    # The fill's own result, by the transform kernel itself (non-finite only past float32's range)
    y = _fk.dense_transform(np.array([[fill]]), [_OPS[kind]], [fill], [mean], [std], backend="numpy")
    if not np.isfinite(y).all():
        _fail(path + ".fill", "a fill whose transformed value fits float32 (|y| <= ~3.4028235e38)", fill)
    return _Dense(name, source, kind, fill, mean, std)


def _parse_vocab(v, path):
    if not isinstance(v, list) or not v:
        _fail(path, "a non-empty list", f"{_tname(v)} {_short(v)}")
    if isinstance(v[0], str):
        for i, x in enumerate(v):
            if not isinstance(x, str):
                _fail(f"{path}[{i}]", "a string (vocab entries are all strings or all integers)",
                      f"{_tname(x)} {_short(x)}")
            _text(x, f"{path}[{i}]")
    else:
        v = [_int(x, f"{path}[{i}]", _I64_MIN, _I64_MAX) for i, x in enumerate(v)]
    seen = {}
    for i, x in enumerate(v):
        if x in seen:
            _fail(f"{path}[{i}]", f"a value not used before (it is {path}[{seen[x]}])", _short(x))
        seen[x] = i
    return tuple(v)


def _parse_sparse(d, path) -> _Sparse:
    kind = _kind(d, path, SPARSE_KINDS)
    common = ("source", "multi")
    if kind == "hash":
        _keys(d, path, ("name", "kind", "num_rows"), common + ("salt",))
    elif kind == "lookup":
        _keys(d, path, ("name", "kind", "vocab"), common + ("oov_row", "num_rows"))
    else:
        _keys(d, path, ("name", "kind", "boundaries"), common + ("num_rows",))
    name = _str(d["name"], path + ".name")
    source = _str(d.get("source", name), path + ".source")
    multi = d.get("multi", False)
    if not isinstance(multi, bool):
        _fail(path + ".multi", "true or false", f"{_tname(multi)} {_short(multi)}")
    if kind == "hash":
        rows = _int(d["num_rows"], path + ".num_rows", 1, _MAX_ROWS)
        salt = d.get("salt", name)
        if _is_int(salt):
            salt = int(salt)
            if not _I64_MIN <= salt <= _U64_MASK:
                _fail(path + ".salt", "a string or an integer in [-2**63, 2**64)", salt)
        elif not isinstance(salt, str):
            _fail(path + ".salt", "a string or an integer", f"{_tname(salt)} {_short(salt)}")
        else:
            _text(salt, path + ".salt")
        return _Sparse(name, source, kind, rows, multi, salt=salt, key=_hashing.salt_key(salt))
    if kind == "lookup":
        vocab = _parse_vocab(d["vocab"], path + ".vocab")
        oov = d.get("oov_row", len(vocab))
        if oov is not None:
            oov = _int(oov, path + ".oov_row", 0, _MAX_ROWS - 1)
        least = max(len(vocab), (oov + 1) if oov is not None else 0)
        rows = _int(d["num_rows"], path + ".num_rows", least, _MAX_ROWS) if "num_rows" in d else least
        if isinstance(vocab[0], str):
            return _Sparse(name, source, kind, rows, multi, vocab=vocab, oov_row=oov,
                           str_rows={s: k for k, s in enumerate(vocab)})
        arr = np.asarray(vocab, dtype=np.int64)
        order = np.argsort(arr, kind="stable")
        keys, key_rows = arr[order], order.astype(np.int64)
        keys.flags.writeable = False
        key_rows.flags.writeable = False
        return _Sparse(name, source, kind, rows, multi, vocab=vocab, oov_row=oov, keys=keys,
                       key_rows=key_rows)
    # bucketize
    if multi:
        _fail(path + ".multi", "false (bucketize features are single-valued)", multi)
    b = d["boundaries"]
    if not isinstance(b, list) or not b:
        _fail(path + ".boundaries", "a non-empty list of numbers", f"{_tname(b)} {_short(b)}")
    b = tuple(_num(x, f"{path}.boundaries[{i}]") for i, x in enumerate(b))
    for i in range(1, len(b)):
        if not b[i] > b[i - 1]:
            _fail(f"{path}.boundaries[{i}]", f"a number > {b[i - 1]} (strictly increasing)", b[i])
    rows = len(b) + 2
    if "num_rows" in d:
        _int(d["num_rows"], path + ".num_rows", rows, rows)
    bounds = np.asarray(b, dtype=np.float64)
    bounds.flags.writeable = False
    return _Sparse(name, source, kind, rows, boundaries=b, bounds=bounds)


# ---- input normalisation -----------------------------------------------------------------------


class _Column:
    """Where a batch's columns come from: a dict of columns or a list of per-record dicts."""

    def __init__(self, records, sources):
        if isinstance(records, Mapping):
            # torch tensor columns are read as the numpy arrays they hold (as the ops read them)
            self.cols = {k: as_numpy(v) if hasattr(v, "detach") else v for k, v in records.items()}
            self.rows = None
            n = None
            for s in sources:
                if s not in records:
                    raise ValueError(f"records has no column {s!r} (columns: {_short(list(records))})")
                c = self.cols[s]
                m = _col_len(c, s)
                if n is None:
                    n = m
                elif m != n:
                    raise ValueError(f"column {s!r} has {m} records, others have {n}")
            if n is None:  # nothing needed: any column gives the batch size
                n = 0
                if records:
                    s = next(iter(records))
                    n = _col_len(self.cols[s], s)
            self.n = n
        elif isinstance(records, (list, tuple)):
            for i, r in enumerate(records):
                if not isinstance(r, Mapping):
                    raise TypeError(f"records[{i}] is a {type(r).__name__}, expected a dict "
                                    "(records: a dict of columns or a list of per-record dicts)")
            self.cols = None
            self.rows = records
            self.n = len(records)
        else:
            raise TypeError("records must be a dict of columns or a list of per-record dicts, got "
                            f"{type(records).__name__}")

    def get(self, source):
        if self.cols is not None:
            return self.cols[source]
        return [r.get(source) for r in self.rows]


def _col_len(c, name) -> int:
    if isinstance(c, tuple) and len(c) == 2 and all(isinstance(a, np.ndarray) for a in c):
        return len(c[1]) - 1  # (values, offsets)
    if isinstance(c, np.ndarray):
        if c.ndim == 0:
            raise ValueError(f"column {name!r} is a scalar; expected one value per record")
        return c.shape[0]
    if isinstance(c, (str, bytes, bytearray, Mapping, AbstractSet)):
        # not a sequence of records: a str would be read as its characters, bytes as integer ids,
        # a dict as its keys, and a set in an order that changes from run to run
        raise TypeError(f"column {name!r} is a {type(c).__name__}; a column must be an array or a "
                        "list (one value per record)")
    try:
        return len(c)
    except TypeError:
        raise TypeError(f"column {name!r} is a {type(c).__name__}, expected an array or a list") from None


_PLAIN_NUMBERS = frozenset({int, float, type(None)})  # bool is excluded on purpose (checked below)


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and v != v)


def _floats(col, what: str, n: int) -> np.ndarray:
    """A 1-D float64 array (NaN for missing) from a numeric column."""
    if isinstance(col, np.ndarray) and col.dtype.kind in "biuf":
        x = col.astype(np.float64, copy=False)
    else:
        items = col.tolist() if isinstance(col, np.ndarray) else list(col)
        if all(type(v) in _PLAIN_NUMBERS for v in items):  # fast path: JSON-like numbers / None
            x = _float64(items)
            if x.shape != (n,):
                raise ValueError(f"{what}: expected {n} values (one number per record), got shape {x.shape}")
            return x
        for i, v in enumerate(items):
            if isinstance(v, (str, bytes)) or (v is not None and not isinstance(
                    v, (int, float, np.integer, np.floating, bool, np.bool_))):
                raise TypeError(f"{what}: record {i} is {type(v).__name__} {_short(v)}, expected a "
                                "number or None")
        x = _float64(items)
    if x.ndim != 1 or x.shape[0] != n:
        raise ValueError(f"{what}: expected {n} values (one number per record), got shape {x.shape}")
    return x


def _float64(items: list) -> np.ndarray:
    """float64 of a list of numbers and None (NaN); an int beyond float64's range (2**1024) is
    NaN too: missing, as a finite value beyond float32's range is."""
    try:
        return np.array(items, dtype=np.float64) if items else np.zeros(0, dtype=np.float64)
    except OverflowError:
        return np.array([_float_or_nan(v) for v in items], dtype=np.float64)


def _float_or_nan(v) -> float:
    try:
        return math.nan if v is None else float(v)
    except OverflowError:
        return math.nan


def _bag_values(col, f: _Sparse, n: int):
    """(values, lengths int64 (n,)): values a list of Python scalars or a 1-D NumPy array."""
    what = f"sparse feature {f.name!r}"
    if f.multi:
        if isinstance(col, tuple) and len(col) == 2 and all(isinstance(a, np.ndarray) for a in col):
            values, offsets = col
            if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) != n + 1:
                raise ValueError(f"{what}: offsets must be 1-D integers of length {n + 1}")
            if values.ndim != 1:
                raise ValueError(f"{what}: values must be 1-D, got shape {values.shape}")
            offsets = offsets.astype(np.int64)
            lengths = np.diff(offsets)
            if len(offsets) and (offsets[0] != 0 or offsets[-1] != len(values) or (lengths < 0).any()):
                raise ValueError(f"{what}: offsets must start at 0, not decrease and end at "
                                 f"len(values) = {len(values)}")
            return values, lengths
        if isinstance(col, np.ndarray) and col.ndim == 2 and col.dtype != object:
            return col.reshape(-1), np.full(col.shape[0], col.shape[1], dtype=np.int64)
        items = col.tolist() if isinstance(col, np.ndarray) else list(col)
        bags = []
        for v in items:
            if isinstance(v, np.ndarray) and v.ndim == 0:
                v = v.item()  # a 0-d array is its one value (its .tolist() is a scalar, not a bag)
            if _is_missing(v):
                bags.append(())
            elif isinstance(v, (list, tuple)):
                bags.append(v)
            elif isinstance(v, np.ndarray):
                if v.ndim != 1:
                    raise ValueError(f"{what}: a record's values must be 1-D, got an array of shape {v.shape}")
                bags.append(v.tolist())
            else:
                bags.append((v,))  # a single value: a bag of one
        lengths = np.fromiter((len(b) for b in bags), dtype=np.int64, count=len(bags))
        return list(itertools.chain.from_iterable(bags)), lengths
    if isinstance(col, np.ndarray) and col.dtype != object:
        if col.ndim != 1:
            raise ValueError(f"{what}: expected one value per record (1-D), got shape {col.shape}; "
                             "set \"multi\": true for several values per record")
        return col, np.ones(col.shape[0], dtype=np.int64)
    items = col.tolist() if isinstance(col, np.ndarray) else list(col)
    items = [v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v for v in items]  # (0-d: one value)
    if items and all(type(v) is int for v in items):  # fast path: plain int ids, none missing
        try:
            return np.array(items, dtype=np.int64), np.ones(len(items), dtype=np.int64)
        except OverflowError:  # ids beyond int64: the general path handles them
            pass
    present = [not _is_missing(v) for v in items]
    lengths = np.fromiter(present, dtype=np.int64, count=len(items))
    values = [v for v, p in zip(items, present) if p]
    for i, v in enumerate(values):
        if isinstance(v, (list, tuple, np.ndarray)):
            raise ValueError(f"{what}: a record holds a list {_short(v)}; set \"multi\": true for "
                             "several values per record")
    return values, lengths


def _classify(values, what):
    """("int", ints) | ("str", list of str/bytes) | ("empty", None) for a feature's values."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "iu":
            return "int", values
        if values.dtype.kind in "US":
            return "str", values.tolist()
        if values.dtype.kind == "O":
            values = values.tolist()
        else:
            raise TypeError(f"{what}: ids must be integers or strings, got {values.dtype}")
    if not values:
        return "empty", None
    first = values[0]
    mixed = "; one batch holds either integer ids or strings, not both"
    if isinstance(first, (str, bytes)):
        for i, v in enumerate(values):
            if not isinstance(v, (str, bytes)):
                raise TypeError(f"{what}: value {i} (counting the batch's values in record order) is "
                                f"{type(v).__name__} {_short(v)}, the first is a string{mixed}")
        return "str", values
    for i, v in enumerate(values):
        if not _is_int(v):
            why = f", the first is an integer id{mixed}" if isinstance(v, (str, bytes)) else \
                ", expected an integer id or a string"
            raise TypeError(f"{what}: value {i} (counting the batch's values in record order) is "
                            f"{type(v).__name__} {_short(v)}{why}")
    return "int", values  # a Python list of ints (converted by the caller: ranges differ)


def _hash_ints(values, f: _Sparse, numba: bool) -> np.ndarray:
    if not isinstance(values, np.ndarray):
        try:
            values = np.array(values, dtype=np.int64)
        except OverflowError:  # ids beyond int64: their value mod 2**64, as the hash defines
            # (int(v): a NumPy integer's & with a Python int beyond its dtype overflows)
            values = np.array([int(v) & _U64_MASK for v in values], dtype=np.uint64)
    return _fk.hash_rows(values.reshape(-1), f.num_rows, f.key, backend="numba" if numba else "numpy")


def _lookup_ints(values, f: _Sparse, numba: bool):
    """(rows, unmatched mask or None) of integer values in an int vocabulary."""
    bad = None
    if isinstance(values, np.ndarray):
        if values.dtype.kind == "u" and values.dtype.itemsize == 8:  # any byte order
            bad = values > np.uint64(_I64_MAX)
            ids = np.where(bad, np.uint64(0), values).astype(np.int64)
        else:
            ids = values.astype(np.int64, copy=False)
    else:
        try:
            ids = np.array(values, dtype=np.int64)
        except OverflowError:
            bad = np.array([not _I64_MIN <= v <= _I64_MAX for v in values], dtype=bool)
            ids = np.array([0 if b else v for v, b in zip(values, bad)], dtype=np.int64)
    oov = -1 if f.oov_row is None else f.oov_row
    rows = _fk.lookup(ids, f.keys, f.key_rows, oov, backend="numba" if numba else "numpy")
    if bad is not None and bad.any():
        rows[bad] = oov
    return rows


def _as_text(v, what: str, i: int) -> str:
    """A str / bytes value of a string feature as text (bytes decoded as UTF-8): ValueError
    for bytes that are not UTF-8 and for a str with no UTF-8 encoding (a lone surrogate)."""
    try:
        if isinstance(v, bytes):
            return v.decode("utf-8")
        v.encode("utf-8")
        return v
    except UnicodeError as e:
        raise ValueError(f"{what}: value {_short(v)} (position {i}) is not valid UTF-8 text "
                         f"({e.reason})") from None


def _lookup_strs(values, f: _Sparse, what: str) -> np.ndarray:
    """Rows of str / bytes values in a string vocabulary (-1 when not in it and oov_row is null)."""
    table = f.str_rows
    rows = [table.get(v, -1) for v in values]
    if -1 in rows:  # bytes, unknown values and invalid text (a scan in C: the common case is none)
        oov = -1 if f.oov_row is None else f.oov_row
        for i, r in enumerate(rows):
            if r < 0:
                v = values[i]
                if type(v) is str and v.isascii():  # unknown text (ASCII has a UTF-8 encoding)
                    rows[i] = oov
                else:
                    rows[i] = table.get(_as_text(v, what, i), oov)
    return np.array(rows, dtype=np.int64)


class Featurizer:
    """Raw records -> ``(dense float32 (B, n_dense), (indices int64, offsets int64))``.

    Build one from a spec (:meth:`from_spec`, the ``featurizer`` field of a model manifest) or
    from training data (:meth:`fit`); :meth:`to_spec` gives the JSON-serialisable spec back.
    Immutable once built and safe to share between threads; the Numba kernels release the GIL.

    Args:
        dense: the spec's ``dense`` list; sparse: its ``sparse`` list (see the module docstring).
        backend: "auto" (Numba kernels when Numba is installed, else NumPy), "numba" or "numpy";
            every backend gives identical results.
    """

    def __init__(self, dense=(), sparse=(), *, backend: str = "auto"):
        self._init({"version": SPEC_VERSION, "dense": list(dense), "sparse": list(sparse)}, "$",
                   backend)

    def _init(self, spec, path, backend):
        _fk.use_numba(backend)  # checks the name
        self.backend = backend
        if not isinstance(spec, dict):
            _fail(path, "an object", _tname(spec))
        _keys(spec, path, ("version",), ("dense", "sparse"))
        version = spec["version"]
        if not _is_int(version) or version < 1:
            _fail(path + ".version", "an integer >= 1", _short(version))
        if version > SPEC_VERSION:
            raise FeaturizerSpecError(
                f"featurizer spec: {path}.version: version {version} is newer than this fastrec "
                f"reads ({SPEC_VERSION}); upgrade fastrec")
        dense, sparse = spec.get("dense", []), spec.get("sparse", [])
        for key, v in (("dense", dense), ("sparse", sparse)):
            if not isinstance(v, list):
                _fail(f"{path}.{key}", "a list", _tname(v))
        self._dense = tuple(_parse_dense(d, f"{path}.dense[{i}]") for i, d in enumerate(dense))
        self._sparse = tuple(_parse_sparse(d, f"{path}.sparse[{i}]") for i, d in enumerate(sparse))
        seen = {}
        for group, feats in (("dense", self._dense), ("sparse", self._sparse)):
            for i, f in enumerate(feats):
                if f.name in seen:
                    _fail(f"{path}.{group}[{i}].name", f"a name not used before (used by {seen[f.name]})",
                          _short(f.name))
                seen[f.name] = f"{path}.{group}[{i}]"
        self._ops = np.array([_OPS[f.kind] for f in self._dense], dtype=np.int64)
        self._fill = np.array([f.fill for f in self._dense], dtype=np.float64)
        self._mean = np.array([f.mean for f in self._dense], dtype=np.float64)
        self._std = np.array([f.std for f in self._dense], dtype=np.float64)
        for a in (self._ops, self._fill, self._mean, self._std):
            a.flags.writeable = False
        self._sources = tuple(dict.fromkeys([f.source for f in self._dense + self._sparse]))

    # ---- spec --------------------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec, *, backend: str = "auto", path: str = "$") -> "Featurizer":
        """A Featurizer from a spec dict (e.g. ``json.load``-ed). FeaturizerSpecError (a
        ValueError) names the bad field's JSON path, prefixed by ``path`` (a manifest reader
        passes ``"$.featurizer"``)."""
        self = cls.__new__(cls)
        self._init(spec, path, backend)
        return self

    @classmethod
    def from_json(cls, text: str, *, backend: str = "auto") -> "Featurizer":
        try:
            spec = json.loads(text)
        except (ValueError, TypeError) as e:
            raise FeaturizerSpecError(f"featurizer spec: not valid JSON: {e}") from None
        except RecursionError:  # (a deeply nested document: no spec nests more than a few levels)
            raise FeaturizerSpecError("featurizer spec: JSON nested too deeply") from None
        return cls.from_spec(spec, backend=backend)

    def to_spec(self) -> dict:
        """The JSON-serialisable spec (every default written out)."""
        return {"version": SPEC_VERSION, "dense": [f.spec() for f in self._dense],
                "sparse": [f.spec() for f in self._sparse]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_spec(), **kwargs)

    def __eq__(self, other):
        return isinstance(other, Featurizer) and self.to_spec() == other.to_spec()

    def __repr__(self):
        return (f"Featurizer(dense={list(self.dense_names)}, sparse="
                f"{[f'{f.name}:{f.kind}[{f.num_rows}]' for f in self._sparse]})")

    # ---- shape -------------------------------------------------------------------------------

    @property
    def dense_names(self) -> tuple:
        return tuple(f.name for f in self._dense)

    @property
    def sparse_names(self) -> tuple:
        """The sparse features in KJT key order (the order of the manifest's sparse_features)."""
        return tuple(f.name for f in self._sparse)

    @property
    def num_dense(self) -> int:
        return len(self._dense)

    @property
    def num_rows(self) -> dict:
        """``{sparse feature name: rows of its table}``; every row it emits is below this."""
        return {f.name: f.num_rows for f in self._sparse}

    @property
    def sources(self) -> tuple:
        """The input columns / record keys :meth:`transform` reads."""
        return self._sources

    # ---- transform ---------------------------------------------------------------------------

    def warmup(self) -> None:
        """Runs small batches through :meth:`transform` so that the first real request does not
        pay for compiling or loading the Numba kernels (0.2-1 s in a fresh process, more without
        a writable cache): integer and string ids for hash features, each lookup vocabulary's
        type, numbers for dense and bucketize features. :meth:`fastrec.Model.warmup` calls it."""
        numba = _fk.use_numba(self.backend)
        _fk.dense_transform(np.ones((2, len(self._dense))), self._ops, self._fill, self._mean, self._std,
                            backend="numba" if numba else "numpy")  # (as transform: also with no dense features)
        for f in self._sparse:  # one feature at a time: a source may feed features of other kinds
            if f.kind == "bucketize":
                values = [1.0]
            elif f.kind == "hash":
                values = [1, "a"]
            else:
                values = [f.vocab[0] if f.vocab else 0]
            for v in values:
                self._sparse_rows(f, [[v, v] if f.multi else v] * 2, 2, numba, {})

    def transform(self, records, *, backend: str | None = None):
        """Featurize a batch.

        Args:
            records: a dict of columns ``{source: column}`` (a column is a NumPy array, a list,
                or for multi-valued features a list of lists, a 2-D array of fixed-size bags or
                a ``(values, offsets)`` pair of arrays), or a list of per-record dicts (absent
                keys are missing values).
            backend: overrides the Featurizer's backend for this call.

        Returns:
            ``(dense, (indices, offsets))``: dense float32 ``(B, n_dense)``; indices int64;
            offsets int64 of length ``T * B + 1``, table-major (all bags of sparse feature 0,
            then feature 1, ...).

        Raises:
            TypeError: a record / column of the wrong type (e.g. floats for a hash feature, or a
            str, bytes, dict or set as a column).
            ValueError: a missing column, columns of different lengths, bad offsets, a string
            value that is not valid UTF-8 text, or a value not in the vocabulary of a lookup
            feature with ``"oov_row": null``.
        """
        backend = self.backend if backend is None else backend
        numba = _fk.use_numba(backend)
        be = "numba" if numba else "numpy"
        cols = _Column(records, self._sources)
        n = cols.n
        x = np.empty((n, len(self._dense)), dtype=np.float64)
        cache = {}
        for j, f in enumerate(self._dense):
            if f.source not in cache:
                cache[f.source] = _floats(cols.get(f.source), f"dense feature {f.name!r}", n)
            x[:, j] = cache[f.source]
        dense = _fk.dense_transform(x, self._ops, self._fill, self._mean, self._std, backend=be)
        rows, lengths = [], []
        for f in self._sparse:
            r, ln = self._sparse_rows(f, cols.get(f.source), n, numba, cache)
            rows.append(r)
            lengths.append(ln)
        offsets = np.zeros(len(self._sparse) * n + 1, dtype=np.int64)
        if lengths:
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
        indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return dense, (indices.astype(np.int64, copy=False), offsets)

    def _sparse_rows(self, f: _Sparse, col, n, numba, cache):
        what = f"sparse feature {f.name!r}"
        if f.kind == "bucketize":
            x = cache.get(f.source)
            if x is None:
                x = cache[f.source] = _floats(col, what, n)
            rows = _fk.bucketize(x, f.bounds, f.num_rows - 1, backend="numba" if numba else "numpy")
            return rows, np.ones(n, dtype=np.int64)
        values, lengths = _bag_values(col, f, n)
        if lengths.shape[0] != n:
            raise ValueError(f"{what}: expected {n} records, got {lengths.shape[0]}")
        kind, values = _classify(values, what)
        if kind == "empty":
            return np.zeros(0, dtype=np.int64), lengths
        if f.kind == "hash":
            if kind == "int":
                return _hash_ints(values, f, numba), lengths
            fn = _hashing.hash_strings_numba if numba else _hashing.hash_strings_ref
            try:
                return fn(values, f.num_rows, f.salt).reshape(-1), lengths
            except ValueError:  # a str with no UTF-8 encoding (bytes are hashed as they are)
                for i, v in enumerate(values):
                    if isinstance(v, str):
                        _as_text(v, what, i)  # the same error as a lookup feature's
                raise
        # lookup
        str_vocab = f.str_rows is not None
        if (kind == "str") != str_vocab:
            raise TypeError(f"{what}: the vocabulary holds {'strings' if str_vocab else 'integers'}, "
                            f"the records hold {'strings' if kind == 'str' else 'integers'}")
        if str_vocab:
            rows = _lookup_strs(values, f, what)
        else:
            rows = _lookup_ints(values, f, numba)
        if f.oov_row is None and rows.size and (rows < 0).any():
            i = int(np.argmax(rows < 0))
            v = values[i]
            raise ValueError(f"{what}: value {_short(v.item() if hasattr(v, 'item') else v)} "
                             f"(position {i}) is not in the vocabulary (its oov_row is null)")
        return rows, lengths

    # ---- fit ---------------------------------------------------------------------------------

    @classmethod
    def fit(cls, records, *, dense=None, sparse=None, num_buckets: int = 10, min_count: int = 1,
            max_vocab: int | None = None, backend: str = "auto") -> "Featurizer":
        """Build a Featurizer from training data.

        ``dense`` / ``sparse``: ``{name: kind}`` or ``{name: partial spec dict}`` (or a list of
        partial spec dicts with a ``name``), in output order. What is not given is fitted:

        * ``standardize``: mean and std of the observed (finite) values (std 1 when constant);
        * ``lookup``: the vocabulary, values seen at least ``min_count`` times, most frequent
          first (hot rows together), at most ``max_vocab`` of them (both ints >= 1;
          ``max_vocab=None``: no limit; ints outside int64 are left out, as transform maps them
          to the oov row); oov_row ``len(vocab)``;
        * ``bucketize``: boundaries at the ``1/k .. (k-1)/k`` quantiles of the observed values
          (``k = num_buckets``, duplicates dropped);
        * ``hash``: nothing to fit; ``num_rows`` must be given.

        Per-feature ``num_buckets`` / ``min_count`` / ``max_vocab`` in a partial spec override
        the arguments. The result goes through the same checks as :meth:`from_spec`.
        """
        dense_in = _fit_items(dense, "dense")
        sparse_in = _fit_items(sparse, "sparse")
        sources = [d.get("source", d.get("name")) for d in dense_in + sparse_in]
        cols = _Column(records, [s for s in sources if isinstance(s, str)])
        n = cols.n
        dense_out, sparse_out = [], []
        for d in dense_in:
            d = dict(d)
            if d.get("kind") == "standardize" and ("mean" not in d or "std" not in d):
                x = _floats(cols.get(d.get("source", d["name"])), f"dense feature {d['name']!r}", n)
                x = x[np.isfinite(x)]
                mean, std = _scaled(x, lambda v: (float(v.mean()), float(v.std()))) if x.size else (0.0, 0.0)
                d.setdefault("mean", mean)
                d.setdefault("std", std if std > 0 and math.isfinite(std) else 1.0)
            dense_out.append(d)
        for d in sparse_in:
            d = dict(d)
            k_buckets = d.pop("num_buckets", num_buckets)
            k_min = d.pop("min_count", min_count)
            k_max = d.pop("max_vocab", max_vocab)
            src = d.get("source", d.get("name"))
            kind = d.get("kind")
            if kind == "lookup" and "vocab" not in d:
                what = f"sparse feature {d.get('name')!r}"
                k_min = _int(k_min, f"min_count of {d.get('name')!r}", 1)
                if k_max is not None:
                    k_max = _int(k_max, f"max_vocab of {d.get('name')!r}", 1)
                probe = _Sparse(str(d.get("name")), src, "lookup", 1, bool(d.get("multi", False)))
                values, _ = _bag_values(cols.get(src), probe, n)
                t, values = _classify(values, what)
                if t == "empty":
                    raise ValueError(f"{what}: no values to build a vocabulary from")
                if t == "str":
                    values = [_as_text(v, what, i) for i, v in enumerate(values)]
                elif isinstance(values, np.ndarray):
                    values = values.tolist()
                counts = Counter(values)
                # (an int outside int64 is no vocabulary key: transform maps it to oov_row)
                vocab = [v for v, c in counts.items()
                         if c >= k_min and (t == "str" or -(2**63) <= v < 2**63)]
                if not vocab:
                    raise ValueError(f"{what}: no value occurs at least min_count={k_min} times, so the "
                                     "vocabulary would be empty (lower min_count; ints outside int64 "
                                     "are never keys)")
                vocab.sort(key=lambda v: (-counts[v], v))
                if k_max is not None:
                    vocab = vocab[:k_max]
                d["vocab"] = vocab
            elif kind == "bucketize" and "boundaries" not in d:
                x = _floats(cols.get(src), f"sparse feature {d.get('name')!r}", n)
                x = x[np.isfinite(x)]
                if not x.size:
                    raise ValueError(f"sparse feature {d.get('name')!r}: no finite values to "
                                     "place bucket boundaries")
                k = _int(k_buckets, f"num_buckets of {d.get('name')!r}", 2)
                q = np.unique(_scaled(x, lambda v: np.quantile(v, np.arange(1, k) / k)))
                d["boundaries"] = [float(v) for v in q] if q.size else [float(x[0])]
            sparse_out.append(d)
        return cls.from_spec({"version": SPEC_VERSION, "dense": dense_out, "sparse": sparse_out},
                             backend=backend)


def _scaled(x: np.ndarray, stat):
    """``stat(x)`` (a float, an array or a tuple of floats), computed on x scaled down by a power
    of two (exact) when it overflows on x itself: the mean, std and quantile interpolation of
    finite values near float64's limit (~1.8e308) overflow to inf, though the results are finite."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = stat(x)
    if np.all(np.isfinite(out)):
        return out
    scale = math.ldexp(1.0, math.frexp(max(float(x.max()), -float(x.min())))[1] - 4)  # |x / scale| < 16
    scaled = stat(x / scale)
    return tuple(v * scale for v in scaled) if isinstance(scaled, tuple) else scaled * scale


def _fit_items(items, group):
    if items is None:
        return []
    out = []
    if isinstance(items, Mapping):
        for name, v in items.items():
            if isinstance(v, str):
                out.append({"name": name, "kind": v})
            elif isinstance(v, Mapping):
                out.append({"name": name, **v})
            else:
                raise TypeError(f"{group}[{name!r}] must be a kind string or a spec dict, got "
                                f"{type(v).__name__}")
        return out
    for i, v in enumerate(items):
        if not isinstance(v, Mapping) or "name" not in v:
            raise TypeError(f"{group}[{i}] must be a spec dict with a 'name'")
        out.append(dict(v))
    return out
