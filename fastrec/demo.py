"""``fastrec demo``: the two models shipped inside the package, served end to end with no torch.

* ``demo_models/ranking``: a DLRM click model, distilled from a 4x larger teacher on synthetic
  Criteo-shaped data (:func:`fastrec.datasets.synthetic_ctr`); int8 MLPs, 8-bit tables, and a
  featurizer that hashes raw ids and takes ``log1p`` of the counts.
* ``demo_models/retrieval``: a two-tower model trained on synthetic user / item interactions
  (:func:`synthetic_interactions`); int8 MLPs, 8-bit tables, an int8 item index with exact
  reranking, and a featurizer for the user side (user id, age bucket, country).

Both are built by ``tools/build_demo_models.py`` (needs torch; deterministic on one machine, but
torch's CPU kernels round differently on other CPUs, so a rebuild elsewhere trains other weights;
the shipped files were last rewritten, same tensors, by fastrec's 64-byte-aligning writer:
``write_model(path, *read_model(path))``). The demo sends raw
requests (JSON bodies, as a service would receive them) through fastrec (``recommend_raw``,
``score_raw``) and through a plain NumPy implementation of the same models written here from
the manifest's tensors (dequantized tables, int8 layers with per-row activation quantization,
float32 forward pass, brute-force top-k), checks that they agree, and prints per-stage latencies (request handling,
featurisation, model) of both.
"""

from __future__ import annotations

import json
import math
import time
from importlib import resources

import numpy as np

__all__ = ["demo_model_path", "main", "NumpyReference", "synthetic_interactions"]

COUNTRIES = ("US", "DE", "FR", "GB", "JP", "BR", "IN", "ES", "IT", "CA")
GENRES = ("drama", "comedy", "action", "jazz", "news", "sports", "kids", "science")


# ---- the retrieval data (shared with tools/build_demo_models.py) ----------------------------

def synthetic_interactions(*, seed: int = 0, n_users: int = 2000, n_items: int = 3000, dim: int = 16,
                           per_user: int = 40, temperature: float = 0.5) -> dict:
    """Deterministic latent-factor users and items, and each user's interactions.

    Users have a raw id (``1001 + u``), an age and a country; their hidden taste vector is a
    country vector + an age-group vector + a personal part. Items have a raw id (``100000 + 7 j``)
    and a genre; their hidden vector is the genre's + a personal part, plus a popularity bias.
    Each user interacts with ``per_user`` distinct items sampled (Gumbel top-k) from
    ``softmax(affinity / temperature)``, ``affinity = <user, item> + bias``.

    Returns a dict: ``user_id, age, country`` (n_users,), ``item_id, genre`` (n_items,),
    ``affinity(users) -> (len(users), n_items)`` (the hidden scores) and ``interactions``
    (n_users, per_user) item positions in sampling order (the most likely first, roughly).
    """
    rng = np.random.default_rng([seed, 7])
    country = rng.integers(0, len(COUNTRIES), n_users)
    age = rng.integers(16, 76, n_users)
    age_group = np.searchsorted([25, 35, 45, 55, 65], age, side="right")
    c_vec = rng.normal(0, 1.0, (len(COUNTRIES), dim))
    a_vec = rng.normal(0, 0.8, (6, dim))
    u = (c_vec[country] + a_vec[age_group] + rng.normal(0, 0.7, (n_users, dim))) / math.sqrt(dim)
    genre = rng.integers(0, len(GENRES), n_items)
    g_vec = rng.normal(0, 1.0, (len(GENRES), dim))
    v = g_vec[genre] + rng.normal(0, 0.6, (n_items, dim))
    bias = rng.normal(0, 0.5, n_items)

    def affinity(users):
        return u[users] @ v.T + bias

    inter = np.empty((n_users, per_user), dtype=np.int64)
    for s in range(0, n_users, 500):
        users = np.arange(s, min(n_users, s + 500))
        z = affinity(users) / temperature + rng.gumbel(size=(len(users), n_items))
        top = np.argpartition(-z, per_user, axis=1)[:, :per_user]
        order = np.argsort(-np.take_along_axis(z, top, 1), axis=1)
        inter[users] = np.take_along_axis(top, order, 1)
    return {"user_id": 1001 + np.arange(n_users, dtype=np.int64), "age": age.astype(np.int64),
            "country": np.array([COUNTRIES[c] for c in country]),
            "item_id": 100000 + 7 * np.arange(n_items, dtype=np.int64), "genre": genre,
            "affinity": affinity, "interactions": inter}


# ---- the models -------------------------------------------------------------------------

