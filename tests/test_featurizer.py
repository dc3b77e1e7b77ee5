"""fastrec.Featurizer: every transform against a plain-Python reference, the table-major CSR
layout, multi-valued inputs, spec round trips and bad specs, fit, Numba vs NumPy (identical),
and transform from several threads."""

import copy
import json
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fastrec.featurizer import Featurizer, FeaturizerSpecError
from fastrec.kernels import featurize as fk
from fastrec.kernels import hashing

BACKENDS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    not fk.numba_available(), reason="numba not installed"))]

SPEC = {
    "version": 1,
    "dense": [
        {"name": "I1", "kind": "log1p"},
        {"name": "I2", "kind": "log1p", "fill": 3.0},
        {"name": "age_z", "source": "age", "kind": "standardize", "mean": 30.0, "std": 8.0},
        {"name": "price", "kind": "identity", "fill": -1.0},
    ],
    "sparse": [
        {"name": "C1", "kind": "hash", "num_rows": 97, "salt": "C1"},
        {"name": "city", "kind": "hash", "num_rows": 1000, "salt": 12345},
        {"name": "movie_id", "kind": "lookup", "vocab": [50, 7, -3, 2**62], "oov_row": 4},
        {"name": "gender", "kind": "lookup", "vocab": ["M", "F"], "num_rows": 3},
        {"name": "tags", "kind": "hash", "multi": True, "num_rows": 31},
        {"name": "genres", "kind": "lookup", "multi": True, "vocab": ["Drama", "Comedy", "Noir"]},
        {"name": "age_bucket", "source": "age", "kind": "bucketize", "boundaries": [18, 25.5, 40]},
    ],
}


def make_records(rng, n):
    """Per-record dicts with missing values of every kind."""
    cities = ["Zürich", "Paris", "", "東京", "Lagos"]
    genres = ["Drama", "Comedy", "Noir", "Western"]
    out = []
    for i in range(n):
        r = {
            "I1": [None, np.nan, -2.0, 0.0, 1.0, 1e9, math.inf, float(rng.integers(0, 1000))][i % 8],
            "I2": float(rng.integers(-1, 50)) if i % 3 else None,
            "age": [None, 17, 18, 25.5, 39.9, 40, 70, -math.inf][i % 8],
            "price": float(rng.normal()) if i % 4 else math.nan,
            "C1": int(rng.integers(-(2**63), 2**63 - 1)),
            "city": cities[i % 5],
            "movie_id": [50, 7, -3, 2**62, 8, 2**64 - 1][i % 6],
            "gender": ["M", "F", "X"][i % 3],
            "tags": [int(t) for t in rng.integers(0, 10**6, i % 4)],
            "genres": [genres[k] for k in rng.integers(0, 4, i % 3)],
        }
        if i % 5 == 0:
            del r["C1"]  # an absent key: an empty bag
        if i % 7 == 0:
            r["genres"] = None
        out.append(r)
    return out


def to_columns(records, spec):
    srcs = {f.get("source", f["name"]) for f in spec["dense"] + spec["sparse"]}
    return {s: [r.get(s) for r in records] for s in srcs}


# ---- the plain-Python reference ----------------------------------------------------------------


def ref_dense(f, v):
    missing = v is None or not math.isfinite(v)
    v = f.get("fill", f.get("mean", 0.0)) if missing else float(v)
    if f["kind"] == "log1p":
        v = math.log1p(max(v, 0.0))
    elif f["kind"] == "standardize":
        v = (v - f["mean"]) / f["std"]
    return np.float32(v)


def ref_row(f, v):
    if f["kind"] == "hash":
        salt = f.get("salt", f["name"])
        if isinstance(v, str):
            return int(hashing.hash_strings_ref([v], f["num_rows"], salt)[0])
        return int(hashing.hash_ids_ref(np.array([v % 2**64], dtype=np.uint64), f["num_rows"], salt)[0])
    if f["kind"] == "lookup":
        vocab = f["vocab"]
        return vocab.index(v) if v in vocab else f.get("oov_row", len(vocab))
    if v is None or not math.isfinite(v):
        return len(f["boundaries"]) + 1
    return sum(1 for b in f["boundaries"] if b <= v)


def ref_transform(spec, records):
    dense = np.array([[ref_dense(f, r.get(f.get("source", f["name"]))) for f in spec["dense"]]
                      for r in records], dtype=np.float32).reshape(len(records), len(spec["dense"]))
    indices, offsets = [], [0]
    for f in spec["sparse"]:
        for r in records:
            v = r.get(f.get("source", f["name"]))
            if f["kind"] == "bucketize":
                bag = [v]
            elif v is None:
                bag = []
            else:
                bag = list(v) if f.get("multi") else [v]
            indices += [ref_row(f, x) for x in bag]
            offsets.append(len(indices))
    return dense, np.array(indices, dtype=np.int64), np.array(offsets, dtype=np.int64)


def check_same(got, want):
    dense, (idx, off) = got
    assert dense.dtype == np.float32 and idx.dtype == np.int64 and off.dtype == np.int64
    np.testing.assert_array_equal(dense, want[0])
    np.testing.assert_array_equal(idx, want[1])
    np.testing.assert_array_equal(off, want[2])


