"""Where the large fp32 Zipf case's time goes: fastrec and torch on ids drawn from only the
hottest rows of each table (cache-resident), on Zipf ids and on uniform ids.

Issue 2's large case (8 tables x 1M fp32 rows, D=64, B=2048 bags of 32 ids, numpy's allocation),
one implementation per process so that neither shares the CPUs with the other's idle threads
(torch's OpenMP workers spin after each call). Prints the median call time per (impl, ids).

    python benches/embedding_parts.py                       # hot100 hot1000 zipf uniform, 2 runs each
    python benches/embedding_parts.py --ids hot1000 zipf --runs 3 --seconds 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
T, ROWS, D, B, L, POOL = 8, 1_000_000, 64, 2048, 32, 8


def _requests(kind: str, rng):
    from benchutils import ZipfSampler, split_per_table, table_major_offsets

    off = table_major_offsets([L] * T, B)
    samplers = [ZipfSampler(ROWS, 1.05, seed=100 + t) for t in range(T)]
    reqs = []
    for _ in range(POOL):
        parts = []
        for z in samplers:
            if kind == "zipf":
                x = z(rng, B * L)
            elif kind == "uniform":
                x = rng.integers(0, ROWS, B * L)
            else:  # hotH: Zipf ids restricted to the H hottest rows
                h = int(kind[3:])
                r = np.searchsorted(z.cdf[:h] / z.cdf[h - 1], rng.random(B * L), side="right")
                x = z.perm[np.minimum(r, h - 1)]
            parts.append(x)
        ind = np.concatenate(parts).astype(np.int64)
        reqs.append((ind, split_per_table(ind, off, T, B)))
    return off, reqs


def _child(impl: str, kind: str, seconds: float) -> float:
    import torch

    import fastrec
    from benchutils import THREADS, random_table

    torch.set_num_threads(THREADS)
    fastrec.set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    tables = [random_table(rng, ROWS, D) for _ in range(T)]
    off, reqs = _requests(kind, rng)
    if impl == "fastrec":
        def call(q):
            return fastrec.ops.embedding_bags(tables, q[0], off)
    else:
        mods = [torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(w), freeze=True, mode="sum",
                                                      include_last_offset=True) for w in tables]
        reqs = [[(torch.from_numpy(i), torch.from_numpy(o)) for i, o in q[1]] for q in reqs]

        def call(q):
            return torch.cat([m(i, o) for m, (i, o) in zip(mods, q)], 1)
    with torch.inference_mode():
        for q in reqs:  # warm-up (no result check here: the tests and bench_embedding.py hold the two together)
            call(q)
        times = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a = time.perf_counter()
            call(reqs[len(times) % POOL])
            times.append(time.perf_counter() - a)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ids", nargs="+", default=["hot100", "hot1000", "zipf", "uniform"])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(_child(a.child[0], a.child[1], a.seconds))
        return 0
    print("| ids | fastrec (ms) | torch (ms) | torch / fastrec |\n|---|---|---|---:|")
    for kind in a.ids:
        got = {"fastrec": [], "torch": []}
        for _ in range(a.runs):
            for impl in got:
                out = subprocess.run([sys.executable, __file__, "--child", impl, kind, "--seconds", str(a.seconds)],
                                     capture_output=True, text=True, check=True, cwd=HERE)
                got[impl].append(float(out.stdout.split()[-1]) * 1e3)
        f, t = got["fastrec"], got["torch"]
        print(f"| {kind} | {' / '.join(f'{x:.2f}' for x in f)} | {' / '.join(f'{x:.2f}' for x in t)} "
              f"| {np.median(t) / np.median(f):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
