"""CUDA int8 linear / MLP: fastrec against torch's int8 path and torch fp16 / fp32, on one GPU.

    python benches/bench_cuda_linear.py [--json results.json] [--reps 200] [--batches 1,16,64,256,2048]

A plain script (not pytest-benchmark: the timings are CUDA events), about a minute on an H100.

Cases: single layers at DLRM sizes, (K, N) in (13, 512), (512, 256), (256, 64), (479, 1024),
(1024, 1024), (1024, 512), (256, 1) (ReLU, sigmoid for the width-1 layer), and two whole MLPs:
512-256-64 (ReLU, ReLU) and DLRM's top MLP 479-1024-1024-512-256-1 (ReLU ..., sigmoid), for
B in {1, 16, 64, 256, 2048}. Weights He-uniform, bias U(-0.1, 0.1), inputs N(0, 1), float32 on the
GPU (float16 for torch-fp16).

Implementations:
* fastrec: ``Int8Linear`` / ``Int8MLP`` on a torch CUDA tensor (per-row quantization pass, IMMA
  GEMM with the dequantization, bias and activation fused; default ``check_finite=True``, which
  waits for the last quantization pass to raise on NaN / Inf).
* fastrec-nocheck: the same with ``check_finite=False`` (no host wait).
* torch-int8: torch's int8 path as a user writes it in eager mode: per-row quantization in torch
  ops (abs, amax, clamp, div, round, clamp, to int8), ``torch._int_mm`` (cuBLASLt int8), then
  dequantization, bias and activation in torch ops. ``_int_mm`` needs M > 16 and K, N multiples
  of 8: weights are padded once (N to a multiple of 8, K to a multiple of 8 and at least 32), the
  int8 activations are zero-padded per call where K or M needs it (B <= 16; K = 13, 479), and that
  copy is part of its time. Same per-channel int8 weight codes as fastrec.
* torch-fp16 / torch-fp32: ``F.linear`` + activation (fp16 with fp16 input and weights).

Two timings per implementation, both from CUDA events on the current stream:
* latency: one call from an idle GPU (synchronise, record, call, record), median over --reps;
  what a single request sees.
* pipelined: --reps calls back to back, time per call; what a saturated server sees (host launch
  overhead and GPU time overlap, except where a call waits on the GPU).

Each implementation is first checked against torch-fp32 on the timed input: int8 paths must keep
the max abs error within 5% of the reference's max abs. Prints markdown tables (times in us and
torch-int8 / fastrec speedups) and writes all numbers to --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

LAYERS = [(13, 512), (512, 256), (256, 64), (479, 1024), (1024, 1024), (1024, 512), (256, 1)]
MLPS = {
    "mlp-512-256-64": ((512, 256, 64), ("relu", "relu")),
    "mlp-479-1024-1024-512-256-1": ((479, 1024, 1024, 512, 256, 1), ("relu", "relu", "relu", "relu", "sigmoid")),
}
BATCHES = (1, 16, 64, 256, 2048)
IMPLS = ("fastrec", "fastrec-nocheck", "torch-int8", "torch-fp16", "torch-fp32")
INT8_TOL = 0.05


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def make_layers(dims, seed):
    rng = np.random.default_rng(seed)
    layers = []
    for k, n in zip(dims[:-1], dims[1:]):
        bound = np.sqrt(6.0 / k)
        layers.append((rng.uniform(-bound, bound, (n, k)).astype(np.float32),
                       rng.uniform(-0.1, 0.1, n).astype(np.float32)))
    return layers


def _act(torch, y, act):
    if act == "relu":
        return y.relu_()
    if act == "sigmoid":
        return y.sigmoid_()
    return y


class TorchInt8Layer:
    """torch's eager int8 path: quantize per row -> torch._int_mm -> dequantize + bias + act."""

    def __init__(self, torch, w, b, act, device):
        from fastrec.linear import quantize_weight

        self.torch, self.act = torch, act
        q, scale = quantize_weight(w)  # the codes fastrec uses
        self.N, self.K = q.shape
        self.Kp, Np = max(32, _round_up(self.K, 8)), _round_up(self.N, 8)
        wq = np.zeros((Np, self.Kp), np.int8)
        wq[: self.N, : self.K] = q
        self.wt = torch.from_numpy(wq).to(device).t()  # (Kp, Np) column-major: cuBLASLt's fast layout
        self.w_scale = torch.from_numpy(scale).to(device)[None, :]
        self.bias = torch.from_numpy(b).to(device)

    def __call__(self, x):
        torch = self.torch
        M = x.shape[0]
        scale = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30).div_(127.0)
        q = x.div(scale).round_().clamp_(-127, 127).to(torch.int8)
        pad_m = 17 - M if M <= 16 else 0
        if pad_m or self.Kp != self.K:
            q = torch.nn.functional.pad(q, (0, self.Kp - self.K, 0, pad_m))
        acc = torch._int_mm(q, self.wt)
        y = acc[:M, : self.N].float().mul_(scale).mul_(self.w_scale).add_(self.bias)
        return _act(torch, y, self.act)


