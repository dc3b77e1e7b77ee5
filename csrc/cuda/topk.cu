// CUDA top-k over an item catalogue: fused scoring + threshold filtering, exact selection.
// See topk.h for the algorithm. Kernels:
//   prep_queries_kernel  per-row int8 quantization / fp16 conversion of the queries + NaN/Inf flag
//   score_mma_kernel     int8 (mma m16n8k32 s8) / fp16 (mma m16n8k16 f16, f32 accumulate) scoring
//                        of a range of items against 64 queries per block; scores that pass the
//                        query's threshold (passes()) are appended to its candidate buffer
//   score_f32_kernel     the same with fp32 FMA (16 queries x 512 items per block step)
//   select_kernel        per query: drop exclusions, radix-select the keep-th best key, compact
//                        (stage) or rerank + sort + write the k best (final)
//
// MMA fragments (PTX ISA, "Matrix Fragments for mma.m16n8k32" .s8 and "mma.m16n8k16" .f16),
// lane = 4 * g + t:
//   s8  A: a0 row g k 4t..4t+3, a1 row g+8 k 4t.., a2 row g k 16+4t.., a3 row g+8 k 16+4t..
//       B: b0 col g k 4t..4t+3, b1 col g k 16+4t..
//   f16 A: a0 row g k 2t,2t+1, a1 row g+8 k 2t.., a2 row g k 2t+8,2t+9, a3 row g+8 k 2t+8..
//       B: b0 col g k 2t,2t+1, b1 col g k 2t+8,2t+9
//   C (both): c0,c1 row g cols 2t,2t+1; c2,c3 row g+8 cols 2t,2t+1.
// As in linear.cu, each lane loads 16 contiguous bytes (bytes 16t..16t+15 of a 64-byte chunk) of
// its A rows and of its B column and feeds them to two mma's: registers .x/.y to the first and
// .z/.w to the second, in the same positions for A and B. A dot product only needs A and B to use
// the same k order, and over t = 0..3 the two mma's cover the 64 bytes once each (32 int8 codes
// per mma for s8, 16 halves per mma for f16): one argument pattern serves both precisions.
#include "topk.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

