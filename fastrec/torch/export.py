"""Export a :class:`~fastrec.torch.DLRM` or :class:`~fastrec.torch.TwoTower` to a fastrec model
directory (docs/FORMAT.md, format version 1): ``manifest.json`` + ``model.safetensors``.

Quantization happens here, with fastrec's own code, so the bytes are exactly what the runtime
expects: int8 MLP weights from :meth:`fastrec.Int8Linear.from_float`, q8/q4 tables from
:meth:`fastrec.QuantizedTable.from_float`.

Tensor names: ``tables.<table>``; ``dlrm.bottom.<i>.{weight,bias,weight_scale}``,
``dlrm.top.<i>.*``; ``two_tower.user.<i>.*``, ``two_tower.item.<i>.*``; ``index.items``,
``index.ids``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..io import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE as MANIFEST, TENSORS_FILE as WEIGHTS
from ..io import write_model
from .models import DLRM, TwoTower

__all__ = ["export"]

_PRECISIONS = ("int8", "fp16", "fp32")
_STORAGE = {8: "q8", 4: "q4"}


def _float_array(t: torch.Tensor, what: str) -> np.ndarray:
    if t.is_meta:
        raise ValueError(f"{what} is on the 'meta' device and holds no values: load or initialise "
                         "the model's weights before exporting it")
    a = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or Inf")
    return a


def _layers(linears, activations, prefix: str, precision: str, tensors: dict) -> list:
    from ..linear import Int8Linear

    out = []
    for i, (lin, act) in enumerate(zip(linears, activations)):
        name = f"{prefix}.{i}"
        if not isinstance(getattr(lin, "weight", None), torch.Tensor):  # torch.ao's has weight()
            raise TypeError(f"{name} is a {type(lin).__module__}.{type(lin).__name__}, not a float "
                            "torch.nn.Linear: export the float model (before torch.ao quantization); "
                            "fastrec quantizes it itself (precision='int8')")
        w = _float_array(lin.weight, f"{name}.weight")
        b = None if lin.bias is None else _float_array(lin.bias, f"{name}.bias")
        entry = {"in": int(w.shape[1]), "out": int(w.shape[0]), "activation": act,
                 "weight": f"{name}.weight", "bias": None if b is None else f"{name}.bias"}
        if precision == "int8":
            q = Int8Linear.from_float(w, b)
            tensors[f"{name}.weight"] = np.ascontiguousarray(q.weight_int8)
            tensors[f"{name}.weight_scale"] = np.ascontiguousarray(q.weight_scale)
            entry["weight_scale"] = f"{name}.weight_scale"
        elif precision == "fp16":
            w16 = w.astype(np.float16)
            if not np.isfinite(w16).all():
                raise ValueError(f"{name}.weight does not fit in fp16 (|w| > 65504)")
            tensors[f"{name}.weight"] = w16
        else:
            tensors[f"{name}.weight"] = w
        if b is not None:
            tensors[f"{name}.bias"] = b
        out.append(entry)
    return out


def _check_choice(value, name: str, choices) -> None:
    """TypeError for a value that is not a str, ValueError for a str not among ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(choices)} (a str), got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _pooling(bag, name: str) -> str:
    """The bag's mode (the models build sum bags; a user may have switched one to mean or max),
    refusing the settings the format cannot express."""
    if bag.mode not in ("sum", "mean", "max"):
        raise ValueError(f"table {name!r}: pooling mode {bag.mode!r} is not one of sum, mean, max")
    for attr in ("padding_idx", "max_norm"):
        if getattr(bag, attr, None) is not None:
            raise ValueError(f"table {name!r}: nn.EmbeddingBag {attr}={getattr(bag, attr)!r} cannot be "
                             "exported (the model format has no such setting); set it to None")
    if not bag.include_last_offset:
        raise ValueError(f"table {name!r}: the model's bags take CSR offsets (include_last_offset=True)")
    return bag.mode


def _tables(model, bits, precision: str, tensors: dict) -> list:
    from ..tables import QuantizedTable

    if bits is None:
        storage = "fp16" if precision == "fp16" else "fp32"
    else:
        storage = _STORAGE[bits]
    out = []
    for name, rows, dim in model.tables:
        bag = model._ebc.embedding_bags[name]
        pooling = _pooling(bag, name)
        w = _float_array(bag.weight, f"table {name!r}")
        if storage == "fp32":
            data = w
        elif storage == "fp16":
            data = w.astype(np.float16)
            if not np.isfinite(data).all():
                raise ValueError(f"table {name!r} does not fit in fp16 (|w| > 65504)")
        else:
            data = np.ascontiguousarray(QuantizedTable.from_float(w, bits=bits).data)
        tensors[f"tables.{name}"] = data
        out.append({"name": name, "rows": rows, "dim": dim, "pooling": pooling,
                    "storage": storage, "tensor": f"tables.{name}"})
    return out