def demo_model_path(name: str):
    """A context manager giving the directory of an embedded demo model ("ranking" |
    "retrieval") as a real path (``importlib.resources.as_file``)."""
    if name not in ("ranking", "retrieval"):
        raise ValueError(f"no demo model {name!r}; there are 'ranking' and 'retrieval'")
    return resources.as_file(resources.files("fastrec") / "demo_models" / name)


def _dequantize_table(t: dict, data: np.ndarray) -> np.ndarray:
    if t["storage"] == "q8":  # FBGEMM: dim uint8 codes, then fp32 scale and fp32 bias per row
        D = t["dim"]
        raw = np.ascontiguousarray(data)
        scale = raw[:, D:D + 4].copy().view(np.float32)
        bias = raw[:, D + 4:D + 8].copy().view(np.float32)
        return raw[:, :D].astype(np.float32) * scale + bias
    if t["storage"] in ("fp32", "fp16"):
        return np.asarray(data, dtype=np.float32)
    raise ValueError(f"the NumPy reference reads fp32 / fp16 / q8 tables, not {t['storage']}")


def _dequantize_layers(layers, tensors) -> list:
    """``[(W.T float32, weight scales or None, bias or None, activation)]``: an int8 layer keeps
    its int8 codes (as exact float32) and per-channel scales."""
    out = []
    for layer in layers:
        W = np.asarray(tensors[layer["weight"]], dtype=np.float32)
        scale = None
        if layer.get("weight_scale") is not None:
            scale = np.asarray(tensors[layer["weight_scale"]], dtype=np.float32)
        b = tensors[layer["bias"]] if layer.get("bias") is not None else None
        out.append((np.ascontiguousarray(W.T), scale, b, layer["activation"]))
    return out


def _mlp(x, layers):
    for Wt, scale, b, act in layers:
        if scale is None:
            x = x @ Wt
        else:  # int8: activations quantized per row (symmetric, amax / 127), as the engine does
            amax = np.abs(x).max(axis=1).astype(np.float32)
            inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
            q = np.clip(np.rint(x * inv[:, None]), -127, 127).astype(np.float32)
            x = (q @ Wt) * (amax / np.float32(127))[:, None] * scale  # exact integer sums in float32
        if b is not None:
            x = x + b
        if act == "relu":
            x = np.maximum(x, 0)
        elif act == "sigmoid":
            x = 1.0 / (1.0 + np.exp(-x))
    return x


class NumpyReference:
    """The same model in plain NumPy (float32), from a model directory's manifest and tensors:
    8-bit tables dequantized once, int8 layers as the int8 engine defines them (activations
    quantized per row, integer dot products, then both scales), embedding bags as
    ``np.add.reduceat``,
    the DLRM dot interaction as a batched matmul, top-k by ``argpartition`` over every item."""

    def __init__(self, path):
        from .featurizer import Featurizer
        from .io import read_model

        m, tensors = read_model(path)
        self.kind = m["kind"]
        self.featurizer = Featurizer.from_spec(m["featurizer"], backend="numpy")
        tables = {t["name"]: _dequantize_table(t, tensors[t["tensor"]]) for t in m["tables"]}
        self.table_of = {f["name"]: tables[f["table"]] for f in m["sparse_features"]}
        if self.kind == "dlrm":
            self.features = [f["name"] for f in m["sparse_features"]]
            self.bottom = _dequantize_layers(m["dlrm"]["bottom_mlp"], tensors)
            self.top = _dequantize_layers(m["dlrm"]["top_mlp"], tensors)
        else:
            tt = m["two_tower"]
            user = set(tt["user"]["features"])
            self.features = [f["name"] for f in m["sparse_features"] if f["name"] in user]
            self.concat = [self.features.index(f) for f in tt["user"]["features"]]
            self.user_mlp = _dequantize_layers(tt["user"]["mlp"], tensors)
            self.normalize = tt["user"]["normalize"]
            self.items = np.array(tensors[tt["index"]["items"]], dtype=np.float32)
            self.ids = np.array(tensors[tt["index"]["ids"]])

    def featurize(self, records):
        return self.featurizer.transform(records)

    def _bags(self, indices, offsets):
        T = len(self.features)
        B = (len(offsets) - 1) // T
        out = []
        for t, f in enumerate(self.features):
            off = offsets[t * B:(t + 1) * B + 1]
            rows = self.table_of[f][indices[off[0]:off[-1]]]
            pooled = np.zeros((B, rows.shape[1]), dtype=np.float32)
            nonempty = off[1:] > off[:-1]
            if rows.shape[0]:
                sums = np.add.reduceat(rows, (off[:-1] - off[0])[nonempty], axis=0)
                pooled[nonempty] = sums
            out.append(pooled)
        return out

    def score(self, dense, sparse):
        x = _mlp(dense, self.bottom)
        z = np.stack([x] + self._bags(*sparse), axis=1)          # (B, T+1, D)
        dots = z @ z.transpose(0, 2, 1)
        i, j = np.tril_indices(z.shape[1], -1)
        top_in = np.concatenate([x, dots[:, i, j]], axis=1)
        return _mlp(top_in, self.top)[:, 0]

    def recommend(self, sparse, k, exclude=None):
        bags = self._bags(*sparse)
        q = _mlp(np.concatenate([bags[i] for i in self.concat], axis=1), self.user_mlp)
        if self.normalize:
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        s = q @ self.items.T
        if exclude is not None:
            pos = {int(v): n for n, v in enumerate(self.ids)}
            for b, ex in enumerate(exclude):
                s[b, [pos[int(e)] for e in ex if int(e) in pos]] = -np.inf
        top = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        return np.take_along_axis(s, top, 1), self.ids[top]


