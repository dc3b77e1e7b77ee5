"""The model directory as untrusted input: every corrupt, truncated or hostile file raises
fastrec.ModelFormatError (a ValueError) naming the file, the field and what was expected, and
nothing crashes or allocates what a lying header asks for."""

import json
import os
import struct

import numpy as np
import pytest

import fastrec
from fastrec import ModelFormatError
from fastrec.io import read_model, read_safetensors, validate_manifest, write_model
from test_model_runtime import build_dlrm, build_two_tower, random_sparse

TENSORS = "model.safetensors"
MANIFEST = "manifest.json"


@pytest.fixture
def dlrm_dir(tmp_path, rng):
    m, tensors, ref = build_dlrm(rng, precision="int8", storages=("q8", "fp32", "q8"))
    path = tmp_path / "m"
    write_model(path, m, tensors)
    return path


def _read_header(path):
    raw = (path / TENSORS).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path, header, data, *, length=None):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    (path / TENSORS).write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)


def _edit_manifest(path, fn):
    m = json.loads((path / MANIFEST).read_text())
    fn(m)
    (path / MANIFEST).write_text(json.dumps(m))


def _fails(path, *patterns):
    with pytest.raises(ModelFormatError) as info:
        fastrec.load(path)
    msg = str(info.value)
    for p in patterns:
        assert p in msg, f"{p!r} not in {msg!r}"
    return info.value


def test_valid_directory_loads_and_error_type(dlrm_dir):
    assert fastrec.load(dlrm_dir).kind == "dlrm"
    assert issubclass(ModelFormatError, ValueError)
    assert fastrec.ModelFormatError is ModelFormatError


# ---- the safetensors file -----------------------------------------------------------------

def _odd_tensors(rng):
    """Tensors whose sizes are not multiples of 64 bytes, so most need a gap filler before the next."""
    return {"a.f32": rng.standard_normal((7, 5)).astype(np.float32), "b.f16": np.arange(3, dtype=np.float16),
            "c.i8": rng.integers(-128, 128, (3, 11)).astype(np.int8), "d.u8": np.arange(1, dtype=np.uint8),
            "e.i64": np.arange(9, dtype=np.int64), "f.bool": np.array([True, False, True]),
            "g.f32be": np.arange(6, dtype=">f4").reshape(2, 3), "h.empty": np.zeros((0, 4), np.float32),
            "i.scalar": np.array(2.5, np.float64)}