def _item_catalogue(model: TwoTower, items):
    """-> (parts per item feature over all N items, ids (N,) int64)."""
    names = [f for f, _ in model.item_features]
    ids = None
    if items is None:
        if len(names) != 1:
            raise ValueError("a two-tower export needs items= (the item features of every "
                             "catalogue item) unless the item tower has exactly one feature")
        rows = dict((t[0], t[1]) for t in model.tables)[model.item_features[0][1]]
        indices, offsets = torch.arange(rows), torch.arange(rows + 1)
    elif isinstance(items, Mapping):
        unknown = sorted(set(items) - {"indices", "offsets", "ids"})
        if unknown or "indices" not in items:
            raise ValueError("items must be a dict with the keys 'indices', 'offsets' (the "
                             "table-major CSR of the item features) and optionally 'ids'"
                             + (f"; unknown keys {unknown}" if unknown else ""))
        indices, offsets, ids = items["indices"], items.get("offsets"), items.get("ids")
    elif isinstance(items, Sequence) and not isinstance(items, (str, bytes)) \
            and len(items) in (2, 3):
        indices, offsets = items[0], items[1]
        ids = items[2] if len(items) == 3 else None
    else:
        raise TypeError("items must be None, a dict {'indices', 'offsets', 'ids'} or a tuple "
                        f"(indices, offsets[, ids]), got {type(items).__name__}")
    N, parts = model._split(indices, offsets, names)
    if N == 0:
        raise ValueError("items holds no item")
    if ids is None:
        ids = np.arange(N, dtype=np.int64)
    else:
        ids = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if ids.size == 0:
            ids = ids.astype(np.int64)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"item ids must be integers, got {ids.dtype}")
        if ids.shape != (N,):
            raise ValueError(f"item ids must have shape ({N},) (one per item), got {ids.shape}")
        if ids.dtype == np.uint64 and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
            raise ValueError("item ids must fit in int64")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        s = np.sort(ids)
        dup = s[1:][s[1:] == s[:-1]]
        if dup.size:
            raise ValueError(f"item ids must be unique; {int(dup[0])} appears more than once")
    return N, parts, ids


def _item_vectors(model: TwoTower, N: int, parts, batch_size: int) -> np.ndarray:
    out = np.empty((N, model.dim), dtype=np.float32)
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, N, batch_size):
                e = min(N, s + batch_size)
                sub = []
                for idx, off in parts:
                    o = off[s:e + 1]
                    sub.append((idx[int(o[0]):int(o[-1])], o - o[0]))
                v = model._tower_from_parts(sub, model.item_features, model.candidate_proj)
                out[s:e] = v.to("cpu", torch.float32).numpy()
    finally:
        model.train(was)
    if not np.isfinite(out).all():
        raise ValueError("the item tower produced NaN or Inf")
    return out


def _producer() -> str:
    from .. import __version__

    return f"fastrec {__version__} (torch {torch.__version__})"


