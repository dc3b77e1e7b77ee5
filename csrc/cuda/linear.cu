// CUDA int8 linear / MLP: a per-row activation quantization pass, then an int8 tensor-core GEMM
// (mma.sync m16n8k32 s8 x s8 -> s32) with the dequantization, bias and ReLU / sigmoid fused in
// its epilogue. Layers of an MLP run back to back on the caller's stream.
//
// Fragment layout of mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (PTX ISA, "Matrix Fragments
// for mma.m16n8k32", .s8), lane = 4 * g + t (g = groupID = lane >> 2, t = lane & 3), four int8
// per 32-bit register, lowest byte first:
//   A (16 x 32, row):  a-reg 0: row g,     k = 4t .. 4t+3        a-reg 1: row g + 8, k = 4t .. 4t+3
//                      a-reg 2: row g,     k = 16+4t .. 16+4t+3  a-reg 3: row g + 8, k = 16+4t ..
//   B (32 x 8, col):   b-reg 0: col g,     k = 4t .. 4t+3        b-reg 1: col g,     k = 16+4t ..
//   C (16 x 8, s32):   c0, c1: row g, cols 2t, 2t+1              c2, c3: row g + 8, cols 2t, 2t+1
//
// A dot product does not care in which order k is summed, only that A and B use the same order.
// So each lane loads 16 contiguous bytes of a 64-byte k-chunk (bytes 16t .. 16t+15 of its rows)
// and feeds them to two mma's (see mma_k64): logical k 4t+j of the first mma is byte 16t+j,
// logical 16+4t+j is byte 16t+4+j, and the second mma takes bytes 16t+8 .. 16t+15 the same way.
// Over t = 0..3 the two mma's cover bytes 0..63 once each, identically for A and B. The payoff:
// one 128-bit load per row per chunk (global or shared), no ldmatrix, no shuffles, and shared
// memory rows of exactly 64 bytes are conflict-free (a quarter-warp reads two rows = 128 bytes).
#include "linear.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

#include "common.cuh"
#include "mma.cuh"

