"""NVRTC (CUDA's run-time compiler) through ctypes, for tests that compile the CuPy kernels'
sources without a GPU: NVRTC needs only its library, not a device or a driver.

The library is looked for where CuPy finds it: the ``nvidia-cuda-nvrtc-cu12`` wheel (``.ci/run``
installs it; NVRTC 12 is what the ``cuda`` extra's cupy-cuda12x uses) under
``nvidia/cuda_nvrtc/lib`` (``nvidia/cu13/lib`` for 13), then ``$CUDA_HOME/lib64`` and
``/usr/local/cuda*/lib64``, then the loader's search path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os


def _candidates():
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        yield from sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")), reverse=True)
    for home in [os.environ.get("CUDA_HOME", "")] + sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if home:
            yield from sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")), reverse=True)
    name = ctypes.util.find_library("nvrtc")
    if name:
        yield name


def _load():
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib
    return None


LIB = _load()


def version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    LIB.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


if LIB is None:
    SKIP_REASON = "NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12)"
elif version() < (11, 8):  # (compute_90, the newest architecture fastrec targets, came with 11.8)
    SKIP_REASON = f"NVRTC {version()} is older than 11.8"
else:
    SKIP_REASON = None


def compile_ptx(source: str, name: str, options=()) -> tuple[str, str]:
    """``(ptx, log)`` of ``source``; RuntimeError with NVRTC's log when it does not compile."""
    prog = ctypes.c_void_p()

    def check(result, what):
        if result != 0:
            raise RuntimeError(f"{what}: {LIB.nvrtcGetErrorString(result).decode()}")

    check(LIB.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
          "nvrtcCreateProgram")
    try:
        opts = (ctypes.c_char_p * max(1, len(options)))(*[o.encode() for o in options])
        result = LIB.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        check(LIB.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        log = ctypes.create_string_buffer(size.value)
        check(LIB.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        log = log.value.decode(errors="replace")
        if result != 0:
            raise RuntimeError(f"{name} does not compile ({LIB.nvrtcGetErrorString(result).decode()}):\n{log}")
        check(LIB.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
        ptx = ctypes.create_string_buffer(size.value)
        check(LIB.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        return ptx.value.decode(), log
    finally:
        LIB.nvrtcDestroyProgram(ctypes.byref(prog))
