"""Host-side (Python) cost of fastrec's CUDA calls, measurable on any machine, GPU or not.

    python benches/cuda_host_overhead.py [--tables 26] [--calls 3000] [--ops]

CPU torch tensors stand in for CUDA tensors (``torch.Tensor.is_cuda`` reads True), the launcher
is replaced by one that only zero-fills the output, and the model's torch device is the CPU: what
is left is the work fastrec's Python layer does per call before the kernel is launched (input
checks, reading tables and ids off their tensors, argument marshalling, output allocation) plus,
for the model, the torch ops of the forward on tiny CPU tensors (B=4, 16-wide MLPs). On a GPU each
of those microseconds is spent while the GPU waits, for every call (benches/bench_cuda_*.py time
a call from before this work to after the kernel).

Cases: ``ops.embedding_bags`` over T float32 torch tables and over T 8-bit DeviceQuantizedTables
(B=4, one id per bag); an ``Int8Linear`` call (its launch plan replaced by one that only
zero-fills the output); a float DLRM's ``score`` on the GPU runtime with one table-major (indices,
offsets) pair and with a dict of T per-feature pairs, and an int8 DLRM's (8-bit tables, int8
MLPs whose plans only zero-fill their outputs) with the pair. Prints the median over 5 repeats of
microseconds per call. Not a GPU measurement: the kernel, the launch and the bounds-check
readback are not in it.

``--ops`` also counts, for the model cases, the torch ops of one call (torch.profiler, top-level
ops only) that would each launch a kernel on a GPU (views, allocations and no-op dtype
conversions left out) and those that read a device value back (a host wait on a GPU); fastrec's
own kernels (the embedding bags, int8 MLPs) and its bounds-check wait are not among them.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time

import numpy as np


def _stand_in():
    import torch

    from fastrec import QuantizedTable, _cuda, _cuda_embedding, _cuda_model

    class ZeroLauncher:
        @staticmethod
        def embedding_bags(tables, indices, num_indices, i64, offsets, num_offsets, o64, fixed_len, psw, out,
                           device, stream):
            if fixed_len < 0:  # (every call here)
                rows = (num_offsets - 1) // len(tables)
                n = rows * sum(t[2] for t in tables)
                np.frombuffer((ctypes.c_float * n).from_address(out), dtype=np.float32)[:] = 0

        @staticmethod
        def embedding_bags_deferred(*args):  # (the GPU model runtime's call: checked at its end)
            ZeroLauncher.embedding_bags(*args)
            return Checked

    class Checked:
        @staticmethod
        def check():
            pass

    class HostTorch(_cuda_model._Torch):
        def __init__(self, index):
            super().__init__(0)
            self.index, self.device = index, torch.device("cpu")

    class NoPlan:  # an Int8Linear / Int8MLP launch plan that only zero-fills the output
        def __init__(self, out_features):
            self.n = out_features

        @staticmethod
        def scratch_bytes(rows):
            return rows * 1024

        def forward(self, x, rows, y, *args):
            np.frombuffer((ctypes.c_float * (rows * self.n)).from_address(y), dtype=np.float32)[:] = 0

    from fastrec import _cuda_linear

    plans = {}  # (a dict lookup per call, as the real _plan's cache)
    _cuda_linear._plan = lambda obj, key, device, layers, codes, framework=None: plans.setdefault(
        (id(obj), key), NoPlan(layers[-1].out_features))
    torch.Tensor.is_cuda = property(lambda self: True)
    _cuda.stream = lambda a: 0
    _cuda.refuse_capture_for = lambda x, what: None
    _cuda.refuse_capture = lambda framework, device, what: None
    _cuda_embedding._embedding_backend = lambda: ZeroLauncher
    _cuda_model._Torch = HostTorch
    _cuda_model.CudaModel._sync = lambda self: None
    QuantizedTable.to_device = lambda self, like="torch", device=None: _cuda_embedding.DeviceQuantizedTable(
        torch.from_numpy(self.data.copy()), self.bits, self.dim, self.layout)


def _us_per_call(fn, calls: int) -> float:
    for _ in range(max(50, calls // 20)):
        fn()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs)


_NO_KERNEL = {"aten::view", "aten::unsqueeze", "aten::transpose", "aten::slice", "aten::select", "aten::expand",
              "aten::as_strided", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::alias",
              "aten::t", "aten::empty", "aten::empty_strided", "aten::new_empty", "aten::resize_",
              "aten::result_type", "aten::lift_fresh", "aten::detach_", "aten::detach", "aten::to"}
_READS = {"aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::nonzero"}


def _op_counts(fn) -> tuple[int, int]:
    """(kernel-launching torch ops, device reads) of one call of fn (after one warm call). A
    torch.tensor upload shows as lift_fresh + detach_ (one copy, counted with the kernels), a
    no-op conversion as aten::to (left out)."""
    import torch

    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events() if e.cpu_parent is None]
    uploads = names.count("aten::lift_fresh")
    return (sum(n not in _NO_KERNEL and n not in _READS for n in names) + uploads,
            sum(n in _READS for n in names))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", type=int, default=26)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--ops", action="store_true", help="also count the model calls' torch ops and reads")
    args = ap.parse_args(argv)
    _stand_in()
    import torch

    import fastrec
    from fastrec import QuantizedTable, _cuda_model, ops
    from fastrec.io import write_model

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
    from test_model_runtime import build_dlrm, random_sparse, table_major

    T, B, R, D = args.tables, 4, 1000, 64
    rng = np.random.default_rng(0)
    W = [rng.standard_normal((R, D)).astype(np.float32) for _ in range(T)]
    fp32 = [torch.from_numpy(w) for w in W]
    q8 = [QuantizedTable.from_float(w, bits=8).to_device() for w in W]
    ids = torch.from_numpy(rng.integers(0, R, T * B))
    off = torch.arange(T * B + 1)
    cases = {
        f"ops.embedding_bags, {T} fp32 tables": lambda: ops.embedding_bags(fp32, ids, off),
        f"ops.embedding_bags, {T} 8-bit tables": lambda: ops.embedding_bags(q8, ids, off),
    }
    lin = fastrec.Int8Linear.from_float(rng.standard_normal((1024, 479)).astype(np.float32),
                                        np.zeros(1024, np.float32))
    x = torch.from_numpy(rng.standard_normal((64, 479)).astype(np.float32))
    cases["Int8Linear 479x1024, B=64 (no kernel)"] = lambda: lin(x)
    m, tensors, ref = build_dlrm(rng, storages=("fp32",) * T, bottom=(16,), top=(16,))
    m8, tensors8, _ = build_dlrm(rng, precision="int8", storages=("q8",) * T, bottom=(16,), top=(16,))
    with tempfile.TemporaryDirectory() as d:
        write_model(d + "/m", m, tensors)
        write_model(d + "/m8", m8, tensors8)
        model = _cuda_model.CudaModel(fastrec.load(d + "/m"), -1, "torch")
        model8 = _cuda_model.CudaModel(fastrec.load(d + "/m8"), -1, "torch")
    sparse = random_sparse(rng, ref["features"], ref["rows"], 4)
    dense = torch.from_numpy(rng.standard_normal((4, 5)).astype(np.float32))
    pair = tuple(torch.from_numpy(a) for a in table_major(sparse, ref["features"]))
    per_feature = {f: (torch.from_numpy(i), torch.from_numpy(o)) for f, (i, o) in sparse.items()}
    cases[f"DLRM score, {T} features, one table-major pair (B=4)"] = lambda: model.score(dense, pair)
    cases[f"DLRM score, {T} features, dict of pairs (B=4)"] = lambda: model.score(dense, per_feature)
    cases[f"int8 DLRM score, {T} 8-bit tables, one table-major pair (B=4; no MLP kernels)"] = \
        lambda: model8.score(dense, pair)
    print(f"# fastrec {fastrec.__version__}, torch {torch.__version__}, CPU stand-in (no kernel, no launch)")
    print("| case | us per call |" + (" torch kernels | reads |\n|---|---:|---:|---:|" if args.ops else "\n|---|---:|"))
    for name, fn in cases.items():
        row = f"| {name} | {_us_per_call(fn, args.calls):.1f} |"
        if args.ops:
            row += " {} | {} |".format(*_op_counts(fn)) if "score" in name else " | |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
