"""int8 Linear / MLP benchmarks: fastrec vs torch (fp32 and dynamic int8) and onnxruntime.

Cases (each pytest-benchmark group holds fastrec and its peers on identical inputs):

* ``linear-{K}x{N}-B{B}``: one layer y = x @ W.T + b, (K, N) in {(512, 256), (1024, 1024)},
  B in {1, 32, 256, 2048}, no activation.
* ``mlp-13-512-256-128-B{B}``: DLRM's bottom MLP, ReLU after every layer (the last one too).
* ``mlp-1024-1024-512-256-1-B{B}``: DLRM's top MLP, ReLU between the layers, sigmoid at the end.

Implementations:

* ``fastrec``: ``fastrec.Int8Linear.from_float(W, b)`` / ``fastrec.Int8MLP.from_float(...)``
  (int8 per-output-channel weights, activations quantized per row inside the kernel). Skipped
  while the installed fastrec has no ``Int8Linear`` / ``Int8MLP``.
* ``torch-fp32``: ``nn.Linear`` (``nn.Sequential`` with ``nn.ReLU`` / ``nn.Sigmoid`` for MLPs)
  under ``torch.inference_mode``.
* ``torch-dynq``: the same module through ``torch.ao.quantization.quantize_dynamic`` with
  ``per_channel_dynamic_qconfig`` (qint8 weights per output channel), FBGEMM engine, Linear+ReLU
  pairs fused first (``fuse_modules``) so they become ``DynamicQuantizedLinearReLU``.
* ``ort-int8``: an ONNX graph of MatMul + Add (+ Relu / Sigmoid) per layer, built with
  ``onnx.helper`` from the same weights, through ``onnxruntime.quantization.quantize_dynamic``
  (per_channel=True, QInt8 weights; ORT fuses it into ``DynamicQuantizeMatMul``), run by an
  ``InferenceSession`` on CPUExecutionProvider through I/O binding (input bound once; the
  output copied out as a new array per call).
* ``ort-fp32``: the fp32 ONNX graph, for information.

All at ``FASTREC_BENCH_THREADS`` threads (default 2): fastrec.set_num_threads /
torch.set_num_threads (conftest.py), ORT intra_op_num_threads = THREADS, inter_op_num_threads = 1.

Each bench first checks its output against torch-fp32's: int8 paths must have max abs error
<= 5% of the reference's max abs, ort-fp32 <= 1e-4 (both on the timed input and on a fixed
256-row input, with the scale taken from the 256-row reference). One call per round; rounds
scale inversely with the op count (about half a second per bench). extra_info: GOPS
(2*B*K*N summed over the layers, from the median), p50_us / p99_us.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastrec
from benchutils import THREADS, assert_rel_error, record_gops, record_latency, torch_dynamic_int8

torch = pytest.importorskip("torch")
nn = torch.nn

BATCHES = (1, 32, 256, 2048)
LINEAR_SHAPES = ((512, 256), (1024, 1024))
MLPS = {
    "13-512-256-128": ((13, 512, 256, 128), ("relu", "relu", "relu")),
    "1024-1024-512-256-1": ((1024, 1024, 512, 256, 1), ("relu", "relu", "relu", "sigmoid")),
}
IMPLS = ("fastrec", "torch-fp32", "torch-dynq", "ort-int8", "ort-fp32")
INT8_IMPLS = ("fastrec", "torch-dynq", "ort-int8")

INT8_TOL = 0.05
FP32_TOL = 1e-4
CHECK_ROWS = 256

# rounds: about TARGET_S per bench from a rough fp32 speed estimate, within [MIN, MAX]
TARGET_S = 0.5
EST_OPS_PER_S = 150e9
EST_CALL_S = 15e-6
MIN_ROUNDS = 25
MAX_ROUNDS = 2000

ONNX_OPSET = 17


def _rounds(ops: int) -> tuple[int, int]:
    est = ops / EST_OPS_PER_S + EST_CALL_S
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, TARGET_S / est)))
    return rounds, max(2, min(100, rounds // 10))


# --------------------------------------------------------------------------------------------
# Models: one _Case per layer stack, built once; every implementation is made lazily from it


class _Case:
    def __init__(self, kind: str, dims, activations, seed: int):
        self.kind = kind  # "linear" or "mlp"
        self.dims = tuple(dims)
        self.activations = list(activations)
        rng = np.random.default_rng(seed)
        self.layers = []
        for k, n in zip(self.dims[:-1], self.dims[1:]):
            # He-uniform weights keep the activations' spread through the ReLUs, so the sigmoid
            # output of the top MLP spans (0, 1) and the checks can see a wrong answer
            bound = np.sqrt(6.0 / k)
            w = rng.uniform(-bound, bound, (n, k)).astype(np.float32)
            b = rng.uniform(-1.0, 1.0, n).astype(np.float32)  # (large enough that a dropped bias fails the check)
            self.layers.append((w, b))
        self.macs = sum(k * n for k, n in zip(self.dims[:-1], self.dims[1:]))
        self.check_x = rng.standard_normal((CHECK_ROWS, self.dims[0]), dtype=np.float32)
        self._inputs = {}
        self._impls = {}
        self._ref = {}

    # inputs and torch-fp32 references --------------------------------------------------------

    def x(self, batch: int) -> np.ndarray:
        if batch not in self._inputs:
            rng = np.random.default_rng(1000 + batch)
            self._inputs[batch] = rng.standard_normal((batch, self.dims[0]), dtype=np.float32)
        return self._inputs[batch]

    def reference(self, key) -> np.ndarray:
        if key not in self._ref:
            x = self.check_x if key == "check" else self.x(key)
            with torch.inference_mode():
                self._ref[key] = self.torch_fp32()(torch.from_numpy(x)).numpy().copy()
        return self._ref[key]

    # implementations: impl(x numpy) -> output; runner(impl, x) -> zero-argument callable ------

    def torch_fp32(self):
        if "torch-fp32" not in self._impls:
            mods = []
            for (w, b), act in zip(self.layers, self.activations):
                lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(w))
                    if b is not None:
                        lin.bias.copy_(torch.from_numpy(b))
                mods.append(lin)
                if act == "relu":
                    mods.append(nn.ReLU())
                elif act == "sigmoid":
                    mods.append(nn.Sigmoid())
            self._impls["torch-fp32"] = (mods[0] if len(mods) == 1 else nn.Sequential(*mods)).eval()
        return self._impls["torch-fp32"]

    def torch_dynq(self):
        if "torch-dynq" not in self._impls:
            self._impls["torch-dynq"] = torch_dynamic_int8(self.torch_fp32())
        return self._impls["torch-dynq"]

    def onnx_model(self):
        from onnx import TensorProto, helper, numpy_helper

        nodes, inits = [], []
        cur = "x"
        for i, ((w, b), act) in enumerate(zip(self.layers, self.activations)):
            last = i == len(self.layers) - 1
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"W{i}"))
            nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"mm{i}"], name=f"matmul{i}"))
            cur = f"mm{i}"
            if b is not None:
                inits.append(numpy_helper.from_array(b, f"b{i}"))
                nodes.append(helper.make_node("Add", [cur, f"b{i}"], [f"add{i}"], name=f"add{i}"))
                cur = f"add{i}"
            if act is not None:
                op = {"relu": "Relu", "sigmoid": "Sigmoid"}[act]
                nodes.append(helper.make_node(op, [cur], [f"act{i}"], name=f"act{i}"))
                cur = f"act{i}"
            if last:
                nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
        graph = helper.make_graph(
            nodes, f"{self.kind}-{'-'.join(map(str, self.dims))}",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", self.dims[0]])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", self.dims[-1]])],
            inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
        import onnx

        onnx.checker.check_model(model)
        return model

    def ort_session(self, impl: str, tmpdir):
        if impl not in self._impls:
            import onnx

            ort = pytest.importorskip("onnxruntime")
            pytest.importorskip("onnxruntime.quantization")
            from onnxruntime.quantization import QuantType, quantize_dynamic

            stem = os.path.join(str(tmpdir), f"{self.kind}-{'-'.join(map(str, self.dims))}")
            fp32_path = stem + "-fp32.onnx"
            if not os.path.exists(fp32_path):
                onnx.save(self.onnx_model(), fp32_path)
            path = fp32_path
            if impl == "ort-int8":
                path = stem + "-int8.onnx"
                quantize_dynamic(fp32_path, path, per_channel=True, weight_type=QuantType.QInt8)
            so = ort.SessionOptions()
            so.intra_op_num_threads = THREADS
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            self._impls[impl] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return self._impls[impl]

    def fastrec_impl(self):
        if "fastrec" not in self._impls:
            name = "Int8Linear" if self.kind == "linear" else "Int8MLP"
            cls = getattr(fastrec, name, None)
            if cls is None:
                pytest.skip(f"the installed fastrec has no {name}")
            if self.kind == "linear":
                (w, b), = self.layers
                assert self.activations == [None]
                self._impls["fastrec"] = cls.from_float(w, b)
            else:
                self._impls["fastrec"] = cls.from_float(self.layers, self.activations)
        return self._impls["fastrec"]

    def runner(self, impl: str, x: np.ndarray, tmpdir):
        """A zero-argument callable for the timed loop and a function turning its result into
        numpy (outside the timing)."""
        if impl in ("torch-fp32", "torch-dynq"):
            model = self.torch_fp32() if impl == "torch-fp32" else self.torch_dynq()
            xt = torch.from_numpy(x)
            return (lambda: model(xt)), (lambda r: r.numpy())
        if impl in ("ort-int8", "ort-fp32"):
            # onnxruntime's fastest way from Python: the input bound once (I/O binding, no feed
            # dict converted per call), the output allocated by onnxruntime and copied out as a
            # new numpy array each call (fastrec also returns a new array). sess.run costs ~3 us
            # more a call (17.7 against 14.8 us, 1024x1024 at B=1).
            sess = self.ort_session(impl, tmpdir)
            binding = sess.io_binding()
            binding.bind_cpu_input("x", x)
            binding.bind_output("y", "cpu")
            run = sess.run_with_iobinding

            def call():
                run(binding)
                return binding.copy_outputs_to_cpu()[0]

            return call, np.asarray
        if impl == "fastrec":
            obj = self.fastrec_impl()
            return (lambda: obj(x)), np.asarray
        raise ValueError(impl)


_CASES: dict = {}  # built once per process, shared by the fixture and benches/paired.py


def _specs():
    return [("linear", f"{k}x{n}") for k, n in LINEAR_SHAPES] + [("mlp", m) for m in MLPS]


def get_case(kind: str, name: str) -> _Case:
    if (kind, name) not in _CASES:
        seed = _specs().index((kind, name)) + 1  # the order the benches run them
        if kind == "linear":
            k, n = map(int, name.split("x"))
            _CASES[kind, name] = _Case(kind, (k, n), (None,), seed)
        else:
            dims, acts = MLPS[name]
            _CASES[kind, name] = _Case(kind, dims, acts, seed)
    return _CASES[kind, name]


@pytest.fixture(scope="module")
def cases():
    return get_case


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


# --------------------------------------------------------------------------------------------


def _params():
    out = []
    for kind, name in _specs():
        for b in BATCHES:
            group = f"{kind}-{name}-B{b}"
            for impl in IMPLS:
                out.append(pytest.param(kind, name, b, impl, id=f"{group}-{impl}",
                                        marks=pytest.mark.benchmark(group=group)))
    return out


def _check(case: _Case, impl: str, x: np.ndarray, batch: int, onnx_dir) -> float:
    tol = INT8_TOL if impl in INT8_IMPLS else FP32_TOL
    ref_check = case.reference("check")
    scale = float(np.abs(ref_check).max())
    err = 0.0
    for key, xx in (("check", case.check_x), (batch, x)):
        call, to_np = case.runner(impl, xx, onnx_dir)
        err = max(err, assert_rel_error(to_np(call()), case.reference(key),
                                        f"{impl} {case.kind}-{case.dims} input {key}", tol, scale))
    return err


@pytest.mark.parametrize("kind,name,batch,impl", _params())
def test_dense(benchmark, cases, onnx_dir, kind, name, batch, impl):
    case = cases(kind, name)
    x = case.x(batch)
    ops = 2 * batch * case.macs
    rounds, warmup = _rounds(ops)
    with torch.inference_mode():
        err = _check(case, impl, x, batch, onnx_dir)
        call, _ = case.runner(impl, x, onnx_dir)
        benchmark.extra_info.update(
            impl=impl, case=kind, dims="-".join(map(str, case.dims)),
            activations=",".join(a or "none" for a in case.activations), batch=batch,
            threads=THREADS, max_rel_error=round(err, 6))
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)
    record_latency(benchmark)
    record_gops(benchmark, ops)