namespace fastrec {
namespace cuda {
namespace {

using u64 = unsigned long long;

constexpr int64_t kItemAlign = 512;    // stage boundaries and np are multiples of this
constexpr int kMmaQ = 64;              // queries per block of the MMA kernel
constexpr int kMmaThreads = 128;       // 4 warps, 16 items each per step
constexpr int kF32Q = 16;              // queries per block of the fp32 kernel
constexpr int kF32Threads = 128;       // 4 warps x 4 x 32 items = 512 items per step
constexpr int kSelectThreads = 512;
constexpr int64_t kMaxKeep = 16384;    // final sort in shared memory: 128 KB of keys
constexpr int64_t kChunkBudget = int64_t{256} << 20;  // candidate buffers per query chunk
constexpr int kMaxSmem = 200 * 1024;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- keys ----------------------------------------------------------------------------------

__device__ __forceinline__ u64 make_key(float s, int64_t row) {
  s = __fadd_rn(s, 0.0f);  // -0 -> +0: equal scores must compare equal
  unsigned u = __float_as_uint(s);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<u64>(u) << 32) | static_cast<u64>(0xFFFFFFFFu - static_cast<unsigned>(row));
}

__device__ __forceinline__ float key_score(u64 key) {
  const unsigned u = static_cast<unsigned>(key >> 32);
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u);
}

__device__ __forceinline__ int64_t key_row(u64 key) {
  return static_cast<int64_t>(0xFFFFFFFFu - static_cast<unsigned>(key & 0xFFFFFFFFull));
}

// Whether score s enters its query's candidates, given the query's threshold th: any score
// >= th while th is -inf (the kept set is not full yet, or its keep-th best score is -inf:
// -inf scores count too, NaN never), and only scores > th otherwise. Stages score items in
// increasing row order, so an item that only ties the keep-th best score has a larger row than
// that kept key and loses the tie (the smaller row wins): appending it could not change the
// result, and with >= a catalogue of equal scores overflowed every stage's buffer and re-ran
// with 4x the room.
__device__ __forceinline__ bool passes(float s, float th) { return th == -INFINITY ? s >= th : s > th; }

__device__ __forceinline__ void append(unsigned* count, u64* keys, int64_t cap, int row, float s, int64_t item) {
  const unsigned pos = atomicAdd(count + row, 1u);
  if (pos < cap) keys[row * cap + pos] = make_key(s, item);
}

// ---- queries -------------------------------------------------------------------------------

template <int PREC>
__global__ void __launch_bounds__(256) prep_queries_kernel(const float* __restrict__ q, int Qc, int D, int rb,
                                                           uint8_t* __restrict__ codes, float* __restrict__ qscale,
                                                           int* __restrict__ bad, int64_t qbase) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (r >= Qc) return;  // whole warps
  const float* x = q + static_cast<int64_t>(r) * D;
  bool finite = true;
  float amax = 0.f;
  for (int d = lane; d < D; d += 32) {
    const float v = x[d];
    finite = finite && isfinite(v);
    amax = fmaxf(amax, fabsf(v));
  }
  finite = __all_sync(0xffffffffu, finite);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (!finite && lane == 0) atomicMin(bad, static_cast<int>(qbase + r));
  if (PREC == kTopkInt8) {
    // As the CPU (csrc/cpu/ref/gemm_ref.cpp): rows whose 127 / amax overflows are scaled by 2^100.
    float inv = amax > 0.f ? __fdiv_rn(127.f, amax) : 0.f;
    float up = 1.f;
    if (isinf(inv)) {
      up = 0x1p100f;
      inv = __fdiv_rn(127.f, __fmul_rn(amax, up));
    }
    if (lane == 0) qscale[r] = __fdiv_rn(amax, 127.f);
    int8_t* c = reinterpret_cast<int8_t*>(codes + static_cast<int64_t>(r) * rb);
    for (int d = lane; d < rb; d += 32) {
      const float v = d < D ? fminf(127.f, fmaxf(-127.f, rintf(__fmul_rn(__fmul_rn(x[d], up), inv)))) : 0.f;
      c[d] = static_cast<int8_t>(v);
    }
  } else if (PREC == kTopkF16) {
    // The CPU scores float32 queries against the fp16 items; here the mma takes fp16 queries.
    // Each row is first scaled by a power of two that puts its amax in [2^14, 2^15): a row
    // beyond +-65504 became inf (NaN scores: items dropped) and one below ~6e-8 became zeros.
    // The epilogue multiplies the scores by 2^-shift (qscale), exact as a power of two. The
    // shift is capped at 149 so that 2^-shift stays representable (a subnormal row then lands
    // in [1, 2^15) instead: still within fp16's range).
    int e = 0;
    if (amax > 0.f && isfinite(amax)) frexpf(amax, &e);  // amax = m * 2^e, m in [0.5, 1)
    const int shift = amax > 0.f ? min(15 - e, 149) : 0;
    if (lane == 0) qscale[r] = ldexpf(1.f, -shift);
    __half* h = reinterpret_cast<__half*>(codes + static_cast<int64_t>(r) * rb);
    for (int d = lane; d < rb / 2; d += 32) h[d] = __float2half_rn(d < D ? ldexpf(x[d], shift) : 0.f);
  }
}

__global__ void fill_kernel(float* __restrict__ p, int64_t n, float v) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) p[i] = v;
}

// ---- scoring -------------------------------------------------------------------------------

__device__ __forceinline__ void mma(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
  mma_s8(c, a0, a1, a2, a3, b0, b1);
}
__device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
  mma_f16(c, a0, a1, a2, a3, b0, b1);
}


