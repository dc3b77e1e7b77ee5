"""The model directory on disk: ``manifest.json`` + ``model.safetensors`` (docs/FORMAT.md).

    write_model(path, manifest, tensors)      # creates the directory, validates, writes both files
    manifest, tensors = read_model(path)      # validated; tensors are read-only memory-mapped views

Both files are untrusted input. :func:`read_model` checks every size against the file before it
touches memory and every manifest field against the format, and raises
:class:`ModelFormatError` (a ``ValueError``) naming the file, the JSON path of the bad field and
what was expected. No pickle anywhere.

The safetensors file is parsed here rather than through ``safetensors.safe_open``: with
``framework="numpy"`` that API returns a fresh copy of each tensor on every ``get_tensor`` call,
so worker processes would not share one copy of the tables. The format is simple (an 8-byte
little-endian header length, a JSON header of ``{name: {dtype, shape, data_offsets}}``, then the
raw little-endian data); this reader maps the file read-only once and hands out
``np.frombuffer`` views of it, so every process that loads the model shares the page cache.
Writing is done here too, as standard safetensors (any safetensors reader reads the file),
with every tensor starting on a 64-byte boundary of the file (:data:`TENSOR_ALIGNMENT`). Memory
maps start on a page, so each table then starts on a cache line: a D=64 fp32 row spans 4 lines
instead of 5, an fp16 one 2 instead of 3. The format allows no gaps between tensors, so the
writer fills each gap with a small uint8 tensor named ``__fastrec_pad.<n>``; the reader drops
those names.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "TENSORS_FILE",
    "TENSOR_ALIGNMENT",
    "ModelFormatError",
    "featurizer_from_manifest",
    "read_model",
    "read_safetensors",
    "validate_manifest",
    "write_model",
]

FORMAT_NAME = "fastrec-model"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "model.safetensors"

TENSOR_ALIGNMENT = 64             # file offset of every tensor written by write_model
_PAD_PREFIX = "__fastrec_pad."    # the writer's gap fillers; names reserved, dropped on reading
_MAX_HEADER_BYTES = 100 << 20    # safetensors' own limit on the JSON header
_MAX_MANIFEST_BYTES = 64 << 20   # a manifest is a few KB; refuse to read a giant file
_MISSING = object()

# safetensors dtype -> little-endian numpy dtype (BF16 / F8 have no numpy dtype: never referenced)
_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
_ITEMSIZE = {"BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}  # known but not loadable
_NAME_OF = {np.dtype(v): k for k, v in _DTYPES.items()}

_KINDS = ("dlrm", "two_tower")
_PRECISIONS = ("int8", "fp16", "fp32")
_STORAGES = ("fp32", "fp16", "q8", "q4")
_POOLINGS = ("sum", "mean", "max")
_ACTIVATIONS = ("relu", "none", "sigmoid")
# The widest input an int8 layer or index takes: the int32 sums of 127 * 127 * width must not
# overflow (kMaxInt8K in csrc/include/fastrec/linear.h; fastrec.ItemIndex's int8 limit too).
MAX_INT8_WIDTH = 2**31 // (127 * 127)
_TOP_KEYS = {"format", "format_version", "kind", "producer", "precision", "embedding_bits", "tables",
             "sparse_features", "dense_features", "dlrm", "two_tower", "featurizer", "metadata"}


class ModelFormatError(ValueError):
    """A model directory that does not follow docs/FORMAT.md.

    Attributes: ``file`` (the file at fault), ``field`` (the JSON path of the bad field, e.g.
    ``$.tables[2].rows``, or a tensor's place in the safetensors header), ``expected`` (what the
    format requires there).
    """

    def __init__(self, file, field: str, expected: str, got: Any = _MISSING):
        self.file = str(file)
        self.field = field
        self.expected = expected
        msg = f"{self.file}: {field}: expected {expected}"
        if got is not _MISSING:
            msg += f", got {_show(got)}"
        super().__init__(msg)


class ModelNotFoundError(ModelFormatError, FileNotFoundError):
    """A model directory, or one of its two files, that does not exist: a
    :class:`ModelFormatError` (so a ValueError) that is also a FileNotFoundError, which
    health checks and retry loops usually catch."""


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class _Text(str):
    """A description shown as is in an error (a plain value is shown with repr)."""

    def __repr__(self) -> str:
        return str(self)


def _type_name(value) -> _Text:
    if value is None:
        return _Text("null")
    if isinstance(value, bool):
        return _Text("a boolean")
    if isinstance(value, int):
        return _Text("an integer")
    if isinstance(value, float):
        return _Text("a number")
    if isinstance(value, str):
        return _Text("a string")
    if isinstance(value, list):
        return _Text("an array")
    if isinstance(value, dict):
        return _Text("an object")
    return _Text(type(value).__name__)


# ---- safetensors --------------------------------------------------------------------------

@dataclass(frozen=True)
class _TensorInfo:
    dtype: str            # safetensors name, e.g. "F32"
    shape: tuple
    array: np.ndarray | None  # None for a dtype numpy cannot hold


def read_safetensors(path) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file: read-only numpy views of one read-only
    memory map of the file (no copy), and the header's ``__metadata__`` (or ``{}``).

    Every offset and size in the header is checked against the file before any view is made;
    anything wrong raises :class:`ModelFormatError`. Tensors whose dtype numpy lacks (BF16, F8)
    are left out.
    """
    infos, metadata = _read_safetensors(path)
    return {k: v.array for k, v in infos.items() if v.array is not None}, metadata


