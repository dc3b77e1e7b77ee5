"""Two fastrec builds, interleaved: how much faster is a change, measured on the same inputs.

    pip install --no-deps --target /tmp/build-a <old checkout>     # each a release build
    pip install --no-deps --target /tmp/build-b .
    python benches/ab_builds.py /tmp/build-a /tmp/build-b                       # embedding cases
    python benches/ab_builds.py /tmp/build-a /tmp/build-b --case small-8bit-B270 --rounds 20

Each build runs in its own worker process (two copies of fastrec cannot share one process);
both build the same tables and requests as benches/bench_embedding.py. Round after round, each
worker times a few calls (the order alternates, with a 0.2 s pause before each block) and the
ratio A / B is taken within the round. Prints the median of the per-round ratios and their
interquartile range: above 1 means build B is faster.

Caveat: each worker holds its own copy of the tables. For DRAM-bound cases (large fp32) where
those copies landed moved the ratio of a build against an identical copy of itself to 1.22x
(IQR 1.00-1.28) on our Zen 4 VM. Run A against a copy of A first; trust only differences well
outside that. Cache-resident cases (8-bit, small requests) were steadier.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [f"large-{p}-{d}" for p in ("fp32", "8bit") for d in ("uniform", "zipf")]
CASES += [f"small-{p}-B{b}" for p in ("fp32", "8bit") for b in (1, 270)]


def worker(build: str) -> None:
    """Reads 'case calls' lines on stdin, answers with the median call time in seconds."""
    sys.path.insert(0, HERE)
    import bench_embedding as be
    import fastrec

    if not os.path.abspath(fastrec.__file__).startswith(os.path.abspath(build)):
        raise SystemExit(f"fastrec came from {fastrec.__file__}, not from {build}")
    from benchutils import THREADS

    fastrec.set_num_threads(THREADS)
    print("ready", flush=True)
    for line in sys.stdin:
        case, calls = line.split()
        kind, precision, var = case.split("-")
        tables = be.get_tables(kind).get(precision)
        reqs = be.get_large_requests(var) if kind == "large" else be.get_small_requests(int(var[1:]))
        ts = []
        for i in range(int(calls) + 1):
            r = reqs[i % len(reqs)]
            t0 = time.perf_counter()
            fastrec.ops.embedding_bags(tables, r.indices, r.offsets)
            ts.append(time.perf_counter() - t0)
        print(float(np.median(ts[1:])), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build_a", help="a directory holding one fastrec build (e.g. pip install --target)")
    p.add_argument("build_b")
    p.add_argument("--case", default="", help="only cases whose name contains this")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--calls", type=int, default=9, help="calls per block (x40 for B=1, x8 for B=270)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    procs = {}
    for name, build in (("A", args.build_a), ("B", args.build_b)):
        env = dict(os.environ, PYTHONPATH=os.path.abspath(build))
        procs[name] = subprocess.Popen([sys.executable, os.path.abspath(__file__), build, build, "--worker", build],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                       cwd=os.path.dirname(os.path.abspath(build)))
    for proc in procs.values():
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("a worker failed to start")
    print(f"A = {args.build_a}, B = {args.build_b}; A / B per round, median (IQR)")
    for case in CASES:
        if args.case and args.case not in case:
            continue
        calls = args.calls * (40 if case.endswith("-B1") else 8 if case.endswith("-B270") else 1)
        t = {"A": [], "B": []}
        for r in range(args.rounds):
            for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                time.sleep(0.2)
                procs[name].stdin.write(f"{case} {calls}\n")
                procs[name].stdin.flush()
                t[name].append(float(procs[name].stdout.readline()))
        ratio = np.array(t["A"]) / np.array(t["B"])
        q1, q3 = np.percentile(ratio, [25, 75])
        print(f"{case:18s} A {np.median(t['A']) * 1e3:8.3f} ms  B {np.median(t['B']) * 1e3:8.3f} ms  "
              f"A/B {np.median(ratio):.2f}x ({q1:.2f}-{q3:.2f})", flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
