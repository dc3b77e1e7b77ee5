// Host emulation of the CUDA that fastrec's kernels use, so that the real csrc/cuda/*.cu files
// compile with a host C++ compiler and run on the CPU over host memory (fastrec._C_cuda_emu, a
// test-only module: FASTREC_CUDA_EMU=ON; tests/test_cuda_*.py's "emulated" cases), and so do the
// CuPy RawKernel sources of kernels/ (rawkernel_emu.h; tests/test_cupy_kernels.py).
//
// A launch runs its blocks one after another on the calling thread; the threads of a block are
// fibers (started with ucontext, switched with _setjmp / _longjmp) scheduled cooperatively,
// switching only where a thread waits for others:
// __syncthreads, the warp collectives (__shfl*_sync, __ballot_sync, __match_any_sync,
// __all_sync, __syncwarp) and mma.sync, which run on values all the warp's live lanes put in
// a per-warp exchange. A thread that returns leaves its block's and warp's barriers, as on the
// hardware. __shared__ variables are thread_local (one block runs at a time on a thread;
// concurrent launches run on different threads); dynamic shared memory is a per-thread
// buffer. Memory operations are sequential, so atomics are plain read-modify-writes. A cp.async
// copy lands when its thread waits for its group (cp.async.wait_group), not before.
//
// The host sees device work only after a wait (runtime_emu.cpp): a device-to-host
// cudaMemcpyAsync into pinned memory fills its destination with 0xA5 bytes and lands at the next
// stream, event or device synchronisation (into pageable memory it completes before returning,
// as CUDA's), and kernels write mapped pinned memory through a device view of it that reaches the
// host buffer then; so a launcher reading a result or error flag without waiting reads garbage
// or a stale value.
//
// The schedule (runtime_emu.cpp): with FASTREC_EMU_SEED unset or 0, blocks and threads run in
// index order, round by round (every thread runs until it next waits: the warps keep in step).
// With a seed, a schedule drawn from it: blocks in a random order; in each round the warps in a
// random order, each run as far as it can go (until all its threads wait for other warps, at
// __syncthreads) before the next starts, its threads in a random order at each step; each
// cp.async copy lands at once or at its wait, at random; dynamic shared memory starts as a random
// byte (0xA5 in index order). The same seed gives the same schedule for the same launches on a
// thread. .ci/run runs the emulated tests under both.
//
// What this checks: the kernels' arithmetic, indexing, fragment layouts, barriers placed where
// every thread reaches them, collectives with every lane present (one naming an exited lane
// throws), the launchers' planning and checks, against the CPU ops; and the ordering mistakes a
// schedule exposes: a missing barrier between a write and another thread's read (read after
// write), a missing cp.async wait, and (seeded: a warp runs ahead) a missing barrier before
// shared memory another warp still reads is written again (write after read).
// tests/test_cuda_emulation.py holds the emulator to catching each (selftest_emu.cpp). Built
// with -fsanitize=address (.ci/run does), AddressSanitizer reports a kernel's access outside an
// allocation ("device" memory is host memory, cudaMalloc's exactly the size asked for), as
// compute-sanitizer's memcheck would; runtime_emu.cpp tells it about each fiber switch. What it
// cannot: timing, occupancy, the memory model (threads switch only at barriers, so a race between
// two of them that no barrier separates shows only if a schedule puts the read on the wrong side
// of the write; a missing fence, volatile, or atomic's atomicity never shows), most of stream
// order (launches and all but device-to-host copies complete at once, so a missing wait between
// streams, or a host buffer changed before the copy reading it ran, goes unnoticed; what the host
// reads of device work does wait for a synchronisation: runtime_emu.cpp), register and
// shared-memory limits beyond the checks the launchers make themselves, and launch-configuration
// errors (none are raised). Static __shared__ variables keep the last block's values.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <type_traits>
#include <utility>

#define FASTREC_HOST_EMULATION 1

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __grid_constant__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)
#define __shared__ static thread_local

namespace fastrec_emu {

extern thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

// Runs body() as blockDim threads of each block of grid (see the file comment), with `smem`
// bytes of dynamic shared memory.
void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);
void* dynamic_smem();

// Barriers and the warp exchange (runtime_emu.cpp).
void syncthreads();
void syncwarp();
// Each live lane of the calling thread's warp puts `v`; returns every lane's value (32 slots;
// an exited lane's is stale: see check_lanes) and the mask of live lanes.
struct WarpValues {
  uint64_t v[32];
  unsigned live;
};
WarpValues warp_exchange(uint64_t v);
int lane();  // the calling thread's lane: its linear index in the block, mod 32

// A collective whose mask names a lane that has returned (or a shuffle from one) is undefined on
// the hardware: an error here.
inline void check_lanes(unsigned mask, unsigned live, int src = -1) {
  if ((mask & ~live) != 0 || (src >= 0 && !(live >> src & 1u))) {
    throw std::logic_error("host emulation: a warp collective names a lane that has exited");
  }
}

