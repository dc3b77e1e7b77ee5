"""fastrec.kernels: Numba (CPU) and CuPy (GPU) kernels, installed as ``fastrec.kernels``.

Kernels here are compiled lazily on first use (Numba ``nogil=True, cache=True``; CuPy RawKernel
through NVRTC), so importing fastrec never requires Numba or CuPy. The featurizer's hashing and
bucketizing kernels (issue "Models end to end") and the CuPy embedding bag (issue "CUDA
backend") live here; the compiled C++ module covers the embedding bag on CPUs.
"""

__all__: list[str] = []