__device__ __forceinline__ uint4 ldg16(const uint8_t* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Items [i0, i1) (i0 a multiple of 16, rows up to round_up(i1, 16) readable) against queries
// [64 * blockIdx.x, +64) of the chunk. Warp w of block (x, y) takes the 16 items at
// i0 + 16 * (4 * y + w), then steps by 64 * gridDim.y.
template <int PREC>
__global__ void __launch_bounds__(kMmaThreads) score_mma_kernel(
    const uint8_t* __restrict__ items, const float* __restrict__ iscale, const uint8_t* __restrict__ qcodes,
    const float* __restrict__ qscale, int Qc, int rb, int64_t i0, int64_t i1, const float* __restrict__ thr,
    unsigned* __restrict__ count, u64* __restrict__ keys, int64_t cap) {
  using Acc = typename std::conditional<PREC == kTopkInt8, int, float>::type;
  FASTREC_DYNAMIC_SMEM(uint4, sq);  // [64][rb / 16]
  const int chunks = rb / 16;
  const int q0 = blockIdx.x * kMmaQ;
  for (int idx = threadIdx.x; idx < kMmaQ * chunks; idx += kMmaThreads) {
    const int r = idx / chunks, c = idx - r * chunks;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (q0 + r < Qc) v = __ldg(reinterpret_cast<const uint4*>(qcodes + static_cast<int64_t>(q0 + r) * rb) + c);
    sq[idx] = v;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float th[8], qs[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int r = q0 + (i >> 1) * 16 + g + (i & 1) * 8;  // i = 2 * mt + half
    th[i] = r < Qc ? thr[r] : INFINITY;
    qs[i] = r < Qc ? qscale[r] : 0.f;  // int8: the query's scale; fp16: 2^-shift
  }
  __syncthreads();
  for (int64_t base = i0 + 16 * (4 * static_cast<int64_t>(blockIdx.y) + warp); base < i1;
       base += int64_t{64} * gridDim.y) {
    Acc acc[4][2][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0;
    const uint8_t* b0p = items + (base + g) * rb + 16 * t;
    const uint8_t* b1p = b0p + 8 * static_cast<int64_t>(rb);
    for (int c = 0; c < rb; c += 64) {
      const uint4 b0 = ldg16(b0p + c), b1 = ldg16(b1p + c);
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const uint4 alo = sq[(mt * 16 + g) * chunks + c / 16 + t];
        const uint4 ahi = sq[(mt * 16 + g + 8) * chunks + c / 16 + t];
        mma(acc[mt][0], alo.x, ahi.x, alo.y, ahi.y, b0.x, b0.y);
        mma(acc[mt][0], alo.z, ahi.z, alo.w, ahi.w, b0.z, b0.w);
        mma(acc[mt][1], alo.x, ahi.x, alo.y, ahi.y, b1.x, b1.y);
        mma(acc[mt][1], alo.z, ahi.z, alo.w, ahi.w, b1.z, b1.w);
      }
    }
    float isc[2][2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) isc[nt][e] = PREC == kTopkInt8 ? __ldg(iscale + base + nt * 8 + 2 * t + e) : 1.f;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = q0 + mt * 16 + g + h * 8;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int64_t item = base + nt * 8 + 2 * t + e;
            float s;
            if (PREC == kTopkInt8) {
              s = __fmul_rn(static_cast<float>(acc[mt][nt][2 * h + e]), __fmul_rn(qs[2 * mt + h], isc[nt][e]));
            } else {
              s = __fmul_rn(static_cast<float>(acc[mt][nt][2 * h + e]), qs[2 * mt + h]);
            }
            if (passes(s, th[2 * mt + h]) && item < i1 && r < Qc) append(count, keys, cap, r, s, item);
          }
      }
  }
}

// fp32: items transposed xt[d * np + i] (rows d >= D are zero). Block (x, y): queries
// [16 x, +16), items from i0 + 512 y stepping by 512 gridDim.y; thread (warp w, lane l) owns
// items base + 128 w + 32 j + l, j = 0..3, and all 16 queries (64 accumulators).
__global__ void __launch_bounds__(kF32Threads) score_f32_kernel(const float* __restrict__ xt, int64_t np,
                                                                 const float* __restrict__ q, int Qc, int D, int D4,
                                                                 int64_t i0, int64_t i1, const float* __restrict__ thr,
                                                                 unsigned* __restrict__ count, u64* __restrict__ keys,
                                                                 int64_t cap) {
  FASTREC_DYNAMIC_SMEM(float4, sq4);  // [16][D4 / 4]
  float* sqf = reinterpret_cast<float*>(sq4);
  const int q0 = blockIdx.x * kF32Q;
  for (int idx = threadIdx.x; idx < kF32Q * D4; idx += kF32Threads) {
    const int r = idx / D4, d = idx - r * D4;
    sqf[idx] = (q0 + r < Qc && d < D) ? q[static_cast<int64_t>(q0 + r) * D + d] : 0.f;
  }
  float th[kF32Q];
#pragma unroll
  for (int r = 0; r < kF32Q; ++r) th[r] = q0 + r < Qc ? thr[q0 + r] : INFINITY;
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int d4n = D4 / 4;
  for (int64_t base = i0 + kItemAlign * static_cast<int64_t>(blockIdx.y); base < i1;
       base += kItemAlign * static_cast<int64_t>(gridDim.y)) {
    float acc[kF32Q][4];
#pragma unroll
    for (int r = 0; r < kF32Q; ++r)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[r][j] = 0.f;
    const float* xp = xt + base + 128 * warp + lane;
    for (int d4 = 0; d4 < d4n; ++d4) {
      float x[4][4];
#pragma unroll
      for (int dd = 0; dd < 4; ++dd)
#pragma unroll
        for (int j = 0; j < 4; ++j) x[dd][j] = __ldg(xp + (4 * static_cast<int64_t>(d4) + dd) * np + 32 * j);
#pragma unroll
      for (int r = 0; r < kF32Q; ++r) {
        const float4 qv = sq4[r * d4n + d4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float a = acc[r][j];
          a = fmaf(qv.x, x[0][j], a);
          a = fmaf(qv.y, x[1][j], a);
          a = fmaf(qv.z, x[2][j], a);
          a = fmaf(qv.w, x[3][j], a);
          acc[r][j] = a;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kF32Q; ++r)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t item = base + 128 * warp + 32 * j + lane;
        if (passes(acc[r][j], th[r]) && item < i1) append(count, keys, cap, q0 + r, acc[r][j], item);
      }
  }
}

// ---- selection -----------------------------------------------------------------------------

struct SelectArgs {
  u64* keys;
  unsigned* count;
  float* thr;
  int64_t cap;
  int keep;
  int final_pass;
  int64_t qbase;  // global index of the chunk's first query
  const int64_t* ids;
  const int64_t* ex_ids;
  const int64_t* ex_off;
  int* ovf;  // [Q] per global query
  int64_t k;
  float* out_scores;
  int64_t* out_ids;
  int rerank;
  const float* queries;  // [Q][D] global
  int64_t D;
  const float* rows;
  int64_t stride_item, stride_d;
  int P;  // power of two >= the most candidates kept
};

__device__ __forceinline__ bool contains(const int64_t* __restrict__ a, int64_t lo, int64_t hi, int64_t v) {
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    const int64_t x = a[mid];
    if (x == v) return true;
    if (x < v) lo = mid + 1; else hi = mid;
  }
  return false;
}