template <class Kernel>
struct Bound {
  Kernel kernel;
  dim3 grid, block;
  size_t smem;
  template <class... Args>
  void operator()(Args... args) const {
    run_grid(grid, block, smem, [&]() { kernel(args...); });
  }
};

template <class Kernel>
Bound<Kernel> launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return Bound<Kernel>{kernel, grid, block, smem};
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp exchange of at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace fastrec_emu

#define FASTREC_LAUNCH(kernel, grid, block, smem, stream) \
  ::fastrec_emu::launch((kernel), dim3(grid), dim3(block), (smem), (stream))
#define FASTREC_DYNAMIC_SMEM(type, name) type* name = static_cast<type*>(::fastrec_emu::dynamic_smem())

#define threadIdx ::fastrec_emu::thread_idx
#define blockIdx ::fastrec_emu::block_idx
#define blockDim ::fastrec_emu::block_dim
#define gridDim ::fastrec_emu::grid_dim

inline void __syncthreads() { fastrec_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { fastrec_emu::syncwarp(); }
[[noreturn]] inline void __trap() { throw std::logic_error("host emulation: __trap"); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src) {
  const fastrec_emu::WarpValues w = fastrec_emu::warp_exchange(fastrec_emu::to_bits(v));
  fastrec_emu::check_lanes(mask, w.live, src & 31);
  return fastrec_emu::from_bits<T>(w.v[src & 31]);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  const fastrec_emu::WarpValues w = fastrec_emu::warp_exchange(fastrec_emu::to_bits(v));
  const int src = fastrec_emu::lane() - static_cast<int>(delta);  // (lanes below delta keep their own)
  fastrec_emu::check_lanes(mask, w.live, src < 0 ? fastrec_emu::lane() : src);
  return src < 0 ? v : fastrec_emu::from_bits<T>(w.v[src]);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  const fastrec_emu::WarpValues w = fastrec_emu::warp_exchange(fastrec_emu::to_bits(v));
  const int src = (fastrec_emu::lane() ^ lane_mask) & 31;
  fastrec_emu::check_lanes(mask, w.live, src);
  return fastrec_emu::from_bits<T>(w.v[src]);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  const fastrec_emu::WarpValues w = fastrec_emu::warp_exchange(pred != 0);
  fastrec_emu::check_lanes(mask, w.live);
  unsigned r = 0;
  for (int i = 0; i < 32; ++i)
    if ((w.live >> i & 1u) && w.v[i]) r |= 1u << i;
  return r & mask;
}
inline int __all_sync(unsigned mask, int pred) {
  const fastrec_emu::WarpValues w = fastrec_emu::warp_exchange(pred != 0);
  fastrec_emu::check_lanes(mask, w.live);
  for (int i = 0; i < 32; ++i)
    if ((w.live & mask) >> i & 1u && !w.v[i]) return 0;
  return 1;
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T v) {
  const fastrec_emu::WarpValues w = fastrec_emu::warp_exchange(fastrec_emu::to_bits(v));
  fastrec_emu::check_lanes(mask, w.live);
  const uint64_t mine = w.v[fastrec_emu::lane()];
  unsigned r = 0;
  for (int i = 0; i < 32; ++i)
    if ((w.live & mask) >> i & 1u && w.v[i] == mine) r |= 1u << i;
  return r;
}

using std::isfinite;  // (device code calls them unqualified)
using std::isinf;
using std::isnan;

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

template <class T>
inline T __ldg(const T* p) { return *p; }

inline float __uint_as_float(unsigned int x) { return fastrec_emu::from_bits<float>(x); }
inline unsigned int __float_as_uint(float f) { return static_cast<unsigned int>(fastrec_emu::to_bits(f)); }
inline float __int_as_float(int x) { return fastrec_emu::from_bits<float>(static_cast<uint32_t>(x)); }

// Each rounded on its own (the module is built with -ffp-contract=off: no fused multiply-adds).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
// cvt.rni.s32.f32: nearest, ties to even; NaN gives 0 and out-of-range values saturate.
inline int __float2int_rn(float x) {
  if (std::isnan(x)) return 0;
  if (x >= 2147483647.f) return INT_MAX;
  if (x <= -2147483648.f) return INT_MIN;
  return static_cast<int>(std::nearbyint(x));
}

// PTX prmt (default mode): byte i of the result is byte (s >> 4i) & 7 of {y, x} (x the low word).
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
  const uint64_t both = (static_cast<uint64_t>(y) << 32) | x;
  unsigned int r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned int>((both >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
}

template <class T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
template <class T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

// CUDA's integer min / max overloads (mixed widths promote, as in device code)
template <class A, class B>
inline auto min(A a, B b) -> typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value,
                                                     typename std::common_type<A, B>::type>::type {
  using C = typename std::common_type<A, B>::type;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <class A, class B>
inline auto max(A a, B b) -> typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value,
                                                     typename std::common_type<A, B>::type>::type {
  using C = typename std::common_type<A, B>::type;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

namespace fastrec_emu {

// mma.sync.aligned.m16n8k32 (s8) / m16n8k16 (f16) for one warp: every live lane puts its A and
// B registers; each lane then computes its own C fragment (lane = 4g + t: rows g and g + 8,
// columns 2t and 2t + 1), the PTX ISA's fragment layouts:
//   s8  A: a0 row g k 4t..4t+3, a1 row g+8 k 4t.., a2 row g k 16+4t.., a3 row g+8 k 16+4t..
//       B: b0 col g k 4t..4t+3, b1 col g k 16+4t..
//   f16 A: a0 row g k 2t,2t+1, a1 row g+8 k 2t.., a2 row g k 2t+8,2t+9, a3 row g+8 k 2t+8..
//       B: b0 col g k 2t,2t+1, b1 col g k 2t+8,2t+9
// (elements packed from the register's low bits up).
struct MmaInputs {
  uint32_t a[32][4], b[32][2];
};
inline void mma_gather(MmaInputs& in, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  const WarpValues x = warp_exchange(uint64_t{a0} | uint64_t{a1} << 32);
  const WarpValues y = warp_exchange(uint64_t{a2} | uint64_t{a3} << 32);
  const WarpValues z = warp_exchange(uint64_t{b0} | uint64_t{b1} << 32);
  check_lanes(0xffffffffu, z.live);  // (mma.sync: the whole warp)
  for (int l = 0; l < 32; ++l) {
    in.a[l][0] = static_cast<uint32_t>(x.v[l]);
    in.a[l][1] = static_cast<uint32_t>(x.v[l] >> 32);
    in.a[l][2] = static_cast<uint32_t>(y.v[l]);
    in.a[l][3] = static_cast<uint32_t>(y.v[l] >> 32);
    in.b[l][0] = static_cast<uint32_t>(z.v[l]);
    in.b[l][1] = static_cast<uint32_t>(z.v[l] >> 32);
  }
}

// The calling lane's C fragment += A (16 x K) * B (K x 8), from the whole warp's A and B.
template <class Acc, class E, int K>
inline void mma_accumulate(Acc (&c)[4], const E (&A)[16][K], const E (&B)[K][8]) {
  const int g = lane() >> 2, t = lane() & 3;
  for (int e = 0; e < 4; ++e) {
    const int r = g + (e >> 1) * 8, col = 2 * t + (e & 1);
    Acc acc = c[e];
    for (int k = 0; k < K; ++k) acc += static_cast<Acc>(A[r][k]) * static_cast<Acc>(B[k][col]);
    c[e] = acc;  // (fp16: the hardware's order and rounding may differ)
  }
}

inline void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  MmaInputs in;
  mma_gather(in, a0, a1, a2, a3, b0, b1);
  int8_t A[16][32], B[32][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int j = 0; j < 4; ++j) {
      A[g][4 * t + j] = static_cast<int8_t>(in.a[l][0] >> (8 * j));
      A[g + 8][4 * t + j] = static_cast<int8_t>(in.a[l][1] >> (8 * j));
      A[g][16 + 4 * t + j] = static_cast<int8_t>(in.a[l][2] >> (8 * j));
      A[g + 8][16 + 4 * t + j] = static_cast<int8_t>(in.a[l][3] >> (8 * j));
      B[4 * t + j][g] = static_cast<int8_t>(in.b[l][0] >> (8 * j));
      B[16 + 4 * t + j][g] = static_cast<int8_t>(in.b[l][1] >> (8 * j));
    }
  }
  mma_accumulate(c, A, B);
}

inline float half_bits(uint32_t reg, int j) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(reg >> (16 * j))));
}

inline void mma_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  MmaInputs in;
  mma_gather(in, a0, a1, a2, a3, b0, b1);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int j = 0; j < 2; ++j) {
      A[g][2 * t + j] = half_bits(in.a[l][0], j);
      A[g + 8][2 * t + j] = half_bits(in.a[l][1], j);
      A[g][2 * t + 8 + j] = half_bits(in.a[l][2], j);
      A[g + 8][2 * t + 8 + j] = half_bits(in.a[l][3], j);
      B[2 * t + j][g] = half_bits(in.b[l][0], j);
      B[2 * t + 8 + j][g] = half_bits(in.b[l][1], j);
    }
  }
  mma_accumulate(c, A, B);
}

// cp.async.cg.shared.global [smem], [gmem], 16, n (n bytes copied, the rest of the 16 zeroed),
// cp.async.commit_group and cp.async.wait_group n. A copy lands at the latest when its group is
// waited for; under a schedule seed (FASTREC_EMU_SEED) some land at once instead, as the hardware
// allows either (runtime_emu.cpp).
void cp_async16(void* smem, const void* gmem, int n);
void cp_async_commit();
void cp_async_wait(int pending_groups);

}  // namespace fastrec_emu