namespace fastrec {
namespace cuda {
namespace {

constexpr int kChunk = 64;      // k-bytes per chunk (two m16n8k32 steps)
constexpr int64_t kPadN = 128;  // weights padded in N to the widest tile: tiles never read past them
constexpr int kQuantRows = 8;   // rows per block of the quantization pass (one warp per row)
constexpr int kSmallMaxM = 32;  // the small-batch kernel handles M <= 32

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

std::atomic<int> g_gemm_config{0};

// ---- device helpers ------------------------------------------------------------------------


// One 64-byte k-chunk of a 16 x 8 tile: a_lo / a_hi are this lane's 16 bytes of A rows g and
// g + 8, b its 16 bytes of B column g (all from byte 16t of the chunk). See the file comment.
__device__ __forceinline__ void mma_k64(int (&c)[4], const uint4& a_lo, const uint4& a_hi, const uint4& b) {
  mma_s8(c, a_lo.x, a_hi.x, a_lo.y, a_hi.y, b.x, b.y);
  mma_s8(c, a_lo.z, a_hi.z, a_lo.w, a_hi.w, b.z, b.w);
}

__device__ __forceinline__ uint4 ldg16(const int8_t* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

#if defined(FASTREC_HOST_EMULATION)  // (csrc/cuda/emu)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  fastrec_emu::cp_async16(smem, gmem, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { fastrec_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  fastrec_emu::cp_async_wait(N);
}
#else
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // 0: fill the 16 bytes with zeros, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// The epilogue for one output element, the CPU's operations in the CPU's order, each rounded on
// its own (the __f*_rn intrinsics are never contracted into FMAs).
template <int EPI>
__device__ __forceinline__ void store_out(float* __restrict__ y, int32_t* __restrict__ y32, int64_t idx, int acc,
                                          float row_scale, const float* __restrict__ w_scale,
                                          const float* __restrict__ bias, int64_t n) {
  if constexpr (EPI == kEpiInt32) {
    y32[idx] = acc;
  } else {
    // A zero sum gives 0 where the scales' product overflows, as on the CPU (not 0 * inf = NaN);
    // a row holding NaN/Inf (row_scale NaN/inf; the check_finite=False case) stays NaN.
    const float s = __fmul_rn(row_scale, w_scale[n]);
    float v = (acc == 0 && isfinite(row_scale)) ? copysignf(0.f, s) : __fmul_rn(__int2float_rn(acc), s);
    if (bias != nullptr) v = __fadd_rn(v, bias[n]);
    // ReLU as the CPU's max(v, 0) for every number; NaN (only from such a row: a finite row
    // cannot give one) stays NaN, so check_finite=False shows the bad rows.
    if constexpr (EPI == kEpiRelu) v = isnan(v) ? v : fmaxf(v, 0.f);
    if constexpr (EPI == kEpiSigmoid) v = __fdiv_rn(1.f, __fadd_rn(1.f, expf(-v)));
    y[idx] = v;
  }
}

// ---- quantization pass ---------------------------------------------------------------------
// One warp per row: amax and a finite check, then codes packed four to a 32-bit store, zero
// padded from K to Kp. `bad` (may be null) gets, per block, its first row holding NaN/Inf or -1.
template <bool VEC>
__global__ void __launch_bounds__(kQuantRows * 32)
quantize_rows_kernel(const float* __restrict__ x, int64_t M, int64_t K, int64_t Kp, int8_t* __restrict__ q,
                     float* __restrict__ scale, int* __restrict__ bad) {
  __shared__ int bad_row[kQuantRows];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kQuantRows + warp;
  bool row_bad = false;
  if (row < M) {
    const float* xr = x + row * K;
    float amax = 0.f;
    bool finite = true;
    if constexpr (VEC) {
      for (int64_t k = 4 * lane; k < K; k += 128) {
        const float4 v = *reinterpret_cast<const float4*>(xr + k);
        finite = finite && isfinite(v.x) && isfinite(v.y) && isfinite(v.z) && isfinite(v.w);
        amax = fmaxf(fmaxf(amax, fmaxf(fabsf(v.x), fabsf(v.y))), fmaxf(fabsf(v.z), fabsf(v.w)));
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) {
        const float v = xr[k];
        finite = finite && isfinite(v);
        amax = fmaxf(amax, fabsf(v));
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    finite = __all_sync(0xffffffffu, finite);
    row_bad = !finite;
    // The CPU's float operations: inv = 127 / amax, scale = amax / 127, code = rint(x * inv);
    // where 127 / amax overflows (amax < ~3.7e-37), code = rint((x * 2^100) * (127 / (amax * 2^100))).
    float inv = amax > 0.f ? __fdiv_rn(127.f, amax) : 0.f;
    float up = 1.f;
    if (isinf(inv)) {
      up = 0x1p100f;
      inv = __fdiv_rn(127.f, __fmul_rn(amax, up));
    }
    if (lane == 0) scale[row] = finite ? __fdiv_rn(amax, 127.f) : __int_as_float(0x7fc00000);
    int8_t* qr = q + row * Kp;
    for (int64_t k = 4 * lane; k < Kp; k += 128) {
      float v[4];
      if constexpr (VEC) {
        const float4 f = k < K ? *reinterpret_cast<const float4*>(xr + k) : make_float4(0.f, 0.f, 0.f, 0.f);
        v[0] = f.x;
        v[1] = f.y;
        v[2] = f.z;
        v[3] = f.w;
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = k + j < K ? xr[k + j] : 0.f;
      }
      uint32_t packed = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = min(127, max(-127, __float2int_rn(__fmul_rn(__fmul_rn(v[j], up), inv))));
        packed |= (static_cast<uint32_t>(c) & 0xffu) << (8 * j);
      }
      *reinterpret_cast<uint32_t*>(qr + k) = packed;
    }
  }
  if (bad == nullptr) return;
  if (lane == 0) bad_row[warp] = row_bad ? static_cast<int>(row) : INT_MAX;
  __syncthreads();
  if (threadIdx.x == 0) {
    int first = INT_MAX;
#pragma unroll
    for (int w = 0; w < kQuantRows; ++w) first = min(first, bad_row[w]);
    bad[blockIdx.x] = first == INT_MAX ? -1 : first;
  }
}

// ---- small batch (M <= 32): weights streamed straight from global memory -------------------
// Roles swapped (C^T = W . X^T): the weights are the 16-row A operand, the activations the 8-column
// B operand, so a single request wastes nothing of the 16-row side. A block owns 16 channels; its
// warps split K (chunk kc goes to warp kc % warps) and reduce through shared memory. Many blocks
// of few channels each keep many weight loads in flight, which is what a GEMV is bound by.
template <int NB, int EPI>  // NB: groups of 8 batch rows (1, 2 or 4)
__global__ void __launch_bounds__(256)
gemm_small_m_kernel(const int8_t* __restrict__ A, const float* __restrict__ a_scale, int M,
                    const int8_t* __restrict__ W, const float* __restrict__ w_scale, const float* __restrict__ bias,
                    int64_t N, int64_t Kp, float* __restrict__ Y, int32_t* __restrict__ Y32) {
  constexpr int U = NB >= 4 ? 2 : 4;  // chunks per warp per loop trip, loads issued up front
  __shared__ int red[8][NB * 4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * 16;
  const int nk = static_cast<int>(Kp / kChunk);

  const int8_t* w_lo = W + (n0 + g) * Kp + 16 * t;  // channel n0 + g
  const int8_t* w_hi = w_lo + 8 * Kp;               // channel n0 + g + 8
  const int8_t* xr[NB];
  bool ok[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    const int row = 8 * b + g;
    ok[b] = row < M;
    xr[b] = A + static_cast<int64_t>(ok[b] ? row : 0) * Kp + 16 * t;
  }
  int acc[NB][4];
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b][0] = acc[b][1] = acc[b][2] = acc[b][3] = 0;

  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  int kc = warp;
  for (; kc + (U - 1) * nwarps < nk; kc += U * nwarps) {
    uint4 wl[U], wh[U], xv[U][NB];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t off = static_cast<int64_t>(kc + u * nwarps) * kChunk;
      wl[u] = ldg16(w_lo + off);
      wh[u] = ldg16(w_hi + off);
#pragma unroll
      for (int b = 0; b < NB; ++b) xv[u][b] = ok[b] ? ldg16(xr[b] + off) : zero;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int b = 0; b < NB; ++b) mma_k64(acc[b], wl[u], wh[u], xv[u][b]);
    }
  }
  if (kc < nk) {  // fewer than U chunks left for this warp: their loads in flight at once too
    uint4 wl[U - 1], wh[U - 1], xv[U - 1][NB];
#pragma unroll
    for (int u = 0; u < U - 1; ++u) {
      if (kc + u * nwarps < nk) {  // warp-uniform
        const int64_t off = static_cast<int64_t>(kc + u * nwarps) * kChunk;
        wl[u] = ldg16(w_lo + off);
        wh[u] = ldg16(w_hi + off);
#pragma unroll
        for (int b = 0; b < NB; ++b) xv[u][b] = ok[b] ? ldg16(xr[b] + off) : zero;
      }
    }
#pragma unroll
    for (int u = 0; u < U - 1; ++u) {
      if (kc + u * nwarps < nk) {
#pragma unroll
        for (int b = 0; b < NB; ++b) mma_k64(acc[b], wl[u], wh[u], xv[u][b]);
      }
    }
  }

#pragma unroll
  for (int b = 0; b < NB; ++b) {
#pragma unroll
    for (int r = 0; r < 4; ++r) red[warp][4 * b + r][lane] = acc[b][r];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < NB * 4 * 32; e += blockDim.x) {
    const int r = e >> 5, l = e & 31;
    int sum = 0;
    for (int w = 0; w < nwarps; ++w) sum += red[w][r][l];
    // C^T fragment: register r % 4 of batch group r / 4 in lane l = 4 * gl + tl holds channel
    // n0 + gl (+ 8 for registers 2, 3) and batch row 8 * (r / 4) + 2 * tl (+ 1 for registers 1, 3).
    const int gl = l >> 2, tl = l & 3, ri = r & 3;
    const int64_t n = n0 + gl + 8 * (ri >> 1);
    const int row = 8 * (r >> 2) + 2 * tl + (ri & 1);
    if (row < M && n < N) {
      const float sa = EPI == kEpiInt32 ? 0.f : a_scale[row];
      store_out<EPI>(Y, Y32, static_cast<int64_t>(row) * N + n, sum, sa, w_scale, bias, n);
    }
  }
}

// ---- tiled GEMM for larger batches: cp.async multi-stage pipeline -------------------------
// Block tile BM x BN, 64 k-bytes per stage; warps WM x WN, each owning MT x NT tiles of 16 x 8.
// Shared memory rows are 64 bytes (one k-chunk), A tile [BM][64] then B tile [BN][64] per stage.
template <int MT, int NT, int WM, int WN, int STAGES>
struct TileConfig {
  static constexpr int BM = 16 * MT * WM, BN = 8 * NT * WN, THREADS = 32 * WM * WN;
  static constexpr int SMEM = STAGES * (BM + BN) * kChunk;
};

template <int MT, int NT, int WM, int WN, int STAGES, int EPI>
__global__ void __launch_bounds__(32 * WM * WN)
gemm_tiled_kernel(const int8_t* __restrict__ A, const float* __restrict__ a_scale, int64_t M,
                  const int8_t* __restrict__ W, const float* __restrict__ w_scale, const float* __restrict__ bias,
                  int64_t N, int64_t Kp, float* __restrict__ Y, int32_t* __restrict__ Y32) {
  using Cfg = TileConfig<MT, NT, WM, WN, STAGES>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, THREADS = Cfg::THREADS;
  constexpr int A_LOADS = BM * 4 / THREADS, B_LOADS = BN * 4 / THREADS;  // 16-byte copies per thread
  static_assert(BM * 4 % THREADS == 0 && BN * 4 % THREADS == 0, "tile rows must split evenly over threads");
  FASTREC_DYNAMIC_SMEM(uint4, smem_u4);
  int8_t* As = reinterpret_cast<int8_t*>(smem_u4);
  int8_t* Bs = As + STAGES * BM * kChunk;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp % WM, wn = warp / WM;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int nk = static_cast<int>(Kp / kChunk);

  // Copy k-chunk kc into stage s: thread c copies 16 bytes, row c / 4, bytes 16 * (c % 4); rows of
  // A past M are zero-filled (read nothing); W is padded to a multiple of BN rows.
  auto load_stage = [&](int s, int kc) {
    const int64_t k0 = static_cast<int64_t>(kc) * kChunk;
#pragma unroll
    for (int i = 0; i < A_LOADS; ++i) {
      const int c = tid + i * THREADS, r = c >> 2, q = c & 3;
      const bool valid = m0 + r < M;
      const int8_t* src = A + (valid ? m0 + r : 0) * Kp + k0 + 16 * q;
      cp_async16(As + (s * BM + r) * kChunk + 16 * q, src, valid);
    }
#pragma unroll
    for (int i = 0; i < B_LOADS; ++i) {
      const int c = tid + i * THREADS, r = c >> 2, q = c & 3;
      cp_async16(Bs + (s * BN + r) * kChunk + 16 * q, W + (n0 + r) * Kp + k0 + 16 * q, true);
    }
  };

  int acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0;
  }

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_stage(s, s);
    cp_async_commit();  // always commit: group i holds chunk i, empty or not
  }
  for (int kc = 0; kc < nk; ++kc) {
    cp_async_wait<STAGES - 2>();  // chunk kc has landed (this thread's copies) ...
    __syncthreads();              // ... everyone's, and everyone is done with chunk kc - 1
    const int next = kc + STAGES - 1;
    if (next < nk) load_stage(next % STAGES, next);  // refills the stage chunk kc - 1 used
    cp_async_commit();

    const int8_t* as = As + (kc % STAGES) * BM * kChunk;
    const int8_t* bs = Bs + (kc % STAGES) * BN * kChunk;
    uint4 a_lo[MT], a_hi[MT];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int r = (wm * MT + i) * 16 + g;
      a_lo[i] = *reinterpret_cast<const uint4*>(as + r * kChunk + 16 * t);
      a_hi[i] = *reinterpret_cast<const uint4*>(as + (r + 8) * kChunk + 16 * t);
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int r = (wn * NT + j) * 8 + g;
      const uint4 b = *reinterpret_cast<const uint4*>(bs + r * kChunk + 16 * t);
#pragma unroll
      for (int i = 0; i < MT; ++i) mma_k64(acc[i][j], a_lo[i], a_hi[i], b);
    }
  }
  cp_async_wait<0>();

  // C fragment: acc[i][j][2h + e] is row (wm*MT + i)*16 + g + 8h, column (wn*NT + j)*8 + 2t + e.
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + (wm * MT + i) * 16 + g + 8 * h;
      if (row >= M) continue;
      const float sa = EPI == kEpiInt32 ? 0.f : a_scale[row];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int64_t col = n0 + (wn * NT + j) * 8 + 2 * t;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (col + e < N) store_out<EPI>(Y, Y32, row * N + col + e, acc[i][j][2 * h + e], sa, w_scale, bias, col + e);
        }
      }
    }
  }
}

