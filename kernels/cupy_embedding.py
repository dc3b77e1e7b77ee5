"""Embedding bags as CuPy RawKernels (NVRTC, compiled at run time): the GPU path when the
compiled CUDA module (``fastrec._C_cuda``) is absent but CuPy sees a GPU, or when
``FASTREC_CUDA_BACKEND=cupy`` asks for it (see ``fastrec._cuda_embedding._embedding_backend``).

:func:`embedding_bags` takes exactly the arguments of ``fastrec._C_cuda.embedding_bags`` (raw
device pointers as ints, tables as ``(ptr, rows, dim, row_stride, kind, tbe, mode,
padding_idx)``) and has the same semantics, so ``fastrec.ops`` validates, normalises and
allocates the output once for either backend:

* row formats (``kind``): 0 fp32, 1 fp16, 2 8-bit codes + fp32 scale + fp32 bias (FBGEMM CPU
  layout), 3 4-bit and 4 2-bit codes + fp16 scale + fp16 bias, 5 8-bit with fp16 scale and
  bias; ``tbe`` puts the fp16 scale and bias before the codes (fbgemm_gpu / TorchRec layout);
  a value is ``scale * code + bias``;
* modes sum / mean / max per table, per-sample weights (sum only), a padding id per table
  (skipped; mean divides by the other entries), int32 or int64 ids and offsets, table-major
  CSR offsets of length ``T*B + 1`` or the fixed-length ``(B, L)`` form;
* an empty (or all-padding) bag gives zeros;
* a bad id raises IndexError and bad offsets ValueError, with the CPU op's messages; the kernel
  never reads outside a table, the ids or the offsets, so the CUDA context stays usable.

Simple rather than fast: one launch per table, one block of 128 threads per bag; the threads
first range-check the bag's ids, then each owns columns ``j, j + 128, ...`` and walks the bag's
ids, reading rows byte-wise (any alignment) and accumulating in fp32. A kernel is compiled once
per (row format, id dtype, offset dtype) variant, lazily, and cached (CuPy also caches the
binary on disk). The call waits for the kernels: a 16-byte error slot is read back.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np

from . import renew_after_fork

__all__ = ["available", "embedding_bags", "kernel_source"]

KIND_NAMES = {0: "f32", 1: "f16", 2: "q8", 3: "q4", 4: "q2", 5: "q8-half"}
_KIND_BITS = {0: 32, 1: 16, 2: 8, 3: 4, 4: 2, 5: 8}
_THREADS = 128
_MAX_GRID_X = 2**31 - 1
_NO_ERROR = np.uint64(2**64 - 1)

_SOURCE = r"""
// fastrec embedding bag (CuPy RawKernel, NVRTC). Variant macros, defined before this text:
// FASTREC_KIND: 0 f32, 1 f16, 2 8-bit + fp32 scale/bias, 3 4-bit, 4 2-bit (fp16 scale/bias),
//               5 8-bit + fp16 scale/bias.  FASTREC_IDX_T / FASTREC_OFF_T: int or long long.
typedef FASTREC_IDX_T fastrec_idx_t;
typedef FASTREC_OFF_T fastrec_off_t;

// n (<= 4) little-endian bytes at p: rows may sit at any byte alignment.
__device__ __forceinline__ unsigned int fastrec_load_le(const unsigned char* p, int n) {
  unsigned int v = 0;
  for (int i = 0; i < n; ++i) v |= ((unsigned int)p[i]) << (8 * i);
  return v;
}

__device__ __forceinline__ float fastrec_half_to_float(unsigned int bits) {
#ifdef FASTREC_HOST_EMULATION  // (compiled for the host in tests: csrc/cuda/emu/rawkernel_emu.h)
  return fastrec_emu::half_bits(bits, 0);
#else
  const unsigned short h = (unsigned short)bits;
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}