def test_writer_puts_every_tensor_on_a_64_byte_boundary(tmp_path, rng):
    # write_model's tensors start 64-byte aligned in the file, hence in the page-aligned map:
    # an fp32 table row of 256 bytes spans 4 cache lines instead of 5 (docs/FORMAT.md).
    m, tensors, _ = build_dlrm(rng, precision="int8", storages=("fp32", "q8", "fp16"), D=64)
    tensors = {**tensors, **_odd_tensors(rng)}  # unreferenced tensors are allowed
    write_model(tmp_path / "m", m, tensors)
    header, data = _read_header(tmp_path / "m")
    data_start = (tmp_path / "m" / TENSORS).stat().st_size - len(data)
    assert data_start % 64 == 0
    pads = {k for k in header if k.startswith("__fastrec_pad.")}
    assert set(header) - pads == set(tensors)
    spans = sorted(tuple(e["data_offsets"]) for e in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no holes
    assert spans[-1][1] == len(data)
    for name in tensors:
        assert header[name]["data_offsets"][0] % 64 == 0, name
    for k in pads:
        assert header[k]["dtype"] == "U8" and 1 <= header[k]["shape"][0] < 64, header[k]
    # The reader drops the fillers and hands out aligned views with the written values.
    back, _ = read_safetensors(tmp_path / "m" / TENSORS)
    assert set(back) == set(tensors)
    for name, a in tensors.items():
        assert back[name].dtype == a.dtype.newbyteorder("<") and np.array_equal(back[name], a), name
        if back[name].size:
            assert back[name].ctypes.data % 64 == 0, name
    model = fastrec.load(tmp_path / "m")
    assert all(t.ctypes.data % 64 == 0 for t in model._table_data)


def test_written_file_reads_with_the_safetensors_package(tmp_path, rng):
    st = pytest.importorskip("safetensors")
    m, tensors, _ = build_dlrm(rng, precision="fp32", storages=("fp32", "q4"))
    tensors = {**tensors, **_odd_tensors(rng)}
    write_model(tmp_path / "m", m, tensors)
    with st.safe_open(str(tmp_path / "m" / TENSORS), framework="numpy") as f:
        names = set(f.keys())
        got = {k: f.get_tensor(k) for k in names}
    pads = {k for k in names if k.startswith("__fastrec_pad.")}
    assert names - pads == set(tensors)
    for name, a in tensors.items():
        assert np.array_equal(got[name], a) and got[name].shape == a.shape, name
    assert all(got[k].dtype == np.uint8 and not got[k].any() for k in pads)


def test_files_of_the_old_writer_load_and_rewrite_aligned(tmp_path, rng):
    # Models written before the aligned writer (safetensors.numpy.save_file, 8-byte alignment)
    # still load; write_model(new, *read_model(old)) rewrites one aligned, same scores.
    st_numpy = pytest.importorskip("safetensors.numpy")
    m, tensors, ref = build_dlrm(rng, precision="int8", storages=("fp32", "fp16", "q8"), D=16)
    old = tmp_path / "old"
    old.mkdir()
    (old / MANIFEST).write_text(json.dumps(m))
    st_numpy.save_file(tensors, str(old / TENSORS))
    new = tmp_path / "new"
    write_model(new, *read_model(old))
    a, b = fastrec.load(old), fastrec.load(new)
    assert all(t.ctypes.data % 64 == 0 for t in b._table_data)
    dense = rng.standard_normal((5, m["dense_features"])).astype(np.float32)
    sparse = random_sparse(rng, ref["features"], ref["rows"], 5)
    np.testing.assert_array_equal(a.score(dense, sparse), b.score(dense, sparse))


def test_writer_refuses_reserved_names_and_unknown_dtypes(tmp_path, rng):
    m, tensors, _ = build_dlrm(rng, precision="fp32", storages=("fp32",))
    with pytest.raises(ValueError, match="reserved"):
        write_model(tmp_path / "m", m, {**tensors, "__fastrec_pad.0": np.zeros(3, np.uint8)})
    with pytest.raises(ValueError, match="reserved"):
        write_model(tmp_path / "m", m, {**tensors, "__metadata__": np.zeros(3, np.uint8)})
    with pytest.raises(ValueError, match="not valid Unicode"):
        write_model(tmp_path / "m", m, {**tensors, "a\ud800": np.zeros(3, np.uint8)})
    with pytest.raises(TypeError, match="no safetensors name"):
        write_model(tmp_path / "m", m, {**tensors, "x": np.zeros(3, np.complex64)})
    with pytest.raises(ValueError, match="not valid Unicode text"):  # (written, then refused by load)
        write_model(tmp_path / "m", {**m, "metadata": {"note": "x\ud800y"}}, tensors)
    assert not (tmp_path / "m").exists()
    # text choices may be any str (np.str_, str enums); numbers must be the JSON type named
    import enum

    class Kind(str, enum.Enum):
        DLRM = "dlrm"

    m2 = json.loads(json.dumps(m))
    m2["kind"] = Kind.DLRM
    m2["tables"][0]["pooling"] = np.str_("sum")
    write_model(tmp_path / "ok", m2, tensors)
    assert fastrec.load(tmp_path / "ok").kind == "dlrm"


@pytest.mark.parametrize("keep", [0, 3, 8, 20, 0.5, -1])
def test_truncated_safetensors(dlrm_dir, keep):
    raw = (dlrm_dir / TENSORS).read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else (len(raw) + keep if keep < 0 else keep)
    (dlrm_dir / TENSORS).write_bytes(raw[:n])
    err = _fails(dlrm_dir, TENSORS)
    assert err.file.endswith(TENSORS)


@pytest.mark.parametrize("less", [1, 2, 3, 5, 8, 17])
def test_header_length_lowered_into_the_padding(dlrm_dir, less):
    # The JSON still parses (it ends in padding spaces), but every tensor would be read `less`
    # bytes early: the tensors no longer tile the data section up to the end of the file.
    raw = bytearray((dlrm_dir / TENSORS).read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    raw[:8] = struct.pack("<Q", n - less)
    (dlrm_dir / TENSORS).write_bytes(bytes(raw))
    assert raw[8 + n - less:8 + n].strip() == b""  # only padding was cut: the JSON still parses
    _fails(dlrm_dir, TENSORS, "cover the data section")


@pytest.mark.parametrize("how", ["gap", "overlap", "short", "duplicate"])
def test_tensors_must_tile_the_data_section(dlrm_dir, how):
    header, data = _read_header(dlrm_dir)
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], k) for k, e in header.items() if k != "__metadata__")
    last = spans[-1][2]
    if how == "gap":  # one byte more data at the end, not in any tensor
        _write_header(dlrm_dir, header, data + b"\0")
        _fails(dlrm_dir, "cover the data section")
        return
    if how == "short":  # the data ends before the last tensor does
        _write_header(dlrm_dir, header, data[:-1])
        _fails(dlrm_dir, "within the data section")
        return
    if how == "overlap":  # a 1-byte U8 tensor inside the last tensor's bytes
        b = header[last]["data_offsets"][0]
        header["extra"] = {"dtype": "U8", "shape": [1], "data_offsets": [b, b + 1]}
    else:  # a second tensor on the same bytes as the last one
        header["extra"] = dict(header[last])
    _write_header(dlrm_dir, header, data)
    _fails(dlrm_dir, "tile the data section")