// ---- launchers -----------------------------------------------------------------------------

struct GemmArgs {
  const int8_t* a;
  const float* a_scale;
  int64_t M;
  const Int8LinearWeights* w;
  float* y;
  int32_t* y32;
};

int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device < 0 || device >= 64) {
    int n = 0;
    FASTREC_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    FASTREC_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

template <int NB, int EPI>
void launch_small(const GemmArgs& g, cudaStream_t stream) {
  const Int8LinearWeights& w = *g.w;
  const int nk = static_cast<int>(w.Kp() / kChunk);
  const int warps = std::min(8, nk);
  FASTREC_LAUNCH((gemm_small_m_kernel<NB, EPI>), ceil_div(w.N(), 16), 32 * warps, 0, stream)(
      g.a, g.a_scale, static_cast<int>(g.M), w.w(), w.scale(), w.bias(), w.N(), w.Kp(), g.y, g.y32);
}

template <int MT, int NT, int WM, int WN, int STAGES, int EPI>
void launch_tiled(const GemmArgs& g, cudaStream_t stream) {
  using Cfg = TileConfig<MT, NT, WM, WN, STAGES>;
  static_assert(Cfg::SMEM <= 48 * 1024, "more than 48 KiB would need cudaFuncSetAttribute");
  static_assert(kPadN % Cfg::BN == 0, "weights are padded for this tile width");
  const Int8LinearWeights& w = *g.w;
  const dim3 grid(ceil_div(g.M, Cfg::BM), ceil_div(w.N(), Cfg::BN));
  FASTREC_LAUNCH((gemm_tiled_kernel<MT, NT, WM, WN, STAGES, EPI>), grid, Cfg::THREADS, Cfg::SMEM, stream)(
      g.a, g.a_scale, g.M, w.w(), w.scale(), w.bias(), w.N(), w.Kp(), g.y, g.y32);
}

int64_t tiles(int64_t M, int64_t N, int64_t bm, int64_t bn) { return ((M + bm - 1) / bm) * ((N + bn - 1) / bn); }

// 1 = small-batch kernel, 2/3/4 = 32x32 / 64x64 / 128x128 tiles: the widest tile that still gives
// every multiprocessor a block (two for the widest), else the narrowest.
int pick_config(int64_t M, int64_t N, int sms) {
  const int forced = g_gemm_config.load(std::memory_order_relaxed);
  if (forced >= 2 && forced <= 4) return forced;
  if (M <= kSmallMaxM) return 1;
  if (tiles(M, N, 128, 128) >= 2 * sms) return 4;
  if (tiles(M, N, 64, 64) >= sms) return 3;
  return 2;
}

template <int EPI>
void launch_gemm_epi(const GemmArgs& g, cudaStream_t stream) {
  switch (pick_config(g.M, g.w->N(), sm_count(g.w->device()))) {
    case 1:
      if (g.M <= 8) {
        launch_small<1, EPI>(g, stream);
      } else if (g.M <= 16) {
        launch_small<2, EPI>(g, stream);
      } else {
        launch_small<4, EPI>(g, stream);
      }
      break;
    case 2:
      launch_tiled<1, 2, 2, 2, 4, EPI>(g, stream);  // 32 x 32, 4 warps of 16 x 16
      break;
    case 3:
      launch_tiled<2, 4, 2, 2, 4, EPI>(g, stream);  // 64 x 64, 4 warps of 32 x 32
      break;
    default:
      launch_tiled<4, 4, 2, 4, 3, EPI>(g, stream);  // 128 x 128, 8 warps of 64 x 32
      break;
  }
  FASTREC_CUDA_CHECK_LAUNCH();
}

void launch_gemm(const GemmArgs& g, int epi, cudaStream_t stream) {
  switch (epi) {
    case kEpiNone:
      return launch_gemm_epi<kEpiNone>(g, stream);
    case kEpiRelu:
      return launch_gemm_epi<kEpiRelu>(g, stream);
    case kEpiSigmoid:
      return launch_gemm_epi<kEpiSigmoid>(g, stream);
    case kEpiInt32:
      return launch_gemm_epi<kEpiInt32>(g, stream);
    default:
      throw std::invalid_argument("activation code must be 0 (none), 1 (relu) or 2 (sigmoid)");
  }
}

void launch_quantize(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* q, float* scale, int* bad,
                     cudaStream_t stream) {
  const bool vec = K % 4 == 0 && reinterpret_cast<std::uintptr_t>(x) % 16 == 0;
  const unsigned blocks = ceil_div(M, kQuantRows);
  if (vec) {
    FASTREC_LAUNCH((quantize_rows_kernel<true>), blocks, kQuantRows * 32, 0, stream)(x, M, K, Kp, q, scale, bad);
  } else {
    FASTREC_LAUNCH((quantize_rows_kernel<false>), blocks, kQuantRows * 32, 0, stream)(x, M, K, Kp, q, scale, bad);
  }
  FASTREC_CUDA_CHECK_LAUNCH();
}


// Per-thread resources of the finite check: pinned, mapped host memory the quantization pass
// writes its flags into (read by the host after an event, no copy to enqueue), and one event per
// device. A thread's call waits for its own flags before returning, so reuse is safe.
struct ThreadCheckState {
  int* host = nullptr;
  int* dev = nullptr;
  size_t capacity = 0;
  std::vector<cudaEvent_t> events;  // by device; null until first use
  ~ThreadCheckState() {
    if (host != nullptr) cudaFreeHost(host);  // errors ignored: may run at process exit
    for (cudaEvent_t e : events) {
      if (e != nullptr) cudaEventDestroy(e);
    }
  }
};

ThreadCheckState& check_state() {
  thread_local ThreadCheckState s;
  return s;
}

int* check_flags(ThreadCheckState& s, size_t n, int** dev) {
  if (n > s.capacity) {
    if (s.host != nullptr) cudaFreeHost(s.host);
    s.host = s.dev = nullptr;
    s.capacity = 0;
    const size_t cap = std::max<size_t>(n, 4096);
    void* p = nullptr;
    FASTREC_CUDA_CHECK(cudaHostAlloc(&p, cap * sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable));
    s.host = static_cast<int*>(p);
    void* d = nullptr;
    FASTREC_CUDA_CHECK(cudaHostGetDevicePointer(&d, p, 0));
    s.dev = static_cast<int*>(d);
    s.capacity = cap;
  }
  *dev = s.dev;
  return s.host;
}

cudaEvent_t check_event(ThreadCheckState& s, int device) {
  if (static_cast<size_t>(device) >= s.events.size()) s.events.resize(static_cast<size_t>(device) + 1, nullptr);
  cudaEvent_t& e = s.events[static_cast<size_t>(device)];
  if (e == nullptr) FASTREC_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return e;
}

constexpr int64_t kAlign = 256;

}  // namespace