# ---- requests -----------------------------------------------------------------------------

def _parse_request(body: str):
    """Request handling: a JSON body -> a list of per-record dicts (what a service would do)."""
    req = json.loads(body)
    if not isinstance(req, dict) or not isinstance(req.get("records"), list):
        raise ValueError("a request is a JSON object with a list 'records'")
    return req["records"], req.get("k", 10)


def _clean(v):
    if isinstance(v, (float, np.floating)) and not math.isfinite(v):
        return None
    return v.item() if isinstance(v, np.generic) else v


def _ranking_requests(meta: dict, n_candidates: int, n_requests: int):
    """``n_requests`` JSON bodies of ``n_candidates`` raw candidates each (synthetic_ctr with
    the model's data settings and another seed), and the hidden click probabilities."""
    from .datasets import synthetic_ctr

    args = json.loads(meta["synthetic_ctr"])
    data = synthetic_ctr(n_candidates * n_requests, **args)
    cols = data.columns()
    bodies, probs = [], []
    for r in range(n_requests):
        sl = slice(r * n_candidates, (r + 1) * n_candidates)
        recs = [{k: _clean(cols[k][i]) for k in cols} for i in range(sl.start, sl.stop)]
        bodies.append(json.dumps({"records": recs}))
        probs.append(data.probs[sl])
    return bodies, probs


def _percentiles(xs):
    a = np.asarray(xs) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


