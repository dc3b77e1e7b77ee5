"""A loop over one Int8MLP call, for profilers: `perf record python benches/mlp_loop.py`.

Runs the 1024-1024-512-256-1 MLP of bench_linear.py (relu, relu, relu, sigmoid; random weights)
at batch B for a few seconds and prints the time per call and the int8 MACs per second.

    python benches/mlp_loop.py                      # B=2048, 8 s
    python benches/mlp_loop.py --batch 256 --seconds 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import fastrec

DIMS = (1024, 1024, 512, 256, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--seconds", type=float, default=8.0)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    layers = [(rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k), rng.standard_normal(n).astype(np.float32))
              for k, n in zip(DIMS, DIMS[1:])]
    mlp = fastrec.Int8MLP.from_float(layers, ["relu", "relu", "relu", "sigmoid"])
    x = rng.standard_normal((a.batch, DIMS[0])).astype(np.float32)
    for _ in range(10):
        mlp(x)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        mlp(x)
        calls += 1
    dt = (time.perf_counter() - t0) / calls
    macs = a.batch * sum(k * n for k, n in zip(DIMS, DIMS[1:]))
    print(f"B={a.batch}: {dt * 1e3:.2f} ms a call, {macs / dt / 1e9:.0f} G int8 MACs/s "
          f"({fastrec.get_num_threads()} threads, {calls} calls)")


if __name__ == "__main__":
    main()