// Element j of a row, as the CPU reference decodes it.
__device__ __forceinline__ float fastrec_element(const unsigned char* row, long long j, long long code_off,
                                                 long long qp_off) {
#if FASTREC_KIND == 0
  return __uint_as_float(fastrec_load_le(row + 4 * j, 4));
#elif FASTREC_KIND == 1
  return fastrec_half_to_float(fastrec_load_le(row + 2 * j, 2));
#else
  const unsigned char* codes = row + code_off;
#if FASTREC_KIND == 3
  const unsigned int q = (((unsigned int)codes[j >> 1]) >> (4 * (int)(j & 1))) & 0xFu;
#elif FASTREC_KIND == 4
  const unsigned int q = (((unsigned int)codes[j >> 2]) >> (2 * (int)(j & 3))) & 0x3u;
#else
  const unsigned int q = codes[j];
#endif
#if FASTREC_KIND == 2
  const float scale = __uint_as_float(fastrec_load_le(row + qp_off, 4));
  const float bias = __uint_as_float(fastrec_load_le(row + qp_off + 4, 4));
#else
  const float scale = fastrec_half_to_float(fastrec_load_le(row + qp_off, 2));
  const float bias = fastrec_half_to_float(fastrec_load_le(row + qp_off + 2, 2));
#endif
  return scale * (float)q + bias;
#endif
}