// ---- weights -------------------------------------------------------------------------------

Int8LinearWeights::Int8LinearWeights(int device, const int8_t* w, int64_t N, int64_t K, const float* scale,
                                     const float* bias)
    : device_(device), N_(N), K_(K), Np_(round_up(N, kPadN)), Kp_(round_up(K, kChunk)) {
  if (N < 1 || K < 1) throw std::invalid_argument("an int8 layer needs N >= 1 and K >= 1");
  if (device < 0) throw std::invalid_argument("device must be >= 0");
  if (N > int64_t{65535} * 32) throw std::invalid_argument("the CUDA kernels take at most 65535 * 32 output channels");
  std::vector<int8_t> wp(static_cast<size_t>(Np_ * Kp_), 0);
  for (int64_t n = 0; n < N; ++n) std::copy(w + n * K, w + (n + 1) * K, wp.begin() + n * Kp_);
  std::vector<float> sp(static_cast<size_t>(Np_), 0.f), bp;
  std::copy(scale, scale + N, sp.begin());
  if (bias != nullptr) {
    bp.assign(static_cast<size_t>(Np_), 0.f);
    std::copy(bias, bias + N, bp.begin());
  }
  DeviceScope scope(device);
  try {
    FASTREC_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&w_), wp.size()));
    FASTREC_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&scale_), sp.size() * sizeof(float)));
    FASTREC_CUDA_CHECK(cudaMemcpy(w_, wp.data(), wp.size(), cudaMemcpyHostToDevice));
    FASTREC_CUDA_CHECK(cudaMemcpy(scale_, sp.data(), sp.size() * sizeof(float), cudaMemcpyHostToDevice));
    if (bias != nullptr) {
      FASTREC_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&bias_), bp.size() * sizeof(float)));
      FASTREC_CUDA_CHECK(cudaMemcpy(bias_, bp.data(), bp.size() * sizeof(float), cudaMemcpyHostToDevice));
    }
    // A copy from pageable memory may return before its DMA lands; a first forward on a
    // non-blocking stream is not ordered after the default stream, so wait here (once).
    FASTREC_CUDA_CHECK(cudaStreamSynchronize(0));
  } catch (...) {
    cudaFree(w_);
    cudaFree(scale_);
    cudaFree(bias_);
    throw;
  }
}