// One block per query of the chunk.
__global__ void __launch_bounds__(kSelectThreads) select_kernel(SelectArgs a) {
  FASTREC_DYNAMIC_SMEM(u64, sbuf);  // [P]
  __shared__ unsigned hist[256];
  __shared__ u64 s_prefix;
  __shared__ unsigned s_rank, s_total, s_m;
  const int tid = threadIdx.x, lane = tid & 31;
  const int q = blockIdx.x;
  const int64_t gq = a.qbase + q;
  u64* kb = a.keys + q * a.cap;
  const unsigned c = a.count[q];
  if (c > a.cap && tid == 0) a.ovf[gq] = 1;
  const int n = static_cast<int>(c > a.cap ? a.cap : c);
  const int n_round = (n + 31) & ~31;

  if (a.ex_off != nullptr) {
    const int64_t lo = a.ex_off[gq], hi = a.ex_off[gq + 1];
    if (hi > lo) {
      for (int i = tid; i < n; i += kSelectThreads) {
        const u64 key = kb[i];
        if (key != 0 && contains(a.ex_ids, lo, hi, a.ids[key_row(key)])) kb[i] = 0;
      }
    }
    __syncthreads();
  }

  // Radix select of the keep-th largest nonzero key (8 passes of 8 bits, most significant first).
  u64 prefix = 0, mask = 0;
  unsigned rank = static_cast<unsigned>(a.keep);
  bool take_all = false;
  for (int p = 0; p < 8; ++p) {
    const int shift = 56 - 8 * p;
    for (int i = tid; i < 256; i += kSelectThreads) hist[i] = 0;
    __syncthreads();
    for (int i = tid; i < n_round; i += kSelectThreads) {
      const u64 key = i < n ? kb[i] : 0ull;
      const bool valid = key != 0 && (key & mask) == prefix;
      const unsigned digit = valid ? static_cast<unsigned>((key >> shift) & 255u) : 256u;
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      if (valid && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], static_cast<unsigned>(__popc(peers)));
    }
    __syncthreads();
    if (tid < 32) {
      // Warp 0 finds the digit d holding the rank-th largest key (counting down from digit 255:
      // the keys above d number fewer than rank, those above or at d at least rank). Lane l sums
      // digits 255 - 8l down to 248 - 8l; an inclusive scan over the lanes gives how many keys
      // lie above each lane's digits; the one lane whose digits the rank falls in walks them.
      // (Was thread 0 walking all 256 digits, up to 8 times a select: a serial chain of shared
      // loads.) tests/test_cuda_topk.py holds the results to the CPU index (in CI: emulated).
      const int top = 255 - 8 * lane;
      unsigned mine = 0;
      for (int j = 0; j < 8; ++j) mine += hist[top - j];
      unsigned incl = mine;
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      const unsigned total = __shfl_sync(0xffffffffu, incl, 31);
      if (p == 0 && lane == 0) s_total = total;
      const unsigned valid_keys = p == 0 ? total : s_total;  // (s_total: pass 0's, read by all after it)
      const unsigned above = incl - mine;
      if (valid_keys >= static_cast<unsigned>(a.keep) && above < rank && rank <= incl) {
        unsigned cum = above;
        for (int j = 0; j < 8; ++j) {
          const unsigned h = hist[top - j];
          if (cum + h >= rank) {
            s_prefix = prefix | (static_cast<u64>(top - j) << shift);
            s_rank = rank - cum;
            break;
          }
          cum += h;
        }
      }
    }
    __syncthreads();
    if (s_total < static_cast<unsigned>(a.keep)) {
      take_all = true;
      break;
    }
    prefix = s_prefix;
    rank = s_rank;
    mask |= 0xFFull << shift;
    __syncthreads();  // everyone has read s_prefix / s_rank before thread 0 writes them again
  }
  const u64 kstar = take_all ? 1ull : prefix;

  // Gather the selected keys (exactly min(keep, valid) of them: keys are distinct).
  if (tid == 0) s_m = 0;
  __syncthreads();
  for (int i = tid; i < n_round; i += kSelectThreads) {
    const u64 key = i < n ? kb[i] : 0ull;
    const bool take = key != 0 && key >= kstar;
    const unsigned ballot = __ballot_sync(0xffffffffu, take);
    unsigned base = 0;
    if (lane == 0 && ballot != 0) base = atomicAdd(&s_m, static_cast<unsigned>(__popc(ballot)));
    base = __shfl_sync(0xffffffffu, base, 0);
    if (take) sbuf[base + __popc(ballot & ((1u << lane) - 1u))] = key;
  }
  __syncthreads();
  const int m = static_cast<int>(s_m);

  if (!a.final_pass) {
    for (int i = tid; i < m; i += kSelectThreads) kb[i] = sbuf[i];
    if (tid == 0) {
      a.count[q] = static_cast<unsigned>(m);
      a.thr[q] = take_all ? -INFINITY : key_score(kstar);
    }
    return;
  }

  if (a.rerank) {
    const float* qv = a.queries + gq * a.D;
    for (int i = tid; i < m; i += kSelectThreads) {
      const int64_t row = key_row(sbuf[i]);
      const float* x = a.rows + row * a.stride_item;
      double acc = 0.0;
      for (int64_t d = 0; d < a.D; ++d) acc += static_cast<double>(qv[d]) * static_cast<double>(x[d * a.stride_d]);
      sbuf[i] = make_key(static_cast<float>(acc), row);
    }
  }
  for (int i = m + tid; i < a.P; i += kSelectThreads) sbuf[i] = 0ull;
  // Bitonic sort, descending.
  for (int size = 2; size <= a.P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int i = tid; i < a.P / 2; i += kSelectThreads) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const u64 x = sbuf[lo], y = sbuf[hi];
        if ((x < y) == desc) {
          sbuf[lo] = y;
          sbuf[hi] = x;
        }
      }
    }
  }
  __syncthreads();
  const int64_t out = std::min<int64_t>(a.k, m);
  float* os = a.out_scores + gq * a.k;
  int64_t* oi = a.out_ids + gq * a.k;
  for (int64_t j = tid; j < a.k; j += kSelectThreads) {
    if (j < out) {
      const u64 key = sbuf[j];
      os[j] = key_score(key);
      oi[j] = a.ids[key_row(key)];
    } else {
      os[j] = -INFINITY;
      oi[j] = -1;
    }
  }
}