// One table; block b pools bag b (blocks >= batch only run the offsets-ends check).
// err[0]: smallest bad id position; err[1]: != ~0 when the offsets break the CSR rules.
extern "C" __global__ void fastrec_embedding_bag(
    unsigned long long data_addr, long long rows, long long dim, long long stride, long long code_off,
    long long qp_off, long long pad, long long mode, long long table, long long col,
    unsigned long long ids_addr, unsigned long long offsets_addr, unsigned long long psw_addr,
    unsigned long long out_addr, unsigned long long* err, long long num_indices, long long num_offsets,
    long long fixed_len, long long batch, long long out_stride, long long check_ends) {
  const unsigned char* data = (const unsigned char*)data_addr;
  const fastrec_idx_t* ids = (const fastrec_idx_t*)ids_addr;
  const fastrec_off_t* offsets = (const fastrec_off_t*)offsets_addr;
  const float* psw = (const float*)psw_addr;
  float* out = (float*)out_addr;

  if (check_ends && blockIdx.x == 0 && threadIdx.x == 0) {
    const long long first = (long long)offsets[0];
    const long long last = (long long)offsets[num_offsets - 1];
    if (first != 0 || last != num_indices) atomicMin(err + 1, 0ull);
  }
  const long long bag = (long long)blockIdx.x;
  if (bag >= batch) return;

  const long long g = table * batch + bag;  // table-major
  long long s, e;
  if (fixed_len >= 0) {
    s = g * fixed_len;
    e = s + fixed_len;
  } else {
    s = (long long)offsets[g];
    e = (long long)offsets[g + 1];
    if (threadIdx.x == 0 && e < s) atomicMin(err + 1, (unsigned long long)(g + 1));
    s = s < 0 ? 0 : (s > num_indices ? num_indices : s);  // bad offsets never send a read out of bounds
    e = e < s ? s : (e > num_indices ? num_indices : e);
  }

  for (long long p = s + threadIdx.x; p < e; p += blockDim.x) {
    const long long id = (long long)ids[p];
    if ((unsigned long long)id >= (unsigned long long)rows) atomicMin(err, (unsigned long long)p);
  }

  const bool is_max = mode == 2;
  for (long long j = threadIdx.x; j < dim; j += blockDim.x) {
    float acc = is_max ? __uint_as_float(0xff800000u) : 0.f;  // -inf
    long long count = 0;
    for (long long p = s; p < e; ++p) {
      const long long id = (long long)ids[p];
      if ((unsigned long long)id >= (unsigned long long)rows || id == pad) continue;
      const float v = fastrec_element(data + id * stride, j, code_off, qp_off);
      if (is_max) {
        acc = fmaxf(acc, v);
      } else {
        const float w = psw ? psw[p] : 1.f;
        acc = acc + w * v;
      }
      ++count;
    }
    if (count == 0) {
      acc = 0.f;
    } else if (mode == 1) {
      acc = acc * (1.f / (float)count);
    }
    out[bag * out_stride + col + j] = acc;
  }
}
"""


def kernel_source(kind: int, idx64: bool, off64: bool) -> str:
    """The CUDA C++ source of one variant (what NVRTC compiles)."""
    return (f"#define FASTREC_KIND {int(kind)}\n"
            f"#define FASTREC_IDX_T {'long long' if idx64 else 'int'}\n"
            f"#define FASTREC_OFF_T {'long long' if off64 else 'int'}\n" + _SOURCE)


def _cupy():
    """The cupy module (tests/cuda_emu_rawkernel.py stands in for it to run these kernels,
    compiled for the host, without a GPU)."""
    import cupy

    return cupy


_kernels: dict = {}
_lock = threading.Lock()
renew_after_fork(globals(), "_lock")


def _kernel(kind: int, idx64: bool, off64: bool):
    key = (kind, idx64, off64)
    k = _kernels.get(key)
    if k is None:
        cupy = _cupy()
        with _lock:
            k = _kernels.get(key)
            if k is None:
                k = cupy.RawKernel(kernel_source(kind, idx64, off64), "fastrec_embedding_bag")
                _kernels[key] = k
    return k


_availability: list = []  # [reason or None], once known


def available() -> str | None:
    """None when CuPy is importable and sees a GPU, else the reason it cannot run here
    (found once per process)."""
    if not _availability:
        _availability.append(_find_availability())
    return _availability[0]


def _find_availability() -> str | None:
    try:
        cupy = _cupy()
    except Exception as e:  # ImportError, or a CuPy that fails to load its CUDA libraries
        return f"CuPy is not importable ({e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"CuPy finds no CUDA device ({e})"
    return None if n > 0 else "CuPy finds no CUDA device"


# ---- host side: the launcher's checks, the launches, the readback and the messages -------------


class _Plan:
    __slots__ = ("data", "rows", "dim", "stride", "code_off", "qp_off", "pad", "mode", "kind")


def _describe(t, index: int) -> _Plan:
    """A table tuple checked as the compiled launcher checks it (ValueError where it throws
    std::invalid_argument)."""
    data, rows, dim, stride, kind, tbe, mode, pad = t
    name = f"table {index}"
    kind, rows, dim, stride, mode, pad = int(kind), int(rows), int(dim), int(stride), int(mode), int(pad)
    bits = _KIND_BITS.get(kind)
    if bits is None:
        raise ValueError(f"{name}: unknown row kind {kind}")
    if rows < 0 or dim < 0 or stride < 0:
        raise ValueError(f"{name}: negative size")
    if mode not in (0, 1, 2):
        raise ValueError("mode code must be 0 (sum), 1 (mean) or 2 (max)")
    if pad < -1 or pad >= rows:
        raise ValueError(f"{name}: padding_idx {pad} is out of range")
    if rows > 0 and stride > 0 and not data:
        raise ValueError(f"{name}: null data")
    quant = bits <= 8
    if kind == 2 and tbe:
        raise ValueError(f"{name}: 8-bit TBE rows have fp16 scale and bias (kind 5)")
    tbe = kind == 5 or (bool(tbe) and quant)
    cb = (dim * bits + 7) // 8
    p = _Plan()
    p.code_off = p.qp_off = 0
    if not quant:
        if stride != cb:
            raise ValueError(f"{name}: float rows must be dense (row_stride == dim * itemsize)")
    else:
        need = cb + (8 if kind == 2 else 4)
        if stride < need:
            raise ValueError(f"{name}: packed rows of {stride} bytes are too short for dim={dim} (need >= {need})")
        p.code_off = 4 if tbe else 0
        p.qp_off = 0 if tbe else cb
    p.data, p.rows, p.dim, p.stride, p.mode, p.pad, p.kind = int(data), rows, dim, stride, mode, pad, kind
    return p


def _stream(cupy, ptr: int):
    if ptr == 0:
        return cupy.cuda.Stream.null
    # CuPy 14 deprecates ExternalStream in favour of Stream.from_external(obj with
    # __cuda_stream__); a raw handle from torch has no such object, and ExternalStream is what
    # the GPU tests ran with, so keep it and keep its warning out of users' logs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr)


def _to_host(cupy, src: int, dtype, count: int, stream_ptr: int) -> np.ndarray:
    """count elements of dtype at device address src, copied on the stream."""
    host = np.empty(count, dtype=dtype)
    if count:
        rt = cupy.cuda.runtime
        rt.memcpyAsync(host.ctypes.data, src, host.nbytes, rt.memcpyDeviceToHost, stream_ptr)
        rt.streamSynchronize(stream_ptr)
    return host


def _offsets_error(off: np.ndarray, num_indices: int) -> ValueError:
    """The CPU op's offset messages (csrc/cpu/embedding.cpp)."""
    n = len(off)
    if off[0] != 0:
        return ValueError(f"offsets[0] must be 0, got {int(off[0])}")
    for i in range(1, n):
        if off[i] < off[i - 1]:
            return ValueError(f"offsets must be non-decreasing: offsets[{i}]={int(off[i])} < "
                              f"offsets[{i - 1}]={int(off[i - 1])}")
    if off[n - 1] != num_indices:
        return ValueError(f"offsets[-1] must equal len(indices)={num_indices}, got {int(off[n - 1])}")
    return RuntimeError("fastrec CuPy embedding_bags: the kernel flagged the offsets but they check out on the host")