def _read_safetensors(path) -> tuple[dict, dict]:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ModelFormatError(path, "header length", "an 8-byte header length at the start of the file",
                                       _Text(f"a file of {size} bytes"))
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise ModelFormatError(path, "header length",
                                       f"a JSON header that fits in the file ({size - 8} bytes after the length)", n)
            if n > _MAX_HEADER_BYTES:
                raise ModelFormatError(path, "header length", f"at most {_MAX_HEADER_BYTES} bytes of header", n)
            if n < 2:
                raise ModelFormatError(path, "header length", "a JSON object (at least 2 bytes)", n)
            raw = f.read(n)
            if len(raw) != n:
                raise ModelFormatError(path, "header", f"{n} bytes of header", _Text(f"{len(raw)} bytes (file changed?)"))
            data_start = 8 + n
            data_len = size - data_start
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
    except OSError as exc:
        raise ModelFormatError(path, "file", "a readable safetensors file", _Text(f"{type(exc).__name__}: {exc}")) from None
    try:
        header = _json_text(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFormatError(path, "header", "a UTF-8 JSON object", _Text(f"unparseable JSON ({exc})")) from None
    if not isinstance(header, dict):
        raise ModelFormatError(path, "header", "a JSON object", _type_name(header))
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise ModelFormatError(path, "header.__metadata__", "an object of string values", metadata)
    infos, spans = {}, []
    for name, entry in header.items():
        where = f"header[{name!r}]"
        if not isinstance(entry, dict):
            raise ModelFormatError(path, where, "an object with dtype, shape, data_offsets", _type_name(entry))
        dt = entry.get("dtype")
        if not isinstance(dt, str) or (dt not in _DTYPES and dt not in _ITEMSIZE):
            raise ModelFormatError(path, where + ".dtype", f"one of {sorted(_DTYPES) + sorted(_ITEMSIZE)}", dt)
        shape = entry.get("shape")
        if (not isinstance(shape, list) or len(shape) > 32
                or not all(_is_int(d) and 0 <= d < 2**63 for d in shape)):
            raise ModelFormatError(path, where + ".shape", "a list of at most 32 non-negative integers below 2**63",
                                   shape)
        itemsize = np.dtype(_DTYPES[dt]).itemsize if dt in _DTYPES else _ITEMSIZE[dt]
        if math.prod(d for d in shape if d) * itemsize >= 2**63:  # numpy refuses it even with a zero dimension
            raise ModelFormatError(path, where + ".shape", "dimensions whose product (in bytes) is below 2**63", shape)
        offs = entry.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise ModelFormatError(path, where + ".data_offsets", "[begin, end] with 0 <= begin <= end", offs)
        begin, end = offs
        if end > data_len:
            raise ModelFormatError(path, where + ".data_offsets",
                                   f"offsets within the data section ({data_len} bytes; file truncated?)", offs)
        count = math.prod(shape)
        if count * itemsize != end - begin:
            raise ModelFormatError(path, where + ".data_offsets",
                                   f"{count * itemsize} bytes for {dt} {shape}", _Text(f"{end - begin} bytes"))
        array = None
        if dt in _DTYPES:
            dtype = np.dtype(_DTYPES[dt])
            if count == 0:
                array = np.empty(shape, dtype=dtype)
                array.flags.writeable = False
            else:
                array = np.frombuffer(mm, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
                if (data_start + begin) % dtype.alignment:
                    array = _readonly(np.array(array))  # misaligned: one aligned private copy
        spans.append((begin, end, name))
        if not name.startswith(_PAD_PREFIX):
            infos[name] = _TensorInfo(dt, tuple(shape), array)
    # As the safetensors format requires: the tensors tile the data section, no gaps, no
    # overlaps, up to the end of the file. A header length lowered by a few bytes (the JSON
    # still parses, padded with spaces) otherwise shifted every tensor.
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            raise ModelFormatError(path, f"header[{name!r}].data_offsets",
                                   f"tensors that tile the data section (this one starting at byte {covered})",
                                   [begin, end])
        covered = end
    if covered != data_len:
        raise ModelFormatError(path, "header", f"tensors that cover the data section ({data_len} bytes)",
                               _Text(f"{covered} bytes covered"))
    return infos, metadata


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- manifest validation ------------------------------------------------------------------

class _Checker:
    """Type / range checks on manifest fields that raise ModelFormatError with a JSON path."""

    def __init__(self, manifest_file, tensors_file, tensors: dict):
        self.mfile = manifest_file
        self.tfile = tensors_file
        self.tensors = tensors  # name -> _TensorInfo

    def fail(self, path, expected, got=_MISSING):
        raise ModelFormatError(self.mfile, path, expected, got)

    def obj(self, value, path, required=(), optional=()):
        if not isinstance(value, dict):
            self.fail(path, "an object", _type_name(value))
        for key in required:
            if key not in value:
                self.fail(f"{path}.{key}", "a value (the field is required)", _MISSING)
        known = set(required) | set(optional)
        for key in value:
            if key not in known:
                self.fail(f"{path}.{key}", f"only the fields {sorted(known)} (unknown fields are allowed only "
                                           "under $.metadata)", key)
        return value

    def int_(self, value, path, lo=None, hi=None):
        if value is _MISSING:
            self.fail(path, "an integer (the field is required)")
        if not _is_int(value):
            self.fail(path, "an integer", value if not isinstance(value, (dict, list)) else _type_name(value))
        if lo is not None and value < lo:
            self.fail(path, f"an integer >= {lo}", value)
        if hi is not None and value > hi:
            self.fail(path, f"an integer <= {hi}", value)
        return value

    def str_(self, value, path, nonempty=True):
        if not isinstance(value, str) or (nonempty and not value):
            self.fail(path, "a non-empty string", value if not isinstance(value, (dict, list)) else _type_name(value))
        return value

    def enum(self, value, path, choices):
        # numbers of the same type too: 8.0 == 8 and True == 1, but neither is the JSON the format
        # names (text only has to be a str: np.str_ and str enums are text)
        if isinstance(value, (dict, list)) or not any(
                value == c and (isinstance(c, str) or type(value) is type(c)) for c in choices):
            self.fail(path, "one of " + ", ".join(json.dumps(c) for c in choices),
                      value if not isinstance(value, (dict, list)) else _type_name(value))
        return value

    def bool_(self, value, path):
        if not isinstance(value, bool):
            self.fail(path, "true or false", value if not isinstance(value, (dict, list)) else _type_name(value))
        return value

    def list_(self, value, path, nonempty=False):
        if not isinstance(value, list):
            self.fail(path, "an array", _type_name(value))
        if nonempty and not value:
            self.fail(path, "a non-empty array", value)
        return value

    def tensor(self, name, path, dtype: str, shape: tuple, *, finite=False, int8_range=False):
        """The tensor named at ``path``, checked to have ``dtype`` and ``shape``."""
        self.str_(name, path)
        info = self.tensors.get(name)
        if info is None:
            self.fail(path, f"the name of a tensor in {TENSORS_FILE}", _Text(f"{name!r}, which is not there"))
        if info.dtype != dtype or info.shape != tuple(shape):
            raise ModelFormatError(self.tfile, f"tensor {name!r} (referenced by {path})",
                                   f"{dtype} of shape {list(shape)}", _Text(f"{info.dtype} of shape {list(info.shape)}"))
        a = info.array
        if finite and a.size and not np.isfinite(a).all():
            raise ModelFormatError(self.tfile, f"tensor {name!r} (referenced by {path})", "finite values",
                                   _Text("NaN or Inf"))
        if int8_range and a.size and int(a.min()) < -127:
            raise ModelFormatError(self.tfile, f"tensor {name!r} (referenced by {path})",
                                   "symmetric int8 codes in [-127, 127]", int(a.min()))
        return a


def _check_layers(c: _Checker, layers, path, precision: str, in_dim: int, in_what: str):
    """Checks an MLP's layers (first that the widths chain, then each tensor); returns the
    output width (``in_dim`` for an empty MLP)."""
    c.list_(layers, path)
    width = in_dim
    for i, layer in enumerate(layers):
        p = f"{path}[{i}]"
        c.obj(layer, p, required=("in", "out", "activation", "weight"), optional=("bias", "weight_scale"))
        n_in = c.int_(layer["in"], p + ".in", 1)
        c.int_(layer["out"], p + ".out", 1)
        if n_in != width:
            c.fail(p + ".in", f"{width} ({in_what})" if i == 0 else f"{width} (the previous layer's out)", n_in)
        if precision == "int8" and n_in > MAX_INT8_WIDTH:
            c.fail(p + ".in", f"at most {MAX_INT8_WIDTH} for precision int8 (its int32 sums of 127 * 127 * in "
                   "must not overflow)", n_in)
        c.enum(layer["activation"], p + ".activation", _ACTIVATIONS)
        width = layer["out"]
    wdtype = {"int8": "I8", "fp16": "F16", "fp32": "F32"}[precision]
    for i, layer in enumerate(layers):
        p = f"{path}[{i}]"
        n_in, n_out = layer["in"], layer["out"]
        c.tensor(layer["weight"], p + ".weight", wdtype, (n_out, n_in), finite=precision != "int8",
                 int8_range=precision == "int8")
        scale = layer.get("weight_scale")
        if precision == "int8":
            if scale is None:
                c.fail(p + ".weight_scale", "a tensor name (precision int8 needs per-channel scales)", scale)
            c.tensor(scale, p + ".weight_scale", "F32", (n_out,), finite=True)
        elif scale is not None:
            c.fail(p + ".weight_scale", f"null or absent (precision {precision} has no scales)", scale)
        if layer.get("bias") is not None:
            c.tensor(layer["bias"], p + ".bias", "F32", (n_out,), finite=True)
    return width


def _table_shape(storage: str, rows: int, dim: int) -> tuple:
    if storage == "q8":
        return ("U8", (rows, dim + 8))
    if storage == "q4":
        return ("U8", (rows, (dim + 1) // 2 + 4))
    return ("F32" if storage == "fp32" else "F16", (rows, dim))


def _check_tower(c: _Checker, tower, path, precision, feature_dim: dict) -> int:
    c.obj(tower, path, required=("features", "combine", "mlp", "normalize"))
    feats = c.list_(tower["features"], path + ".features", nonempty=True)
    seen = set()
    for i, f in enumerate(feats):
        c.str_(f, f"{path}.features[{i}]")
        if f not in feature_dim:
            c.fail(f"{path}.features[{i}]", "the name of a sparse feature (in $.sparse_features)", f)
        if f in seen:
            c.fail(f"{path}.features[{i}]", "each feature once per tower", f)
        seen.add(f)
    c.enum(tower["combine"], path + ".combine", ("concat",))
    c.bool_(tower["normalize"], path + ".normalize")
    width = sum(feature_dim[f] for f in feats)
    return _check_layers(c, tower["mlp"], path + ".mlp", precision, width,
                         "the sum of the tower's feature dims")


def validate_manifest(manifest, tensors, *, manifest_file=MANIFEST_FILE, tensors_file=TENSORS_FILE) -> None:
    """Checks a manifest against docs/FORMAT.md (version 1) and the tensors it references.

    ``tensors``: ``{name: np.ndarray}``. Raises :class:`ModelFormatError` on the first problem.
    """
    infos = {}
    for name, a in tensors.items():
        a = np.asarray(a)
        infos[name] = _TensorInfo(_NAME_OF.get(a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype,
                                               str(a.dtype)), tuple(a.shape), a)
    _validate(_Checker(manifest_file, tensors_file, infos), manifest)


def _validate(c: _Checker, m) -> None:
    if not isinstance(m, dict):
        c.fail("$", "a JSON object", _type_name(m))
    # format and version first: a newer file should say so, not fail on a field it added
    if m.get("format") != FORMAT_NAME:
        got = m.get("format", _MISSING)
        c.fail("$.format", json.dumps(FORMAT_NAME) + (" (the field is required)" if got is _MISSING else ""),
               got if not isinstance(got, (dict, list)) else _type_name(got))
    version = c.int_(m.get("format_version", _MISSING), "$.format_version", 1)
    if version > FORMAT_VERSION:
        c.fail("$.format_version", f"a version this fastrec reads (<= {FORMAT_VERSION}); the file was written "
                                   "by a newer fastrec, upgrade fastrec to load it", version)
    c.obj(m, "$", required=("format", "format_version", "kind", "precision", "tables", "sparse_features"),
          optional=_TOP_KEYS)
    kind = c.enum(m["kind"], "$.kind", _KINDS)
    if "producer" in m and m["producer"] is not None:
        c.str_(m["producer"], "$.producer", nonempty=False)
    precision = c.enum(m["precision"], "$.precision", _PRECISIONS)
    bits = m.get("embedding_bits")
    if bits is not None:
        c.enum(bits, "$.embedding_bits", (8, 4))
        if isinstance(bits, bool):
            c.fail("$.embedding_bits", "8, 4 or null", bits)
    meta = m.get("metadata")
    if meta is not None:
        c.obj(meta, "$.metadata", optional=meta.keys() if isinstance(meta, dict) else ())
        for k, v in meta.items():
            if not isinstance(v, str):
                c.fail(f"$.metadata.{k}", "a string (metadata values are strings)", v)
    feat = m.get("featurizer")
    if feat is not None and not isinstance(feat, dict):
        c.fail("$.featurizer", "null or an object", _type_name(feat))

    # tables
    tables = c.list_(m["tables"], "$.tables", nonempty=True)
    table_dim = {}
    allowed = {None: ("fp32", "fp16"), 8: ("fp32", "fp16", "q8"), 4: ("fp32", "fp16", "q4")}[bits]
    for i, t in enumerate(tables):
        p = f"$.tables[{i}]"
        c.obj(t, p, required=("name", "rows", "dim", "pooling", "storage", "tensor"))
        name = c.str_(t["name"], p + ".name")
        if name in table_dim:
            c.fail(p + ".name", "a table name not used before", name)
        rows = c.int_(t["rows"], p + ".rows", 1)
        dim = c.int_(t["dim"], p + ".dim", 1)
        c.enum(t["pooling"], p + ".pooling", _POOLINGS)
        storage = c.enum(t["storage"], p + ".storage", _STORAGES)
        if storage not in allowed:
            c.fail(p + ".storage", f"one of {list(allowed)} (embedding_bits is {json.dumps(bits)})", storage)
        dtype, shape = _table_shape(storage, rows, dim)
        c.tensor(t["tensor"], p + ".tensor", dtype, shape)
        table_dim[name] = dim

    # sparse features
    feats = c.list_(m["sparse_features"], "$.sparse_features", nonempty=True)
    feature_dim = {}
    for i, f in enumerate(feats):
        p = f"$.sparse_features[{i}]"
        c.obj(f, p, required=("name", "table"))
        name = c.str_(f["name"], p + ".name")
        if name in feature_dim:
            c.fail(p + ".name", "a feature name not used before", name)
        table = c.str_(f["table"], p + ".table")
        if table not in table_dim:
            c.fail(p + ".table", "the name of a table in $.tables", table)
        feature_dim[name] = table_dim[table]

    if kind == "dlrm":
        _validate_dlrm(c, m, precision, feats, feature_dim)
    else:
        _validate_two_tower(c, m, precision, feature_dim)
    if feat is not None:
        table_rows = {t["name"]: t["rows"] for t in tables}
        _validate_featurizer(c, m, feat, {f["name"]: table_rows[f["table"]] for f in feats})


def _validate_dlrm(c: _Checker, m, precision, feats, feature_dim) -> None:
    for key in ("two_tower",):
        if m.get(key) is not None:
            c.fail(f"$.{key}", 'null or absent (kind is "dlrm")', _type_name(m[key]))
    if "dense_features" not in m:
        c.fail("$.dense_features", "the width of the dense input (required for kind dlrm)")
    dense = c.int_(m["dense_features"], "$.dense_features", 1)
    if "dlrm" not in m:
        c.fail("$.dlrm", "an object (required for kind dlrm)")
    d = c.obj(m["dlrm"], "$.dlrm", required=("bottom_mlp", "interaction", "top_mlp"))
    c.enum(d["interaction"], "$.dlrm.interaction", ("dot",))
    dims = {feature_dim[f["name"]] for f in feats}
    D = feature_dim[feats[0]["name"]]
    if len(dims) != 1:
        for i, f in enumerate(feats):
            if feature_dim[f["name"]] != D:
                c.fail(f"$.sparse_features[{i}].table", f"a table of dim {D} (a dot interaction needs one dim "
                                                        "for every feature)", _Text(f"{f['table']!r} of dim {feature_dim[f['name']]}"))
    out = _check_layers(c, d["bottom_mlp"], "$.dlrm.bottom_mlp", precision, dense, "$.dense_features")
    if out != D:
        path = f"$.dlrm.bottom_mlp[{len(d['bottom_mlp']) - 1}].out" if d["bottom_mlp"] else "$.dlrm.bottom_mlp"
        c.fail(path, f"{D} (the tables' dim, for the dot interaction)", out)
    T = len(feats)
    top = c.list_(d["top_mlp"], "$.dlrm.top_mlp", nonempty=True)
    out = _check_layers(c, top, "$.dlrm.top_mlp", precision, D + (T + 1) * T // 2,
                        f"D + (T+1)T/2 with D={D}, T={T}")
    last = f"$.dlrm.top_mlp[{len(top) - 1}]"
    if out != 1:
        c.fail(last + ".out", "1 (the top MLP ends in one logit)", out)
    if top[-1]["activation"] != "sigmoid":
        c.fail(last + ".activation", '"sigmoid" (the top MLP ends with a sigmoid)', top[-1]["activation"])


def _validate_two_tower(c: _Checker, m, precision, feature_dim) -> None:
    for key in ("dlrm",):
        if m.get(key) is not None:
            c.fail(f"$.{key}", 'null or absent (kind is "two_tower")', _type_name(m[key]))
    if m.get("dense_features") is not None:
        c.fail("$.dense_features", 'null or absent (kind is "two_tower")', m["dense_features"])
    if "two_tower" not in m:
        c.fail("$.two_tower", "an object (required for kind two_tower)")
    tt = c.obj(m["two_tower"], "$.two_tower", required=("user", "item", "index"))
    du = _check_tower(c, tt["user"], "$.two_tower.user", precision, feature_dim)
    di = _check_tower(c, tt["item"], "$.two_tower.item", precision, feature_dim)
    if du != di:
        c.fail("$.two_tower.item", f"a tower whose output width equals the user tower's ({du})", di)
    idx = c.obj(tt["index"], "$.two_tower.index", required=("items", "ids", "precision", "rerank"))
    c.enum(idx["precision"], "$.two_tower.index.precision", _PRECISIONS)
    if idx["precision"] == "int8" and du > MAX_INT8_WIDTH:  # (what ItemIndex refuses)
        c.fail("$.two_tower.index.precision", f'"fp16" or "fp32" for item vectors wider than {MAX_INT8_WIDTH} '
               f"(int8 sums of 127 * 127 * dim must not overflow int32; the towers' width is {du})", "int8")
    c.bool_(idx["rerank"], "$.two_tower.index.rerank")
    items_name = c.str_(idx["items"], "$.two_tower.index.items")
    info = c.tensors.get(items_name)
    n = info.shape[0] if info is not None and len(info.shape) == 2 else 0
    items = c.tensor(items_name, "$.two_tower.index.items", "F32", (n, du), finite=True)
    ids = c.tensor(idx["ids"], "$.two_tower.index.ids", "I64", (n,))
    # What ItemIndex refuses at load, so that a writer cannot produce a model load refuses.
    amax = max(float(items.max()), -float(items.min())) if n and idx["precision"] == "fp16" else 0.0
    if amax > 65504.0:
        raise ModelFormatError(c.tfile, f"tensor {items_name!r} (referenced by $.two_tower.index.items)",
                               "item vectors within float16's range (+-65504) for an fp16 index",
                               _Text(f"values up to {amax:.6g}"))
    ids_at = f"tensor {idx['ids']!r} (referenced by $.two_tower.index.ids)"
    if n and int(ids.min()) < 0:
        raise ModelFormatError(c.tfile, ids_at, "item ids >= 0 (search results pad with id -1)", int(ids.min()))
    if n > 1:
        s = np.sort(ids)
        dup = s[1:][s[1:] == s[:-1]]
        if dup.size:
            raise ModelFormatError(c.tfile, ids_at, "unique item ids", _Text(f"{int(dup[0])} more than once"))


_SPEC_ERROR = re.compile(r"^featurizer spec: (\$\S*): (.*)$", re.S)


def featurizer_from_manifest(manifest, *, manifest_file=MANIFEST_FILE):
    """The :class:`fastrec.Featurizer` of a manifest's ``featurizer`` field (None when null or
    absent), built with ``Featurizer.from_spec(spec, path="$.featurizer")``; a bad spec raises
    :class:`ModelFormatError` naming the JSON path of the bad field. Does not cross-check the
    featurizer against the model (``read_model`` / ``validate_manifest`` do)."""
    from .featurizer import Featurizer, FeaturizerSpecError

    spec = manifest.get("featurizer")
    if spec is None:
        return None
    try:
        return Featurizer.from_spec(spec, path="$.featurizer")
    except FeaturizerSpecError as exc:
        m = _SPEC_ERROR.match(str(exc))
        if m is None:
            raise ModelFormatError(manifest_file, "$.featurizer", "a valid featurizer spec",
                                   _Text(str(exc))) from None
        field, detail = m.groups()
        if detail.startswith("expected ") and ", got " in detail:
            expected, got = detail[len("expected "):].split(", got ", 1)
            raise ModelFormatError(manifest_file, field, expected, _Text(got)) from None
        raise ModelFormatError(manifest_file, field, "a valid featurizer spec", _Text(detail)) from None


def _validate_featurizer(c: _Checker, m, spec, feature_rows: dict) -> None:
    """The featurizer spec is valid and produces this model's input: for a DLRM its sparse
    features are ``sparse_features`` in order and its dense count is ``dense_features``; for a
    two-tower model its sparse features are the user tower's (in ``sparse_features`` order) and
    it has no dense features. Every feature's ``num_rows`` fits its table's rows."""
    fz = featurizer_from_manifest(m, manifest_file=c.mfile)
    names = [f["name"] for f in m["sparse_features"]]
    if m["kind"] == "dlrm":
        want, what = names, "the names of $.sparse_features, in order"
        n_dense, dense_what = m["dense_features"], "$.dense_features"
    else:
        user = set(m["two_tower"]["user"]["features"])
        want = [f for f in names if f in user]
        what = "the user tower's features ($.two_tower.user.features) in $.sparse_features order"
        n_dense, dense_what = 0, "none: a two-tower model has no dense input"
    got = list(fz.sparse_names)
    if got != want:
        c.fail("$.featurizer.sparse", f"sparse features named {want} ({what})", got)
    if fz.num_dense != n_dense:
        c.fail("$.featurizer.dense", f"{n_dense} dense features ({dense_what})", fz.num_dense)
    for i, (name, rows) in enumerate(fz.num_rows.items()):
        if rows > feature_rows[name]:
            c.fail(f"$.featurizer.sparse[{i}].num_rows",
                   f"at most {feature_rows[name]} (the rows of feature {name!r}'s table)", rows)


# ---- the directory ------------------------------------------------------------------------

def _read_manifest(path: str):
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > _MAX_MANIFEST_BYTES:
                raise ModelFormatError(path, "$", f"a manifest of at most {_MAX_MANIFEST_BYTES} bytes", size)
            raw = f.read(_MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ModelFormatError(path, "$", "a readable manifest.json", _Text(f"{type(exc).__name__}: {exc}")) from None
    try:
        return _json_text(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFormatError(path, "$", "UTF-8 JSON", _Text(f"unparseable ({exc})")) from None


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _json_text(raw: bytes):
    """Strict JSON from UTF-8 bytes: no NaN / Infinity, and no string (key or value) holding a
    lone surrogate escape such as "\\ud800", which is valid JSON text but not Unicode text: it
    cannot be printed (``fastrec inspect``) or written back (``write_model``), and the
    safetensors package refuses it. (UnicodeEncodeError is a ValueError.)"""
    value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    if b"\\u" in raw:  # (only an escape can make one: the raw bytes decoded)
        _check_unicode(value)
    return value


def _check_unicode(value) -> None:
    """UnicodeEncodeError (a ValueError) when a string of ``value``, key or value at any depth,
    holds a lone surrogate."""
    json.dumps(value, ensure_ascii=False).encode("utf-8")


def _missing_or_wrong(path: str, field: str, expected: str, missing: str, wrong: str):
    """ModelNotFoundError for a path that does not exist, else ModelFormatError (it is there
    but of the wrong kind, or cannot be reached: os.path.exists / isfile say False for a file in
    a directory this user may not search, which read as "missing")."""
    try:
        os.stat(path)
    except FileNotFoundError:
        raise ModelNotFoundError(path, field, expected, _Text(missing)) from None
    except OSError as e:  # (PermissionError, a path too long, ...)
        raise ModelFormatError(path, field, expected, _Text(f"not accessible ({e.strerror or e})")) from None
    raise ModelFormatError(path, field, expected, _Text(wrong))


def read_model(path) -> tuple[dict, dict]:
    """Reads and validates a model directory.

    Returns ``(manifest, tensors)``: the manifest as parsed JSON (checked against
    docs/FORMAT.md), and ``{name: np.ndarray}`` read-only views of one read-only memory map
    of ``model.safetensors`` (shared with every other process that maps the file).

    Raises:
        ModelFormatError: anything missing, unreadable, malformed or inconsistent, naming the
            file, the JSON path of the bad field and what was expected. A directory or file that
            does not exist raises its subclass ModelNotFoundError, also a FileNotFoundError.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        _missing_or_wrong(path, "directory", f"a model directory holding {MANIFEST_FILE} and {TENSORS_FILE}",
                          "no such directory", "not a directory")
    mfile = os.path.join(path, MANIFEST_FILE)
    tfile = os.path.join(path, TENSORS_FILE)
    for f in (mfile, tfile):
        if not os.path.isfile(f):
            _missing_or_wrong(f, "file", "a regular file (part of the model directory)", "missing", "not a regular file")
    manifest = _read_manifest(mfile)
    infos, _ = _read_safetensors(tfile)
    _validate(_Checker(mfile, tfile, infos), manifest)
    return manifest, {k: v.array for k, v in infos.items() if v.array is not None}


def write_model(path, manifest: dict, tensors: dict, *, validate: bool = True) -> None:
    """Writes a model directory: ``model.safetensors`` (standard safetensors, every tensor on a
    64-byte boundary of the file: see the module docstring) and ``manifest.json``. Creates the
    directory; replaces the two files if they exist (each is written to a temporary name and
    renamed into place).

    ``validate=True`` (the default) first checks the manifest against the tensors, so a
    writer cannot produce a directory :func:`read_model` would refuse (ModelFormatError).
    """
    path = os.fspath(path)
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of name -> numpy array, got {type(tensors).__name__}")
    arrays = {}
    for name, a in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: JSON would escape it, safetensors refuses it
            raise ValueError(f"tensor name {name!r} is not valid Unicode text") from None
        if name.startswith(_PAD_PREFIX) or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is reserved (as are all names starting with {_PAD_PREFIX!r})")
        if not isinstance(a, np.ndarray):
            raise TypeError(f"tensor {name!r} must be a numpy array, got {type(a).__name__}")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if a.dtype not in _NAME_OF:
            raise TypeError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name "
                            f"(supported: {', '.join(sorted(_DTYPES))})")
        arrays[name] = np.asarray(a, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
    if validate:
        validate_manifest(manifest, arrays, manifest_file=os.path.join(path, MANIFEST_FILE),
                          tensors_file=os.path.join(path, TENSORS_FILE))
    text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    try:  # what read_model refuses (_json_text)
        _check_unicode(manifest)
    except UnicodeEncodeError as exc:
        raise ValueError(f"the manifest holds a string that is not valid Unicode text ({exc.reason}: "
                         f"{exc.object[max(exc.start - 20, 0):exc.end + 20]!r})") from None
    os.makedirs(path, exist_ok=True)
    tfile = os.path.join(path, TENSORS_FILE)
    mfile = os.path.join(path, MANIFEST_FILE)
    tmp_t, tmp_m = tfile + ".tmp", mfile + ".tmp"
    try:
        _write_safetensors(tmp_t, arrays)
        with open(tmp_m, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp_t, tfile)
        os.replace(tmp_m, mfile)
    finally:
        for tmp in (tmp_t, tmp_m):
            if os.path.exists(tmp):
                os.remove(tmp)


def _write_safetensors(path: str, arrays: dict) -> None:
    """A safetensors file of ``arrays`` (little-endian, C-contiguous numpy arrays of dtypes in
    ``_NAME_OF``), in name order, each starting TENSOR_ALIGNMENT bytes into the file times some
    integer: the header is padded with spaces (as the format allows) and each gap is filled by
    a uint8 tensor named ``_PAD_PREFIX + <n>``, since the format allows no holes."""
    header, parts, offset = {}, [], 0
    for name in sorted(arrays):
        a = arrays[name]
        gap = -offset % TENSOR_ALIGNMENT
        if gap:
            header[f"{_PAD_PREFIX}{len(parts)}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            parts.append(bytes(gap))
            offset += gap
        header[name] = {"dtype": _NAME_OF[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        parts.append(a)
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % TENSOR_ALIGNMENT)  # the data section starts on the boundary too
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for part in parts:
            if isinstance(part, bytes):
                f.write(part)
            elif part.nbytes:
                f.write(memoryview(part.reshape(-1)).cast("B"))