class Case:
    def __init__(self, torch, name, dims, acts, seed):
        import fastrec

        self.torch, self.name, self.dims, self.acts = torch, name, tuple(dims), tuple(acts)
        self.layers = make_layers(dims, seed)
        self.macs = sum(k * n for k, n in zip(dims[:-1], dims[1:]))
        dev = torch.device("cuda")
        if len(self.layers) == 1:
            lin = fastrec.Int8Linear.from_float(*self.layers[0])
            self.fastrec = lambda x, check=True: lin(x, activation=self.acts[0], check_finite=check)
        else:
            mlp = fastrec.Int8MLP.from_float(self.layers, list(self.acts))
            self.fastrec = lambda x, check=True: mlp(x, check_finite=check)
        self.int8 = [TorchInt8Layer(torch, w, b, a, dev) for (w, b), a in zip(self.layers, self.acts)]
        self.w32 = [(torch.from_numpy(w).to(dev), torch.from_numpy(b).to(dev)) for w, b in self.layers]
        self.w16 = [(w.half(), b.half()) for w, b in self.w32]

    def _dense(self, x, weights):
        F = self.torch.nn.functional
        for (w, b), a in zip(weights, self.acts):
            x = _act(self.torch, F.linear(x, w, b), a)
        return x

    def _int8(self, x):
        for layer in self.int8:
            x = layer(x)
        return x

    def runner(self, impl, x32, x16):
        return {
            "fastrec": lambda: self.fastrec(x32),
            "fastrec-nocheck": lambda: self.fastrec(x32, False),
            "torch-int8": lambda: self._int8(x32),
            "torch-fp16": lambda: self._dense(x16, self.w16),
            "torch-fp32": lambda: self._dense(x32, self.w32),
        }[impl]


def time_impl(torch, fn, reps, warmup=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        torch.cuda.synchronize()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    lat = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return {
        "latency_us_p50": statistics.median(lat),
        "latency_us_p90": lat[int(0.9 * (len(lat) - 1))],
        "pipelined_us": s.elapsed_time(e) * 1e3 / reps,
    }


def check(torch, out, ref, impl):
    err = float((out.float() - ref).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    rel = err / max(scale, 1e-30)
    tol = INT8_TOL if impl.startswith(("fastrec", "torch-int8")) else (1e-2 if impl == "torch-fp16" else 1e-5)
    if rel > tol:
        raise AssertionError(f"{impl}: max abs error {err:.3g} is {rel:.1%} of max |ref| (> {tol:.0%})")
    return rel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--reps", type=int, default=200, help="timed calls per implementation and mode")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    import torch

    if not torch.cuda.is_available():
        print("bench_cuda_linear: torch has no CUDA device here", file=sys.stderr)
        return 1
    import fastrec

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    cases = [Case(torch, f"linear-{k}x{n}", (k, n), ("sigmoid" if n == 1 else "relu",), seed=i)
             for i, (k, n) in enumerate(LAYERS)]
    cases += [Case(torch, name, dims, acts, seed=100 + i) for i, (name, (dims, acts)) in enumerate(MLPS.items())]

    results = []
    t0 = time.time()
    with torch.inference_mode():
        for case in cases:
            for B in batches:
                rng = np.random.default_rng(1000 + B)
                x32 = torch.from_numpy(rng.standard_normal((B, case.dims[0]), dtype=np.float32)).cuda()
                x16 = x32.half()
                ref = case.runner("torch-fp32", x32, x16)()
                for impl in IMPLS:
                    fn = case.runner(impl, x32, x16)
                    rel = check(torch, fn(), ref, impl)
                    r = time_impl(torch, fn, args.reps)
                    r.update(case=case.name, B=B, impl=impl, max_rel_error=rel,
                             gops=2 * B * case.macs / (r["latency_us_p50"] * 1e3))
                    results.append(r)
    elapsed = time.time() - t0

    props = torch.cuda.get_device_properties(0)
    machine = {"gpu": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
               "fastrec": fastrec.__version__, "python": platform.python_version(), "seconds": round(elapsed, 1)}
    print(f"\n# fastrec CUDA int8 linear / MLP ({machine['gpu']}, torch {machine['torch']}, "
          f"CUDA {machine['cuda']}; {elapsed:.0f} s)\n")
    by = {(r["case"], r["B"], r["impl"]): r for r in results}
    for mode, title in (("latency_us_p50", "latency, one call from an idle GPU (median us)"),
                        ("pipelined_us", "pipelined, back-to-back calls (us per call)")):
        print(f"## {title}\n")
        print("| case | B | " + " | ".join(IMPLS) + " | torch-int8 / fastrec | torch-int8 / fastrec-nocheck |")
        print("|---|---:|" + "---:|" * (len(IMPLS) + 2))
        for case in cases:
            for B in batches:
                row = [by[(case.name, B, i)][mode] for i in IMPLS]
                t8 = by[(case.name, B, "torch-int8")][mode]
                print(f"| {case.name} | {B} | " + " | ".join(f"{v:.1f}" for v in row) +
                      f" | {t8 / row[0]:.2f}x | {t8 / row[1]:.2f}x |")
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