def embedding_bags(tables, indices, num_indices, indices_int64, offsets, num_offsets, offsets_int64,
                   fixed_len, per_sample_weights, out, device, stream):
    """Same arguments and semantics as ``fastrec._C_cuda.embedding_bags`` (see the module
    docstring): pools T device tables over device ids into ``out[B, sum(D_t)]`` on ``stream``
    (an integer handle; 0 is the legacy default stream) of ``device``, and waits for it."""
    T = len(tables)
    if T == 0:
        raise ValueError("at least one table is required")
    num_indices, num_offsets, fixed_len = int(num_indices), int(num_offsets), int(fixed_len)
    if num_offsets < 1 or (num_offsets - 1) % T != 0:
        raise ValueError(f"offsets must have length T*B + 1 (T={T} tables), got length {num_offsets}")
    batch = (num_offsets - 1) // T
    if num_indices < 0:
        raise ValueError("num_indices must be >= 0")
    if fixed_len >= 0:
        if T != 1 or num_indices != batch * fixed_len:
            raise ValueError("2-D indices: one table and B * L indices are required")
    elif not offsets:
        raise ValueError("offsets are required")
    if num_indices > 0 and not indices:
        raise ValueError("indices: null pointer")
    plans = [_describe(t, i) for i, t in enumerate(tables)]
    if per_sample_weights and any(p.mode != 0 for p in plans):
        raise ValueError("per_sample_weights is only supported with mode 'sum'")
    out_stride = sum(p.dim for p in plans)
    if batch > 0 and out_stride > 0 and not out:
        raise ValueError("out: null pointer")
    if batch > _MAX_GRID_X:
        raise ValueError("embedding_bags: batch too large for one launch")
    if fixed_len >= 0 and batch == 0:
        return  # nothing to pool and no offsets to check

    cupy = _cupy()
    i64 = np.int64
    with cupy.cuda.Device(int(device)):
        s = _stream(cupy, int(stream))
        with s:
            err = cupy.full(2, -1, dtype=cupy.int64)  # all bits set: no error
            col = 0
            for t, p in enumerate(plans):
                check_ends = t == 0 and fixed_len < 0
                if batch > 0 or check_ends:
                    kern = _kernel(p.kind, bool(indices_int64), bool(offsets_int64))
                    kern((max(batch, 1),), (_THREADS,), (
                        np.uint64(p.data), i64(p.rows), i64(p.dim), i64(p.stride), i64(p.code_off),
                        i64(p.qp_off), i64(p.pad), i64(p.mode), i64(t), i64(col),
                        np.uint64(indices), np.uint64(offsets or 0), np.uint64(per_sample_weights or 0),
                        np.uint64(out or 0), err, i64(num_indices), i64(num_offsets), i64(fixed_len),
                        i64(batch), i64(out_stride), i64(check_ends)))
                col += p.dim
            flags = _to_host(cupy, err.data.ptr, np.uint64, 2, s.ptr)
        bad_id, bad_off = flags[0], flags[1]
        if bad_id == _NO_ERROR and bad_off == _NO_ERROR:
            return
        off_dtype = np.int64 if offsets_int64 else np.int32
        if bad_off != _NO_ERROR:
            raise _offsets_error(_to_host(cupy, offsets, off_dtype, num_offsets, s.ptr).astype(np.int64), num_indices)
        pos = int(bad_id)
        idx_dtype = np.dtype(np.int64 if indices_int64 else np.int32)
        value = int(_to_host(cupy, indices + pos * idx_dtype.itemsize, idx_dtype, 1, s.ptr)[0])
        if fixed_len >= 0:
            bag = pos // fixed_len  # pos < B * L, so L > 0
        else:
            off = _to_host(cupy, offsets, off_dtype, num_offsets, s.ptr).astype(np.int64)
            bag = int(np.searchsorted(off, pos, side="right")) - 1
        t = bag // batch
        raise IndexError(f"index {value} at position {pos} (table {t}, bag {bag % batch}) is out of range "
                         f"[0, {plans[t].rows})")
