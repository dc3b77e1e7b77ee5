"""Latency of small embedding requests arriving with idle gaps between them, as in serving.

Back-to-back loops (the other benches) keep caches, thread pools and the CPU itself warm. A
server's requests come with gaps: this times one call after each gap of 0, 0.3, 1 and 5 ms
(`time.sleep`), for fastrec's one `embedding_bags` call and torch's loop over the tables
(bench_embedding.py's small case: 26 tables of 100,000 rows, D=64, MLPerf DLRMv2's bag sizes).

    python benches/paced.py                    # 8-bit and fp32, B=270 and B=1
    python benches/paced.py --precision 8bit --batch 270 --calls 1000

Per gap the order is fastrec, torch, fastrec, torch (each run shows how much the same code
moves within one run); the ratio is the mean of torch's two over the mean of fastrec's two.
torch runs under ``torch.inference_mode()``, entered once. p50 / p99 per call, microseconds.
The first table is the machine's own cost of waking up:
`np.add(1, 1)` and `embedding_bags` over 26 cache-resident tables of 128 rows, timed the same way. Threads: FASTREC_BENCH_THREADS (default 2), both libraries.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_embedding as be  # noqa: E402  (the tables, requests and runners of the small case)

import fastrec  # noqa: E402
from benchutils import THREADS  # noqa: E402

GAPS_MS = (0, 0.3, 1, 5)


def measure(run, requests, gap_ms: float, calls: int) -> tuple[float, float]:
    for r in requests[:3]:
        run(r)
    times = []
    for i in range(calls):
        if gap_ms:
            time.sleep(gap_ms / 1e3)
        t0 = time.perf_counter()
        run(requests[i % len(requests)])
        times.append(time.perf_counter() - t0)
    p50, p99 = np.percentile(np.asarray(times) * 1e6, [50, 99])
    return float(p50), float(p99)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precision", action="append", choices=["8bit", "fp32"])
    p.add_argument("--batch", action="append", type=int, choices=[1, 270])
    p.add_argument("--calls", type=int, default=600)
    a = p.parse_args()
    import torch

    fastrec.set_num_threads(THREADS)
    torch.set_num_threads(THREADS)
    print(f"fastrec {fastrec.__version__}, torch {torch.__version__}, {THREADS} threads each; p50 / p99 us per call")
    tables = be.get_tables("small")
    small = be.get_small_requests(1)
    tiny = [fastrec.QuantizedTable.from_float(np.ones((128, be.D), np.float32), bits=8) for _ in range(be.SMALL_T)]
    tiny_requests = [(r.indices % 128, r.offsets) for r in small]
    print("\nwake-up cost, B=1\n| gap | np.add(1, 1) | embedding_bags, 26 x 128 rows |\n|---|---:|---:|")
    for gap in GAPS_MS:
        noop = measure(lambda r: np.add(1, 1), small, gap, a.calls)
        cached = measure(lambda r: fastrec.ops.embedding_bags(tiny, *r), tiny_requests, gap, a.calls)
        print(f"| {gap} ms | {noop[0]:.1f} / {noop[1]:.1f} | {cached[0]:.1f} / {cached[1]:.1f} |")
    for precision in a.precision or ["8bit", "fp32"]:
        runs = {"fastrec": be._runner("fastrec", precision, tables), "torch": be._runner("torch", precision, tables)}
        for batch in a.batch or [270, 1]:
            requests = be.get_small_requests(batch)
            be.assert_same(runs["fastrec"](requests[0]), runs["torch"](requests[0]).numpy(), "fastrec vs torch")
            print(f"\n{precision}, B={batch}\n| gap | fastrec (1st; 2nd) | torch (1st; 2nd) | "
                  "torch / fastrec (p50, p99) |\n|---|---:|---:|---:|")
            for gap in GAPS_MS:
                calls = a.calls if gap < 5 else a.calls // 2
                with torch.inference_mode():
                    f1 = measure(runs["fastrec"], requests, gap, calls)
                    t1 = measure(runs["torch"], requests, gap, calls)
                    f2 = measure(runs["fastrec"], requests, gap, calls)
                    t2 = measure(runs["torch"], requests, gap, calls)
                ratio = [(t1[i] + t2[i]) / (f1[i] + f2[i]) for i in (0, 1)]
                print(f"| {gap} ms | {f1[0]:.0f} / {f1[1]:.0f}; {f2[0]:.0f} / {f2[1]:.0f} | "
                      f"{t1[0]:.0f} / {t1[1]:.0f}; {t2[0]:.0f} / {t2[1]:.0f} | {ratio[0]:.1f}x, {ratio[1]:.1f}x |")


if __name__ == "__main__":
    main()
