"""int8 linear layers and MLPs: per-channel int8 weights packed once, activations quantized per
row inside the kernel, int32 accumulation, bias / ReLU / dequantization fused in the epilogue.

    lin = fastrec.Int8Linear.from_float(weight, bias)     # weight (N, K), nn.Linear's layout
    y = lin(x, activation="relu")                          # x float32 (B, K) -> (B, N)
    mlp = fastrec.Int8MLP.from_float([(w1, b1), (w2, b2)], ["relu", "sigmoid"])
    p = mlp(x)

Device arrays (torch CUDA tensors, CuPy arrays) run on the GPU (see fastrec._cuda_linear): the
result is of the caller's framework, on the same device, computed on the caller's current stream;
the weights are uploaded to each device once, on first use there.

Quantization: weights symmetric per output channel (scale = max|w_n| / 127), activations
symmetric per row (scale = max|x_b| / 127), both rounded half to even to [-127, 127].
Tiny rows: where 127 / max|x_b| overflows float32 (max|x_b| below ~3.7e-37) the row is scaled
by 2^100 before rounding, so its codes keep their ratios; its scale is still max|x_b| / 127,
subnormal below ~1.5e-36, so such rows come back with less relative precision (~0.4% at
1e-38). Flush-to-zero (``torch.set_flush_denormal(True)``) is a per-thread CPU setting: on a
thread that has it, subnormal inputs and scales read as zero, so results for such rows can
differ between the calling thread, fastrec's pool threads and the GPU (which does not flush).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import _C
from ._arrays import as_numpy, finite_float32, native
from ._cuda import is_device_array

__all__ = ["Int8Linear", "Int8MLP"]

_ACTIVATIONS = {None: 0, "none": 0, "relu": 1, "sigmoid": 2}
_F32 = np.dtype(np.float32)


def _plain_f32_matrix(x, in_features: int) -> bool:
    """True for the common input, a native float32 numpy matrix of the right width: the
    callers then go straight to the C++ call (which copies it only if it is not C-contiguous,
    and finds NaN / Inf in the quantization pass). The general path (device arrays, tensors,
    checks with Python's messages) cost ~4 us of Python per call, a quarter of a batch-1
    1024x1024 layer."""
    return type(x) is np.ndarray and x.dtype is _F32 and x.ndim == 2 and x.shape[1] == in_features


def _activation_code(activation) -> int:
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation must be None, 'relu' or 'sigmoid', got {type(activation).__name__} {activation!r}")
    try:
        return _ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be None, 'relu' or 'sigmoid', got {activation!r}") from None


def _float_matrix(a, name: str) -> np.ndarray:
    """A floating-point array as finite C-contiguous float32 (TypeError / ValueError otherwise)."""
    a = as_numpy(a)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got {a.dtype}")
    return finite_float32(a, name)


def _f32_vector(a, name: str, n: int) -> np.ndarray:
    """A finite float32 array of shape (n,) (TypeError / ValueError otherwise)."""
    a = native(as_numpy(a))
    if a.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {a.dtype}")
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def quantize_weight(weight) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: returns (q (N, K) int8, scale (N,) float32)."""
    w = _float_matrix(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {w.shape}")
    if w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"weight must have at least one row and one column, got shape {w.shape}")
    # The activation quantizer itself (csrc/cpu/ref/gemm_ref.cpp and its SIMD twins, bit-identical):
    # round half to even of x * (127 / amax), rows whose 127 / amax overflows scaled by 2^100 first.
    return _C.quantize_rows_int8(w)


def _checked_int8(weight_int8, weight_scale, bias):
    """(weight_int8, weight_scale, bias) as Int8Linear takes them, or TypeError / ValueError."""
    w = as_numpy(weight_int8)
    if w.dtype != np.int8:
        raise TypeError(f"weight_int8 must be int8, got {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"weight_int8 must be 2-D (out_features, in_features), got shape {w.shape}")
    if w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"weight_int8 must have at least one row and one column, got shape {w.shape}")
    if int(w.min()) < -127:
        raise ValueError("weight_int8 codes must be in [-127, 127] (symmetric quantization), found -128")
    scale = _f32_vector(weight_scale, "weight_scale", w.shape[0])
    bias = None if bias is None else _f32_vector(bias, "bias", w.shape[0])
    return w, scale, bias


class Int8Linear:
    """``y = x @ W.T + b`` with int8 weights and dynamically quantized int8 activations.

    Attributes: ``weight_int8`` (N, K) int8, ``weight_scale`` (N,) float32, ``bias`` (N,) float32
    or None, ``in_features`` (K), ``out_features`` (N).
    """

    def __init__(self, weight_int8, weight_scale, bias=None):
        """Same as :meth:`from_int8` (the checks are here, so no way round them)."""
        weight_int8, weight_scale, bias = _checked_int8(weight_int8, weight_scale, bias)
        self._core = _C.Int8LayerCore(weight_int8, weight_scale, bias)
        self._k = self._core.in_features
        # Read-only copies: the kernels use their own packed copy, made above, so writing to
        # these arrays could never change the results; numpy refuses it instead.
        self.weight_int8 = np.array(weight_int8, dtype=np.int8, copy=True)
        self.weight_scale = np.array(weight_scale, dtype=np.float32, copy=True)
        self.bias = None if bias is None else np.array(bias, dtype=np.float32, copy=True)
        for a in (self.weight_int8, self.weight_scale, self.bias):
            if a is not None:
                a.flags.writeable = False
        self._cuda_weights = {}  # device -> weights uploaded there (fastrec._cuda_linear)
        self._cuda_plans = {}    # (device, activation code) -> launch plan

    @classmethod
    def from_float(cls, weight, bias=None) -> "Int8Linear":
        """Quantize a float layer: ``weight`` (out_features, in_features), ``bias`` (out_features,)."""
        q, scale = quantize_weight(weight)
        if bias is not None:
            bias = _float_matrix(bias, "bias")
            if bias.shape != (q.shape[0],):
                raise ValueError(f"bias must have shape ({q.shape[0]},), got {bias.shape}")
            if not np.isfinite(bias).all():
                raise ValueError("bias contains NaN or Inf")
        return cls(q, scale, bias)

    @classmethod
    def from_int8(cls, weight_int8, weight_scale, bias=None) -> "Int8Linear":
        """A layer from already-quantized weights (e.g. read from a model file): ``weight_int8``
        int8 (out_features, in_features) with codes in [-127, 127], ``weight_scale`` float32
        (out_features,) finite, ``bias`` float32 (out_features,) finite or None. No requantization."""
        return cls(weight_int8, weight_scale, bias)

    @property
    def in_features(self) -> int:
        return self._core.in_features

    @property
    def out_features(self) -> int:
        return self._core.out_features

    def __call__(self, x, activation=None, *, check_finite: bool = True):
        """``activation(x @ W.T + b)``; x float32 (B, K), a numpy array or a device array.

        ``check_finite`` matters on the GPU only (the CPU check is free): False skips the host
        wait that the NaN/Inf check costs, and such rows then come out as NaN.
        """
        if _plain_f32_matrix(x, self._k) and (activation is None or type(activation) is str):
            code = _ACTIVATIONS.get(activation)
            if code is not None:
                return _C.int8_linear(x, self._core, code)
        from .ops import int8_linear

        return int8_linear(x, self, activation=activation, check_finite=check_finite)

    def __reduce__(self):
        # Pickling (copy.deepcopy, multiprocessing, Ray) carries the int8 codes, scales and bias;
        # the copy packs them again, so it returns bit-identical results.
        return (type(self), (self.weight_int8, self.weight_scale, self.bias))

    def dequantized_weight(self) -> np.ndarray:
        """The float32 weights these int8 codes stand for."""
        return self.weight_int8.astype(np.float32) * self.weight_scale[:, None]

    def __repr__(self) -> str:
        return (f"Int8Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None})")


class Int8MLP:
    """Layers run back to back inside one C++ call (no Python between layers).

    ``activations`` has one entry per layer: None, "relu" or "sigmoid" (DLRM's top MLP ends
    with a width-1 layer and a sigmoid).
    """

    def __init__(self, layers: Sequence[Int8Linear], activations):
        layers = list(layers)
        if not layers:
            raise ValueError("an MLP needs at least one layer")
        if not all(isinstance(lin, Int8Linear) for lin in layers):
            raise TypeError("layers must be Int8Linear objects (or use Int8MLP.from_float)")
        if isinstance(activations, (str, bytes)):  # (its letters were taken as one activation each)
            raise TypeError("activations must be a sequence with one entry per layer, e.g. ['relu', None]")
        activations = list(activations)
        if len(activations) != len(layers):
            raise ValueError(f"one activation per layer is required ({len(layers)}), got {len(activations)}")
        for i in range(1, len(layers)):
            if layers[i].in_features != layers[i - 1].out_features:
                raise ValueError(f"layer {i} takes {layers[i].in_features} features but layer {i - 1} "
                                 f"gives {layers[i - 1].out_features}")
        self.layers = layers
        self.activations = activations
        self._codes = [_activation_code(a) for a in activations]
        self._cores = [lin._core for lin in layers]
        self._k = layers[0]._k
        self._cuda_plans = {}  # device -> launch plan (fastrec._cuda_linear)

    @classmethod
    def from_float(cls, layers, activations) -> "Int8MLP":
        """``layers``: a sequence of (weight (N, K), bias (N,) or None) pairs."""
        lins = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, (tuple, list)) or len(layer) != 2:
                raise TypeError(f"layer {i} must be a (weight, bias) pair (bias may be None), got "
                                f"{type(layer).__name__}")
            lins.append(Int8Linear.from_float(*layer))
        return cls(lins, activations)

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    @property
    def out_features(self) -> int:
        return self.layers[-1].out_features

    def __call__(self, x, *, check_finite: bool = True):
        """The layers on x (float32 (B, in_features), numpy or device array); see Int8Linear.__call__."""
        if _plain_f32_matrix(x, self._k):
            return _C.int8_mlp(x, self._cores, self._codes)
        if is_device_array(x):
            from ._cuda_linear import int8_mlp

            return int8_mlp(x, self, check_finite=check_finite)
        from .ops import _linear_input

        x = _linear_input(x, self.in_features)
        return _C.int8_mlp(x, self._cores, self._codes)

    def __reduce__(self):
        return (type(self), (self.layers, self.activations))

    def __repr__(self) -> str:
        dims = [self.in_features] + [lin.out_features for lin in self.layers]
        return f"Int8MLP({'-'.join(map(str, dims))}, activations={self.activations})"