def test_header_length_larger_than_file(dlrm_dir):
    header, data = _read_header(dlrm_dir)
    _write_header(dlrm_dir, header, data, length=2**63)
    _fails(dlrm_dir, "header length", "fits in the file")
    _write_header(dlrm_dir, header, data, length=0)
    _fails(dlrm_dir, "header length")


@pytest.mark.parametrize("text", [b"not json at all", b"[1, 2, 3]", b"\xff\xfe\x00\x00", b"[" * 100000,
                                  b'{"a": 1}', b'{"__metadata__": {"k": 1}}'])
def test_bad_header_json(dlrm_dir, text):
    header, data = _read_header(dlrm_dir)
    (dlrm_dir / TENSORS).write_bytes(struct.pack("<Q", len(text)) + text + data)
    _fails(dlrm_dir, TENSORS, "header")


@pytest.mark.parametrize("field,value,expect", [
    ("data_offsets", [0, 10**15], "within the data section"),
    ("data_offsets", [-8, 0], "begin <= end"),
    ("data_offsets", [40, 8], "begin <= end"),
    ("data_offsets", "0-8", "begin <= end"),
    ("shape", [10**12, 10**12], "product (in bytes)"),
    ("shape", [10**6, 10**6], "bytes for"),
    ("shape", [-1, 8], "non-negative"),
    ("shape", [2.5], "non-negative"),
    ("dtype", "F128", "one of"),
    ("dtype", "U8", "bytes for"),
])
def test_hostile_tensor_entries(dlrm_dir, field, value, expect):
    header, data = _read_header(dlrm_dir)
    header["tables.t1"][field] = value
    _write_header(dlrm_dir, header, data)
    _fails(dlrm_dir, TENSORS, "tables.t1", expect)


