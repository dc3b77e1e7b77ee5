"""CUDA top-k: fastrec's device ItemIndex against torch.topk(q @ items.T, k), on one GPU.

    python benches/bench_cuda_topk.py [--json results.json] [--n 10000000] [--reps 10]

A plain script (CUDA-event timings, not pytest-benchmark); about 1-2 minutes on an H100, most of
it building the three indexes (CPU packing + upload) and the float64 ground truth.

Case: N items x D = 64 (standard normal, float32), Q in {1, 16, 256} queries (standard normal),
k = 100, inner product.

Implementations (all on the same GPU, inputs already there):
* fastrec-int8: ``ItemIndex(precision="int8", rerank=True)`` (the default) searched with a torch
  CUDA tensor: IMMA first pass, 1.5k candidates reranked in float64 over the float32 rows.
* fastrec-fp16: ``precision="fp16"`` (rerank=True).
* fastrec-fp32: ``precision="fp32"`` (rerank=True).
* torch-fp32: ``torch.topk(q @ items.T, k)`` with float32 items (TF32 off, torch's default for
  matmul), the full Q x N score matrix materialised.
* torch-fp16: the same with float16 items and queries.
If the Q x N score matrix does not fit, torch runs over catalogue chunks of 1M items (topk per
chunk, then a topk of the merged candidates); the table says so.

Times: median over --reps of one call each, CUDA events around the call after a synchronise
(fastrec waits for its stream at the end of a search, so a call's time includes that).
Recall@100: the fraction of the float64 exact top-100 ids each implementation returns, averaged
over queries. Prints a markdown table and writes everything to --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def _time(fn, reps, torch):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _chunked_topk(torch, score, n, k, chunk):
    """topk of score(c0, c1) (Q x (c1 - c0)) over catalogue chunks, merged as it goes."""
    best_s = best_i = None
    for c0 in range(0, n, chunk):
        s = score(c0, min(n, c0 + chunk))
        ts, ti = torch.topk(s, min(k, s.shape[1]), dim=1)
        ti = ti + c0
        if best_s is not None:
            ts, ti = torch.cat([best_s, ts], 1), torch.cat([best_i, ti], 1)
            o = torch.topk(ts, min(k, ts.shape[1]), dim=1).indices
            ts, ti = ts.gather(1, o), ti.gather(1, o)
        best_s, best_i = ts, ti
    return best_s, best_i


def _exact(torch, q, x, k, chunk=1 << 20):
    """float64 exact top-k ids over catalogue chunks."""
    q64 = q.double()
    return _chunked_topk(torch, lambda c0, c1: q64 @ x[c0:c1].double().T, x.shape[0], k, chunk)[1]


def _torch_topk(torch, q, x, k, chunk):
    if chunk is None:
        return torch.topk(q @ x.T, k, dim=1)
    return _chunked_topk(torch, lambda c0, c1: q @ x[c0:c1].T, x.shape[0], k, chunk)


def _recall(ids, exact):
    ids, exact = ids.cpu().numpy(), exact.cpu().numpy()
    return float(np.mean([len(np.intersect1d(a, b)) / exact.shape[1] for a, b in zip(ids, exact)]))


def main():
    import torch

    import fastrec
    from fastrec import _cuda_topk

    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--queries", default="1,16,256")
    args = ap.parse_args()
    qs = [int(v) for v in args.queries.split(",")]
    rng = np.random.default_rng(0)
    items = rng.standard_normal((args.n, args.d), dtype=np.float32)
    queries = rng.standard_normal((max(qs), args.d), dtype=np.float32)
    dev = torch.device("cuda")
    dq = torch.from_numpy(queries).to(dev)
    dx = torch.from_numpy(items).to(dev)
    dx16 = dx.half()
    t0 = time.time()
    exact = _exact(torch, dq, dx, args.k)
    t_exact = time.time() - t0

    impls = {}
    build = {}
    for prec in ("int8", "fp16", "fp32"):
        t0 = time.time()
        index = fastrec.ItemIndex(items, precision=prec, rerank=True)
        _cuda_topk.upload(index, dq)
        build[prec] = time.time() - t0
        impls[f"fastrec-{prec}"] = (lambda q, index=index: index.search(q, args.k))

    # torch: full score matrix if it fits (with room for topk's workspace), else 1M-item chunks
    free, _ = torch.cuda.mem_get_info()
    chunked = max(qs) * args.n * 4 * 2.5 > free
    chunk = (1 << 20) if chunked else None
    impls["torch-fp32"] = lambda q: _torch_topk(torch, q, dx, args.k, chunk)
    impls["torch-fp16"] = lambda q: _torch_topk(torch, q.half(), dx16, args.k, chunk)

    rows = []
    for Q in qs:
        q = dq[:Q].contiguous()
        for name, fn in impls.items():
            try:
                ms = _time(lambda: fn(q), args.reps, torch)
                _, ids = fn(q)
                rec = _recall(ids, exact[:Q])
            except torch.cuda.OutOfMemoryError as e:  # pragma: no cover
                ms, rec = float("nan"), float("nan")
                print(f"{name} Q={Q}: out of memory ({e})")
            rows.append({"Q": Q, "impl": name, "ms": ms, "recall@k": rec})
            torch.cuda.empty_cache()

    props = torch.cuda.get_device_properties(0)
    print(f"\nN={args.n} D={args.d} k={args.k} on {props.name}; torch {'chunked (1M items)' if chunked else 'full score matrix'}"
          f"; exact ground truth {t_exact:.1f}s; index build+upload s: {build}\n")
    print("| Q | impl | ms | recall@k | speedup vs torch-fp32 | vs torch-fp16 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base32 = next(x["ms"] for x in rows if x["Q"] == r["Q"] and x["impl"] == "torch-fp32")
        base16 = next(x["ms"] for x in rows if x["Q"] == r["Q"] and x["impl"] == "torch-fp16")
        print(f"| {r['Q']} | {r['impl']} | {r['ms']:.3f} | {r['recall@k']:.4f} | {base32 / r['ms']:.2f}x | "
              f"{base16 / r['ms']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "n": args.n, "d": args.d, "k": args.k, "torch_chunked": chunked,
                       "build_s": build, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
