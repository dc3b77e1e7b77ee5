"""Paired (interleaved) ratios: fastrec and each peer take turns, round after round.

    python benches/paired.py                                  # whole model, B=2048 and B=270
    python benches/paired.py --batch 2048 --rounds 25 --calls 5
    python benches/paired.py --bench embedding                # every bench_embedding.py case
    python benches/paired.py --bench embedding --case zipf    # cases whose name holds "zipf"
    python benches/paired.py --bench linear --case mlp        # int8 linear layers / MLPs
    python benches/paired.py --bench embedding --case 8bit --l1-variants
                              # + fastrec with its L1 prefetch forced on / off (fp32 cases: float rows)

pytest-benchmark (benches/report.py) times each implementation in one block, one after the
other. On a shared VM whose speed drifts by +-30% over tens of seconds, a slow spell that
falls on one block moves that ratio by as much. Here every round runs each implementation for a
few calls (the order rotates from round to round, with a 0.3 s pause before each block so
that torch's spinning OpenMP workers are idle, then 10 ms of untimed calls of the block's own
implementation, --warmup-ms, so that each is timed at full speed), and the ratio is taken within the round:
peer's median call / fastrec's median call. The report gives the median of the per-round
ratios and their interquartile range, and p50 / p99 over all of each implementation's calls.

Same inputs, implementations and output checks as bench_model.py, bench_embedding.py and
bench_linear.py (which this imports): the model scores one batch per size; the embedding cases
cycle through their pools of distinct requests; the linear cases run fastrec, torch-dynq,
ort-int8 (when onnxruntime is installed) and torch-fp32, about 30 ms of calls per block.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = "fastrec"


def _block(fn, calls: int) -> list:
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def _warm_up(fn, seconds: float) -> int:
    """Untimed calls of fn for about `seconds` (none for 0); returns how many ran."""
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
        n += 1
    return n


def paired(fns: dict, rounds: int, calls: int, pause: float = 0.3, warmup: float = 0.0) -> dict:
    """{impl: per-round lists of call times in seconds}; fns are zero-argument callables.

    Before each timed block: `pause` seconds of sleep (torch's OpenMP workers stop spinning),
    then `warmup` seconds of untimed calls of the same implementation (the CPUs come back up to
    speed after the sleep; see main's --warmup-ms)."""
    names = list(fns)
    for name in names:  # warm-up
        _block(fns[name], 2)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(pause)
            _warm_up(fns[name], warmup)
            times[name].append(_block(fns[name], calls))
    return times


def report(label: str, times: dict, base: str = BASE) -> str:
    """Per impl: p50 / p99 over all its calls, and the per-round ratios of medians to base's."""
    b = np.asarray([np.median(block) for block in times[base]])
    b99 = np.percentile(np.concatenate(times[base]), 99)
    lines = [f"| {label} | impl | p50 | p99 | p50 ratio: median of rounds (IQR) | p99 ratio |",
             "|---|---|---:|---:|---|---:|"]
    for name, blocks in times.items():
        med = np.asarray([np.median(block) for block in blocks])
        q1, q2, q3 = np.percentile(med / b, [25, 50, 75])
        p50, p99 = np.percentile(np.concatenate(blocks), [50, 99])
        lines.append(f"| | {name} | {p50 * 1e3:.3f} ms | {p99 * 1e3:.3f} ms | {q2:.2f}x ({q1:.2f}-{q3:.2f}x) "
                     f"| {p99 / b99:.2f}x |")
    return "\n".join(lines)


def _next_request(run, cycle):
    return run(next(cycle))


# --------------------------------------------------------------------------------------------
# Cases: (label, {impl: zero-argument callable}, calls per block), outputs checked first


def model_cases(batches, calls: int):
    import bench_model as bm

    for batch in batches:
        args = bm._batch(batch)
        fns = {}
        for name in bm.IMPLS:
            fn = bm._impl(name)
            bm._check(name, fn(*args), batch)
            fns[name] = (lambda fn=fn: fn(*args))
        yield f"model B={batch}", fns, calls if batch >= 1000 else 8 * calls  # single requests: more calls


def _with_l1_prefetch(fn, mode: int, rows: str = "quantized"):
    """fn with one of the embedding kernels' prefetch switches forced on (1) or off (0): the L1
    prefetch of quantized rows, or the far prefetch of float rows into L1 (instead of L2)."""
    from fastrec import _C

    switch = _C._set_embedding_l1_prefetch if rows == "quantized" else _C._set_embedding_float_l1_prefetch

    def call():
        switch(mode)
        try:
            return fn()
        finally:
            switch(-1)
    return call


def embedding_cases(case_filter: str, calls: int, l1_variants: bool = False):
    import torch

    import bench_embedding as be

    cases = [("large", p, d) for p in be.PRECISIONS for d in ("uniform", "zipf")]
    cases += [("small", p, b) for p in be.PRECISIONS for b in (1, 270)]
    reference: dict = {}
    for kind, precision, var in cases:
        label = f"{kind}-{precision}-{var if kind == 'large' else f'B{var}'}"
        if case_filter and case_filter not in label:
            continue
        if kind == "large":
            tables, requests = be.get_tables("large"), be.get_large_requests(var)
            key, n = ("large", precision, var), calls
        else:
            tables, requests = be.get_tables("small"), be.get_small_requests(var)
            key, n = ("small", precision, var), (40 if var == 1 else 8) * calls
        fns = {}
        for impl in ("fastrec", "torch"):
            run = be._runner(impl, precision, tables)
            with torch.inference_mode():
                be._check(impl, precision, tables, requests, key, reference, run)
            cycle = itertools.cycle(requests)
            fn = functools.partial(_next_request, run, cycle)
            fns[impl] = fn
            if impl == "fastrec" and l1_variants:
                rows = "quantized" if precision == "8bit" else "float"
                fns["fastrec-L1-on"] = _with_l1_prefetch(fn, 1, rows)
                fns["fastrec-L1-off"] = _with_l1_prefetch(fn, 0, rows)
        yield label, fns, n


def linear_cases(case_filter: str, calls: int):
    import tempfile

    import pytest
    import torch

    import bench_linear as bl

    onnx_dir = tempfile.mkdtemp(prefix="fastrec-paired-")
    for kind, name in bl._specs():
        case = bl.get_case(kind, name)
        for batch in bl.BATCHES:
            label = f"{kind}-{name}-B{batch}"
            if case_filter and case_filter not in label:
                continue
            x = case.x(batch)
            fns = {}
            for impl in ("fastrec", "torch-dynq", "ort-int8", "torch-fp32"):
                try:
                    with torch.inference_mode():
                        bl._check(case, impl, x, batch, onnx_dir)
                        call, _ = case.runner(impl, x, onnx_dir)
                except (ImportError, pytest.skip.Exception):  # onnx / onnxruntime not installed
                    continue

                fns[impl] = call
            # about 30 ms of fastrec calls per block (the bench's own estimate of a call's time)
            est = max(bl.EST_CALL_S, 2 * batch * case.macs / bl.EST_OPS_PER_S)
            yield label, fns, int(min(2000, max(calls, 0.03 / est)))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", choices=("model", "embedding", "linear"), default="model")
    p.add_argument("--batch", type=int, action="append", help="model batch size (repeatable; default 2048 and 270)")
    p.add_argument("--case", default="", help="embedding / linear: only cases whose name contains this")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=5, help="calls per implementation per round (more for small requests)")
    p.add_argument("--warmup-ms", type=float, default=10.0,
                   help="untimed calls for this long after each block's pause, before its timed calls "
                        "(default 10; 0 times from the first call after the pause, as runs before "
                        "2026-11-24 ~21:15 UTC did). On the Zen 5 VM calls after a 0.3 s sleep ran up "
                        "to 2x slow and took ~8 ms of calls to reach full speed, torch's and fastrec's "
                        "alike, which counted against whichever library makes shorter calls")
    p.add_argument("--l1-variants", action="store_true",
                   help="embedding: also time fastrec with its L1 prefetch forced on and off (8-bit cases: the "
                        "L1 prefetch of quantized rows; fp32 cases: the far prefetch of float rows into L1 instead of L2) "
                        "(each call also sets and resets the switch: two extra calls into _C, ~2%% of a B=1 call)")
    args = p.parse_args(argv)
    sys.path.insert(0, HERE)
    import platform

    import fastrec
    import torch
    from benchutils import THREADS

    fastrec.set_num_threads(THREADS)
    torch.set_num_threads(THREADS)
    print(f"Machine: {_cpu_model() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"threads per library: {THREADS}; fastrec {fastrec.__version__}; load before: {os.getloadavg()}")
    if args.bench == "model":
        cases = model_cases(args.batch or (2048, 270), args.calls)
    elif args.bench == "embedding":
        cases = embedding_cases(args.case, args.calls, args.l1_variants)
    else:
        cases = linear_cases(args.case, args.calls)
    for label, fns, calls in cases:
        # torch runs under inference_mode, entered once (as the pytest benches do), not per call:
        # the context costs ~1.5 us, 5-10% of a torch call at B=1. Nothing else reads it.
        with torch.inference_mode():
            times = paired(fns, args.rounds, calls, warmup=args.warmup_ms / 1e3)
        print()
        print(report(label, times), flush=True)
    print(f"\nload after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