struct Layout {
  int64_t qc = 0;  // queries per chunk
  int64_t keys = 0, count = 0, thr = 0, qcodes = 0, qscale = 0, flags = 0, total = 0;
};

int64_t query_row_bytes(const TopkIndexView& idx) { return idx.precision == kTopkF32 ? 0 : idx.row_bytes; }

Layout layout(const TopkIndexView& idx, int64_t Q, int64_t cap) {
  Layout l;
  const int64_t per_query = cap * 8 + query_row_bytes(idx) + 16;
  l.qc = std::max<int64_t>(1, std::min<int64_t>(Q, kChunkBudget / per_query));
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t at = off;
    off += round_up(std::max<int64_t>(bytes, 1), 256);
    return at;
  };
  l.keys = take(l.qc * cap * 8);
  l.count = take(l.qc * 4);
  l.thr = take(l.qc * 4);
  l.qcodes = take(l.qc * query_row_bytes(idx));
  l.qscale = take(l.qc * 4);
  l.flags = take((Q + 1) * 4);
  l.total = off;
  return l;
}

void check_index(const TopkIndexView& idx) {
  if (idx.precision < kTopkInt8 || idx.precision > kTopkF32) throw std::invalid_argument("bad precision");
  if (idx.n < 0 || idx.dim < 1 || idx.np < idx.n || idx.np % kItemAlign != 0) throw std::invalid_argument("bad index shape");
  // The selection counts a query's candidates in int: its buffer (at most n + keep + 2 * 512)
  // must stay below INT_MAX, or a catalogue of equal scores past 2^31 items came back empty.
  if (idx.n > INT_MAX - kMaxKeep - 4 * kItemAlign) {
    throw std::invalid_argument("the CUDA index holds at most " + std::to_string(INT_MAX - kMaxKeep - 4 * kItemAlign) +
                                " items");
  }
  if (idx.precision != kTopkF32) {
    const int64_t per = idx.precision == kTopkInt8 ? 1 : 2;
    if (idx.row_bytes % 64 != 0 || idx.row_bytes < idx.dim * per) throw std::invalid_argument("bad row_bytes");
    if (kMmaQ * idx.row_bytes > kMaxSmem) {
      throw std::invalid_argument("dimension " + std::to_string(idx.dim) + " is too large for the CUDA top-k");
    }
  } else if (kF32Q * round_up(idx.dim, 4) * 4 > kMaxSmem) {
    throw std::invalid_argument("dimension " + std::to_string(idx.dim) + " is too large for the CUDA top-k");
  }
}