Int8LinearWeights::~Int8LinearWeights() {
  // Kernels still in flight on any stream may read these weights: wait for the device first.
  // Errors are ignored (this may run at process exit, after the driver is gone).
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) return;
  if (cudaSetDevice(device_) == cudaSuccess) {
    cudaDeviceSynchronize();
    cudaFree(w_);
    cudaFree(scale_);
    cudaFree(bias_);
  }
  cudaSetDevice(prev);
  cudaGetLastError();
}

// ---- plan ----------------------------------------------------------------------------------

Int8LinearPlan::Int8LinearPlan(std::vector<std::shared_ptr<const Int8LinearWeights>> layers,
                               std::vector<int> activations)
    : layers_(std::move(layers)), acts_(std::move(activations)) {
  if (layers_.empty()) throw std::invalid_argument("an MLP needs at least one layer");
  if (acts_.size() != layers_.size()) throw std::invalid_argument("one activation per layer is required");
  device_ = layers_[0]->device();
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (!layers_[i]) throw std::invalid_argument("layer " + std::to_string(i) + " is None");
    if (layers_[i]->device() != device_) throw std::invalid_argument("all layers must be on the same device");
    if (acts_[i] < kEpiNone || acts_[i] > kEpiSigmoid) {
      throw std::invalid_argument("activation code must be 0 (none), 1 (relu) or 2 (sigmoid)");
    }
    if (i > 0 && layers_[i]->K() != layers_[i - 1]->N()) {
      throw std::invalid_argument("layer " + std::to_string(i) + " takes " + std::to_string(layers_[i]->K()) +
                                  " features but layer " + std::to_string(i - 1) + " gives " +
                                  std::to_string(layers_[i - 1]->N()));
    }
    kp_max_ = std::max(kp_max_, layers_[i]->Kp());
    if (i + 1 < layers_.size()) hidden_max_ = std::max(hidden_max_, layers_[i]->N());
  }
}