class _Timer:
    def __init__(self):
        self.times = {}

    def run(self, stage, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        self.times.setdefault(stage, []).append(time.perf_counter() - t)
        return out


def _serve(timer: _Timer, body, featurize, model):
    records, k = timer.run("request handling", _parse_request, body)
    inputs = timer.run("featurisation", featurize, records)
    return timer.run("model", model, inputs, k)


def main(*, users: int = 4, candidates: int = 270, repeat: int = 200, out=print) -> int:
    """Runs the demo (``fastrec demo``); returns the exit status (1 when fastrec and the NumPy
    reference disagree)."""
    import fastrec

    if users < 1 or candidates < 10 or repeat < 1:
        raise ValueError("users >= 1, candidates >= 10 and repeat >= 1")
    with demo_model_path("ranking") as rpath, demo_model_path("retrieval") as tpath:
        ranker, retriever = fastrec.load(rpath), fastrec.load(tpath)
        ranker_ref, retriever_ref = NumpyReference(rpath), NumpyReference(tpath)
    meta_r = ranker.manifest["metadata"]
    meta_t = retriever.manifest["metadata"]
    out(f"fastrec {fastrec.__version__} demo: two embedded models, no torch, no download")
    for name, m in (("ranking", ranker), ("retrieval", retriever)):
        desc = m.manifest["metadata"].get("description", "")
        out(f"  {name:<9} {m.kind}, {m.precision} MLPs, {m.tables[0].storage} tables, "
            f"{m.nbytes / 1024:.0f} KiB: {desc}")

    # ---- retrieval: raw user requests -> top 10 --------------------------------------------
    data = synthetic_interactions(**json.loads(meta_t["synthetic_interactions"]))
    genre_of = dict(zip(data["item_id"].tolist(), (GENRES[g] for g in data["genre"])))
    picks = list(np.linspace(0, len(data["user_id"]) - 1, max(users - 1, 1)).astype(int))[:max(users - 1, 1)]
    user_records = [{"user_id": int(data["user_id"][u]), "age": int(data["age"][u]),
                     "country": str(data["country"][u])} for u in picks]
    if users > 1:
        user_records.append({"user_id": 99999999, "age": 29, "country": "JP"})  # a new user
    user_records = user_records[:users]
    body = json.dumps({"records": user_records, "k": 10})
    records, k = _parse_request(body)
    scores, ids = retriever.recommend_raw(records, k=k)
    ref_scores, ref_ids = retriever_ref.recommend(retriever_ref.featurize(records)[1], k)
    out("")
    out(f"Recommendations (recommend_raw, top {k} of {len(retriever.index)} items):")
    pos = {int(v): n for n, v in enumerate(data["item_id"])}
    for b, rec in enumerate(records):
        who = ", ".join(f"{key}={val}" for key, val in rec.items())
        known = rec["user_id"] in set(data["user_id"].tolist())
        line = "  ".join(f"{int(i)}:{genre_of[int(i)]}" for i in ids[b][:5])
        out(f"  user {who}{'' if known else ' (new user: id not in the vocabulary)'}")
        out(f"    top 5: {line}")
        if known:
            u = int(np.searchsorted(data["user_id"], rec["user_id"]))
            aff = data["affinity"](np.array([u]))[0]
            best = set(np.argsort(-aff)[:100].tolist())
            hits = sum(pos[int(i)] in best for i in ids[b])
            out(f"    {hits}/{k} of the top {k} are among this user's 100 best items under the hidden model")
    overlap = np.mean([len(set(ids[b].tolist()) & set(ref_ids[b].tolist())) / k for b in range(len(records))])

    # ---- ranking: ~270 raw candidates -> probabilities ---------------------------------------
    n_req = min(repeat, 50)
    bodies, probs = _ranking_requests(meta_r, candidates, n_req)
    recs, _ = _parse_request(bodies[0])
    p = ranker.score_raw(recs)
    p_ref = ranker_ref.score(*ranker_ref.featurize(recs))
    diff = float(np.max(np.abs(p - p_ref)))
    order = np.argsort(-p, kind="stable")
    out("")
    out(f"Ranking {len(recs)} raw candidates (score_raw), the best 5 (true p: the data's hidden model):")
    out("    rank  model p  numpy p   true p   C1 (raw id)            I1 (count)")
    for r, i in enumerate(order[:5]):
        out(f"    {r + 1:>4}  {p[i]:.4f}   {p_ref[i]:.4f}   {probs[0][i]:.4f}   {recs[i]['C1']:<22} {recs[i]['I1']}")
    corr = float(np.corrcoef(p, probs[0])[0, 1])
    out(f"  correlation of model p with true p over the {len(recs)} candidates: {corr:.3f}")

    # ---- latency ----------------------------------------------------------------------------
    ranker.warmup()
    retriever.warmup()
    user_bodies = [json.dumps({"records": [rec], "k": 10}) for rec in user_records]  # (request r: r % len)
    engines = {
        "fastrec": (
            (ranker.featurizer.transform, lambda x, k: ranker.score(*x)),
            (retriever.featurizer.transform, lambda x, k: retriever.recommend(x[1], k))),
        "numpy": (
            (ranker_ref.featurize, lambda x, k: ranker_ref.score(*x)),
            (retriever_ref.featurize, lambda x, k: retriever_ref.recommend(x[1], k))),
    }
    timers = {}
    for name, ((rf, rm), (tf, tm)) in engines.items():
        for task, f, mdl, reqs in (("rank", rf, rm, bodies), ("recommend", tf, tm, user_bodies)):
            timer = timers[(name, task)] = _Timer()
            _serve(timer, reqs[0], f, mdl)  # warm-up
            timer.times.clear()
            for r in range(repeat):
                _serve(timer, reqs[r % len(reqs)], f, mdl)
    out("")
    out(f"Latency per request, ms (p50 / p99 over {repeat} requests, same requests for both; "
        f"rank: {candidates} candidates, recommend: 1 user, top 10):")
    out(f"    {'task':<10} {'stage':<17} {'fastrec p50':>11} {'p99':>8} {'numpy p50':>10} {'p99':>8} {'speed-up':>9}")
    for task in ("rank", "recommend"):
        totals = {}
        for stage in ("request handling", "featurisation", "model", "total"):
            row = {}
            for name in ("fastrec", "numpy"):
                t = timers[(name, task)].times
                xs = np.sum([t[s] for s in ("request handling", "featurisation", "model")], axis=0) \
                    if stage == "total" else t[stage]
                row[name] = _percentiles(xs)
            totals[stage] = row
            (fp50, fp99), (np50, np99) = row["fastrec"], row["numpy"]
            out(f"    {task:<10} {stage:<17} {fp50:>11.3f} {fp99:>8.3f} {np50:>10.3f} {np99:>8.3f} "
                f"{np50 / max(fp50, 1e-9):>8.1f}x")
    out("")
    ok = diff < 1e-3 and overlap >= 0.9
    out(f"Agreement with the NumPy reference: max |p - p_ref| = {diff:.2e} over {len(recs)} candidates; "
        f"top-{k} overlap {overlap * 100:.0f}% over {len(records)} users"
        f": {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1
