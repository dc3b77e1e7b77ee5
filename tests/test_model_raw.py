"""Models with a featurizer: export(..., featurizer=...) -> load -> score_raw / recommend_raw,
and the manifest checks of the "featurizer" field (docs/FORMAT.md, FEATURIZER)."""

import json

import numpy as np
import pytest

import fastrec
from fastrec import Featurizer, ModelFormatError
from fastrec.datasets import synthetic_ctr

torch = pytest.importorskip("torch")
from fastrec.torch import DLRM, TwoTower, export  # noqa: E402

CARDS = (50, 200, 7)
ROWS = (64, 256, 16)


def _ctr_featurizer(rows=ROWS):
    return Featurizer(
        dense=[{"name": f"I{j + 1}", "kind": "log1p"} for j in range(4)],
        sparse=[{"name": f"C{j + 1}", "kind": "hash", "num_rows": r} for j, r in enumerate(rows)])


def _dlrm():
    torch.manual_seed(0)
    return DLRM(4, [(f"t{j}", r, 8) for j, r in enumerate(ROWS)],
                {f"C{j + 1}": f"t{j}" for j in range(3)}, bottom_mlp=[16, 8], top_mlp=[16, 1])


@pytest.fixture(scope="module")
def ranking(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "ctr"
    export(_dlrm(), path, precision="int8", embedding_bits=8, featurizer=_ctr_featurizer())
    return path


def _tower_featurizer(user_rows=30):
    return {"version": 1, "sparse": [
        {"name": "user_id", "kind": "lookup", "vocab": list(range(100, 100 + user_rows - 1))},
        {"name": "age_bucket", "source": "age", "kind": "bucketize", "boundaries": [18, 30, 50]}]}


def _two_tower():
    torch.manual_seed(1)
    return TwoTower({"user_id": "users", "age_bucket": "ages"}, {"item_id": "items"},
                    [("users", 30, 8), ("ages", 5, 8), ("items", 40, 8)], user_mlp=[8], item_mlp=[8])


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "tt"
    export(_two_tower(), path, featurizer=_tower_featurizer())
    return path


def test_score_raw_round_trip(ranking):
    model = fastrec.load(ranking)
    assert model.featurizer == _ctr_featurizer()
    assert json.loads((ranking / "manifest.json").read_text())["featurizer"] == _ctr_featurizer().to_spec()
    data = synthetic_ctr(300, seed=3, num_dense=4, num_sparse=3, cardinalities=CARDS)
    cols = data.columns()
    dense, sparse = _ctr_featurizer().transform(cols)
    want = model.score(dense, sparse)
    np.testing.assert_array_equal(model.score_raw(cols), want)
    # a list of per-record dicts gives the same
    records = [{k: (None if isinstance(v[i], float) and np.isnan(v[i]) else v[i].item())
                for k, v in cols.items()} for i in range(20)]
    np.testing.assert_array_equal(model.score_raw(records), want[:20])
    assert model.score_raw({k: v[:0] for k, v in cols.items()}).shape == (0,)


def test_recommend_raw_round_trip(retrieval):
    model = fastrec.load(retrieval)
    assert model.featurizer.sparse_names == model.user_features
    records = [{"user_id": 103, "age": 25}, {"user_id": 999, "age": None}, {"user_id": 100, "age": 70}]
    _, sparse = Featurizer.from_spec(_tower_featurizer()).transform(records)
    s0, i0 = model.recommend(sparse, k=5, exclude=[[0], [], [1, 2]])
    s1, i1 = model.recommend_raw(records, k=5, exclude=[[0], [], [1, 2]])
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_array_equal(s0, s1)
    np.testing.assert_array_equal(model.user_vectors_raw(records), model.user_vectors(sparse))


def test_raw_needs_a_featurizer_and_the_right_kind(tmp_path, ranking, retrieval):
    export(_dlrm(), tmp_path / "plain")
    plain = fastrec.load(tmp_path / "plain")
    assert plain.featurizer is None
    with pytest.raises(ValueError, match="featurizer"):
        plain.score_raw({"I1": [1.0]})
    with pytest.raises(TypeError, match="dlrm"):
        fastrec.load(retrieval).score_raw([{"user_id": 1}])
    with pytest.raises(TypeError, match="two_tower"):
        fastrec.load(ranking).recommend_raw([{"C1": 1}])


def test_export_rejects_bad_featurizer_arguments(tmp_path):
    with pytest.raises(TypeError, match="featurizer"):
        export(_dlrm(), tmp_path / "a", featurizer="hash")
    with pytest.raises(ValueError, match=r"\$.sparse\[0\].num_rows"):
        export(_dlrm(), tmp_path / "b", featurizer={"version": 1, "sparse": [{"name": "C1", "kind": "hash"}]})
    with pytest.raises(ModelFormatError, match=r"\$.featurizer.sparse\[1\].num_rows"):
        export(_dlrm(), tmp_path / "c", featurizer=_ctr_featurizer(rows=(64, 257, 16)))


def _rewrite(src, dst, fn):
    dst.mkdir()
    m = json.loads((src / "manifest.json").read_text())
    fn(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return dst


def _set(path, value):
    def fn(m):
        obj = m
        keys = path.split(".")
        for k in keys[:-1]:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        if value is _DEL:
            del obj[keys[-1]]
        else:
            obj[int(keys[-1]) if isinstance(obj, list) else keys[-1]] = value
    return fn


_DEL = object()

BAD_SPECS = [  # (field under $.featurizer, new value, JSON path named by the error)
    ("version", 2, "$.featurizer.version"),
    ("version", "1", "$.featurizer.version"),
    ("surprise", 1, "$.featurizer.surprise"),
    ("dense", {}, "$.featurizer.dense"),
    ("dense.0.kind", "sqrt", "$.featurizer.dense[0].kind"),
    ("dense.1.fill", "zero", "$.featurizer.dense[1].fill"),
    ("sparse.0.num_rows", 0, "$.featurizer.sparse[0].num_rows"),
    ("sparse.0.num_rows", _DEL, "$.featurizer.sparse[0].num_rows"),
    ("sparse.1.kind", "lookup", "$.featurizer.sparse[1].vocab"),
    ("sparse.2.salt", [1], "$.featurizer.sparse[2].salt"),
    ("sparse.2.name", "I1", "$.featurizer.sparse[2].name"),
]


@pytest.mark.parametrize("field,value,where", BAD_SPECS)
def test_bad_featurizer_spec_is_a_model_format_error(tmp_path, ranking, field, value, where):
    bad = _rewrite(ranking, tmp_path / "m", _set("featurizer." + field, value))
    with pytest.raises(ModelFormatError) as e:
        fastrec.load(bad)
    assert e.value.field == where, str(e.value)
    assert str(bad / "manifest.json") in str(e.value)


MISMATCHES = [  # the featurizer does not make this model's input
    ("featurizer.sparse", lambda s: s[::-1], "$.featurizer.sparse"),          # order differs
    ("featurizer.sparse", lambda s: s[:2], "$.featurizer.sparse"),            # one missing
    ("featurizer.sparse", lambda s: s + [{"name": "C4", "kind": "hash", "num_rows": 5}],
     "$.featurizer.sparse"),                                                  # one too many
    ("featurizer.dense", lambda d: d[:3], "$.featurizer.dense"),              # dense count
    ("featurizer.sparse", lambda s: [dict(s[0], num_rows=65)] + s[1:], "$.featurizer.sparse[0].num_rows"),
]


@pytest.mark.parametrize("field,change,where", MISMATCHES)
def test_mismatching_featurizer_is_a_model_format_error(tmp_path, ranking, field, change, where):
    def fn(m):
        key = field.split(".")[1]
        m["featurizer"][key] = change(m["featurizer"][key])
    bad = _rewrite(ranking, tmp_path / "m", fn)
    with pytest.raises(ModelFormatError) as e:
        fastrec.load(bad)
    assert e.value.field == where, str(e.value)


def test_two_tower_featurizer_mismatches(tmp_path, retrieval):
    def item_feature(m):  # the item tower's feature is not the featurizer's business
        m["featurizer"]["sparse"].append({"name": "item_id", "kind": "hash", "num_rows": 40})
    with pytest.raises(ModelFormatError, match="user tower") as e:
        fastrec.load(_rewrite(retrieval, tmp_path / "a", item_feature))
    assert e.value.field == "$.featurizer.sparse"

    def dense(m):
        m["featurizer"]["dense"] = [{"name": "x", "kind": "identity"}]
    with pytest.raises(ModelFormatError) as e:
        fastrec.load(_rewrite(retrieval, tmp_path / "b", dense))
    assert e.value.field == "$.featurizer.dense"

    def vocab(m):  # 40 vocabulary entries + the OOV row: 41 rows > the table's 30
        m["featurizer"]["sparse"][0]["vocab"] = list(range(40))
        m["featurizer"]["sparse"][0]["oov_row"] = 40
        m["featurizer"]["sparse"][0]["num_rows"] = 41
    with pytest.raises(ModelFormatError) as e:
        fastrec.load(_rewrite(retrieval, tmp_path / "c", vocab))
    assert e.value.field == "$.featurizer.sparse[0].num_rows"


def test_validate_manifest_checks_the_featurizer(ranking):
    manifest, tensors = fastrec.io.read_model(ranking)
    manifest = dict(manifest, featurizer=dict(manifest["featurizer"], dense=[]))
    with pytest.raises(ModelFormatError, match=r"\$.featurizer.dense"):
        fastrec.Model(manifest, {k: np.array(v) for k, v in tensors.items()})