int64_t Int8LinearPlan::scratch_bytes(int64_t M) const {
  if (M <= 0) return 0;
  return round_up(M * kp_max_, kAlign) + round_up(M * 4, kAlign) + 2 * round_up(M * hidden_max_ * 4, kAlign);
}

void Int8LinearPlan::forward(const float* x, int64_t M, float* y, void* scratch, int64_t scratch_size,
                             std::uintptr_t stream_handle, bool check_finite) const {
  if (M < 0) throw std::invalid_argument("the batch size must be >= 0");
  if (M == 0) return;
  if (M > INT_MAX) throw std::invalid_argument("at most 2^31 - 1 rows per call");
  if (scratch_size < scratch_bytes(M)) {
    throw std::invalid_argument("scratch buffer too small: " + std::to_string(scratch_size) + " bytes, " +
                                std::to_string(scratch_bytes(M)) + " needed");
  }
  if (x == nullptr || y == nullptr || scratch == nullptr) throw std::invalid_argument("null device pointer");
  if (reinterpret_cast<std::uintptr_t>(scratch) % 16 != 0) throw std::invalid_argument("scratch must be 16-byte aligned");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  DeviceScope scope(device_);
  if (check_finite) {
    // A graph capture cannot wait on the GPU: refuse before anything is enqueued, so the
    // capture stays valid. (check_finite=False only launches kernels, which a capture records.)
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) {
      cudaGetLastError();
    } else if (capture != cudaStreamCaptureStatusNone) {
      throw std::invalid_argument(
          "check_finite=True waits for the GPU, which a CUDA graph capture cannot do: pass "
          "check_finite=False while capturing");
    }
  }

  char* base = static_cast<char*>(scratch);
  int8_t* a = reinterpret_cast<int8_t*>(base);
  float* a_scale = reinterpret_cast<float*>(base + round_up(M * kp_max_, kAlign));
  float* hidden[2];
  hidden[0] = reinterpret_cast<float*>(reinterpret_cast<char*>(a_scale) + round_up(M * 4, kAlign));
  hidden[1] = reinterpret_cast<float*>(reinterpret_cast<char*>(hidden[0]) + round_up(M * hidden_max_ * 4, kAlign));

  const int64_t qblocks = ceil_div(M, kQuantRows);
  const size_t L = layers_.size();
  ThreadCheckState* cs = nullptr;
  int* flags_host = nullptr;
  int* flags_dev = nullptr;
  cudaEvent_t done = nullptr;
  if (check_finite) {
    cs = &check_state();
    flags_host = check_flags(*cs, L * static_cast<size_t>(qblocks), &flags_dev);
    done = check_event(*cs, device_);
  }

  const float* in = x;
  try {
    for (size_t i = 0; i < L; ++i) {
      const Int8LinearWeights& w = *layers_[i];
      const bool last = i + 1 == L;
      launch_quantize(in, M, w.K(), w.Kp(), a, a_scale, check_finite ? flags_dev + i * qblocks : nullptr, stream);
      // The host waits for the last quantization pass only; the last GEMM is already queued then.
      if (last && check_finite) FASTREC_CUDA_CHECK(cudaEventRecord(done, stream));
      float* out = last ? y : hidden[i % 2];
      launch_gemm(GemmArgs{a, a_scale, M, &w, out, nullptr}, acts_[i], stream);
      in = out;
    }
    if (check_finite) FASTREC_CUDA_CHECK(cudaEventSynchronize(done));
  } catch (...) {
    // Passes queued before the error may still write this thread's flag buffer, which its next
    // call reuses (perhaps on another stream): let them finish first (the wait's own error, if
    // any, is dropped: the first one is what the caller gets).
    if (check_finite) {
      cudaStreamSynchronize(stream);
      cudaGetLastError();
    }
    throw;
  }
  if (!check_finite) return;
  for (size_t i = 0; i < L; ++i) {
    for (int64_t b = 0; b < qblocks; ++b) {
      const int row = flags_host[i * qblocks + b];
      if (row >= 0) {
        std::string msg = "input contains NaN or Inf (row " + std::to_string(row) + ")";
        if (i > 0) msg += " at layer " + std::to_string(i) + " (layer " + std::to_string(i - 1) + " overflowed float32)";
        throw std::invalid_argument(msg);
      }
    }
  }
}

// ---- test hooks ----------------------------------------------------------------------------

void int8_gemm_int32(const Int8LinearWeights& w, const int8_t* a, int64_t M, int32_t* y32, std::uintptr_t stream) {
  if (M < 0) throw std::invalid_argument("the batch size must be >= 0");
  if (M == 0) return;
  DeviceScope scope(w.device());
  launch_gemm(GemmArgs{a, nullptr, M, &w, nullptr, y32}, kEpiInt32, reinterpret_cast<cudaStream_t>(stream));
}

void quantize_rows(int device, const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* q, float* scale,
                   std::uintptr_t stream) {
  if (M < 0 || K < 1 || Kp < K || Kp % kChunk != 0) throw std::invalid_argument("bad quantize_rows shape");
  if (M == 0) return;
  DeviceScope scope(device);
  launch_quantize(x, M, K, Kp, q, scale, nullptr, reinterpret_cast<cudaStream_t>(stream));
}

void set_gemm_config(int config) {
  if (config < 0 || config > 4) throw std::invalid_argument("gemm config must be 0..4");
  g_gemm_config.store(config, std::memory_order_relaxed);
}

int gemm_config() { return g_gemm_config.load(std::memory_order_relaxed); }

}  // namespace cuda
}  // namespace fastrec
