"""CUDA embedding bags: fastrec against torch.nn.functional.embedding_bag on one GPU.

A plain script (not pytest-benchmark: a GPU bench wants CUDA events, not wall clocks):

    python benches/bench_cuda_embedding.py [--json out.json] [--quick]

Cases: T tables (default 26) x R rows (default 1M) x D in (128, 64); B in (2048, 16384) bags per
table; pooling 1, 20, or random lengths 1..39 (mean 20); ids uniform over the rows, int64;
table-major CSR offsets (TorchRec's KeyedJaggedTensor layout); mode "sum".

* ``torch-fp32`` / ``torch-fp16``: one ``F.embedding_bag(ids_t, W_t, offsets_t, mode="sum",
  include_last_offset=True)`` per table, then ``torch.cat(dim=1)`` into the same (B, T*D) array
  fastrec returns (per-table id/offset slices are made once, outside the timing).
* ``fastrec-fp32/fp16/8bit/4bit``: one ``fastrec.ops.embedding_bags`` call over the T tables
  (fp32/fp16: the same CUDA tensors torch reads; 8/4-bit: FBGEMM-layout rows built on the GPU,
  D + 8 and D/2 + 4 bytes a row). The call includes its bounds-check readback (16 bytes).

Timing: CUDA events around each call after warm-up, median of the reps. "useful GB/s" counts the
bytes a perfect kernel must move: rows read (at the table's row width), ids, offsets and the
float32 output; "% copy" divides it by a device-to-device copy's bandwidth measured in the same
run (``clone`` of a 1 GiB tensor, bytes read + written). Prints a markdown table; --json writes
every number. Needs torch with CUDA; about 1-2 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _events_median(fn, warmup: int, reps: int, budget_s: float) -> float:
    """Median milliseconds of fn() between CUDA events on the current stream."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < reps and (len(times) < 3 or time.perf_counter() < t_end):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), 1 GiB clone."""
    import torch

    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    x.fill_(1.0)
    ms = _events_median(lambda: x.clone(), warmup=3, reps=20, budget_s=2.0)
    x = None  # (not del: the lambda closes over x)
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def packed_rows(R: int, D: int, bits: int, gen):
    """Random FBGEMM-layout rows on the GPU (random codes, valid scale/bias)."""
    import torch

    if bits == 8:
        codes = torch.randint(0, 256, (R, D), dtype=torch.uint8, device="cuda", generator=gen)
        qp = torch.rand((R, 2), device="cuda", generator=gen) * 0.01
        return torch.cat([codes, qp.view(torch.uint8)], dim=1)
    codes = torch.randint(0, 256, (R, (D * bits + 7) // 8), dtype=torch.uint8, device="cuda", generator=gen)
    qp = (torch.rand((R, 2), device="cuda", generator=gen) * 0.01).half()
    return torch.cat([codes, qp.view(torch.uint8)], dim=1)


def make_request(T: int, B: int, R: int, pooling, gen):
    """(ids int64, offsets int64 of length T*B + 1) on the GPU, table-major."""
    import torch

    if pooling == "rand":
        lengths = torch.randint(1, 40, (T * B,), device="cuda", generator=gen)
    else:
        lengths = torch.full((T * B,), int(pooling), device="cuda", dtype=torch.int64)
    offsets = torch.zeros(T * B + 1, dtype=torch.int64, device="cuda")
    offsets[1:] = torch.cumsum(lengths, 0)
    ids = torch.randint(0, R, (int(offsets[-1]),), dtype=torch.int64, device="cuda", generator=gen)
    return ids, offsets


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    import fastrec
    from fastrec import QuantizedTable, ops

    props = torch.cuda.get_device_properties(0)
    copy_gbs = copy_bandwidth_gbs()
    print(f"# {props.name}, {props.multi_processor_count} SMs; device-to-device copy {copy_gbs:.0f} GB/s "
          f"(read + write); fastrec {fastrec.__version__}, torch {torch.__version__}", flush=True)
    T, R = args.tables, args.rows
    batches = (2048, 16384) if not args.quick else (512, 2048)
    poolings = (1, 20, "rand")
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    results = []
    for D in (128, 64):
        fp32 = [torch.randn((R, D), device="cuda", generator=gen) for _ in range(T)]
        fp16 = [w.half() for w in fp32]
        q8 = [QuantizedTable.from_fbgemm(packed_rows(R, D, 8, gen), 8) for _ in range(T)]
        q4 = [QuantizedTable.from_fbgemm(packed_rows(R, D, 4, gen), 4) for _ in range(T)]
        row_bytes = {"fp32": 4 * D, "fp16": 2 * D, "8bit": D + 8, "4bit": D // 2 + 4}
        for B in batches:
            for pooling in poolings:
                ids, offsets = make_request(T, B, R, pooling, gen)
                n = ids.numel()
                host_off = offsets.cpu()
                slices = []
                for t in range(T):
                    lo, hi = int(host_off[t * B]), int(host_off[(t + 1) * B])
                    slices.append((ids[lo:hi], (offsets[t * B:(t + 1) * B + 1] - lo).contiguous()))

                def torch_loop(tables):
                    return torch.cat([F.embedding_bag(i, w, o, mode="sum", include_last_offset=True)
                                      for w, (i, o) in zip(tables, slices)], dim=1)

                impls = {
                    "torch-fp32": (lambda: torch_loop(fp32), "fp32"),
                    "torch-fp16": (lambda: torch_loop(fp16), "fp16"),
                    "fastrec-fp32": (lambda: ops.embedding_bags(fp32, ids, offsets), "fp32"),
                    "fastrec-fp16": (lambda: ops.embedding_bags(fp16, ids, offsets), "fp16"),
                    "fastrec-8bit": (lambda: ops.embedding_bags(q8, ids, offsets), "8bit"),
                    "fastrec-4bit": (lambda: ops.embedding_bags(q4, ids, offsets), "4bit"),
                }
                if D == 128 and B == batches[0] and pooling == 20:  # timing only what is right
                    ref = torch_loop(fp32)
                    got = ops.embedding_bags(fp32, ids, offsets)
                    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
                    got16 = ops.embedding_bags(fp16, ids, offsets)
                    torch.testing.assert_close(got16, torch_loop(fp16).float(), rtol=2e-2, atol=2e-2)
                times = {}
                for name, (fn, prec) in impls.items():
                    ms = _events_median(fn, warmup=3, reps=args.reps, budget_s=args.budget)
                    useful = n * row_bytes[prec] + n * 8 + (T * B + 1) * 8 + B * T * D * 4
                    gbs = useful / (ms * 1e-3) / 1e9
                    times[name] = ms
                    results.append({"D": D, "B": B, "T": T, "rows": R, "pooling": pooling, "impl": name, "ms": ms,
                                    "useful_GB_per_s": gbs, "pct_of_copy": 100 * gbs / copy_gbs, "ids": n})
                for r in results[-len(impls):]:
                    r["speedup_vs_torch_fp32"] = times["torch-fp32"] / r["ms"]
                    r["speedup_vs_torch_fp16"] = times["torch-fp16"] / r["ms"]
                print(f"D={D} B={B} pooling={pooling}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()),
                      flush=True)
                # (None rather than del: the timed lambdas close over these names)
                ids = offsets = slices = impls = None
        fp32 = fp16 = q8 = q4 = None
        torch.cuda.empty_cache()
    return {"device": props.name, "sms": props.multi_processor_count, "copy_GB_per_s": copy_gbs,
            "fastrec": fastrec.__version__, "torch": torch.__version__, "results": results}


def markdown(report: dict) -> str:
    lines = [f"{report['device']}: device-to-device copy {report['copy_GB_per_s']:.0f} GB/s; "
             "speedups are torch's time / fastrec's (same run, same tensors).", "",
             "| D | B | pooling | impl | ms | vs torch fp32 | vs torch fp16 | useful GB/s | % copy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['D']} | {r['B']} | {r['pooling']} | {r['impl']} | {r['ms']:.3f} | "
                     f"{r['speedup_vs_torch_fp32']:.2f}x | {r['speedup_vs_torch_fp16']:.2f}x | "
                     f"{r['useful_GB_per_s']:.0f} | {r['pct_of_copy']:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--reps", type=int, default=30, help="timed calls per case (at most)")
    p.add_argument("--budget", type=float, default=0.5, help="seconds per case after the first 3 reps")
    p.add_argument("--quick", action="store_true", help="small batches (a smoke run)")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_cuda_embedding: torch is not installed; nothing to compare (skipped)")
        return 0
    if not torch.cuda.is_available():
        print("bench_cuda_embedding: torch has no CUDA device here (skipped)")
        return 0
    report = run(args)
    print()
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
