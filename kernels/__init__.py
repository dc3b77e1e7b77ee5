"""fastrec.kernels: Numba (CPU) and CuPy (GPU) kernels, installed as ``fastrec.kernels``.

Kernels here are compiled lazily on first use (Numba ``nogil=True, cache=True``; CuPy RawKernel /
ElementwiseKernel through NVRTC), so importing fastrec never requires Numba or CuPy.

* :mod:`fastrec.kernels.hashing`: the featurizer's stable 64-bit hashing of raw integer ids and
  strings to rows (``hash_ids``), with bit-identical NumPy reference, Numba CPU kernel and CuPy
  kernel.
* :mod:`fastrec.kernels.cupy_embedding`: the embedding bag as CuPy RawKernels, the GPU path when
  the compiled CUDA module (``fastrec._C_cuda``) is absent but CuPy sees a GPU, or when
  ``FASTREC_CUDA_BACKEND=cupy`` asks for it.

The compiled C++ module covers the embedding bag on CPUs (and, when built, on GPUs).
"""

import os
import threading

__all__: list[str] = []


def renew_after_fork(namespace: dict, name: str, factory=threading.Lock) -> None:
    """Gives a forked child a fresh ``namespace[name] = factory()`` lock: a fork while another
    thread held the parent's (compiling a kernel, updating an index) left the child's copy
    locked forever, and the child hung on its first use."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: namespace.__setitem__(name, factory()))


def numba_jit(numba, fn):
    """``numba.njit(nogil=True, cache=True)(fn)``, or without the on-disk cache where Numba
    cannot cache ``fn`` (no writable ``__pycache__`` beside the installed package nor a
    writable ``NUMBA_CACHE_DIR`` / home: a read-only image run by a service user). Numba raises
    RuntimeError at decoration then; the kernels still compile, on first call in each process."""
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:
        return numba.njit(nogil=True)(fn)