def _check_metadata(metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str -> str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str; got {k!r}: {v!r}")
    return dict(metadata)


def _check_dir(path) -> pathlib.Path:
    path = pathlib.Path(os.fspath(path))
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory")
        other = sorted(p.name for p in path.iterdir() if p.name not in (MANIFEST, WEIGHTS))
        if other:
            raise FileExistsError(f"{path} holds other files ({', '.join(other[:5])}); a model "
                                  "directory holds only manifest.json and model.safetensors")
    return path


def _featurizer_spec(featurizer):
    if featurizer is None:
        return None
    from ..featurizer import Featurizer

    if isinstance(featurizer, Featurizer):
        return featurizer.to_spec()
    if isinstance(featurizer, Mapping):
        return Featurizer.from_spec(dict(featurizer)).to_spec()  # FeaturizerSpecError if bad
    raise TypeError("featurizer must be a fastrec.Featurizer, a spec dict or None, got "
                    f"{type(featurizer).__name__}")


def export(model, path, *, precision="int8", embedding_bits=8, items=None,
           index_precision="int8", rerank=True, metadata=None, batch_size=4096,
           featurizer=None) -> pathlib.Path:
    """Write ``model`` to the directory ``path`` (created if needed; an existing one may hold
    only an earlier export, which is replaced) and return ``path`` as a ``pathlib.Path``.

    Args:
        model: a :class:`~fastrec.torch.DLRM` or :class:`~fastrec.torch.TwoTower`.
        precision: MLP weights: ``"int8"`` (per-output-channel symmetric, as
            ``fastrec.Int8Linear.from_float``), ``"fp16"`` or ``"fp32"``. Biases stay fp32.
        embedding_bits: 8 or 4 for row-wise quantized tables (``q8`` / ``q4``, exactly
            ``fastrec.QuantizedTable.from_float(w, bits).data``), or None for float tables:
            fp16 when ``precision == "fp16"``, fp32 otherwise.
        items: two-tower only, the catalogue: a dict ``{"indices", "offsets", "ids"}`` or a
            tuple ``(indices, offsets[, ids])``, where ``(indices, offsets)`` is the table-major
            CSR of the item tower's features for all N items (``len(offsets) == T_item * N + 1``)
            and ``ids`` the N unique int64 ids the index returns (default ``0..N-1``). Left out
            for an item tower with one feature, every row of its table is an item and its id
            is the row number. The item tower runs over them in batches of ``batch_size`` under
            ``torch.inference_mode``; the vectors are stored as ``index.items`` (F32 ``[N, dim]``)
            and the ids as ``index.ids``.
        index_precision, rerank: how the runtime builds its ``fastrec.ItemIndex`` (two-tower).
        metadata: a dict of str -> str stored in the manifest.
        featurizer: a :class:`fastrec.Featurizer` or its spec dict, stored as the manifest's
            ``featurizer`` (so ``Model.score_raw`` / ``Model.recommend_raw`` take raw records),
            or None. A DLRM's featurizer has the model's sparse features in order and
            ``num_dense`` dense features; a two-tower model's has the user tower's features (in
            the order of ``model.user_features``) and no dense features; every ``num_rows`` is at
            most its table's rows (else ModelFormatError, a ValueError).

    Raises TypeError / ValueError for bad arguments, FileExistsError for a path that is a file
    or a directory holding other files.
    """
    if not isinstance(model, (DLRM, TwoTower)):
        raise TypeError("export takes a fastrec.torch.DLRM or fastrec.torch.TwoTower, got "
                        f"{type(model).__name__}")
    _check_choice(precision, "precision", _PRECISIONS)
    if embedding_bits is not None:
        if isinstance(embedding_bits, bool) or not isinstance(embedding_bits, (int, np.integer)):
            raise TypeError(f"embedding_bits must be 8, 4 or None, got {embedding_bits!r}")
        if embedding_bits not in _STORAGE:
            raise ValueError(f"embedding_bits must be 8, 4 or None, got {embedding_bits!r}")
        embedding_bits = int(embedding_bits)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an int >= 1, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    metadata = _check_metadata(metadata)
    featurizer = _featurizer_spec(featurizer)
    if isinstance(model, DLRM) and items is not None:
        raise ValueError("items= is for two-tower models; a DLRM has no item index")
    if isinstance(model, TwoTower):
        _check_choice(index_precision, "index_precision", _PRECISIONS)
        if not isinstance(rerank, bool):
            raise TypeError(f"rerank must be a bool, got {rerank!r}")

    tensors: dict = {}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": model.kind,
        "producer": _producer(),
        "precision": precision,
        "embedding_bits": embedding_bits,
        "tables": _tables(model, embedding_bits, precision, tensors),
    }
    if isinstance(model, DLRM):
        manifest["sparse_features"] = [{"name": f, "table": t} for f, t in model.sparse_features]
        manifest["dense_features"] = model.num_dense
        bottom, top = model.bottom_linears(), model.top_linears()
        manifest["dlrm"] = {
            # (each layer's activation as the module's forward applies it: a user may have
            # switched a layer's relu flag after construction)
            "bottom_mlp": _layers(bottom, model.bottom_activations(), "dlrm.bottom", precision, tensors),
            "interaction": "dot",
            "top_mlp": _layers(top, model.top_activations(), "dlrm.top", precision, tensors),
        }
    else:
        N, parts, ids = _item_catalogue(model, items)
        feats = model.user_features + model.item_features
        manifest["sparse_features"] = [{"name": f, "table": t} for f, t in feats]

        def tower(side, features, mlp):
            lin = mlp.linears()
            return {"features": [f for f, _ in features], "combine": "concat",
                    "mlp": _layers(lin, mlp.activations(), f"two_tower.{side}", precision, tensors),
                    "normalize": model.normalize}

        manifest["two_tower"] = {
            "user": tower("user", model.user_features, model.query_proj),
            "item": tower("item", model.item_features, model.candidate_proj),
            "index": {"items": "index.items", "ids": "index.ids",
                      "precision": index_precision, "rerank": rerank},
        }
        tensors["index.items"] = _item_vectors(model, N, parts, batch_size)
        tensors["index.ids"] = ids
    manifest["featurizer"] = featurizer
    manifest["metadata"] = metadata

    path = _check_dir(path)
    write_model(path, manifest, tensors)  # validates against docs/FORMAT.md, then writes
    return path
