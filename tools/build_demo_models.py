"""Builds the demo models shipped in fastrec/demo_models/ (``fastrec demo``). Needs torch.

    python tools/build_demo_models.py            # writes fastrec/demo_models/{ranking,retrieval}

Deterministic (fixed seeds, one torch thread): the same fastrec and torch give the same files.

* ranking: synthetic Criteo-shaped click data (fastrec.datasets.synthetic_ctr, 13 counts and 10
  categorical features with small cardinalities), a featurizer (hash the raw ids, log1p the
  counts), a teacher DLRM (64-dim tables, wide MLPs) trained on the labels, and a 4x smaller
  student (16-dim tables, narrow MLPs) distilled from it; the student is exported with int8 MLPs
  and 8-bit tables. Prints the AUC of the teacher, the student and the exported int8 student.
* retrieval: synthetic latent-factor users / items (fastrec.demo.synthetic_interactions), a
  two-tower model (user id + age bucket + country; item id + genre) trained with a full softmax
  over the catalogue, exported int8 with its item index and a user-side featurizer. Prints recall@10 of the
  torch model and the exported int8 model on held-out interactions.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import numpy as np
import torch

import fastrec
from fastrec import Featurizer
from fastrec.datasets import synthetic_ctr
from fastrec.demo import synthetic_interactions
from fastrec.torch import DLRM, TwoTower, distill, export, train

OUT = pathlib.Path(__file__).resolve().parent.parent / "fastrec" / "demo_models"
CTR = {"seed": 0, "num_dense": 13, "num_sparse": 10,
       "cardinalities": [1460, 583, 12000, 6000, 305, 24, 3000, 633, 3, 8000]}
INTER = {"seed": 0, "n_users": 2000, "n_items": 3000}
EPOCHS, LR = 10, 3e-3  # retrieval training


def auc(y, p) -> float:
    y = np.asarray(y) > 0.5
    order = np.argsort(p, kind="stable")
    ranks = np.empty(len(p))
    sp = np.asarray(p)[order]
    # average ranks of ties
    start = 0
    r = np.arange(1, len(p) + 1, dtype=np.float64)
    while start < len(sp):
        end = start
        while end + 1 < len(sp) and sp[end + 1] == sp[start]:
            end += 1
        r[start:end + 1] = (start + end + 2) / 2
        start = end + 1
    ranks[order] = r
    npos = y.sum()
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * (len(y) - npos)))


def ctr_batches(fz, data, batch=1024):
    cols = data.columns()
    out = []
    for s in range(0, len(data), batch):
        sub = {k: v[s:s + batch] for k, v in cols.items()}
        dense, (idx, off) = fz.transform(sub)
        out.append((torch.from_numpy(dense), torch.from_numpy(idx), torch.from_numpy(off),
                    torch.from_numpy(data.labels[s:s + batch])))
    return out


def predict(model, batches):
    model.eval()
    with torch.no_grad():
        return np.concatenate([torch.sigmoid(model(d, i, o)).numpy() for d, i, o, _ in batches])


def build_ranking():
    rows = [min(4096, 1 << int(np.ceil(np.log2(2 * c)))) for c in CTR["cardinalities"]]
    fz = Featurizer(dense=[{"name": f"I{j + 1}", "kind": "log1p"} for j in range(13)],
                    sparse=[{"name": f"C{j + 1}", "kind": "hash", "num_rows": r} for j, r in enumerate(rows)])
    train_data = synthetic_ctr(200_000, **CTR)
    test_data = synthetic_ctr(250_000, **CTR)
    test_cols = {k: v[200_000:] for k, v in test_data.columns().items()}
    tr = ctr_batches(fz, train_data)
    te_dense, (te_i, te_o) = fz.transform(test_cols)
    te_y = test_data.labels[200_000:]
    te = [(torch.from_numpy(te_dense), torch.from_numpy(te_i), torch.from_numpy(te_o), None)]

    def dlrm(dim, bottom, top):
        return DLRM(13, [(f"t{j + 1}", r, dim) for j, r in enumerate(rows)],
                    {f"C{j + 1}": f"t{j + 1}" for j in range(10)}, bottom_mlp=bottom + [dim], top_mlp=top + [1])

    torch.manual_seed(0)
    teacher = dlrm(64, [128], [256, 128])
    train(teacher, tr, epochs=3, lr=2e-3, progress=False)
    torch.manual_seed(1)
    student = dlrm(16, [32], [64])
    distill(teacher, student, tr, epochs=3, temperature=2.0, alpha=0.5, lr=3e-3, progress=False)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    path = OUT / "ranking"
    shutil.rmtree(path, ignore_errors=True)
    export(student, path, precision="int8", embedding_bits=8, featurizer=fz, metadata={
        "description": "DLRM click model distilled 4x on synthetic Criteo-shaped data",
        "synthetic_ctr": json.dumps(CTR),
        "built_by": "tools/build_demo_models.py"})
    model = fastrec.load(path)
    p_int8 = model.score_raw(test_cols)
    print(f"ranking: teacher {n_t:,} parameters, student {n_s:,} ({n_t / n_s:.1f}x smaller)")
    print(f"  test AUC: hidden model {auc(te_y, test_data.probs[200_000:]):.4f}, "
          f"teacher {auc(te_y, predict(teacher, te)):.4f}, student {auc(te_y, predict(student, te)):.4f}, "
          f"student int8 (fastrec) {auc(te_y, p_int8):.4f}")


def build_retrieval():
    data = synthetic_interactions(**INTER)
    nu, ni = len(data["user_id"]), len(data["item_id"])
    inter = data["interactions"]
    rng = np.random.default_rng(5)
    held = np.zeros_like(inter, dtype=bool)
    for u in range(nu):
        held[u, rng.choice(inter.shape[1], 5, replace=False)] = True
    fz = Featurizer(sparse=[
        {"name": "user_id", "kind": "lookup", "vocab": data["user_id"].tolist()},
        {"name": "age_bucket", "source": "age", "kind": "bucketize", "boundaries": [25, 35, 45, 55, 65]},
        {"name": "country", "kind": "lookup", "vocab": list(fastrec.demo.COUNTRIES)}])
    rows = fz.num_rows
    users = {"user_id": data["user_id"], "age": data["age"], "country": data["country"]}
    _, (ui, uo) = fz.transform(users)
    # one row per user's feature: user_id, age_bucket, country rows
    urows = ui.reshape(3, nu)
    pairs_u, pairs_i = np.nonzero(~held)
    pairs_i = inter[pairs_u, pairs_i]
    torch.manual_seed(2)
    model = TwoTower({"user_id": "users", "age_bucket": "ages", "country": "countries"},
                     {"item_id": "items", "genre": "genres"},
                     [("users", rows["user_id"], 32), ("ages", rows["age_bucket"], 16),
                      ("countries", rows["country"], 16), ("items", ni, 32), ("genres", 8, 16)],
                     user_mlp=[64, 32], item_mlp=[64, 32], normalize=False)
    items = (torch.from_numpy(np.concatenate([np.arange(ni), data["genre"]])), torch.arange(2 * ni + 1),
             data["item_id"])
    # full softmax over the whole catalogue (3000 items: cheap), so no in-batch sampling bias
    g = np.random.default_rng(3)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    for epoch in range(EPOCHS):
        perm = g.permutation(len(pairs_u))
        total = 0.0
        for s in range(0, len(perm), 512):
            b = perm[s:s + 512]
            u, i = pairs_u[b], pairs_i[b]
            uid = urows[0, u].copy()
            uid[g.random(len(u)) < 0.05] = rows["user_id"] - 1  # the OOV row learns a generic user
            B = len(u)
            q = model.user_vectors(torch.from_numpy(np.concatenate([uid, urows[1, u], urows[2, u]])),
                                   torch.arange(3 * B + 1))
            v = model.item_vectors(items[0], items[1])
            loss = torch.nn.functional.cross_entropy(q @ v.T, torch.from_numpy(i))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * B
        print(f"  epoch {epoch + 1}: loss {total / len(perm):.3f}", file=sys.stderr)
    path = OUT / "retrieval"
    shutil.rmtree(path, ignore_errors=True)
    export(model, path, precision="int8", embedding_bits=8, items=items, featurizer=fz, metadata={
        "description": "two-tower retrieval model on synthetic latent-factor users and items",
        "synthetic_interactions": json.dumps(INTER), "built_by": "tools/build_demo_models.py"})
    fm = fastrec.load(path)
    seen = [data["item_id"][inter[u][~held[u]]] for u in range(nu)]
    _, top = fm.recommend_raw(users, k=10, exclude=seen)
    truth = [set(data["item_id"][inter[u][held[u]]].tolist()) for u in range(nu)]
    recall = np.mean([len(truth[u] & set(top[u].tolist())) / 5 for u in range(nu)])
    model.eval()
    with torch.no_grad():
        q = model.user_vectors(torch.from_numpy(ui), torch.from_numpy(uo)).numpy()
        v = model.item_vectors(items[0], items[1]).numpy()
    s = q @ v.T
    for u in range(nu):
        s[u, inter[u][~held[u]]] = -np.inf
    ttop = np.argsort(-s, axis=1)[:, :10]
    t_recall = np.mean([len(truth[u] & set(data["item_id"][ttop[u]].tolist())) / 5 for u in range(nu)])
    aff = data["affinity"](np.arange(nu))
    for u in range(nu):
        aff[u, inter[u][~held[u]]] = -np.inf
    otop = np.argsort(-aff, axis=1)[:, :10]
    o_recall = np.mean([len(truth[u] & set(data["item_id"][otop[u]].tolist())) / 5 for u in range(nu)])
    pop = np.bincount(pairs_i, minlength=ni).astype(float)
    print(f"retrieval: {nu} users, {ni} items, {len(pairs_u)} training interactions")
    print(f"  held-out recall@10: hidden model {o_recall:.3f}, torch fp32 {t_recall:.3f}, "
          f"fastrec int8 {recall:.3f}, popularity {np.mean([len(truth[u] & set(data['item_id'][np.argsort(-np.where(np.isin(np.arange(ni), inter[u][~held[u]]), -1, pop))[:10]].tolist())) / 5 for u in range(nu)]):.3f}")


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    build_ranking()
    build_retrieval()
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
