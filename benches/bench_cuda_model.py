"""A whole DLRM on the GPU: ``fastrec.load(path, device="cuda")`` against the torch module on CUDA.

    python benches/bench_cuda_model.py [--json results.json] [--reps 500] [--batches 2048,270]

A plain script (not pytest-benchmark: the timings are CUDA events), a minute or two on an H100
(most of it building and exporting the model).

Model (the issue-5 DLRM shape): 13 dense features; 26 tables of 100,000 rows, D = 64, one
feature each, with the MLPerf DLRMv2 multi-hot sizes (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6,
9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1) ids per sample (sum pooling); bottom MLP 512-256-64,
top MLP 1024-1024-512-256-1. Built with ``fastrec.torch.DLRM`` (torch's default Linear
initialisation; table rows N(0, 0.1^2) so the interaction matters), exported
with ``fastrec.torch.export`` twice: ``precision="int8", embedding_bits=8`` (int8 MLPs, q8 tables)
and ``precision="fp32", embedding_bits=None``. Requests: uniform random ids, dense N(0, 1); a pool
of 4 distinct requests per batch size, cycled.

Implementations (all on one GPU, torch's current stream, inputs already on the GPU unless said):
* fastrec-int8 / fastrec-fp32: ``Model.score(dense, (indices, offsets))`` of the model loaded with
  ``device="cuda"`` (torch framework), sparse input as one table-major pair (KeyedJaggedTensor
  layout). fastrec-int8-host: the same with numpy inputs (copied to the GPU inside the call).
* torch-fp32 / torch-fp16: the DLRM module moved to CUDA (``.cuda()``; ``.half()`` for fp16, dense
  input in fp16), its submodules called in eager mode under ``inference_mode`` on per-feature
  device ids / offsets split once beforehand: dense_arch -> one ``nn.EmbeddingBag`` per table ->
  inter_arch -> over_arch -> sigmoid. torch-module: ``DLRM.predict`` itself on the device pair (its
  input checks and per-feature splitting included), for information.

Before timing, each output is checked against torch-fp32 on every request of the pool: fp32 paths
within 1e-4 absolute on the probabilities, fp16 within 1e-2, int8 within 2e-2.

Timings, from CUDA events on the current stream: latency = one call from an idle GPU
(synchronise, record, call, record), p50 and p99 over --reps calls; pipelined = --reps calls back
to back, time per call. Prints a markdown table and writes everything to --json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

from benchutils import DLRM_V2_MULTI_HOT as MULTI_HOT

NUM_DENSE = 13
ROWS, DIM = 100_000, 64
BOTTOM = (512, 256, 64)
TOP = (1024, 1024, 512, 256, 1)
BATCHES = (2048, 270)
POOL = 4
IMPLS = ("fastrec-int8", "fastrec-int8-host", "fastrec-fp32", "torch-fp32", "torch-fp16", "torch-module")
TOL = {"fastrec-int8": 2e-2, "fastrec-int8-host": 2e-2, "fastrec-fp32": 1e-4, "torch-fp32": 0.0,
       "torch-fp16": 1e-2, "torch-module": 1e-4}


def make_request(rng, B):
    """(dense (B, 13) float32, indices, offsets) as numpy, table-major (feature t, sample b)."""
    dense = rng.standard_normal((B, NUM_DENSE), dtype=np.float32)
    lengths = np.repeat(np.array(MULTI_HOT, dtype=np.int64), B)  # bag t*B + b has MULTI_HOT[t] ids
    offsets = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    indices = rng.integers(0, ROWS, size=int(offsets[-1]), dtype=np.int64)
    return dense, indices, offsets


class Request:
    def __init__(self, torch, dense, indices, offsets, B):
        dev = torch.device("cuda")
        self.np = (dense, indices, offsets)
        self.dense = torch.from_numpy(dense).to(dev)
        self.dense16 = self.dense.half()
        self.indices = torch.from_numpy(indices).to(dev)
        self.offsets = torch.from_numpy(offsets).to(dev)
        self.parts = []  # per feature: (ids, offsets of length B + 1 from 0), on the device
        for t in range(len(MULTI_HOT)):
            o = offsets[t * B:(t + 1) * B + 1]
            self.parts.append((torch.from_numpy(indices[o[0]:o[-1]]).to(dev), torch.from_numpy(o - o[0]).to(dev)))


def torch_eager(torch, m, dense, parts):
    bags = m._ebc.embedding_bags
    x = m.dense_arch(dense)
    e = [bags[table](idx, off) for (idx, off), (_, table) in zip(parts, m.sparse_features)]
    return torch.sigmoid(m.over_arch(m.inter_arch(x, e)).squeeze(1))


def time_impl(torch, fn, reps, warmup=20):
    """p50 / p99 of one call from an idle GPU, and the time per call of reps back-to-back calls."""
    for _ in range(warmup):
        fn()
    lat = []
    for _ in range(reps):
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        fn()
        ev[1].record()
        ev[1].synchronize()
        lat.append(ev[0].elapsed_time(ev[1]) * 1e3)
    lat.sort()
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first.record()
    for _ in range(reps):
        fn()
    last.record()
    last.synchronize()
    return {"p50_us": statistics.median(lat), "p99_us": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
            "pipelined_us": first.elapsed_time(last) * 1e3 / reps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--reps", type=int, default=500, help="timed calls per implementation and batch size")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    import torch

    if not torch.cuda.is_available():
        print("bench_cuda_model: torch has no CUDA device here", file=sys.stderr)
        return 1
    import fastrec
    from fastrec.torch import DLRM, export

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (torch and fastrec-fp32 alike)
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()
    torch.manual_seed(0)
    tables = [(f"t{i}", ROWS, DIM) for i in range(len(MULTI_HOT))]
    module = DLRM(NUM_DENSE, tables, {f"C{i + 1}": f"t{i}" for i in range(len(MULTI_HOT))}, BOTTOM, TOP).eval()
    with torch.no_grad():  # rows N(0, 0.1^2), so that the interaction (and the output check) means something
        for name, _, _ in tables:
            module._ebc.embedding_bags[name].weight.normal_(0.0, 0.1)
    with tempfile.TemporaryDirectory() as tmp:
        export(module, f"{tmp}/int8", precision="int8", embedding_bits=8)
        export(module, f"{tmp}/fp32", precision="fp32", embedding_bits=None)
        m_int8 = fastrec.load(f"{tmp}/int8", device="cuda", framework="torch")
        m_fp32 = fastrec.load(f"{tmp}/fp32", device="cuda", framework="torch")
    t32 = module.cuda()
    t16 = copy.deepcopy(t32).half()
    setup = time.time() - t0

    results = []
    with torch.inference_mode():
        for B in batches:
            rng = np.random.default_rng(1000 + B)
            pool = [Request(torch, *make_request(rng, B), B) for _ in range(POOL)]
            runners = {
                "fastrec-int8": lambda r: m_int8.score(r.dense, (r.indices, r.offsets)),
                "fastrec-int8-host": lambda r: m_int8.score(r.np[0], (r.np[1], r.np[2])),
                "fastrec-fp32": lambda r: m_fp32.score(r.dense, (r.indices, r.offsets)),
                "torch-fp32": lambda r: torch_eager(torch, t32, r.dense, r.parts),
                "torch-fp16": lambda r: torch_eager(torch, t16, r.dense16, r.parts),
                "torch-module": lambda r: t32.predict(r.dense, r.indices, r.offsets),
            }
            refs = [runners["torch-fp32"](r).float() for r in pool]
            for impl in IMPLS:
                run = runners[impl]
                try:
                    err = max(float((run(r).float() - ref).abs().max()) for r, ref in zip(pool, refs))
                except Exception as exc:  # e.g. an fp16 op this torch build lacks on CUDA
                    print(f"{impl} B={B}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
                    continue
                if err > TOL[impl]:
                    raise AssertionError(f"{impl} B={B}: max |p - p_torch_fp32| = {err:.3g} > {TOL[impl]}")
                it = iter(range(10**9))
                r = time_impl(torch, lambda: run(pool[next(it) % POOL]), args.reps)
                r.update(B=B, impl=impl, max_abs_diff_vs_torch_fp32=err, samples_per_s=B / (r["p50_us"] * 1e-6))
                results.append(r)
    elapsed = time.time() - t0

    props = torch.cuda.get_device_properties(0)
    machine = {"gpu": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
               "fastrec": fastrec.__version__, "python": platform.python_version(),
               "setup_seconds": round(setup, 1), "seconds": round(elapsed, 1), "reps": args.reps}
    print(f"\n# DLRM on the GPU: fastrec vs torch ({machine['gpu']}, torch {machine['torch']}, "
          f"CUDA {machine['cuda']}; {args.reps} calls each; {elapsed:.0f} s)\n")
    print("| B | impl | p50 us | p99 us | pipelined us/call | torch-fp32 p50 / this p50 | max abs diff vs torch-fp32 |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    by = {(r["B"], r["impl"]): r for r in results}
    for B in batches:
        base = by.get((B, "torch-fp32"))
        for impl in IMPLS:
            r = by.get((B, impl))
            if r is None:
                continue
            ratio = f"{base['p50_us'] / r['p50_us']:.2f}x" if base else "-"
            print(f"| {B} | {impl} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {r['pipelined_us']:.1f} | {ratio} | "
                  f"{r['max_abs_diff_vs_torch_fp32']:.2g} |")
    print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