# ---- transforms --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 3, 97])
def test_transform_matches_reference(backend, n):
    fz = Featurizer.from_spec(SPEC, backend=backend)
    records = make_records(np.random.default_rng(n), n)
    want = ref_transform(SPEC, records)
    check_same(fz.transform(records), want)  # per-record dicts
    check_same(fz.transform(to_columns(records, SPEC)), want)  # dict of lists
    assert fz.transform(records)[1][1].shape == (len(SPEC["sparse"]) * n + 1,)


def test_csr_layout_table_major():
    fz = Featurizer.from_spec({"version": 1, "sparse": [
        {"name": "a", "kind": "lookup", "vocab": [10, 20, 30]},
        {"name": "b", "kind": "lookup", "multi": True, "vocab": ["x", "y"]},
    ]})
    dense, (idx, off) = fz.transform({"a": np.array([30, 10, 99]), "b": [["y", "x"], [], ["x", "z", "y"]]})
    assert dense.shape == (3, 0) and dense.dtype == np.float32
    # all bags of a (rows 2, 0, oov 3), then all bags of b
    np.testing.assert_array_equal(idx, [2, 0, 3, 1, 0, 0, 2, 1])
    np.testing.assert_array_equal(off, [0, 1, 2, 3, 5, 5, 8])
    assert fz.num_rows == {"a": 4, "b": 3} and fz.sparse_names == ("a", "b")


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_columns(backend):
    """NumPy columns of any int dtype: ids compare by value (int32 7 == int64 7 == uint64 7)."""
    spec = {"version": 1, "dense": [{"name": "x", "kind": "log1p"}],
            "sparse": [{"name": "c", "kind": "hash", "num_rows": 1000},
                       {"name": "m", "kind": "lookup", "vocab": [7, -1, 5]}]}
    fz = Featurizer.from_spec(spec, backend=backend)
    ids = np.array([7, 0, 5, 123456, 2**31 - 1])
    want = fz.transform({"x": [1, 2, 3, 4, 5], "c": ids.tolist(), "m": ids.tolist()})
    for dt in (np.int32, np.int64, np.uint32, np.uint64):
        got = fz.transform({"x": np.arange(1, 6, dtype=dt), "c": ids.astype(dt), "m": ids.astype(dt)})
        check_same(got, (want[0], *want[1]))
    try:  # torch tensor columns are read as the arrays they hold (they were "record 0 is Tensor")
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        got = fz.transform({"x": torch.arange(1, 6, dtype=torch.float32), "c": torch.from_numpy(ids),
                            "m": torch.from_numpy(ids).to(torch.int32)})
        check_same(got, (want[0], *want[1]))
    # uint64 beyond int64 and Python ints beyond int64 hash mod 2**64 and are out of an int vocab
    big = [2**64 - 1, 2**63]
    got = fz.transform({"x": [0, 0], "c": np.array(big, dtype=np.uint64), "m": np.array(big, dtype=np.uint64)})
    got2 = fz.transform({"x": [0, 0], "c": big, "m": big})
    got3 = fz.transform({"x": [0, 0], "c": [-1, -(2**63)], "m": [-1, -(2**63)]})
    np.testing.assert_array_equal(got[1][0], got2[1][0])
    np.testing.assert_array_equal(got[1][0][:2], got3[1][0][:2])  # same bits mod 2**64
    np.testing.assert_array_equal(got[1][0][2:], [3, 3])
    np.testing.assert_array_equal(got3[1][0][2:], [1, 3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalar_ids_with_ids_beyond_int64(backend):
    # NumPy integer scalars next to an id beyond int64 raised OverflowError (NumPy 2 scalar
    # arithmetic) instead of taking every id's value mod 2**64, as plain ints do
    spec = {"version": 1, "sparse": [{"name": "c", "kind": "hash", "num_rows": 1000},
                                     {"name": "m", "source": "c", "kind": "lookup", "vocab": [-1, 5]}]}
    fz = Featurizer.from_spec(spec, backend=backend)
    want = fz.transform({"c": [2**64 - 1, 5]})[1][0].tolist()
    assert want[:2] == fz.transform({"c": [-1, 5]})[1][0].tolist()[:2] and want[2:] == [2, 1]
    for col in ([np.uint64(2**64 - 1), np.int64(5)], [2**64 - 1, np.int8(5)]):
        assert fz.transform({"c": col})[1][0].tolist() == want
    assert (fz.transform([{"c": np.int64(5)}, {"c": 2**63}])[1][0].tolist()
            == fz.transform({"c": [5, 2**63]})[1][0].tolist())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [">u8", "<u8", ">i8", ">u4"])
def test_byte_swapped_ids_lookup_by_value(backend, dtype):
    # a big-endian uint64 2**64 - 1 was read as int64 -1 and matched the vocabulary's -1
    fz = Featurizer.from_spec({"version": 1, "sparse": [{"name": "c", "kind": "lookup", "vocab": [-1, 7]}]},
                              backend=backend)
    top = np.iinfo(dtype).max
    got = fz.transform({"c": np.array([top, 7], dtype=dtype)})[1][0].tolist()
    assert got == fz.transform({"c": [int(top), 7]})[1][0].tolist() == [2, 1]


def test_multi_valued_input_forms():
    spec = {"version": 1, "sparse": [{"name": "t", "kind": "hash", "multi": True, "num_rows": 50},
                                     {"name": "g", "kind": "lookup", "multi": True, "vocab": [1, 2, 3]}]}
    fz = Featurizer.from_spec(spec)
    bags = [[1, 2], [3, 3, 4], [2, 1]]
    want = fz.transform({"t": bags, "g": bags})
    vals = np.array([1, 2, 3, 3, 4, 2, 1])
    offs = np.array([0, 2, 5, 7])
    obj = np.empty(3, dtype=object)
    obj[:] = [np.array(b) for b in bags]
    for col in ((vals, offs), obj, [tuple(b) for b in bags]):
        got = fz.transform({"t": col, "g": col})
        np.testing.assert_array_equal(got[1][0], want[1][0])
        np.testing.assert_array_equal(got[1][1], want[1][1])
    fixed = np.array([[1, 2], [3, 4], [2, 2]])
    got = fz.transform({"t": fixed, "g": fixed})
    want = fz.transform({"t": fixed.tolist(), "g": fixed.tolist()})
    np.testing.assert_array_equal(got[1][0], want[1][0])
    np.testing.assert_array_equal(got[1][1], [0, 2, 4, 6, 8, 10, 12])
    # a bare value in a multi-valued column is a bag of one; None an empty bag
    got = fz.transform({"t": [5, None, [5]], "g": [1, None, [1]]})
    np.testing.assert_array_equal(got[1][1], [0, 1, 1, 2, 3, 3, 4])
    # A 0-d array is its one value: np.array("abc") was split into "a", "b", "c", np.array(b"ab")
    # hashed as the ids 97 and 98, and np.array(5) raised a TypeError.
    tz = Featurizer.from_spec({"version": 1, "sparse": [{"name": "s", "kind": "hash", "multi": True, "num_rows": 1000}]})
    for v in ("abc", b"ab", 5):
        rows, offsets = tz.transform({"s": [np.array(v), [v]]})[1]
        np.testing.assert_array_equal(offsets, [0, 1, 2])
        assert rows[0] == rows[1]
    with pytest.raises(ValueError, match="must be 1-D"):
        tz.transform({"s": [np.array([[1, 2]])]})
    one = Featurizer.from_spec({"version": 1, "sparse": [{"name": "s", "kind": "hash", "num_rows": 1000}]})
    for v in ("abc", b"ab", 5):  # single-valued too (was "a record holds a list array(5)")
        rows = one.transform({"s": [np.array(v), v]})[1][0]
        assert rows[0] == rows[1]


# ---- spec --------------------------------------------------------------------------------------


def test_spec_round_trip_through_json():
    fz = Featurizer.from_spec(SPEC)
    spec = fz.to_spec()
    text = json.dumps(spec)
    fz2 = Featurizer.from_spec(json.loads(text))
    assert fz2 == fz and fz2.to_spec() == spec and Featurizer.from_json(fz.to_json()) == fz
    # defaults are written out
    assert spec["sparse"][0]["salt"] == "C1" and spec["sparse"][2]["num_rows"] == 5
    assert spec["sparse"][6] == {"name": "age_bucket", "source": "age", "kind": "bucketize",
                                 "boundaries": [18.0, 25.5, 40.0], "num_rows": 5}
    assert spec["dense"][2]["fill"] == 30.0
    records = make_records(np.random.default_rng(0), 40)
    check_same(fz2.transform(records), ref_transform(SPEC, records))
    assert fz.dense_names == ("I1", "I2", "age_z", "price") and fz.num_dense == 4
    assert set(fz.sources) == {"I1", "I2", "age", "price", "C1", "city", "movie_id", "gender",
                               "tags", "genres"}


def _set(path, value):
    def mutate(spec):
        node = spec
        for k in path[:-1]:
            node = node[k]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return mutate


BAD_SPECS = [
    (_set(["version"], 2), "$.version"),
    (_set(["version"], "1"), "$.version"),
    (_set(["version"], KeyError), "$.version"),
    (_set(["extra"], 1), "$.extra"),
    (_set(["dense"], {}), "$.dense"),
    (_set(["dense", 0], "I1"), "$.dense[0]"),
    (_set(["dense", 0, "kind"], "log"), "$.dense[0].kind"),
    (_set(["dense", 0, "name"], ""), "$.dense[0].name"),
    (_set(["dense", 0, "name"], 3), "$.dense[0].name"),
    (_set(["dense", 0, "fill"], math.nan), "$.dense[0].fill"),
    (_set(["dense", 0, "fill"], "0"), "$.dense[0].fill"),
    (_set(["dense", 0, "fill"], True), "$.dense[0].fill"),
    (_set(["dense", 0, "fill"], 10**400), "$.dense[0].fill"),  # an int beyond float64
    (_set(["dense", 0, "name"], "I\udc80"), "$.dense[0].name"),  # a lone surrogate
    (_set(["dense", 0, "mean"], 1.0), "$.dense[0].mean"),
    (_set(["dense", 3, "fill"], 1e39), "$.dense[3].fill"),  # finite, but not in float32
    (lambda spec: spec["dense"][2].update(std=1e-300, fill=0.0), "$.dense[2].fill"),  # (fill - mean) / std
    (_set(["dense", 2, "std"], 0.0), "$.dense[2].std"),
    (_set(["dense", 2, "std"], KeyError), "$.dense[2].std"),
    (_set(["dense", 1, "name"], "I1"), "$.dense[1].name"),
    (_set(["sparse", 0, "name"], "I1"), "$.sparse[0].name"),
    (_set(["sparse", 0, "source"], 5), "$.sparse[0].source"),
    (_set(["sparse", 0, "num_rows"], 0), "$.sparse[0].num_rows"),
    (_set(["sparse", 0, "num_rows"], 2**63), "$.sparse[0].num_rows"),
    (_set(["sparse", 0, "num_rows"], 9.0), "$.sparse[0].num_rows"),
    (_set(["sparse", 0, "num_rows"], KeyError), "$.sparse[0].num_rows"),
    (_set(["sparse", 0, "salt"], 1.5), "$.sparse[0].salt"),
    (_set(["sparse", 0, "salt"], 2**64), "$.sparse[0].salt"),
    (_set(["sparse", 0, "salt"], "\ud800"), "$.sparse[0].salt"),
    (_set(["sparse", 4, "name"], "tags\ud800"), "$.sparse[4].name"),  # the default salt
    (_set(["sparse", 3, "vocab"], ["M", "\udc80"]), "$.sparse[3].vocab[1]"),
    (_set(["sparse", 0, "multi"], "yes"), "$.sparse[0].multi"),
    (_set(["sparse", 0, "vocab"], [1]), "$.sparse[0].vocab"),
    (_set(["sparse", 2, "vocab"], []), "$.sparse[2].vocab"),
    (_set(["sparse", 2, "vocab"], [1, 2, 1]), "$.sparse[2].vocab[2]"),
    (_set(["sparse", 2, "vocab"], [1, "a"]), "$.sparse[2].vocab[1]"),
    (_set(["sparse", 2, "vocab"], ["a", 1]), "$.sparse[2].vocab[1]"),
    (_set(["sparse", 2, "vocab"], [1, 2.0]), "$.sparse[2].vocab[1]"),
    (_set(["sparse", 2, "vocab"], [2**63]), "$.sparse[2].vocab[0]"),
    (_set(["sparse", 2, "oov_row"], -1), "$.sparse[2].oov_row"),
    (_set(["sparse", 3, "num_rows"], 1), "$.sparse[3].num_rows"),
    (_set(["sparse", 6, "boundaries"], [1, 1]), "$.sparse[6].boundaries[1]"),
    (_set(["sparse", 6, "boundaries"], [2, 1]), "$.sparse[6].boundaries[1]"),
    (_set(["sparse", 6, "boundaries"], [1, math.inf]), "$.sparse[6].boundaries[1]"),
    (_set(["sparse", 6, "boundaries"], [1, 2**1024]), "$.sparse[6].boundaries[1]"),
    (_set(["sparse", 6, "boundaries"], []), "$.sparse[6].boundaries"),
    (_set(["sparse", 6, "num_rows"], 4), "$.sparse[6].num_rows"),
    (_set(["sparse", 6, "multi"], True), "$.sparse[6].multi"),
    (_set(["sparse", 6, "kind"], None), "$.sparse[6].kind"),
]


@pytest.mark.parametrize("mutate,where", BAD_SPECS, ids=[w + f"#{i}" for i, (_, w) in enumerate(BAD_SPECS)])
def test_bad_specs(mutate, where):
    spec = copy.deepcopy(SPEC)
    mutate(spec)
    with pytest.raises(FeaturizerSpecError) as e:
        Featurizer.from_spec(spec)
    msg = str(e.value)
    assert where in msg, msg
    assert isinstance(e.value, ValueError)
    assert where.replace("$", "$.featurizer", 1) in str(
        pytest.raises(ValueError, Featurizer.from_spec, spec, path="$.featurizer").value)


def test_untrusted_json_numbers_and_strings():
    # from JSON text (a manifest): an integer literal too large for float64 raised OverflowError
    # and a lone surrogate salt UnicodeEncodeError, neither naming the field
    for text, where in (
            ('{"version": 1, "dense": [{"name": "x", "kind": "identity", "fill": 1%s}]}' % ("0" * 400),
             r"\$\.dense\[0\]\.fill"),
            ('{"version": 1, "sparse": [{"name": "x", "kind": "hash", "num_rows": 5, "salt": "\\ud800"}]}',
             r"\$\.sparse\[0\]\.salt"),
            ('{"version": 1, "sparse": [{"name": "\\ud800", "kind": "hash", "num_rows": 5}]}',
             r"\$\.sparse\[0\]\.name")):
        with pytest.raises(FeaturizerSpecError, match=where):
            Featurizer.from_json(text)
    # an int too long for str() is still reported, not a ValueError from repr
    with pytest.raises(FeaturizerSpecError, match=r"num_rows.*int of \d+ bits"):
        Featurizer.from_spec({"version": 1, "sparse": [{"name": "x", "kind": "hash", "num_rows": 10**5000}]})


@pytest.mark.parametrize("bad", [None, [], "{}", 1])
def test_spec_not_an_object(bad):
    with pytest.raises(FeaturizerSpecError, match=r"\$"):
        Featurizer.from_spec(bad)
    with pytest.raises(FeaturizerSpecError, match="JSON"):
        Featurizer.from_json("{not json")
    with pytest.raises(FeaturizerSpecError, match="nested too deeply"):  # was RecursionError
        Featurizer.from_json("[" * 100_000 + "]" * 100_000)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        Featurizer.from_spec(SPEC, backend="cuda")


# ---- transform errors --------------------------------------------------------------------------


def test_transform_errors():
    fz = Featurizer.from_spec({"version": 1, "dense": [{"name": "x", "kind": "log1p"}],
                               "sparse": [{"name": "c", "kind": "hash", "num_rows": 10},
                                          {"name": "v", "kind": "lookup", "vocab": [1, 2], "oov_row": None},
                                          {"name": "m", "kind": "lookup", "multi": True, "vocab": ["a"]}]})
    ok = {"x": [1.0, 2.0], "c": [1, 2], "v": [1, 2], "m": [["a"], []]}
    fz.transform(ok)

    def bad(**kw):
        return {**ok, **kw}

    with pytest.raises(ValueError, match="no column 'c'"):
        fz.transform({k: v for k, v in ok.items() if k != "c"})
    with pytest.raises(ValueError, match="'c' has 3 records"):
        fz.transform(bad(c=[1, 2, 3]))
    with pytest.raises(TypeError, match="'c'"):
        fz.transform(bad(c=np.array([1.0, 2.0])))
    with pytest.raises(TypeError, match="'c'"):
        fz.transform(bad(c=[1, 2.5]))
    with pytest.raises(TypeError, match="'c'"):
        fz.transform(bad(c=[1, "a"]))
    with pytest.raises(TypeError, match="'c'"):
        fz.transform(bad(c=[True, False]))
    with pytest.raises(ValueError, match="multi"):
        fz.transform(bad(c=[[1], [2]]))
    with pytest.raises(ValueError, match="multi"):
        fz.transform(bad(c=np.array([[1], [2]])))
    with pytest.raises(TypeError, match="'x'"):
        fz.transform(bad(x=["1", "2"]))
    with pytest.raises(TypeError, match="'v'.*integers"):
        fz.transform(bad(v=["1", "2"]))
    with pytest.raises(ValueError, match="'v'.*3.*not in the vocabulary"):
        fz.transform(bad(v=[1, 3]))
    with pytest.raises(TypeError, match="'m'.*strings"):
        fz.transform(bad(m=[[1], []]))
    with pytest.raises(ValueError, match="offsets"):
        fz.transform(bad(m=(np.array(["a"]), np.array([0, 2, 1]))))
    with pytest.raises(ValueError, match="offsets"):
        fz.transform(bad(m=(np.array(["a"]), np.array([0, 1, 2]))))
    with pytest.raises(TypeError, match="records"):
        fz.transform("x")
    with pytest.raises(TypeError, match=r"records\[1\]"):
        fz.transform([{"x": 1, "c": 1, "v": 1, "m": []}, 5])


def test_column_that_is_not_a_sequence_of_records():
    # a str column was read as one record per character, bytes as integer ids, a dict as its
    # keys and a set in an order that depends on PYTHONHASHSEED
    fz = Featurizer.from_spec({"version": 1, "dense": [{"name": "x", "kind": "identity"}],
                               "sparse": [{"name": "city", "kind": "hash", "num_rows": 1000}]})
    for bad in ("Paris", b"Paris", bytearray(b"\x05\x07"), {"Paris": 1}, {5, 7}, frozenset([5, 7])):
        for col in ("x", "city"):
            with pytest.raises(TypeError, match=f"column '{col}' is a {type(bad).__name__}.*array or a list"):
                fz.transform({"x": [1.0, 2.0], "city": ["a", "b"], col: bad})
    with pytest.raises(TypeError, match="column 'city'"):
        Featurizer.fit({"city": "Paris"}, sparse={"city": "lookup"})
    with pytest.raises(TypeError, match="column 'a'"):  # no features: the column gives the size
        Featurizer().transform({"a": "xyz"})
    # sequences of records still are columns: lists, tuples, ranges, arrays
    want = fz.transform({"x": [5, 7], "city": [5, 7]})
    for col in ((5, 7), range(5, 8, 2), np.array([5, 7])):
        check_same(fz.transform({"x": col, "city": col}), (want[0], *want[1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ints_beyond_float64_count_as_missing(backend):
    # a Python int beyond float64's range (2**1024) raised OverflowError; like a finite value
    # beyond float32's range it is missing, in every input form
    fz = Featurizer.from_spec({"version": 1, "dense": [{"name": "x", "kind": "identity", "fill": -1.0}],
                               "sparse": [{"name": "b", "source": "x", "kind": "bucketize",
                                           "boundaries": [0, 10]}]}, backend=backend)
    values = [2**1024, -(2**1024), 3, None, True]
    obj = np.empty(len(values), dtype=object)
    obj[:] = values
    for records in ({"x": values}, {"x": obj}, [{"x": v} for v in values]):
        dense, (idx, off) = fz.transform(records)
        np.testing.assert_array_equal(dense[:, 0], [-1, -1, 3, -1, 1])
        np.testing.assert_array_equal(idx, [3, 3, 1, 3, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strings_are_unicode_text(backend):
    # string lookup decoded bytes with "replace": b"\xff", b"\x80" and "\ufffd" were one value;
    # a lone surrogate was a bare UnicodeEncodeError for hash and out of vocabulary for lookup
    fz = Featurizer.from_spec({"version": 1, "sparse": [
        {"name": "h", "kind": "hash", "num_rows": 1000},
        {"name": "s", "kind": "lookup", "vocab": ["\ufffd", "café"]},
        {"name": "z", "kind": "lookup", "vocab": ["a", "b"], "oov_row": 0}]}, backend=backend)
    ok = {"h": ["a", "b"], "s": ["\ufffd", "café"], "z": ["b", "c"]}
    _, (idx, _) = fz.transform({"h": [b"a", b"\xff"], "s": [b"\xef\xbf\xbd", b"caf\xc3\xa9"],
                                "z": [b"b", b"c"]})
    assert idx[2:].tolist() == [0, 1, 1, 0]  # bytes compare as their UTF-8 text
    assert idx[:2].tolist() == hashing.hash_strings_ref([b"a", b"\xff"], 1000, "h").tolist()  # raw bytes
    for col, bad in (("s", b"\xff"), ("s", b"\x80"), ("z", b"caf\xe9"), ("s", "\ud800"), ("h", "x\udc80")):
        with pytest.raises(ValueError, match=f"sparse feature '{col}': value .* \\(position 1\\) is not "
                                             "valid UTF-8"):
            fz.transform({**ok, col: [ok[col][0], bad]})
    multi = Featurizer.from_spec({"version": 1, "sparse": [{"name": "t", "kind": "hash", "multi": True,
                                                            "num_rows": 10}]}, backend=backend)
    with pytest.raises(ValueError, match=r"'t': value '\\ud800' \(position 2\)"):
        multi.transform({"t": [["a"], [b"\xff", "\ud800"]]})
    # fit reads values the same way: a vocabulary of text, invalid text refused
    fit = Featurizer.fit({"s": [b"caf\xc3\xa9", "café", "a"]}, sparse={"s": "lookup"})
    assert fit.to_spec()["sparse"][0]["vocab"] == ["café", "a"]
    for bad in (b"\xff", "\ud800"):
        with pytest.raises(ValueError, match="sparse feature 's': value .* is not valid UTF-8"):
            Featurizer.fit({"s": ["a", bad]}, sparse={"s": "lookup"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_beyond_float32_count_as_missing(backend):
    # float32's max itself (and what rounds to it) is a valid fill
    Featurizer.from_spec({"version": 1, "dense": [{"name": "a", "kind": "identity", "fill": 3.4028235e38}]})
    Featurizer.from_spec({"version": 1, "dense": [{"name": "b", "kind": "log1p", "fill": 1e300}]})  # -> 690.8
    # 1e300 is a finite float64 but inf in float32: it used to reach the model as inf, which
    # refused the whole batch; now it is missing, as NaN is, and gets the fill
    spec = {"version": 1, "dense": [{"name": "a", "kind": "identity", "fill": -1.0},
                                    {"name": "z", "kind": "standardize", "mean": 1.0, "std": 1e-30},
                                    {"name": "l", "kind": "log1p"}]}
    fz = Featurizer.from_spec(spec, backend=backend)
    dense, _ = fz.transform({"a": [1e300, -1e39, 2.0, math.nan], "z": [1e10, 1.0, 1.0 + 2**-20, None],
                             "l": [1e300, 1.0, 0.0, math.inf]})
    want = np.array([[-1, 0, np.log1p(1e300)], [-1, 0, np.log1p(1.0)], [2, 2**-20 / 1e-30, 0], [-1, 0, 0]],
                    np.float32)
    np.testing.assert_array_equal(dense, want)


def test_empty_batch_and_no_features():
    fz = Featurizer.from_spec(SPEC)
    dense, (idx, off) = fz.transform([])
    assert dense.shape == (0, 4) and idx.shape == (0,) and off.tolist() == [0]
    dense, (idx, off) = Featurizer().transform({"a": [1, 2, 3]})
    assert dense.shape == (3, 0) and idx.shape == (0,) and off.tolist() == [0]


# ---- fit ---------------------------------------------------------------------------------------


def test_fit():
    rng = np.random.default_rng(5)
    n = 2000
    cols = {
        "movie": rng.zipf(1.5, n) % 50,
        "genre": [["a", "b", "c"][: i % 4] for i in range(n)],
        "age": rng.normal(35, 10, n),
        "count": rng.poisson(3, n).astype(float),
        "city": rng.integers(0, 10**9, n),
    }
    cols["age"][::10] = np.nan
    fz = Featurizer.fit(
        cols,
        dense={"age": "standardize", "count": "log1p"},
        sparse={"movie": {"kind": "lookup", "min_count": 2, "max_vocab": 20},
                "genre": {"kind": "lookup", "multi": True},
                "age_b": {"kind": "bucketize", "source": "age", "num_buckets": 4},
                "city": {"kind": "hash", "num_rows": 100}})
    spec = fz.to_spec()
    age = cols["age"][np.isfinite(cols["age"])]
    assert spec["dense"][0]["mean"] == pytest.approx(age.mean())
    assert spec["dense"][0]["std"] == pytest.approx(age.std())
    vals, counts = np.unique(cols["movie"], return_counts=True)
    order = sorted(zip(-counts, vals))
    want = [int(v) for c, v in order if -c >= 2][:20]
    assert spec["sparse"][0]["vocab"] == want and spec["sparse"][0]["oov_row"] == len(want)
    assert spec["sparse"][1]["vocab"] == ["a", "b", "c"]  # most frequent first
    np.testing.assert_allclose(spec["sparse"][2]["boundaries"], np.quantile(age, [0.25, 0.5, 0.75]))
    assert spec["sparse"][3] == {"name": "city", "kind": "hash", "salt": "city", "num_rows": 100}
    dense, (idx, off) = fz.transform(cols)
    assert abs(dense[:, 0][np.isfinite(cols["age"])].mean()) < 1e-4
    assert (dense[::10, 0] == 0).all()  # missing -> fill = mean -> 0
    b = idx[off[2 * n]:off[3 * n]]  # age buckets: about a quarter each, missing -> row 4
    counts = np.bincount(b, minlength=5)
    assert counts[4] == n // 10 and counts.shape == (5,) and fz.num_rows["age_b"] == 5
    assert (np.abs(counts[:4] - 0.9 * n / 4) <= 2).all()
    assert Featurizer.from_json(fz.to_json()) == fz
    with pytest.raises(ValueError, match=r"num_rows"):
        Featurizer.fit(cols, sparse={"city": "hash"})
    with pytest.raises(ValueError, match="no column"):
        Featurizer.fit(cols, dense={"nope": "standardize"})


def test_fit_statistics_of_values_near_the_float64_limit():
    # The mean, std and quantile interpolation of finite values ~1e308 overflowed: the spec check
    # then named a field the caller never wrote, or the std silently became 1.0.
    pos = np.array([1e308, 1.5e308, 1.7e308])
    sym = np.array([-1.7e308, 1.7e308, 1e308, -1e308])
    d = Featurizer.fit({"x": pos}, dense={"x": "standardize"}).to_spec()["dense"][0]
    assert d["mean"] == pytest.approx(np.mean(pos / 1e300) * 1e300) and d["std"] == pytest.approx(np.std(pos / 1e300) * 1e300)
    d = Featurizer.fit({"x": sym}, dense={"x": "standardize"}).to_spec()["dense"][0]
    assert d["mean"] == pytest.approx(0.0, abs=1e294) and d["std"] == pytest.approx(np.std(sym / 1e300) * 1e300)
    b = Featurizer.fit({"x": sym}, sparse={"x": {"kind": "bucketize", "num_buckets": 2}}).to_spec()["sparse"][0]
    assert b["boundaries"] == [0.0]
    # ordinary values: exactly what numpy gives (no rescaling)
    x = np.array([0.1, 0.7, 2.5, 3.3])
    d = Featurizer.fit({"x": x}, dense={"x": "standardize"}).to_spec()["dense"][0]
    assert (d["mean"], d["std"]) == (float(x.mean()), float(x.std()))


def test_fit_leaves_ints_outside_int64_out_of_the_vocabulary():
    # they are never keys (transform maps them to the oov row); fit failed on its own spec
    fz = Featurizer.fit({"c": [2**63, 1, 1, -(2**64), 5]}, sparse={"c": "lookup"})
    assert fz.to_spec()["sparse"][0]["vocab"] == [1, 5]
    _, (ids, _) = fz.transform({"c": [2**63, 1, 5, 7]})
    np.testing.assert_array_equal(ids, [2, 0, 1, 2])
    with pytest.raises(ValueError, match="outside int64"):
        Featurizer.fit({"c": [2**63, 2**64]}, sparse={"c": "lookup"})


def test_fit_with_min_count_that_keeps_no_value():
    # was a FeaturizerSpecError about "$.sparse[0].vocab" (a field the caller never wrote)
    with pytest.raises(ValueError, match="no value occurs at least min_count=2"):
        Featurizer.fit({"city": ["a", "b", "c"]}, sparse={"city": "lookup"}, min_count=2)


def test_fit_vocab_limits_are_checked():
    # max_vocab=-1 silently dropped the last entry, True kept one, 2.5 and min_count="2" were a
    # bare TypeError from deep inside
    cols = {"m": [5, 5, 7, 9]}
    for arg in ("max_vocab", "min_count"):
        for bad in (-1, 0, True, 2.5, "2"):
            with pytest.raises(FeaturizerSpecError, match=f"{arg} of 'm': expected an integer"):
                Featurizer.fit(cols, sparse={"m": "lookup"}, **{arg: bad})
            with pytest.raises(FeaturizerSpecError, match=f"{arg} of 'm'"):
                Featurizer.fit(cols, sparse={"m": {"kind": "lookup", arg: bad}})
    vocab = lambda **kw: Featurizer.fit(cols, sparse={"m": "lookup"}, **kw).to_spec()["sparse"][0]["vocab"]  # noqa: E731
    assert vocab(max_vocab=None) == vocab() == [5, 7, 9]
    assert vocab(max_vocab=np.int64(2)) == [5, 7] and vocab(min_count=2) == [5]


# ---- backends ----------------------------------------------------------------------------------


@pytest.mark.skipif(not fk.numba_available(), reason="numba not installed")
def test_numba_and_numpy_identical():
    rng = np.random.default_rng(11)
    n = 20000
    x = rng.standard_cauchy((n, 5)) * 100
    x[rng.random((n, 5)) < 0.1] = np.nan
    x[rng.random((n, 5)) < 0.01] = np.inf
    x[rng.random((n, 5)) < 0.01] = -np.inf
    x[:50, 1] = -0.0
    ops = np.array([0, 1, 2, 1, 2])
    fill = np.array([0.0, 0.5, 3.0, -1.0, 0.0])
    mean = np.array([0.0, 0.0, 2.5, 0.0, -7.0])
    std = np.array([1.0, 1.0, 0.3, 1.0, 11.0])
    a = fk.dense_transform(x, ops, fill, mean, std, backend="numba")
    b = fk.dense_transform(x, ops, fill, mean, std, backend="numpy")
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))  # bit for bit
    vocab = np.unique(rng.integers(-(10**6), 10**6, 5000))
    keys = vocab.copy()
    rows = rng.permutation(len(keys)).astype(np.int64)
    ids = np.concatenate([rng.choice(vocab, n), rng.integers(-(2**63), 2**63 - 1, 100)])
    np.testing.assert_array_equal(fk.lookup(ids, keys, rows, -7, backend="numba"),
                                  fk.lookup(ids, keys, rows, -7, backend="numpy"))
    np.testing.assert_array_equal(fk.lookup(ids, keys[:0], rows[:0], 3, backend="numba"),
                                  fk.lookup(ids, keys[:0], rows[:0], 3, backend="numpy"))
    for backend in ("numba", "numpy"):  # rows shorter than keys: the Numba loop read past them
        with pytest.raises(ValueError, match="one entry per key"):
            fk.lookup(ids, keys, rows[:2], -7, backend=backend)
    bounds = np.unique(rng.normal(0, 100, 33))
    v = np.concatenate([x[:, 0], bounds, [np.nan, np.inf, -np.inf]])
    np.testing.assert_array_equal(fk.bucketize(v, bounds, 99, backend="numba"),
                                  fk.bucketize(v, bounds, 99, backend="numpy"))
    records = make_records(rng, 300)
    check_same(Featurizer.from_spec(SPEC, backend="numba").transform(records),
               (lambda d, i: (d, *i))(*Featurizer.from_spec(SPEC, backend="numpy").transform(records)))


def test_without_numba(monkeypatch):
    """auto falls back to NumPy when Numba is absent; asking for numba then is an ImportError."""
    monkeypatch.setattr(fk, "_numba", lambda name: None)
    monkeypatch.setattr(hashing, "_numba", lambda name: None)
    records = make_records(np.random.default_rng(2), 30)
    check_same(Featurizer.from_spec(SPEC).transform(records), ref_transform(SPEC, records))
    with pytest.raises(ImportError, match="numba"):
        Featurizer.from_spec(SPEC, backend="numba")


@pytest.mark.parametrize("backend", BACKENDS)
def test_transform_from_threads(backend):
    fz = Featurizer.from_spec(SPEC, backend=backend)
    batches = [make_records(np.random.default_rng(100 + i), 64 + i) for i in range(16)]
    want = [ref_transform(SPEC, b) for b in batches]
    with ThreadPoolExecutor(4) as ex:
        for _ in range(3):
            got = list(ex.map(fz.transform, batches))
            for g, w in zip(got, want):
                check_same(g, w)



_WARMUP_CHILD = r"""
import json, sys, fastrec
from fastrec import demo
from fastrec.kernels import featurize as fk, hashing

def compiled():
    ks = [fk._numba(n) for n in ("dense", "lookup", "bucketize")] + [hashing._numba(n) for n in ("ids", "fnv")]
    return [len(k.signatures) for k in ks]

if sys.argv[1] == "shared":  # one source feeding a dense and a hash feature
    fz = fastrec.Featurizer(dense=[{"name": "hour_f", "source": "hour", "kind": "log1p"}],
                            sparse=[{"name": "hour", "kind": "hash", "num_rows": 24}])
    before = compiled()
    fz.warmup()
    after = compiled()
    fz.transform({"hour": [3, 4]})
    print(json.dumps([before, after, compiled()]))
    sys.exit(0)
with demo.demo_model_path(sys.argv[1]) as path:
    model = fastrec.load(path)
before = compiled()
model.warmup()
after = compiled()
if model.kind == "dlrm":  # the demo's own requests: raw Criteo-like records
    bodies, _ = demo._ranking_requests(model.manifest["metadata"], 20, 1)
    model.score_raw(demo._parse_request(bodies[0])[0])
else:
    model.recommend_raw([{"user_id": 1001, "age": 26, "country": "ES"},
                         {"user_id": 99999999, "age": 29, "country": "JP"}], k=5)
print(json.dumps([before, after, compiled()]))
"""


@pytest.mark.skipif(not fk.numba_available(), reason="numba is not installed")
@pytest.mark.parametrize("model", ["ranking", "retrieval", "shared"])
def test_model_warmup_compiles_the_featurizer_kernels(tmp_path, model):
    """Model.warmup() left the featurizer's Numba kernels to the first score_raw /
    recommend_raw (0.2-1 s in a fresh process). After it, a real request compiles nothing."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))  # a fresh process with a cold cache
    r = subprocess.run([sys.executable, "-c", _WARMUP_CHILD, model], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    before, after, later = json.loads(r.stdout.strip().splitlines()[-1])
    assert sum(before) == 0 and sum(after) > 0, r.stdout
    assert later == after, r.stdout  # nothing compiled after the warmup


def test_mixed_int_and_string_ids_name_the_rule():
    fz = Featurizer(sparse=[{"name": "c", "kind": "hash", "num_rows": 100}])
    for records, got in (([{"c": 1}, {"c": "a"}], "str 'a', the first is an integer id"),
                         ([{"c": "a"}, {"c": None}, {"c": 1}], "int 1, the first is a string")):
        with pytest.raises(TypeError, match=f"value 1 .*is {got}; one batch holds either"):
            fz.transform(records)
    with pytest.raises(TypeError, match="expected an integer id or a string"):
        fz.transform([{"c": 1}, {"c": 2.5}])
