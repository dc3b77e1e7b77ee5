"""The model runtime: load a model directory (docs/FORMAT.md) and serve it with no torch.

    model = fastrec.load("ctr_model/")
    p = model.score(dense, {"C1": (ids, offsets), ...})        # kind "dlrm": probabilities (B,)
    scores, items = model.recommend({"user_id": (ids, offsets)}, k=10)   # kind "two_tower"
    p = model.score_raw([{"I1": 3, "C1": 123456789, ...}, ...])   # with the model's featurizer
    scores, items = model.recommend_raw([{"user_id": 17, "age": 34}], k=10)

Everything a call needs is built once at load and never changed afterwards, so one Model can
serve many threads at once. Tables and fp32 weights are views of the memory-mapped safetensors
file (worker processes share one copy in the page cache); fp16 MLP weights are upcast to
float32 once at load; int8 MLPs are packed once into :class:`fastrec.Int8MLP`.

``fastrec.load(path, device="cuda")`` puts the model on a GPU at load and runs every call there
(fastrec/_cuda_model.py): results are device arrays of the model's framework (torch or CuPy).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from . import _C, ops
from ._arrays import cache_line_aligned, float_input
from .index import ItemIndex
from .io import ModelFormatError, featurizer_from_manifest, read_model
from .linear import Int8Linear, Int8MLP
from .tables import QuantizedTable

__all__ = ["Model", "TableInfo", "load"]


def load(path, *, num_threads=None, device="cpu", framework=None) -> "Model":
    """Loads a model directory written by ``fastrec.torch.export`` / :func:`fastrec.io.write_model`.

    ``num_threads``: if given, calls :func:`fastrec.set_num_threads` (process-wide).
    ``device``: "cpu" (default), "cuda" (the framework's current GPU), "cuda:N" or a
    ``torch.device``. On a GPU the tables, MLP weights and item index are copied there once,
    here, and :meth:`Model.score` / :meth:`Model.user_vectors` / :meth:`Model.recommend` run
    there on the current stream, take device or host arrays, and return device arrays of
    ``framework``: "torch" (CUDA tensors) or "cupy"; default torch when it sees a GPU, else CuPy.
    Raises :class:`fastrec.ModelFormatError` for anything wrong with the directory, and
    RuntimeError when a GPU device is asked for but cannot be used (no CUDA module in this
    build, no GPU, neither framework).
    """
    if num_threads is not None:
        from ._config import set_num_threads

        set_num_threads(num_threads)
    manifest, tensors = read_model(path)
    return Model(manifest, tensors, path=os.fspath(path), device=device, framework=framework, _validated=True)


def _restore_model(cls, manifest: dict, tensors: dict, path, device, framework) -> "Model":
    # Unpickled arrays start wherever the allocator put them; tables read from model files
    # start on 64-byte boundaries (docs/FORMAT.md), which the fp32 / fp16 gathers rely on for speed.
    tensors = {name: cache_line_aligned(a) for name, a in tensors.items()}
    return cls(manifest, tensors, path=path, device=device, framework=framework, _validated=True)


@dataclass(frozen=True)
class TableInfo:
    """One embedding table: ``name``, ``rows``, ``dim``, ``storage`` ("fp32" | "fp16" | "q8" |
    "q4"), ``pooling`` ("sum" | "mean" | "max") and ``nbytes`` (bytes of its rows)."""

    name: str
    rows: int
    dim: int
    storage: str
    pooling: str
    nbytes: int


# ---- MLPs ---------------------------------------------------------------------------------

def _sigmoid(x: np.ndarray) -> np.ndarray:
    # e = exp(-|x|) never overflows, and e / (1 + e) keeps small probabilities accurate in
    # relative terms (0.5 * (1 + tanh(x / 2)) loses them: 2.4e-5 relative at p ~ 1e-3)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def _affine_relu(x: np.ndarray, W: np.ndarray, b, act: str) -> np.ndarray:
    """``x @ W.T + b``, then the ReLU if ``act`` is one (other activations are the caller's)."""
    x = x @ W.T
    if b is not None:
        x += b
    if act == "relu":
        np.maximum(x, 0, out=x)
    return x


class _FloatMLP:
    """float32 numpy layers: ``x @ W.T + b`` then the activation (W a view of the file for
    fp32, an upcast copy for fp16). A layer whose output overflows float32 raises ValueError
    naming it, as the int8 MLPs do (it used to become NaN, or a probability of exactly 1)."""

    def __init__(self, layers, name: str):
        self.layers = tuple(layers)  # (W float32 (out, in), b float32 (out,) or None, activation)
        self.name = name             # "bottom", "top", "user tower", "item tower"

    def __call__(self, x: np.ndarray, *, check: bool = True) -> np.ndarray:
        """The layers on x. ``check``: raise ValueError when float32 overflowed (one check of the
        last layer's output, before a sigmoid, after a ReLU: +inf and NaN from any layer reach it,
        and a ReLU turns -inf into 0, as it would the true value). A DLRM checks only its top
        MLP, whose input carries the bottom MLP's overflow, and then asks :meth:`locate`."""
        x0, last = x, len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = _affine_relu(x, *layer)
            if check and i == last and not math.isfinite(float(x.sum())):  # (finite sum: all finite)
                self.locate(x0)
            if layer[2] == "sigmoid":
                x = _sigmoid(x)
        return x

    def locate(self, x: np.ndarray) -> None:
        """Runs the layers again on x; raises ValueError naming the first whose output holds NaN
        or Inf after its ReLU (before any other activation). Returns when there is none."""
        with np.errstate(over="ignore", invalid="ignore"):
            for i, layer in enumerate(self.layers):
                x = _affine_relu(x, *layer)
                bad = ~np.isfinite(x)
                if bad.any():
                    raise ValueError(f"the output of layer {i} of the {self.name} MLP holds NaN or Inf (row "
                                     f"{int(np.argwhere(bad)[0, 0])}): float32 overflowed in this layer or before "
                                     "it (the model's inputs, weights or tables are too large for float32)")
        # (a sum that overflowed though every value is finite: nothing to report)

    @property
    def nbytes(self) -> int:
        return sum(W.nbytes + (0 if b is None else b.nbytes) for W, b, _ in self.layers)


class _Int8MLPRunner:
    def __init__(self, mlp: Int8MLP):
        self.mlp = mlp

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.mlp(np.ascontiguousarray(x, dtype=np.float32))

    @property
    def nbytes(self) -> int:
        return sum(lin.weight_int8.nbytes + lin.weight_scale.nbytes + (0 if lin.bias is None else lin.bias.nbytes)
                   for lin in self.mlp.layers)


def _identity(x):
    return x


def _build_mlp(layers, precision: str, tensors: dict, name: str):
    if not layers:
        return _identity
    acts = [layer["activation"] for layer in layers]
    if precision == "int8":
        lins = []
        for layer in layers:
            bias = tensors[layer["bias"]] if layer.get("bias") is not None else None
            lins.append(Int8Linear.from_int8(tensors[layer["weight"]], tensors[layer["weight_scale"]], bias))
        return _Int8MLPRunner(Int8MLP(lins, [None if a == "none" else a for a in acts]))
    out = []
    for layer, act in zip(layers, acts):
        W = tensors[layer["weight"]]
        if W.dtype != np.float32:
            W = W.astype(np.float32)  # fp16: upcast once
        b = tensors[layer["bias"]] if layer.get("bias") is not None else None
        out.append((W, b, act))
    return _FloatMLP(out, name)


def _mlp_nbytes(mlp) -> int:
    return 0 if mlp is _identity else mlp.nbytes



# ---- sparse input -------------------------------------------------------------------------

_I64, _I32 = np.dtype(np.int64), np.dtype(np.int32)


def _int_1d(x, what: str) -> np.ndarray:
    if not (type(x) is np.ndarray and (x.dtype is _I64 or x.dtype is _I32)):  # (the common case: as is)
        x = ops._index_array(x, what)  # int32 / int64 (byte-swapped ones converted), else TypeError
    if x.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {x.shape}")
    return x


def _host_ids(x, what: str):
    a = _int_1d(x, what)
    return a, a.shape[0]


def _sparse_name(feature, part: str) -> str:
    """How errors name one array of a request: ``sparse['C1'] indices`` (dict), ``sparse offsets`` (pair)."""
    return f"sparse {part}" if feature is None else f"sparse[{feature!r}] {part}"


def _host_part(x, feature, part: str):
    return _host_ids(x, _sparse_name(feature, part))


_KERNEL_INDEX_ERROR = re.compile(r"index (-?\d+) at position (\d+) \(table (\d+), bag (\d+)\) is out of range \[0, (\d+)\)")


def _offsets_message(feature, indices) -> str:
    return (f"sparse[{feature!r}] offsets must start at 0, be non-decreasing and end at "
            f"len(indices) = {np.shape(indices)[0]}")


class _Group:
    """The features one call pools (all of a DLRM's, or one tower's) in sparse_features order,
    with their tables, modes and, for a tower, the column order of its concat."""

    def __init__(self, features, tables, modes, table_names, dims, tower_order=None):
        self.features = tuple(features)
        self.tables = tuple(tables)
        self.modes = tuple(modes)
        self.table_names = tuple(table_names)
        self.dims = tuple(dims)
        self.width = int(sum(dims))
        self.position = {f: i for i, f in enumerate(self.features)}
        self.columns = None  # None: the kernel's column order is already the concat order
        if tower_order is not None and tuple(tower_order) != self.features:
            starts = np.concatenate([[0], np.cumsum(dims)]).astype(np.int64)
            self.columns = np.concatenate([np.arange(starts[self.position[f]], starts[self.position[f] + 1])
                                           for f in tower_order])

    def split(self, sparse, B: int | None, ids=None):
        """The checks of a request that read no id: ``(pair, parts, B)``, where ``pair`` is the
        table-major ``(indices, offsets)`` (None for a dict) and ``parts`` a dict's
        ``[(indices, offsets, number of ids)]`` in this group's order (None for a pair).
        ``ids(x, feature, part) -> (array, length)`` checks one array (default: host int32/int64
        1-D), naming it ``_sparse_name(feature, part)`` in errors (built only then: a dict of 26
        features would format 52 names per request)."""
        ids = ids or _host_part
        T = len(self.features)
        if isinstance(sparse, dict):
            unknown = [k for k in sparse if k not in self.position]
            if unknown:
                raise ValueError(f"unknown sparse feature {unknown[0]!r}; this call takes {list(self.features)}")
            missing = [f for f in self.features if f not in sparse]
            if missing:
                raise ValueError(f"missing sparse feature(s) {missing}; this call takes {list(self.features)}")
            parts = []
            for f in self.features:
                pair = sparse[f]
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise TypeError(f"sparse[{f!r}] must be a pair (indices, offsets)")
                ind, n = ids(pair[0], f, "indices")
                off, nb = ids(pair[1], f, "offsets")
                nb -= 1
                if nb < 0:
                    raise ValueError(f"sparse[{f!r}] offsets must have length B + 1 >= 1, got an empty array")
                if B is None:
                    B = nb
                elif nb != B:
                    raise ValueError(f"sparse[{f!r}] has {nb} bags, expected {B} (the batch size)")
                parts.append((ind, off, n))
            return None, parts, B
        if isinstance(sparse, (tuple, list)) and len(sparse) == 2:
            indices, _ = ids(sparse[0], None, "indices")
            offsets, n = ids(sparse[1], None, "offsets")
            if n < 1 or (n - 1) % T:
                raise ValueError(f"sparse offsets must have length T*B + 1 with T={T} features "
                                 f"{list(self.features)}, got length {n}")
            if B is not None and (n - 1) // T != B:
                raise ValueError(f"sparse offsets hold {(n - 1) // T} bags per feature, expected {B} (the batch size)")
            return (indices, offsets), None, (n - 1) // T
        raise TypeError("sparse must be a dict {feature: (indices, offsets)} or one table-major pair "
                        f"(indices, offsets), got {type(sparse).__name__}")

    def pack(self, sparse, B: int | None):
        """(indices, offsets, B, starts): one table-major CSR pair for this group; ``starts`` gives,
        for dict input, where each feature's ids begin in ``indices`` (for error messages)."""
        if type(sparse) is dict and len(sparse) == len(self.features):
            # The common dict request (numpy int arrays, consistent offsets) in one C++ call: a
            # 10-feature batch-1 request spent ~20 us here in Python. Anything else returns None
            # and takes the Python path below, which finds and words the problem.
            try:
                pairs = [sparse[f] for f in self.features]
            except KeyError:
                pairs = None
            if pairs is not None:
                packed = _C.pack_bags(pairs, -1 if B is None else B)
                if packed is not None:
                    return packed
        pair, parts, B = self.split(sparse, B)
        if pair is not None:
            return pair[0], pair[1], B, None
        T = len(self.features)
        idx_parts, off_parts, starts = [], [], []
        base = 0
        for f, (ind, off, n) in zip(self.features, parts):
            if off[0] != 0 or off[B] != n:
                raise ValueError(_offsets_message(f, ind))
            # non-decreasing: checked by the kernel on the combined offsets (see pool)
            starts.append(base)
            idx_parts.append(ind)
            off_parts.append(off[:-1])
            base += n
        indices = np.concatenate(idx_parts).astype(np.int64, copy=False) if T > 1 else idx_parts[0]
        off_parts.append(np.array([base], dtype=np.int64))
        offsets = np.concatenate(off_parts).astype(np.int64, copy=False)
        if T > 1 and B:
            offsets[:-1] += np.repeat(np.array(starts, dtype=np.int64), B)
        return indices, offsets, B, starts

    def pool(self, sparse, B: int | None = None):
        """(pooled float32 (B, width) in this group's concat order, B)."""
        out, B = self.run(sparse, B, lambda indices, offsets: ops.embedding_bags(
            list(self.tables), indices, offsets, modes=list(self.modes)))
        if self.columns is not None:
            out = out[:, self.columns]
        return out, B

    def run(self, sparse, B, fn):
        """``(fn(indices, offsets), B)`` on this group's table-major CSR pair, with the kernels'
        id and offsets errors reworded to name the sparse feature."""
        indices, offsets, B, starts = self.pack(sparse, B)
        try:
            return fn(indices, offsets), B
        except IndexError as exc:
            raise IndexError(self._index_message(str(exc), starts)) from None
        except ValueError as exc:
            if starts is not None and "offsets" in str(exc):  # name the feature whose offsets decrease
                for f in self.features:
                    off = np.asarray(sparse[f][1])
                    if np.any(off[1:] < off[:-1]):
                        raise ValueError(_offsets_message(f, sparse[f][0])) from None
            raise

    def _index_message(self, msg: str, starts) -> str:
        m = _KERNEL_INDEX_ERROR.search(msg)
        if not m:
            return msg
        value, pos, t, bag, rows = (int(g) for g in m.groups())
        where = f"position {pos - starts[t]} of its indices" if starts is not None else f"position {pos}"
        return (f"sparse feature {self.features[t]!r} (table {self.table_names[t]!r}): id {value} at {where} "
                f"(bag {bag}) is out of range [0, {rows})")


# ---- the model ----------------------------------------------------------------------------

class Model:
    """A loaded model (see :func:`load`). Immutable after load; safe to call from many threads.

    Properties: ``kind`` ("dlrm" | "two_tower"), ``precision`` (MLP precision), ``features``
    (sparse feature names, the table-major order of a single ``(indices, offsets)`` pair),
    ``tables`` (:class:`TableInfo` tuple), ``dense_features``, ``nbytes``, ``manifest``, ``path``,
    ``device`` ("cpu" | "cuda:N") and ``framework`` (None | "torch" | "cupy").
    """

    def __init__(self, manifest: dict, tensors: dict, *, path: str | None = None, device="cpu", framework=None,
                 _validated: bool = False):
        """Builds a model from a manifest and its tensors (normally through :func:`load`, which
        reads them memory-mapped); the manifest is validated unless it came from ``read_model``.
        The arrays are used as given, without a copy: do not modify them afterwards.
        ``device`` / ``framework``: as for :func:`load`."""
        cuda = None
        if not (isinstance(device, str) and device == "cpu" and framework is None):
            from . import _cuda_model

            cuda = _cuda_model.target(device, framework)  # None for a CPU device; raises if CUDA is unusable
        if not _validated:
            from .io import validate_manifest

            validate_manifest(manifest, tensors)
        self._manifest = manifest
        self._tensors = dict(tensors)  # for pickling (the arrays themselves are used as given: no copy)
        self._path = path
        self._kind = manifest["kind"]
        self._precision = manifest["precision"]
        mfile = os.path.join(path, "manifest.json") if path else "manifest.json"

        tables, infos, table_data = {}, [], []
        for t in manifest["tables"]:
            arr = tensors[t["tensor"]]
            storage = t["storage"]
            if storage in ("q8", "q4"):
                table = QuantizedTable.from_fbgemm(arr, 8 if storage == "q8" else 4, dim=t["dim"])
            else:
                table = arr
            tables[t["name"]] = (table, t)
            table_data.append(arr)
            infos.append(TableInfo(t["name"], t["rows"], t["dim"], storage, t["pooling"], int(arr.nbytes)))
        self._tables = tuple(infos)
        self._table_data = tuple(table_data)
        self._feature_table = {f["name"]: f["table"] for f in manifest["sparse_features"]}
        self._features = tuple(f["name"] for f in manifest["sparse_features"])

        def group(names, tower_order=None):
            wanted = set(names)  # (a set per feature made loading quadratic in the feature count)
            ordered = [f for f in self._features if f in wanted]
            ts = [tables[self._feature_table[f]] for f in ordered]
            return _Group(ordered, [x[0] for x in ts], [x[1]["pooling"] for x in ts],
                          [x[1]["name"] for x in ts], [x[1]["dim"] for x in ts], tower_order)

        if self._kind == "dlrm":
            d = manifest["dlrm"]
            self._dense = int(manifest["dense_features"])
            self._group = group(self._features)
            self._bottom = _build_mlp(d["bottom_mlp"], self._precision, tensors, "bottom")
            self._top = _build_mlp(d["top_mlp"], self._precision, tensors, "top")
            # The interaction (C++ dot_interaction; the GPU path in _cuda_model.py) takes the pairs
            # (i, j), i > j, row-major over the strictly lower triangle, as docs/FORMAT.md states
            # (the original DLRM's order; TorchRec's InteractionArch uses the upper triangle).
            self._D = self._group.dims[0]
            self._index = None
            self._fused = self._fused_forward()
        else:
            tt = manifest["two_tower"]
            self._dense = None
            self._user = group(tt["user"]["features"], tt["user"]["features"])
            self._item = group(tt["item"]["features"], tt["item"]["features"])
            self._user_mlp = _build_mlp(tt["user"]["mlp"], self._precision, tensors, "user tower")
            self._item_mlp = _build_mlp(tt["item"]["mlp"], self._precision, tensors, "item tower")
            self._user_norm = bool(tt["user"]["normalize"])
            self._item_norm = bool(tt["item"]["normalize"])
            idx = tt["index"]
            try:
                self._index = ItemIndex(tensors[idx["items"]], ids=tensors[idx["ids"]], precision=idx["precision"],
                                        rerank=idx["rerank"])
            except (TypeError, ValueError) as exc:
                raise ModelFormatError(mfile, "$.two_tower.index", "an item catalogue ItemIndex accepts",
                                       str(exc)) from None
        self._featurizer = featurizer_from_manifest(manifest, manifest_file=mfile)
        self._cuda = None if cuda is None else _cuda_model.CudaModel(self, *cuda)

    def __reduce__(self):
        """Pickling (``copy.deepcopy``, multiprocessing, Ray's object store) carries the manifest
        and every tensor by value: a copy of all the weights, where :func:`load` in each process
        shares one memory-mapped copy. The copy is rebuilt on the same device; a two-tower
        model's catalogue is carried as it is now (after any ``model.index.add`` / ``remove``)."""
        tensors = dict(self._tensors)
        if self._index is not None:  # the catalogue as it is now, after any add / remove
            idx = self._manifest["two_tower"]["index"]
            tensors[idx["items"]], tensors[idx["ids"]] = self._index._live_rows()
        return (_restore_model, (type(self), self._manifest, tensors, self._path, self.device, self.framework))

    # ---- properties ------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self._kind

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def features(self) -> tuple:
        return self._features

    @property
    def tables(self) -> tuple:
        return self._tables

    @property
    def dense_features(self) -> int | None:
        return self._dense

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def device(self) -> str:
        """"cpu", or "cuda:N" for a model on a GPU (see :func:`load`)."""
        return "cpu" if self._cuda is None else self._cuda.device

    @property
    def framework(self) -> str | None:
        """The framework of a GPU model's arrays ("torch" | "cupy"); None on the CPU."""
        return None if self._cuda is None else self._cuda.framework

    @property
    def manifest(self) -> dict:
        """A copy of the manifest (JSON types)."""
        import copy

        return copy.deepcopy(self._manifest)

    @property
    def featurizer(self):
        """The model's :class:`fastrec.Featurizer` (the manifest's ``featurizer``), or None.
        For a DLRM it makes :meth:`score`'s whole input; for a two-tower model the user
        tower's sparse input (see :meth:`score_raw`, :meth:`recommend_raw`)."""
        return self._featurizer

    @property
    def index(self) -> ItemIndex | None:
        """The item catalogue (two_tower), or None."""
        return self._index

    @property
    def user_features(self) -> tuple:
        """The user tower's features in the order of a table-major pair (two_tower)."""
        self._need("two_tower", "user_features")
        return self._user.features

    @property
    def item_features(self) -> tuple:
        self._need("two_tower", "item_features")
        return self._item.features

    @property
    def nbytes(self) -> int:
        """Bytes of tables, MLP weights and (two_tower) the item index."""
        n = sum(t.nbytes for t in self._tables)
        if self._kind == "dlrm":
            return n + _mlp_nbytes(self._bottom) + _mlp_nbytes(self._top)
        return n + _mlp_nbytes(self._user_mlp) + _mlp_nbytes(self._item_mlp) + self._index.nbytes

    def __repr__(self) -> str:
        storages = sorted({t.storage for t in self._tables})
        extra = (f"dense_features={self._dense}" if self._kind == "dlrm"
                 else f"items={len(self._index)}, dim={self._index.dim}")
        dev = "" if self._cuda is None else f", device={self.device!r}, framework={self.framework!r}"
        return (f"Model(kind={self._kind!r}, precision={self._precision!r}, features={len(self._features)}, "
                f"tables={len(self._tables)} ({'/'.join(storages)}), {extra}, nbytes={self.nbytes}, "
                f"path={self._path!r}{dev})")

    def _fused_forward(self):
        """``_C.dlrm_forward``'s arguments after the ids (mode codes, padding ids, bottom and top
        layers with their activation codes); None where this model does not fit the fused
        forward (fp32/fp16 MLPs, tables of different dims)."""
        b, t, g = self._bottom, self._top, self._group
        if not (isinstance(b, _Int8MLPRunner) and isinstance(t, _Int8MLPRunner)):
            return None
        if g.columns is not None or len(set(g.dims)) != 1 or b.mlp.out_features != self._D or t.mlp.out_features != 1:
            return None
        modes = [ops._mode_code(m) for m in g.modes]
        return modes, [-1] * len(g.tables), b.mlp._cores, b.mlp._codes, t.mlp._cores, t.mlp._codes

    def _need(self, kind: str, method: str) -> None:
        if self._kind != kind:
            other = "score()" if self._kind == "dlrm" else "recommend() / user_vectors()"
            raise TypeError(f"{method} needs a {kind!r} model; this model is {self._kind!r} (use {other})")

    # ---- dlrm ------------------------------------------------------------------------------
    def score(self, dense, sparse) -> np.ndarray:
        """Click probabilities of a DLRM: float32 ``(B,)``.

        Args:
            dense: float32 ``(B, dense_features)``.
            sparse: ``{feature: (indices, offsets)}`` with every feature of :attr:`features`,
                each CSR offsets of length ``B + 1``; or one table-major ``(indices, offsets)``
                pair in :attr:`features` order (offsets of length ``T*B + 1``, TorchRec's
                KeyedJaggedTensor layout).

        On the CPU, an int8 model runs the whole forward in one C++ call (``_C.dlrm_forward``):
        from 4 rows a thread, each task takes up to 60 rows through the embedding bags, the
        bottom MLP, the interaction and the top MLP, so nothing of B rows goes through memory.

        On a GPU model (:func:`load` with ``device="cuda"``): ``dense`` and the ids / offsets
        may be device arrays on its GPU (torch or CuPy, zero-copy) or host arrays (copied), and
        the result is a float32 ``(B,)`` device array of the model's framework, computed on the
        current stream. Same errors.

        Raises:
            TypeError: wrong dtype / type, or not a DLRM. ValueError: wrong shape, unknown or
            missing features, bad offsets. IndexError: an id out of its table's range (names the
            feature and table).
        """
        self._need("dlrm", "score()")
        if self._cuda is not None:
            return self._cuda.score(dense, sparse)
        x = float_input(dense, "dense")
        if x.dtype != np.float32:
            raise TypeError(f"dense must be float32, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self._dense:
            raise ValueError(f"dense must have shape (B, {self._dense}), got {x.shape}")
        B = x.shape[0]
        if self._fused is not None:  # one C++ call for the whole forward
            g = self._group
            out, _ = g.run(sparse, B, lambda indices, offsets: _C.dlrm_forward(
                g.tables, indices, offsets, self._fused[0], self._fused[1], x, *self._fused[2:]))
            return out
        if not np.isfinite(x).all():  # as the int8 forward does (it finds them while quantizing)
            raise ValueError(f"input contains NaN or Inf (row {int(np.argwhere(~np.isfinite(x))[0, 0])})")
        emb, _ = self._group.pool(sparse, B)
        bottom = self._bottom(x, check=False) if isinstance(self._bottom, _FloatMLP) else self._bottom(x)
        # [bottom, dot(v_i, v_j) for i > j] in one C++ pass (docs/FORMAT.md step 3)
        top_in = _C.dot_interaction(np.ascontiguousarray(bottom, dtype=np.float32), emb, len(self._features))
        try:
            return np.ascontiguousarray(self._top(top_in).reshape(B))
        except ValueError:  # an overflow reached the top MLP: name the bottom layer if it began there
            if isinstance(self._bottom, _FloatMLP):
                self._bottom.locate(x)
            raise

    def _need_featurizer(self, method: str):
        if self._featurizer is None:
            raise ValueError(f"{method} needs a model exported with a featurizer "
                             "(fastrec.torch.export(..., featurizer=...)); this one has none: "
                             "featurize the records yourself and call the method without _raw")
        return self._featurizer

    def score_raw(self, records):
        """:meth:`score` on raw records: ``self.featurizer.transform(records)`` then ``score``.

        ``records``: a dict of columns or a list of per-record dicts (see
        :meth:`fastrec.Featurizer.transform`). Returns float32 ``(B,)`` probabilities (a device
        array on a GPU model). Raises ValueError when the model has no featurizer, and the
        featurizer's / :meth:`score`'s errors for bad records.
        """
        self._need("dlrm", "score_raw()")
        fz = self._need_featurizer("score_raw()")
        dense, sparse = fz.transform(records)
        return self.score(dense, sparse)

    # ---- two_tower -------------------------------------------------------------------------
    def _tower(self, group: _Group, mlp, normalize: bool, sparse) -> np.ndarray:
        x, _ = group.pool(sparse)
        x = mlp(x)
        if normalize:
            norm = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.maximum(norm, np.float32(1e-12))
        return np.ascontiguousarray(x, dtype=np.float32)

    def user_vectors(self, sparse) -> np.ndarray:
        """The user tower: float32 ``(B, dim)``. ``sparse`` holds the user tower's features
        (:attr:`user_features`), as a dict or one table-major pair in that order. On a GPU model:
        a float32 device array of its framework (inputs as for :meth:`score`)."""
        self._need("two_tower", "user_vectors()")
        if self._cuda is not None:
            return self._cuda.user_vectors(sparse)
        return self._tower(self._user, self._user_mlp, self._user_norm, sparse)

    def item_vectors(self, sparse) -> np.ndarray:
        """The item tower on item features (:attr:`item_features`): float32 ``(B, dim)``."""
        self._need("two_tower", "item_vectors()")
        if self._cuda is not None:
            return self._cuda.item_vectors(sparse)
        return self._tower(self._item, self._item_mlp, self._item_norm, sparse)

    def recommend(self, sparse, k: int = 10, *, exclude=None):
        """Top-``k`` items per user: ``(scores float32 (B, k), item_ids int64 (B, k))``, best
        first (see :meth:`fastrec.ItemIndex.search` for ``exclude`` and the padding). On a GPU
        model: device arrays of its framework, from the device copy of the index."""
        self._need("two_tower", "recommend()")
        if self._cuda is not None:
            return self._cuda.recommend(sparse, k, exclude)
        q = self.user_vectors(sparse)
        return self._index.search(q, k, exclude=exclude)

    def recommend_raw(self, records, k: int = 10, *, exclude=None):
        """:meth:`recommend` on raw user records: the featurizer makes the user tower's sparse
        input (its sparse features are :attr:`user_features`, in that order), then
        ``recommend(..., k, exclude=exclude)``. Returns ``(scores (B, k), item_ids (B, k))``.
        Raises ValueError when the model has no featurizer."""
        self._need("two_tower", "recommend_raw()")
        fz = self._need_featurizer("recommend_raw()")
        _, sparse = fz.transform(records)
        return self.recommend(sparse, k, exclude=exclude)

    def user_vectors_raw(self, records) -> np.ndarray:
        """:meth:`user_vectors` on raw user records (through the featurizer)."""
        self._need("two_tower", "user_vectors_raw()")
        fz = self._need_featurizer("user_vectors_raw()")
        _, sparse = fz.transform(records)
        return self.user_vectors(sparse)

    # ---- warm-up ---------------------------------------------------------------------------
    def warmup(self, *, tables: bool = False) -> None:
        """Runs one small request through the whole path (first-call costs: page faults on the
        weights, thread pool start, and the featurizer's Numba kernels, which a first
        ``score_raw`` / ``recommend_raw`` paid for: 0.2-1 s). ``tables=True`` also reads one
        byte of every page of every table, so the first requests do not wait on the disk."""
        if self._featurizer is not None:
            self._featurizer.warmup()
        if tables:
            for data in self._table_data:
                flat = data.reshape(-1).view(np.uint8)
                if flat.size:
                    int(flat[::4096].sum())
        if self._kind == "dlrm":
            sparse = {f: (np.zeros(1, np.int64), np.array([0, 1], np.int64)) for f in self._features}
            self.score(np.zeros((1, self._dense), np.float32), sparse)
        else:
            sparse = {f: (np.zeros(1, np.int64), np.array([0, 1], np.int64)) for f in self._user.features}
            self.recommend(sparse, k=1)
