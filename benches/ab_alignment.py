"""What a table's start address costs: fastrec's ``embedding_bags`` over the same table contents
placed 16 bytes past a 64-byte boundary (where numpy puts large arrays, and where safetensors'
own writer left fp32 tables of a model) and 64-byte aligned (where ``fastrec.io.write_model``
and ``fastrec.aligned_empty`` put them).

    python benches/ab_alignment.py                       # fp32 and fp16, 26 x 100,000 x 64, B=2048
    python benches/ab_alignment.py --rows 1000000 --tables 8 --bag 32 --batch 2048 --dtype float32

Interleaved rounds, the order alternating; each round times 5 calls of each over rotating
requests, and the ratio (misaligned / aligned time) is taken within the round. Prints the
median and IQR of the rounds. Uniform random ids; the default bag sizes are MLPerf DLRMv2's.
Threads: ``FASTREC_BENCH_THREADS`` (default 2).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import fastrec
from benchutils import DLRM_V2_MULTI_HOT as DLRMV2_BAGS
from fastrec import ops


def _offset_table(rng, rows: int, dim: int, dtype: np.dtype, shift: int) -> np.ndarray:
    """A (rows, dim) table whose data starts `shift` bytes past a 64-byte boundary."""
    nbytes = rows * dim * dtype.itemsize
    raw = np.empty(nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + shift
    table = raw[start:start + nbytes].view(dtype).reshape(rows, dim)
    table[:] = rng.standard_normal((rows, dim))
    return table


def run(rows: int, dim: int, batch: int, dtype: str, bags, rounds: int = 30, calls: int = 5) -> dict:
    dt = np.dtype(dtype)
    rng = np.random.default_rng(0)
    off16 = [_offset_table(rng, rows, dim, dt, 16) for _ in bags]
    aligned = [fastrec.aligned_copy(t) for t in off16]
    requests = []
    for _ in range(6):
        lengths = np.repeat(np.asarray(bags, dtype=np.int64), batch)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        requests.append((rng.integers(0, rows, int(lengths.sum())), offsets))
    for idx, off in requests:  # same contents, same results, bit for bit
        assert np.array_equal(ops.embedding_bags(off16, idx, off), ops.embedding_bags(aligned, idx, off))
    times = {"16 bytes off": [], "aligned": []}
    ratios = []
    for r in range(rounds):
        order = (("16 bytes off", off16), ("aligned", aligned))
        t = {}
        for name, tables in order if r % 2 else order[::-1]:
            t0 = time.perf_counter()
            for k in range(calls):
                ops.embedding_bags(tables, *requests[(r + k) % len(requests)])
            t[name] = (time.perf_counter() - t0) / calls
            times[name].append(t[name])
        ratios.append(t["16 bytes off"] / t["aligned"])
    q = np.percentile(ratios, [25, 50, 75])
    return {"ms": {k: 1e3 * float(np.median(v)) for k, v in times.items()}, "ratio": q}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--tables", type=int, default=None, help="with --bag: that many tables of equal bags")
    p.add_argument("--bag", type=int, default=None, help="ids per bag (default: MLPerf DLRMv2's sizes)")
    p.add_argument("--dtype", action="append", choices=["float32", "float16"])
    p.add_argument("--rounds", type=int, default=30)
    a = p.parse_args()
    fastrec.set_num_threads(int(os.environ.get("FASTREC_BENCH_THREADS", "2")))
    bags = DLRMV2_BAGS if a.bag is None else (a.bag,) * (a.tables or 8)
    print(f"fastrec {fastrec.__version__}, {fastrec.get_num_threads()} threads; {len(bags)} tables of "
          f"{a.rows} x {a.dim}, B={a.batch}, bags {'DLRMv2' if a.bag is None else a.bag}, uniform ids")
    for dtype in a.dtype or ["float32", "float16"]:
        res = run(a.rows, a.dim, a.batch, dtype, bags, rounds=a.rounds)
        lo, mid, hi = res["ratio"]
        print(f"{dtype}: 16 bytes off {res['ms']['16 bytes off']:.2f} ms, aligned {res['ms']['aligned']:.2f} ms; "
              f"off / aligned {mid:.2f}x (IQR {lo:.2f}-{hi:.2f}x)")


if __name__ == "__main__":
    main()
