"""CuPy, as far as fastrec's RawKernel launchers use it (kernels/cupy_embedding.py), over host
memory and without a GPU: a RawKernel's source is compiled for the host by the C++ compiler under
the CUDA host emulation (csrc/cuda/emu/host_emulation.h, with rawkernel_emu.h's entry point) and
run through ctypes; "device" arrays are numpy arrays and device pointers host addresses.

tests/test_cupy_kernels.py's "emulated" cases run the CuPy embedding kernels this way, on CPU
torch tensors posing as CUDA tensors (conftest.make_to_device), against the compiled kernels'
emulation (fastrec._C_cuda_emu) and the CPU op. Each kernel variant is compiled once (a few
seconds) and kept in a cache directory keyed by its source and the emulator's files.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import types
from pathlib import Path

import numpy as np

EMU = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "emu"
# (as the module: no fused multiply-adds); FASTREC_EMU_CXXFLAGS adds more (.ci/run: -fsanitize=address)
_FLAGS = ["-std=c++17", "-O1", "-fPIC", "-w", "-ffp-contract=off"] + shlex.split(os.environ.get("FASTREC_EMU_CXXFLAGS", ""))


def _cuda_include():
    homes = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", "")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parents[1]))
    homes += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for home in homes:
        if home and (Path(home) / "include" / "cuda_fp16.h").is_file():
            return str(Path(home) / "include")
    return None


CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
CUDA_INCLUDE = _cuda_include()
if not (EMU / "rawkernel_emu.h").is_file():
    SKIP_REASON = f"the emulator's sources are not here ({EMU})"
elif CXX is None:
    SKIP_REASON = "no C++ compiler (g++ / c++ / $CXX)"
elif CUDA_INCLUDE is None:
    SKIP_REASON = "no CUDA toolkit headers (cuda_fp16.h under $CUDA_HOME, nvcc's or /usr/local/cuda*)"
else:
    SKIP_REASON = None

_lock = threading.Lock()
_loaded: dict = {}


_private_cache: list = []


def _cache() -> Path:
    """A directory of compiled variants shared by this user's test runs; a private one for this
    process where that one is not this user's alone (the .so files in it get loaded)."""
    d = Path(tempfile.gettempdir()) / f"fastrec-emu-rawkernel-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.lstat()
    if st.st_uid == os.getuid() and not d.is_symlink():
        if st.st_mode & 0o077:
            os.chmod(d, 0o700)
        return d
    if not _private_cache:
        _private_cache.append(Path(tempfile.mkdtemp(prefix="fastrec-emu-rawkernel-")))
    return _private_cache[0]


def _emulator_digest() -> str:
    h = hashlib.sha256(" ".join([CXX, CUDA_INCLUDE] + _FLAGS).encode())
    for name in ("host_emulation.h", "rawkernel_emu.h", "runtime_emu.cpp"):
        h.update((EMU / name).read_bytes())
    return h.hexdigest()[:16]


def _build(args, out: Path) -> None:
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    r = subprocess.run([CXX] + _FLAGS + [f"-I{EMU}", f"-I{CUDA_INCLUDE}"] + args + ["-o", str(tmp)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"host compile of an emulated kernel failed:\n{r.stderr[-4000:]}")
    os.replace(tmp, out)  # (atomic: concurrent test runs share the cache)


def compile_kernel(source: str, name: str) -> ctypes.CDLL:
    """The kernel `name` of `source`, compiled for the host under the emulation, loaded."""
    if SKIP_REASON is not None:
        raise RuntimeError(SKIP_REASON)
    emu = _emulator_digest()
    key = hashlib.sha256(f"{emu}\0{name}\0{source}".encode()).hexdigest()[:24]
    with _lock:
        lib = _loaded.get(key)
        if lib is not None:
            return lib
        cache = _cache()
        runtime = cache / f"runtime-{emu}.o"
        if not runtime.is_file():
            _build(["-c", str(EMU / "runtime_emu.cpp")], runtime)
        so = cache / f"{name}-{key}.so"
        if not so.is_file():
            src = cache / f"{name}-{key}.{os.getpid()}.cpp"  # (per process: concurrent runs share the cache)
            src.write_text(f'#include "host_emulation.h"\n{source}\n#define FASTREC_EMU_KERNEL {name}\n'
                           '#include "rawkernel_emu.h"\n')
            try:
                _build(["-shared", str(src), str(runtime)], so)
            finally:
                src.unlink()
        lib = ctypes.CDLL(str(so))
        lib.fastrec_emu_launch.restype = ctypes.c_int
        lib.fastrec_emu_launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                           ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint64), ctypes.c_int,
                                           ctypes.c_char_p, ctypes.c_size_t]
        _loaded[key] = lib
        return lib


class ndarray:
    """A "device" array: a numpy array, its address the device pointer."""

    def __init__(self, host: np.ndarray):
        self.host = host
        self.data = types.SimpleNamespace(ptr=host.ctypes.data)


def _word(a) -> int:
    if isinstance(a, ndarray):
        return a.data.ptr
    if isinstance(a, np.generic) and a.dtype.itemsize <= 8:
        return int.from_bytes(np.asarray(a).tobytes().ljust(8, b"\0"), "little")
    raise TypeError(f"a RawKernel argument must be a numpy scalar or an array, got {type(a).__name__}")


def _dim3(v) -> ctypes.Array:
    v = tuple(int(x) for x in (v if isinstance(v, tuple) else (v,)))
    return (ctypes.c_uint * 3)(*(v + (1, 1, 1))[:3])


class RawKernel:
    def __init__(self, code: str, name: str, options=()):
        self.name = name
        self._lib = compile_kernel(code, name)

    def __call__(self, grid, block, args, shared_mem=0):
        words = (ctypes.c_uint64 * max(len(args), 1))(*[_word(a) for a in args])
        err = ctypes.create_string_buffer(512)
        if self._lib.fastrec_emu_launch(_dim3(grid), _dim3(block), int(shared_mem), words, len(args), err, 512):
            raise RuntimeError(f"emulated kernel {self.name}: {err.value.decode()}")


class _Context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Stream(_Context):
    def __init__(self, ptr: int = 0):
        self.ptr = ptr


class _Device(_Context):
    def __init__(self, index: int):
        if index != 0:
            raise ValueError(f"one emulated device, 0 (got {index})")


def _memcpy_async(dst, src, nbytes, kind, stream):
    ctypes.memmove(dst, src, nbytes)


def full(shape, fill_value, dtype=None) -> ndarray:
    return ndarray(np.full(shape, fill_value, dtype=dtype))


def module() -> types.SimpleNamespace:
    """A stand-in for the cupy module (what kernels/cupy_embedding.py calls)."""
    runtime = types.SimpleNamespace(memcpyAsync=_memcpy_async, memcpyDeviceToHost=2,
                                    streamSynchronize=lambda ptr: None, getDeviceCount=lambda: 1)
    cuda = types.SimpleNamespace(Device=_Device, Stream=types.SimpleNamespace(null=_Stream(0)), ExternalStream=_Stream,
                                 runtime=runtime)
    return types.SimpleNamespace(RawKernel=RawKernel, full=full, int64=np.int64, cuda=cuda)