// Lets `fn` take up to `bytes` of dynamic shared memory on the current device. The attribute
// belongs to the kernel, not to the launch, so it is only ever raised, under a lock, to all the
// device allows: setting it to each call's own size raced between threads (a call needing less
// lowered it between another call's set and launch, and that launch failed).
void allow_smem(const void* fn, int device, int smem_optin, int64_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, int> raised;  // -> the limit set
  std::lock_guard<std::mutex> lock(mu);
  auto it = raised.find({device, fn});
  int most = 0;
  if (it != raised.end()) {
    most = it->second;
  } else {
    cudaFuncAttributes attr;
    FASTREC_CUDA_CHECK(cudaFuncGetAttributes(&attr, fn));
    most = smem_optin - static_cast<int>(attr.sharedSizeBytes);
  }
  if (bytes > most) {
    throw std::invalid_argument("the CUDA top-k needs " + std::to_string(bytes / 1024) +
                                " KiB of shared memory a block here; this GPU allows " + std::to_string(most / 1024) +
                                " KiB");
  }
  if (it == raised.end()) {
    FASTREC_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, most));
    raised.emplace(std::make_pair(device, fn), most);
  }
}

}  // namespace

int64_t topk_max_keep() { return kMaxKeep; }

int64_t topk_cap(int64_t keep, int64_t n, int64_t growth) {
  keep = std::min(keep, std::max<int64_t>(n, 1));  // as search clamps it: a k far above n needs no room
  int64_t cap = round_up(std::max<int64_t>(8 * keep, 4096), kItemAlign);
  for (int64_t g = 1; g < growth && cap < n + keep; g *= 2) cap *= 2;
  return std::min<int64_t>(cap, round_up(n + keep, kItemAlign) + kItemAlign);
}

int64_t topk_query_chunk(const TopkIndexView& idx, int64_t Q, int64_t cap) { return layout(idx, Q, cap).qc; }

int64_t topk_scratch_bytes(const TopkIndexView& idx, int64_t Q, int64_t cap) { return layout(idx, Q, cap).total; }

