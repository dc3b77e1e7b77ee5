"""Paired (interleaved) ratios for the whole-model bench: fastrec and each peer take turns.

    python benches/paired.py                      # B=2048 and B=270, 15 rounds
    python benches/paired.py --batch 2048 --rounds 25 --calls 5

pytest-benchmark (benches/report.py) times each implementation in one block, one after the
other. On a shared VM whose speed drifts by +-30% over tens of seconds, a slow spell that
falls on one block moves that ratio by as much. Here every round runs each implementation for a
few calls (the order rotates from round to round, with a 0.3 s pause before each block so
that torch's spinning OpenMP workers are idle), and the ratio is taken within the round:
peer's median call / fastrec's median call. The report gives the median of the per-round
ratios and their interquartile range, and p50 / p99 over all of each implementation's calls
(batches under 1000 rows, single requests, run 8x the calls per block).

Same models, inputs and output checks as bench_model.py (which this imports).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _block(fn, args, calls: int) -> list:
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t0)
    return ts


def paired(batch: int, rounds: int, calls: int, impls, pause: float = 0.3):
    """{impl: per-round lists of call times in seconds}, rounds interleaved."""
    import bench_model as bm

    fns = {}
    for name in impls:
        fns[name] = bm._impl(name)
        bm._check(name, fns[name](*bm._batch(batch)), batch)  # right answers before any timing
    args = bm._batch(batch)
    for name in impls:  # warm-up
        _block(fns[name], args, 2)
    times = {name: [] for name in impls}
    for r in range(rounds):
        order = list(impls[r % len(impls):]) + list(impls[:r % len(impls)])
        for name in order:
            time.sleep(pause)
            times[name].append(_block(fns[name], args, calls))
    return times


def report(batch: int, times: dict, base: str = "fastrec") -> str:
    """Per impl: p50 / p99 over all its calls, and the per-round ratios of medians to base's."""
    b = np.asarray([np.median(block) for block in times[base]])
    b99 = np.percentile(np.concatenate(times[base]), 99)
    lines = [f"| B={batch} | impl | p50 | p99 | p50 ratio: median of rounds (IQR) | p99 ratio |",
             "|---|---|---:|---:|---|---:|"]
    for name, blocks in times.items():
        med = np.asarray([np.median(block) for block in blocks])
        q1, q2, q3 = np.percentile(med / b, [25, 50, 75])
        every = np.concatenate(blocks)
        p50, p99 = np.percentile(every, [50, 99])
        lines.append(f"| | {name} | {p50 * 1e3:.2f} ms | {p99 * 1e3:.2f} ms | {q2:.2f}x ({q1:.2f}-{q3:.2f}x) "
                     f"| {p99 / b99:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, action="append", help="batch size (repeatable; default 2048 and 270)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=5, help="calls per implementation per round")
    args = p.parse_args(argv)
    sys.path.insert(0, HERE)
    import platform

    import fastrec
    import torch
    from benchutils import THREADS

    import bench_model as bm

    fastrec.set_num_threads(THREADS)
    torch.set_num_threads(THREADS)
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"threads per library: {THREADS}; fastrec {fastrec.__version__}; load before: {os.getloadavg()}")
    for batch in args.batch or (2048, 270):
        calls = args.calls if batch >= 1000 else 8 * args.calls  # single requests: enough calls for a p99
        times = paired(batch, args.rounds, calls, bm.IMPLS)
        print()
        print(report(batch, times))
    print(f"\nload after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