def test_lying_header_never_allocates(dlrm_dir):
    """A header declaring a petabyte tensor is refused from the header alone."""
    header, data = _read_header(dlrm_dir)
    header["huge"] = {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 2**62]}
    _write_header(dlrm_dir, header, data)
    _fails(dlrm_dir, "huge", "within the data section")
    # An empty tensor with a dimension numpy cannot hold: ModelFormatError, not numpy's ValueError.
    header, data = _read_header(dlrm_dir)
    del header["huge"]
    header["huge"] = {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}
    _write_header(dlrm_dir, header, data)
    _fails(dlrm_dir, "huge", ".shape", "below 2**63")
    # More dimensions than numpy holds, and empty tensors whose other dimensions numpy refuses
    # to multiply (numpy's own ValueError leaked out of both).
    for shape, expect in (([0] * 65, "at most 32"), ([0, 2**62, 2**62], "product (in bytes)"),
                          ([0, 2**61], "product (in bytes)"), ([0, 2**40, 2**22], "product (in bytes)")):
        header, data = _read_header(dlrm_dir)
        header.pop("huge", None)
        header["huge"] = {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
        _write_header(dlrm_dir, header, data)
        _fails(dlrm_dir, "huge", ".shape", expect)


def test_read_safetensors_views(dlrm_dir):
    tensors, meta = read_safetensors(dlrm_dir / TENSORS)
    assert isinstance(meta, dict)
    assert all(not a.flags.writeable for a in tensors.values())


def test_missing_files_and_not_a_directory(dlrm_dir, tmp_path):
    # What does not exist is also a FileNotFoundError (health checks catch that); the rest not.
    assert isinstance(_fails(tmp_path / "nowhere", "no such directory"), FileNotFoundError)
    f = tmp_path / "file"
    f.write_text("x")
    assert not isinstance(_fails(f, "not a directory"), OSError)
    os.remove(dlrm_dir / TENSORS)
    err = _fails(dlrm_dir, TENSORS, "missing")
    assert isinstance(err, fastrec.ModelNotFoundError) and isinstance(err, FileNotFoundError)
    os.mkdir(dlrm_dir / TENSORS)
    assert not isinstance(_fails(dlrm_dir, TENSORS, "not a regular file"), OSError)


def test_unreachable_file_is_not_called_missing(dlrm_dir, monkeypatch):
    # In a directory this user may not search, os.path.isfile says False and the file read as
    # "missing" (a ModelNotFoundError); stat's PermissionError is what happened. (Simulated:
    # the tests may run as root, whom permissions do not stop.)
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if os.fspath(path).endswith(MANIFEST):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    err = _fails(dlrm_dir, MANIFEST, "not accessible (Permission denied)")
    assert not isinstance(err, fastrec.ModelNotFoundError)


# ---- the manifest -------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["{", "", "[]", "null", "42", '"dlrm"', "\udcff", '{"format": NaN}', "[" * 50000])
def test_bad_manifest_json(dlrm_dir, text):
    (dlrm_dir / MANIFEST).write_bytes(text.encode("utf-8", "surrogateescape"))
    err = _fails(dlrm_dir, MANIFEST)
    assert err.field.startswith("$")


def _set(path_expr, value):
    """A manifest edit: ``path_expr`` like "tables.0.rows"; value _DEL deletes the field."""
    def fn(m):
        keys = [int(k) if k.isdigit() else k for k in path_expr.split(".")]
        obj = m
        for k in keys[:-1]:
            obj = obj[k]
        if value is _DEL:
            del obj[keys[-1]]
        else:
            obj[keys[-1]] = value
    return fn


_DEL = object()

MANIFEST_CASES = [
    ("format", "onnx", "$.format"),
    ("format", _DEL, "$.format"),
    ("format_version", 2, "newer fastrec"),
    ("format_version", 0, "$.format_version"),
    ("format_version", "1", "$.format_version"),
    ("format_version", 1.0, "$.format_version"),
    ("format_version", True, "$.format_version"),
    ("kind", "wide_and_deep", "$.kind"),
    ("precision", "int4", "$.precision"),
    ("embedding_bits", 2, "$.embedding_bits"),
    ("embedding_bits", None, "$.tables[0].storage"),
    ("embedding_bits", 8.0, "$.embedding_bits"),  # (8.0 == 8 was accepted)
    ("metadata", {"note": "x\ud800y"}, "surrogates"),  # valid JSON, not Unicode text
    ("extra_field", 1, "$.extra_field"),
    ("metadata", {"a": 1}, "$.metadata.a"),
    ("metadata", [], "$.metadata"),
    ("featurizer", "hash", "$.featurizer"),
    ("tables", [], "$.tables"),
    ("tables", {}, "$.tables"),
    ("tables.0", "t0", "$.tables[0]"),
    ("tables.0.rows", 10**12, "$.tables[0].tensor"),     # huge declared rows: refused from the header
    ("tables.0.rows", 0, "$.tables[0].rows"),
    ("tables.0.rows", -5, "$.tables[0].rows"),
    ("tables.0.rows", "50", "$.tables[0].rows"),
    ("tables.0.dim", 9, "$.tables[0].tensor"),
    ("tables.0.storage", "q2", "$.tables[0].storage"),
    ("tables.0.storage", "fp32", "$.tables[0].tensor"),  # wrong dtype for the referenced tensor
    ("tables.0.pooling", "avg", "$.tables[0].pooling"),
    ("tables.0.tensor", "tables.nope", "$.tables[0].tensor"),
    ("tables.0.tensor", 7, "$.tables[0].tensor"),
    ("tables.0.surprise", 1, "$.tables[0].surprise"),
    ("tables.1.name", "t0", "$.tables[1].name"),
    ("tables.0.name", _DEL, "$.tables[0].name"),
    ("sparse_features", [], "$.sparse_features"),
    ("sparse_features.0.table", "t9", "$.sparse_features[0].table"),
    ("sparse_features.1.name", "C1", "$.sparse_features[1].name"),
    ("dense_features", 6, "$.dlrm.bottom_mlp[0].in"),
    ("dense_features", _DEL, "$.dense_features"),
    ("dense_features", 0, "$.dense_features"),
    ("two_tower", {}, "$.two_tower"),
    ("dlrm", _DEL, "$.dlrm"),
    ("dlrm.interaction", "cat", "$.dlrm.interaction"),
    ("dlrm.bottom_mlp.0.out", 17, "$.dlrm.bottom_mlp[1].in"),   # dims that do not chain
    ("dlrm.bottom_mlp.1.in", 15, "$.dlrm.bottom_mlp[1].in"),
    ("dlrm.top_mlp.0.in", 20, "$.dlrm.top_mlp[0].in"),
    ("dlrm.top_mlp.1.activation", "relu", "$.dlrm.top_mlp[1].activation"),
    ("dlrm.top_mlp.1.activation", "gelu", "$.dlrm.top_mlp[1].activation"),
    ("dlrm.top_mlp", [], "$.dlrm.top_mlp"),
    ("dlrm.top_mlp.0.weight", "dlrm.bottom.0.weight", "$.dlrm.top_mlp[0].weight"),
    ("dlrm.top_mlp.0.weight_scale", None, "$.dlrm.top_mlp[0].weight_scale"),
    ("dlrm.top_mlp.0.weight_scale", "dlrm.top.1.bias", "$.dlrm.top_mlp[0].weight_scale"),
    ("dlrm.top_mlp.0.bias", "dlrm.top.1.bias", "$.dlrm.top_mlp[0].bias"),
    ("precision", "fp32", "$.dlrm.bottom_mlp[0].weight"),   # int8 tensors under an fp32 manifest
]


@pytest.mark.parametrize("edit,value,field", MANIFEST_CASES, ids=[f"{c[0]}={c[1]!r}"[:40] for c in MANIFEST_CASES])
def test_bad_manifest_fields(dlrm_dir, edit, value, field):
    _edit_manifest(dlrm_dir, _set(edit, value))
    err = _fails(dlrm_dir, field)
    assert "expected" in str(err)
    assert err.file.endswith(MANIFEST) or err.file.endswith(TENSORS)


def test_non_dict_manifest(dlrm_dir):
    (dlrm_dir / MANIFEST).write_text("[1, 2]")
    err = _fails(dlrm_dir, "$", "a JSON object", "an array")
    assert err.field == "$" and err.expected == "a JSON object"


def test_metadata_is_free_form(dlrm_dir):
    _edit_manifest(dlrm_dir, _set("metadata", {"anything": "goes", "trained_on": "2026-01-01"}))
    assert fastrec.load(dlrm_dir).manifest["metadata"]["anything"] == "goes"


def test_version_message_says_upgrade(dlrm_dir):
    _edit_manifest(dlrm_dir, _set("format_version", 7))
    _edit_manifest(dlrm_dir, _set("brand_new_field", {"x": 1}))
    _fails(dlrm_dir, "upgrade fastrec", "7")


def test_tensor_values_checked(tmp_path, rng):
    """Values the kernels would misread: int8 code -128, NaN scales or weights."""
    for name, fix in [("dlrm.top.0.weight", lambda a: np.full_like(a, -128)),
                      ("dlrm.top.0.weight_scale", lambda a: np.full_like(a, np.nan)),
                      ("dlrm.bottom.0.bias", lambda a: np.full_like(a, np.inf))]:
        m, tensors, _ = build_dlrm(rng, precision="int8", storages=("fp32",))
        tensors[name] = fix(tensors[name])
        path = tmp_path / name
        write_model(path, m, tensors, validate=False)
        _fails(path, name)


def test_wrong_dtype_and_missing_tensor(tmp_path, rng):
    m, tensors, _ = build_dlrm(rng, storages=("fp32", "fp32"))
    tensors["tables.t0"] = tensors["tables.t0"].astype(np.float64)
    write_model(tmp_path / "a", m, tensors, validate=False)
    err = _fails(tmp_path / "a", "tables.t0", "F32 of shape [50, 8]", "F64")
    assert err.file.endswith(TENSORS)
    del tensors["tables.t0"]
    write_model(tmp_path / "b", m, tensors, validate=False)
    _fails(tmp_path / "b", "$.tables[0].tensor", "not there")


def test_dlrm_tables_of_different_dims(tmp_path, rng):
    m, tensors, _ = build_dlrm(rng, storages=("fp32", "fp32"))
    m["tables"][1]["dim"] = 4
    tensors["tables.t1"] = tensors["tables.t1"][:, :4].copy()
    write_model(tmp_path / "a", m, tensors, validate=False)
    _fails(tmp_path / "a", "$.sparse_features[1].table", "dim 8")


def test_two_tower_checks(tmp_path, rng):
    m, tensors, _ = build_two_tower(rng)
    t = dict(tensors)
    t["index.ids"] = np.zeros_like(tensors["index.ids"])
    write_model(tmp_path / "dup", m, t, validate=False)
    _fails(tmp_path / "dup", "unique item ids")
    t = dict(tensors)
    t["index.items"] = tensors["index.items"].copy()
    t["index.items"][3, 1] = np.nan
    write_model(tmp_path / "nan", m, t, validate=False)
    _fails(tmp_path / "nan", "finite")
    t = dict(tensors)
    t["index.ids"] = tensors["index.ids"][:-1].copy()
    write_model(tmp_path / "short", m, t, validate=False)
    _fails(tmp_path / "short", "index.ids")
    for edit, value, field in [("two_tower.user.features.0", "nope", "$.two_tower.user.features[0]"),
                               ("two_tower.user.features", [], "$.two_tower.user.features"),
                               ("two_tower.user.combine", "sum", "$.two_tower.user.combine"),
                               ("two_tower.user.normalize", 1, "$.two_tower.user.normalize"),
                               ("two_tower.index.precision", "int4", "$.two_tower.index.precision"),
                               ("two_tower.user.mlp.0.out", 9, "$.two_tower.user.mlp[1].in"),
                               ("dense_features", 13, "$.dense_features"),
                               ("dlrm", {}, "$.dlrm")]:
        mm = json.loads(json.dumps(m))
        _set(edit, value)(mm)
        write_model(tmp_path / "x", mm, tensors, validate=False)
        _fails(tmp_path / "x", field)


def test_write_model_validates(tmp_path, rng):
    m, tensors, _ = build_dlrm(rng)
    m["dlrm"]["top_mlp"][0]["in"] += 1
    with pytest.raises(ModelFormatError, match=r"\$\.dlrm\.top_mlp\[0\]\.in"):
        write_model(tmp_path / "a", m, tensors)
    assert not (tmp_path / "a" / MANIFEST).exists()
    with pytest.raises(ModelFormatError):
        validate_manifest([], tensors)
    with pytest.raises(TypeError):
        write_model(tmp_path / "b", m, {"x": [1, 2]})


def test_read_model_returns_manifest_and_tensors(dlrm_dir):
    manifest, tensors = read_model(dlrm_dir)
    assert manifest["kind"] == "dlrm" and "tables.t0" in tensors


def test_random_corruption_never_crashes(tmp_path, rng):
    """Byte flips anywhere in either file: a ModelFormatError, or a model that loads and whose
    score raises nothing worse than the documented exceptions (values may be garbage)."""
    m, tensors, ref = build_dlrm(rng, precision="int8", storages=("q8", "fp16"))
    path = tmp_path / "m"
    write_model(path, m, tensors)
    good_t = (path / TENSORS).read_bytes()
    good_m = (path / MANIFEST).read_bytes()
    n_header = 8 + struct.unpack("<Q", good_t[:8])[0]
    dense = rng.standard_normal((4, 5)).astype(np.float32)
    sparse = random_sparse(rng, ref["features"], ref["rows"], 4)
    outcomes = {"error": 0, "loaded": 0}
    for trial in range(300):
        t, mm = bytearray(good_t), bytearray(good_m)
        target = (t, mm)[trial % 2]
        limit = n_header if target is t and trial % 4 == 0 else len(target)
        for _ in range(int(rng.integers(1, 4))):
            target[int(rng.integers(0, limit))] = int(rng.integers(0, 256))
        (path / TENSORS).write_bytes(bytes(t))
        (path / MANIFEST).write_bytes(bytes(mm))
        try:
            model = fastrec.load(path)
        except ModelFormatError:
            outcomes["error"] += 1
            continue
        outcomes["loaded"] += 1
        try:
            model.score(dense, sparse)
        except (ValueError, IndexError, TypeError):
            pass
    assert outcomes["error"] > 0 and outcomes["loaded"] > 0, outcomes