TopkStatus search(int device, const TopkIndexView& idx, const TopkRequest& req, void* scratch, int64_t scratch_bytes,
                  std::uintptr_t stream_handle) {
  check_index(idx);
  const int64_t Q = req.Q, k = req.k, n = idx.n;
  if (k < 1) throw std::invalid_argument("k must be >= 1");
  if (req.keep < k) throw std::invalid_argument("keep must be >= k");
  if (Q < 0 || Q >= INT_MAX / 2) throw std::invalid_argument("bad number of queries");
  const int64_t keep = std::min(req.keep, std::max<int64_t>(n, 1));
  if (keep > kMaxKeep) {
    throw std::invalid_argument("the CUDA top-k keeps at most " + std::to_string(kMaxKeep) + " candidates per query (k = " +
                                std::to_string(k) + " needs " + std::to_string(keep) + ")");
  }
  const int64_t cap = req.cap;
  if (cap < keep || cap % kItemAlign != 0) throw std::invalid_argument("bad cap");
  const Layout l = layout(idx, Q, cap);
  if (scratch_bytes < l.total) throw std::invalid_argument("scratch is too small");
  TopkStatus status;
  if (Q == 0) return status;

  DeviceScope scope(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  char* base = static_cast<char*>(scratch);
  u64* keys = reinterpret_cast<u64*>(base + l.keys);
  unsigned* count = reinterpret_cast<unsigned*>(base + l.count);
  float* thr = reinterpret_cast<float*>(base + l.thr);
  uint8_t* qcodes = reinterpret_cast<uint8_t*>(base + l.qcodes);
  float* qscale = reinterpret_cast<float*>(base + l.qscale);
  int* flags = reinterpret_cast<int*>(base + l.flags);  // [0] first bad query, [1 + q] overflow
  int sms = 0;
  FASTREC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  FASTREC_CUDA_CHECK(cudaMemsetAsync(flags, 0x7f, sizeof(int), stream));
  FASTREC_CUDA_CHECK(cudaMemsetAsync(flags + 1, 0, static_cast<size_t>(Q) * sizeof(int), stream));

  const int rb = static_cast<int>(idx.row_bytes);
  const int D = static_cast<int>(idx.dim);
  const int D4 = static_cast<int>(round_up(idx.dim, 4));
  const int64_t mma_smem = kMmaQ * idx.row_bytes;
  const int64_t f32_smem = int64_t{kF32Q} * D4 * 4;
  int P = 1;
  while (P < keep) P <<= 1;
  const int64_t sel_smem = int64_t{P} * 8;
  // kMaxSmem fits an H100 (227 KiB a block); an A100 allows 163 KiB, sm_86 / sm_89 99 KiB.
  int smem_optin = 0;
  FASTREC_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t score_smem = idx.precision == kTopkF32 ? f32_smem : mma_smem;
  if (score_smem > smem_optin) {
    throw std::invalid_argument("dimension " + std::to_string(idx.dim) + " needs " + std::to_string(score_smem / 1024) +
                                " KiB of shared memory a block for the CUDA top-k; this GPU allows " +
                                std::to_string(smem_optin / 1024) + " KiB");
  }
  if (sel_smem > smem_optin) {
    throw std::invalid_argument("keeping " + std::to_string(keep) + " candidates a query needs " +
                                std::to_string(sel_smem / 1024) + " KiB of shared memory a block; this GPU allows " +
                                std::to_string(smem_optin / 1024) + " KiB: use a smaller k (or rerank=False)");
  }
  const void* score_fn = idx.precision == kTopkInt8  ? reinterpret_cast<const void*>(&score_mma_kernel<kTopkInt8>)
                         : idx.precision == kTopkF16 ? reinterpret_cast<const void*>(&score_mma_kernel<kTopkF16>)
                                                     : reinterpret_cast<const void*>(&score_f32_kernel);
  allow_smem(score_fn, device, smem_optin, score_smem);
  allow_smem(reinterpret_cast<const void*>(&select_kernel), device, smem_optin, sel_smem);
  const double growth = std::max(1.0, static_cast<double>(cap - keep) / (3.0 * static_cast<double>(keep)));

  for (int64_t qb = 0; qb < Q; qb += l.qc) {
    const int Qc = static_cast<int>(std::min(l.qc, Q - qb));
    const float* qptr = req.queries + qb * idx.dim;
    switch (idx.precision) {
      case kTopkInt8:
        FASTREC_LAUNCH((prep_queries_kernel<kTopkInt8>), ceil_div(Qc, 8), 256, 0, stream)(qptr, Qc, D, rb, qcodes, qscale, flags, qb);
        break;
      case kTopkF16:
        FASTREC_LAUNCH((prep_queries_kernel<kTopkF16>), ceil_div(Qc, 8), 256, 0, stream)(qptr, Qc, D, rb, qcodes, qscale, flags, qb);
        break;
      default:
        FASTREC_LAUNCH((prep_queries_kernel<kTopkF32>), ceil_div(Qc, 8), 256, 0, stream)(qptr, Qc, D, rb, qcodes, qscale, flags, qb);
    }
    FASTREC_CUDA_CHECK_LAUNCH();
    FASTREC_CUDA_CHECK(cudaMemsetAsync(count, 0, static_cast<size_t>(Qc) * sizeof(unsigned), stream));
    FASTREC_LAUNCH((fill_kernel), ceil_div(Qc, 256), 256, 0, stream)(thr, Qc, -INFINITY);
    FASTREC_CUDA_CHECK_LAUNCH();

    SelectArgs sa{};
    sa.keys = keys;
    sa.count = count;
    sa.thr = thr;
    sa.cap = cap;
    sa.keep = static_cast<int>(keep);
    sa.qbase = qb;
    sa.ids = idx.ids;
    sa.ex_ids = req.exclude_ids;
    sa.ex_off = req.exclude_offsets;
    sa.ovf = flags + 1;
    sa.k = k;
    sa.out_scores = req.scores;
    sa.out_ids = req.out_ids;
    sa.rerank = req.rerank ? 1 : 0;
    sa.queries = req.queries;
    sa.D = idx.dim;
    sa.rows = idx.rows;
    sa.stride_item = idx.stride_item;
    sa.stride_d = idx.stride_d;
    sa.P = P;

    auto score = [&](int64_t i0, int64_t i1) {
      if (i1 <= i0) return;
      if (idx.precision == kTopkF32) {
        const unsigned gx = ceil_div(Qc, kF32Q);
        const int64_t want = std::max<int64_t>(1, (int64_t{sms} * 8 + gx - 1) / gx);
        const unsigned gy = static_cast<unsigned>(std::min<int64_t>({ceil_div(i1 - i0, kItemAlign), want, 65535}));
        FASTREC_LAUNCH((score_f32_kernel), dim3(gx, gy), kF32Threads, f32_smem, stream)(
            static_cast<const float*>(idx.codes), idx.np, qptr, Qc, D, D4, i0, i1, thr, count, keys, cap);
      } else {
        const unsigned gx = ceil_div(Qc, kMmaQ);
        const int64_t want = std::max<int64_t>(1, (int64_t{sms} * 16 + gx - 1) / gx);
        const unsigned gy = static_cast<unsigned>(std::min<int64_t>({ceil_div(i1 - i0, 64), want, 65535}));
        if (idx.precision == kTopkInt8) {
          FASTREC_LAUNCH((score_mma_kernel<kTopkInt8>), dim3(gx, gy), kMmaThreads, mma_smem, stream)(
              static_cast<const uint8_t*>(idx.codes), idx.scales, qcodes, qscale, Qc, rb, i0, i1, thr, count, keys, cap);
        } else {
          FASTREC_LAUNCH((score_mma_kernel<kTopkF16>), dim3(gx, gy), kMmaThreads, mma_smem, stream)(
              static_cast<const uint8_t*>(idx.codes), nullptr, qcodes, qscale, Qc, rb, i0, i1, thr, count, keys, cap);
        }
      }
      FASTREC_CUDA_CHECK_LAUNCH();
    };
    auto select = [&](bool final_pass) {
      sa.final_pass = final_pass ? 1 : 0;
      FASTREC_LAUNCH((select_kernel), static_cast<unsigned>(Qc), kSelectThreads, sel_smem, stream)(sa);
      FASTREC_CUDA_CHECK_LAUNCH();
    };

    // Stage 0 keeps everything it scores (at most cap), later stages grow geometrically so each
    // adds about keep * growth <= (cap - keep) / 3 candidates to a catalogue in random order.
    int64_t end = std::min(n, cap);
    score(0, end);
    while (end < n) {
      select(false);
      const int64_t size = round_up(static_cast<int64_t>(std::ceil(static_cast<double>(end) * growth)), kItemAlign);
      const int64_t next = std::min(n, end + size);
      score(end, next);
      end = next;
    }
    select(true);
  }

  std::vector<int> host(static_cast<size_t>(Q + 1));
  FASTREC_CUDA_CHECK(cudaMemcpyAsync(host.data(), flags, host.size() * sizeof(int), cudaMemcpyDeviceToHost, stream));
  FASTREC_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (host[0] >= 0 && host[0] < Q) status.bad_query = host[0];
  for (int64_t q = 0; q < Q; ++q) {
    if (host[static_cast<size_t>(q + 1)] != 0) status.overflowed.push_back(q);
  }
  return status;
}

}  // namespace cuda
}  // namespace fastrec
