// CUDA embedding bags: every (table, bag) of a call in one launch.
//
// Mapping. Each table is cut into lane-chunks: one chunk is one load of W bytes of a row's
// codes (W = 16, 8 or 4: the widest that the table's base address, row stride and code offset
// allow) holding E elements. A group of G lanes (G = the power of two >= the row's chunks, at
// most 32) pools one bag, lane i owning chunk i; a warp holds 32/G groups, i.e. 32/G
// consecutive bags of one table. Rows wider than 32 chunks are split into column tiles of 32
// chunks, one warp per (bag, tile). So fp32 D=128 is a warp per bag with 16-byte loads, fp16 or
// FBGEMM 8-bit D=128 half a warp, 4-bit D=64 a quarter. Tables whose rows admit no 4-byte
// loads (odd fp16 dims, 8-bit dims not a multiple of 4, ...) take a generic path: one element
// per lane, byte loads, the same loop.
//
// Loop. A lane reads kUnroll ids (and weights) of its bag, range-checks them, then issues the
// kUnroll row loads (and scale/bias loads) before using any, and accumulates in fp32. Every
// lane of a group reads the same ids, so each id costs one transaction per group.
//
// Tables. The kernel is compiled once per decoder variant (so each gets the registers, and
// the unroll, that it needs rather than the worst variant's), and one launch pools every
// table of a variant: a call whose tables share a format and alignment class (the usual
// model) is one launch, a mixed call one per variant present, all before the one readback.
// Up to kMaxTablesPerLaunch table descriptors travel in the kernel parameters
// (__grid_constant__, read through the constant cache); a warp finds its table by a binary
// search over the descriptors' first-warp numbers.
//
// Errors. The kernel never reads outside a table, the ids or the offsets: a bad id is skipped
// and its position atomicMin'ed into a 16-byte scratch slot; offsets are clamped to
// [0, len(indices)] and a violation of the CSR rules is recorded in the slot's second word.
// The launcher copies the slot back (one 16-byte device-to-host copy and a stream wait per
// call) and throws the CPU op's exceptions. Slots come from a per-device pool, one per call in
// flight, so concurrent calls on several threads and streams never share one.
#include "embedding.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.cuh"

namespace fastrec {
namespace cuda {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kWarpsPerBlock = kBlockThreads / 32;

// Tuning knobs (override with CUDAFLAGS="-DFASTREC_EMB_UNROLL_WIDE=..." on a fresh build):
// rows in flight per lane, and the blocks per SM the register budget must allow, for
// variants loading >= 8 bytes per lane ("wide") and 4 or fewer ("narrow"). At the defaults, 64 / 80
// registers (32 / 24 warps per SM), ptxas -v (nvcc 13, sm_90) reports no spills in any variant.
#ifndef FASTREC_EMB_UNROLL_WIDE
#define FASTREC_EMB_UNROLL_WIDE 4
#endif
#ifndef FASTREC_EMB_UNROLL_NARROW
#define FASTREC_EMB_UNROLL_NARROW 8
#endif
#ifndef FASTREC_EMB_MIN_BLOCKS_WIDE
#define FASTREC_EMB_MIN_BLOCKS_WIDE 4
#endif
#ifndef FASTREC_EMB_MIN_BLOCKS_NARROW
#define FASTREC_EMB_MIN_BLOCKS_NARROW 3
#endif
enum Kind : int32_t { kF32 = 0, kF16 = 1, kQ8 = 2, kQ4 = 3, kQ2 = 4, kQ8Half = 5 };  // = RowKind

// Which decoder a table runs: row kind x load width, or the generic byte-wise path.
// At most 8 elements per load (the accumulators a lane keeps per row chunk).
enum Variant : uint8_t {
  kF32x16, kF32x8, kF32x4,
  kF16x16, kF16x8, kF16x4,
  kQ8x8, kQ8x4,
  kQ8Hx4,
  kQ4x4,
  kQ2x2,
  kGeneric,
};

struct TableDesc {
  const uint8_t* data;
  int64_t rows;
  int64_t stride;      // bytes between rows
  int64_t pad;         // padding id, or -1
  int64_t warp_begin;  // this table's first warp in the launch
  int32_t dim;
  int32_t col;         // first output column
  int32_t chunks;      // lane-chunks per row
  int32_t tiles;       // column tiles of 32 chunks (> 1 only when chunks > 32)
  int32_t code_off;    // bytes from the row start to the codes / values
  int32_t qp_off;      // bytes from the row start to (scale, bias)
  int32_t kind;
  int32_t table;       // the table's number in the call (offsets are table-major)
  uint8_t log2_group;  // lanes per bag = 1 << log2_group
  uint8_t is_max;
  uint8_t is_mean;
};

struct Params {
  TableDesc tab[kMaxTablesPerLaunch];
  const void* indices;
  const void* offsets;
  const float* psw;
  float* out;
  unsigned long long* err;  // [0] smallest bad id position, [1] smallest bad offset position
  int64_t num_indices;
  int64_t num_offsets;
  int64_t fixed_len;        // >= 0: bag g is [g*L, (g+1)*L), no offsets
  int64_t batch;
  int64_t out_stride;       // floats per output row
  int64_t total_warps;
  int32_t num_tables;
  int32_t off64;
  int32_t check_ends;       // this launch checks offsets[0] and offsets[-1]
};
static_assert(sizeof(Params) <= 4000, "kernel parameters are limited to 4 KB");

constexpr unsigned long long kNoError = ~0ull;

// ---- device helpers ----------------------------------------------------------------------

__device__ __forceinline__ int64_t load_int(const void* base, bool is64, int64_t i) {
  return is64 ? static_cast<int64_t>(__ldg(static_cast<const long long*>(base) + i))
              : static_cast<int64_t>(__ldg(static_cast<const int*>(base) + i));
}

// 2^23 + byte b of x, as a float, minus 2^23: the byte's value, exactly, without an I2F.
__device__ __forceinline__ float byte_value(uint32_t x, int b) {
  return __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7540u | static_cast<uint32_t>(b))) - 8388608.f;
}

__device__ __forceinline__ float2 half2_bits_to_float2(uint32_t w) {
  __half2 h;
  memcpy(&h, &w, 4);
  return __half22float2(h);
}

template <int W> struct RawVec;
template <> struct RawVec<16> { using T = uint4; };
template <> struct RawVec<8> { using T = uint2; };
template <> struct RawVec<4> { using T = uint32_t; };
template <> struct RawVec<2> { using T = unsigned short; };

__device__ __forceinline__ uint32_t word(const uint4& r, int i) { return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w; }
__device__ __forceinline__ uint32_t word(const uint2& r, int i) { return i == 0 ? r.x : r.y; }
__device__ __forceinline__ uint32_t word(uint32_t r, int) { return r; }
__device__ __forceinline__ uint32_t word(unsigned short r, int) { return r; }

// (scale, bias) as loaded: nothing for float rows, fp32 pair for FBGEMM 8-bit, and the two
// fp16 halves in one register for the other quantized layouts (converted only when used).
struct NoQP {};
__device__ __forceinline__ float2 scale_bias(NoQP) { return make_float2(1.f, 0.f); }
__device__ __forceinline__ float2 scale_bias(float2 qp) { return qp; }
__device__ __forceinline__ float2 scale_bias(uint32_t qp) { return half2_bits_to_float2(qp); }

// Rows read with W-byte vector loads. decode() gives the E values of a chunk (float kinds)
// or its E codes as floats (quantized kinds: value = scale * code + bias).
template <int K, int W>
struct FastRows {
  static constexpr int kBits = K == kF32 ? 32 : K == kF16 ? 16 : (K == kQ8 || K == kQ8Half) ? 8 : K == kQ4 ? 4 : 2;
  static constexpr int E = W * 8 / kBits;
  static constexpr bool kQuant = kBits <= 8;
  static constexpr int kUnroll = W >= 8 ? FASTREC_EMB_UNROLL_WIDE : FASTREC_EMB_UNROLL_NARROW;  // rows in flight per lane
  static constexpr int kMinBlocks = W >= 8 ? FASTREC_EMB_MIN_BLOCKS_WIDE : FASTREC_EMB_MIN_BLOCKS_NARROW;
  using R = typename RawVec<W>::T;
  using QP = std::conditional_t<!kQuant, NoQP, std::conditional_t<K == kQ8, float2, uint32_t>>;

  __device__ static __forceinline__ R load(const uint8_t* row, const TableDesc& d, int chunk) {
    return __ldg(reinterpret_cast<const R*>(row + d.code_off + chunk * W));
  }
  __device__ static __forceinline__ QP qparams(const uint8_t* row, const TableDesc& d) {
    if constexpr (!kQuant) {
      return NoQP{};
    } else if constexpr (K == kQ8) {  // FBGEMM 8-bit: fp32 scale, fp32 bias (4-byte aligned)
      const float* q = reinterpret_cast<const float*>(row + d.qp_off);
      return make_float2(__ldg(q), __ldg(q + 1));
    } else {  // fp16 scale, fp16 bias
      return __ldg(reinterpret_cast<const unsigned int*>(row + d.qp_off));
    }
  }
  __device__ static __forceinline__ void decode(const R& r, float (&v)[E]) {
#pragma unroll
    for (int i = 0; i < (W + 3) / 4; ++i) {
      const uint32_t x = word(r, i);
      if constexpr (K == kF32) {
        v[i] = __uint_as_float(x);
      } else if constexpr (K == kF16) {
        const float2 f = half2_bits_to_float2(x);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
      } else if constexpr (kBits == 8) {
#pragma unroll
        for (int b = 0; b < 4; ++b) v[4 * i + b] = byte_value(x, b);
      } else if constexpr (kBits == 4) {  // element 2j in the low nibble of byte j
        const uint32_t lo = x & 0x0F0F0F0Fu, hi = (x >> 4) & 0x0F0F0F0Fu;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          v[8 * i + 2 * b] = byte_value(lo, b);
          v[8 * i + 2 * b + 1] = byte_value(hi, b);
        }
      } else {  // 2-bit: element 4j + m in bits [2m, 2m + 2) of byte j
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const uint32_t part = (x >> (2 * m)) & 0x03030303u;
#pragma unroll
          for (int b = 0; b < W && b < 4; ++b) v[16 * i + 4 * b + m] = byte_value(part, b);
        }
      }
    }
  }
};

__device__ __forceinline__ uint32_t load_le(const uint8_t* p, int n) {
  uint32_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<uint32_t>(__ldg(p + i)) << (8 * i);
  return v;
}

__device__ __forceinline__ float half_value(uint32_t h) { return __half2float(__ushort_as_half(static_cast<unsigned short>(h))); }

// Any kind at any alignment: one element per lane (chunk = element), byte loads, decoded in
// load() exactly as the CPU reference does.
struct GenericRows {
  static constexpr int E = 1;
  static constexpr bool kQuant = false;
  static constexpr int kUnroll = FASTREC_EMB_UNROLL_WIDE;
  static constexpr int kMinBlocks = FASTREC_EMB_MIN_BLOCKS_WIDE;
  using R = float;
  using QP = NoQP;

  __device__ static __forceinline__ float load(const uint8_t* row, const TableDesc& d, int j) {
    if (d.kind == kF32) return __uint_as_float(load_le(row + 4 * j, 4));
    if (d.kind == kF16) return half_value(load_le(row + 2 * j, 2));
    const uint8_t* codes = row + d.code_off;
    uint32_t q;
    if (d.kind == kQ4) {
      q = (__ldg(codes + j / 2) >> (4 * (j & 1))) & 0xFu;
    } else if (d.kind == kQ2) {
      q = (__ldg(codes + j / 4) >> (2 * (j & 3))) & 0x3u;
    } else {
      q = __ldg(codes + j);
    }
    const uint8_t* qp = row + d.qp_off;
    float s, b;
    if (d.kind == kQ8) {
      s = __uint_as_float(load_le(qp, 4));
      b = __uint_as_float(load_le(qp + 4, 4));
    } else {
      s = half_value(load_le(qp, 2));
      b = half_value(load_le(qp + 2, 2));
    }
    return s * static_cast<float>(q) + b;
  }
  __device__ static __forceinline__ NoQP qparams(const uint8_t*, const TableDesc&) { return NoQP{}; }
  __device__ static __forceinline__ void decode(float r, float (&v)[1]) { v[0] = r; }
};

enum class Pool { kSum, kWeightedSum, kMax };  // mean: kSum, scaled at the end

// Pools bag [s, e) of table d into out (the bag's output row at the table's column): this
// lane's chunk only when `active`; the group's `reporter` lane also records bad ids.
template <class Rows, Pool P, class Idx>
__device__ __forceinline__ void pool_bag(const Params& p, const TableDesc& d, const Idx* __restrict__ ids,
                                         int64_t s, int64_t e, int chunk, bool active, bool reporter,
                                         float* __restrict__ out) {
  constexpr int E = Rows::E;
  constexpr int kUnroll = Rows::kUnroll;
  constexpr bool kMax = P == Pool::kMax;
  using R = typename Rows::R;
  using QP = typename Rows::QP;
  float acc[E];
#pragma unroll
  for (int i = 0; i < E; ++i) acc[i] = kMax ? -INFINITY : 0.f;
  int64_t count = 0;  // (a bag may hold 2^31 ids or more)
  const uint8_t* const data = d.data;
  const int64_t rows = d.rows, stride = d.stride, pad = d.pad;

  for (int64_t p0 = s; p0 < e; p0 += kUnroll) {
    const Idx* const batch_ids = ids + p0;
    const int last = static_cast<int>(min(e - 1 - p0, static_cast<int64_t>(kUnroll - 1)));
    int64_t id[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      // Past the bag's end: re-read its last id (no branch, a cache hit) and ignore it.
      ok[u] = u <= last;
      id[u] = static_cast<int64_t>(__ldg(batch_ids + min(u, last)));
    }
    int first_bad = kUnroll;  // the batch's first bad id: later ones have larger positions
#pragma unroll
    for (int u = kUnroll - 1; u >= 0; --u) {
      const bool bad = ok[u] && static_cast<uint64_t>(id[u]) >= static_cast<uint64_t>(rows);
      first_bad = bad ? u : first_bad;
      ok[u] = ok[u] && !bad && id[u] != pad;
    }
    if (first_bad < kUnroll && reporter) atomicMin(p.err, static_cast<unsigned long long>(p0 + first_bad));
    R raw[kUnroll];
    QP qp[kUnroll];
    float w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      raw[u] = R{};
      qp[u] = QP{};
      if (ok[u] && active) {
        const uint8_t* row = data + id[u] * stride;
        raw[u] = Rows::load(row, d, chunk);
        qp[u] = Rows::qparams(row, d);
      }
      if constexpr (P == Pool::kWeightedSum) w[u] = ok[u] ? __ldg(p.psw + p0 + u) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!ok[u]) continue;
      ++count;
      float v[E];
      Rows::decode(raw[u], v);
      const float2 sb = scale_bias(qp[u]);
      if constexpr (kMax) {
#pragma unroll
        for (int i = 0; i < E; ++i) acc[i] = fmaxf(acc[i], Rows::kQuant ? fmaf(sb.x, v[i], sb.y) : v[i]);
      } else {
        // Each row's value (scale*q + bias for quantized rows), times its weight, added: as the
        // CPU does. Folding w into scale and bias overflowed to inf/NaN for large weights where
        // w times the value is finite, and separate code and bias sums cancel (less accurate).
        const float wu = P == Pool::kWeightedSum ? w[u] : 1.f;
#pragma unroll
        for (int i = 0; i < E; ++i) {
          const float x = Rows::kQuant ? fmaf(sb.x, v[i], sb.y) : v[i];
          acc[i] = P == Pool::kWeightedSum ? fmaf(x, wu, acc[i]) : acc[i] + x;
        }
      }
    }
  }
  if (!active) return;

  // Empty or all-padding bag: zeros. Mean: the sum times 1/count, as the CPU op does.
  const float scale = (count > 0 && d.is_mean) ? 1.f / static_cast<float>(count) : 1.f;
  float v[E];
#pragma unroll
  for (int i = 0; i < E; ++i) v[i] = count == 0 ? 0.f : kMax ? acc[i] : acc[i] * scale;
  const int d0 = chunk * E;
  float* o = out + d0;
  if constexpr (E % 4 == 0) {
    if (d0 + E <= d.dim && (reinterpret_cast<uintptr_t>(o) & 15) == 0) {
#pragma unroll
      for (int i = 0; i < E; i += 4) *reinterpret_cast<float4*>(o + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < E; ++i) {
    if (d0 + i < d.dim) o[i] = v[i];
  }
}

// kWeighted: per-sample weights (every mode is sum); otherwise each table's mode.
template <class Rows, class Idx, bool kWeighted>
__global__ void __launch_bounds__(kBlockThreads, Rows::kMinBlocks) bags_kernel(const __grid_constant__ Params p) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (p.check_ends && warp == 0 && lane == 0) {
    const int64_t first = load_int(p.offsets, p.off64, 0);
    const int64_t last = load_int(p.offsets, p.off64, p.num_offsets - 1);
    if (first != 0 || last != p.num_indices) atomicMin(p.err + 1, 0ull);
  }
  if (warp >= p.total_warps) return;

  int lo = 0, hi = p.num_tables - 1;  // the last table whose first warp is <= warp
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (p.tab[mid].warp_begin <= warp) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const TableDesc& d = p.tab[lo];
  const int64_t local = warp - d.warp_begin;
  int64_t bag;
  int tile, li;
  if (d.tiles > 1) {  // a warp per (bag, column tile)
    bag = local / d.tiles;
    tile = static_cast<int>(local - bag * d.tiles);
    li = lane;
  } else {  // 32 / G bags per warp
    bag = (local << (5 - d.log2_group)) + (lane >> d.log2_group);
    tile = 0;
    li = lane & ((1 << d.log2_group) - 1);
  }
  if (bag >= p.batch) return;
  const int chunk = tile * 32 + li;
  const bool active = chunk < d.chunks;
  const bool reporter = li == 0 && tile == 0;
  if (!active && !reporter) return;

  const int64_t g = static_cast<int64_t>(d.table) * p.batch + bag;
  int64_t s, e;
  if (p.fixed_len >= 0) {
    s = g * p.fixed_len;
    e = s + p.fixed_len;
  } else {
    s = load_int(p.offsets, p.off64, g);
    e = load_int(p.offsets, p.off64, g + 1);
    if (reporter && e < s) atomicMin(p.err + 1, static_cast<unsigned long long>(g + 1));
    s = min(max(s, int64_t{0}), p.num_indices);  // bad offsets never send a read out of bounds
    e = min(max(e, s), p.num_indices);
  }
  float* out = p.out + bag * p.out_stride + d.col;
  const Idx* ids = static_cast<const Idx*>(p.indices);
  if constexpr (kWeighted) {
    pool_bag<Rows, Pool::kWeightedSum>(p, d, ids, s, e, chunk, active, reporter, out);
  } else if (d.is_max) {
    pool_bag<Rows, Pool::kMax>(p, d, ids, s, e, chunk, active, reporter, out);
  } else {
    pool_bag<Rows, Pool::kSum>(p, d, ids, s, e, chunk, active, reporter, out);
  }
}

using KernelFn = void (*)(Params);

template <class Rows>
KernelFn kernel_for(bool idx64, bool weighted) {
  if (weighted) return idx64 ? bags_kernel<Rows, long long, true> : bags_kernel<Rows, int, true>;
  return idx64 ? bags_kernel<Rows, long long, false> : bags_kernel<Rows, int, false>;
}

KernelFn pick_kernel(int variant, bool idx64, bool weighted) {
  switch (variant) {
    case kF32x16: return kernel_for<FastRows<kF32, 16>>(idx64, weighted);
    case kF32x8: return kernel_for<FastRows<kF32, 8>>(idx64, weighted);
    case kF32x4: return kernel_for<FastRows<kF32, 4>>(idx64, weighted);
    case kF16x16: return kernel_for<FastRows<kF16, 16>>(idx64, weighted);
    case kF16x8: return kernel_for<FastRows<kF16, 8>>(idx64, weighted);
    case kF16x4: return kernel_for<FastRows<kF16, 4>>(idx64, weighted);
    case kQ8x8: return kernel_for<FastRows<kQ8, 8>>(idx64, weighted);
    case kQ8x4: return kernel_for<FastRows<kQ8, 4>>(idx64, weighted);
    case kQ8Hx4: return kernel_for<FastRows<kQ8Half, 4>>(idx64, weighted);
    case kQ4x4: return kernel_for<FastRows<kQ4, 4>>(idx64, weighted);
    case kQ2x2: return kernel_for<FastRows<kQ2, 2>>(idx64, weighted);
    default: return kernel_for<GenericRows>(idx64, weighted);
  }
}

// ---- host side -----------------------------------------------------------------------------

// A 16-byte device scratch slot (plus a pinned host copy) per call in flight. Slots are kept
// in the "no error" state (all bits set) between calls: the kernel writes one only on error,
// and the launcher resets it before giving it back.
struct Slot {
  unsigned long long* dev = nullptr;
  unsigned long long* host = nullptr;
};

class SlotPool {
 public:
  Slot acquire(int device, cudaStream_t stream) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (static_cast<size_t>(device) >= free_.size()) free_.resize(device + 1);
      std::vector<Slot>& f = free_[device];
      if (!f.empty()) {
        Slot s = f.back();
        f.pop_back();
        return s;
      }
    }
    // None free: a new block, made ready without the lock (it waits for the caller's stream,
    // which other threads' calls, on any device, must not wait for). Threads that grow at once
    // each add a block.
    std::vector<Slot> block = new_block(stream);
    Slot s = block.back();
    block.pop_back();
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<Slot>& f = free_[device];  // (free_ only grows: the resize above still holds)
    f.insert(f.end(), block.begin(), block.end());
    return s;
  }
  void release(int device, Slot s) {
    std::lock_guard<std::mutex> lock(mu_);
    free_[device].push_back(s);
  }

 private:
  static constexpr int kSlotsPerBlock = 64;
  static std::vector<Slot> new_block(cudaStream_t stream) {
    unsigned long long *dev = nullptr, *host = nullptr;
    const size_t bytes = kSlotsPerBlock * 2 * sizeof(unsigned long long);
    FASTREC_CUDA_CHECK(cudaMalloc(&dev, bytes));
    FASTREC_CUDA_CHECK(cudaMallocHost(&host, bytes));
    FASTREC_CUDA_CHECK(cudaMemsetAsync(dev, 0xFF, bytes, stream));
    FASTREC_CUDA_CHECK(cudaStreamSynchronize(stream));  // ready before any other stream uses them
    std::vector<Slot> block;
    for (int i = 0; i < kSlotsPerBlock; ++i) block.push_back(Slot{dev + 2 * i, host + 2 * i});
    return block;
  }
  std::mutex mu_;
  std::vector<std::vector<Slot>> free_;  // per device; never freed (the driver may be gone at exit)
};

SlotPool& slot_pool() {
  static SlotPool* pool = new SlotPool;
  return *pool;
}

// Returns the slot to the pool only once the call is known to have finished with it cleanly.
class SlotLease {
 public:
  SlotLease(int device, cudaStream_t stream) : device_(device), slot_(slot_pool().acquire(device, stream)) {}
  ~SlotLease() {
    if (clean_) slot_pool().release(device_, slot_);
  }
  SlotLease(const SlotLease&) = delete;
  SlotLease& operator=(const SlotLease&) = delete;
  const Slot& slot() const { return slot_; }
  void set_clean() { clean_ = true; }

 private:
  int device_;
  Slot slot_;
  bool clean_ = false;
};


int64_t code_bytes(int bits, int64_t dim) { return (dim * bits + 7) / 8; }

int kind_bits(int32_t kind) {
  switch (kind) {
    case kF32: return 32;
    case kF16: return 16;
    case kQ8: case kQ8Half: return 8;
    case kQ4: return 4;
    case kQ2: return 2;
    default: return 0;
  }
}

// Largest power of two (<= 16) dividing every address a row read starts from.
int alignment_of(uintptr_t a) {
  if (a == 0) return 16;
  const uintptr_t low = a & (~a + 1);
  return low >= 16 ? 16 : static_cast<int>(low);
}

// A table's descriptor (all but warp_begin), its decoder variant and the warps it needs.
struct Planned {
  TableDesc desc;
  int variant;
  int64_t warps;
};

Planned describe(const BagTable& t, int64_t index, int64_t batch, int64_t col) {
  Planned plan;
  TableDesc* d = &plan.desc;
  const std::string name = "table " + std::to_string(index);
  const int bits = kind_bits(t.kind);
  if (bits == 0) throw std::invalid_argument(name + ": unknown row kind " + std::to_string(t.kind));
  if (t.num_rows < 0 || t.dim < 0 || t.row_stride < 0) throw std::invalid_argument(name + ": negative size");
  if (t.dim > (INT32_MAX / 64)) throw std::invalid_argument(name + ": dim " + std::to_string(t.dim) + " is too large");
  if (t.mode < 0 || t.mode > 2) throw std::invalid_argument("mode code must be 0 (sum), 1 (mean) or 2 (max)");
  if (t.padding_idx < -1 || t.padding_idx >= t.num_rows) {
    throw std::invalid_argument(name + ": padding_idx " + std::to_string(t.padding_idx) + " is out of range");
  }
  if (t.num_rows > 0 && t.row_stride > 0 && t.data == nullptr) throw std::invalid_argument(name + ": null data");
  std::memset(d, 0, sizeof(*d));
  d->table = static_cast<int32_t>(index);
  const bool quant = bits <= 8;
  const bool tbe = t.kind == kQ8Half || (t.tbe && quant);
  if (t.kind == kQ8 && t.tbe) throw std::invalid_argument(name + ": 8-bit TBE rows have fp16 scale and bias (kind 5)");
  const int64_t cb = code_bytes(bits, t.dim);
  if (!quant) {
    if (t.row_stride != cb) throw std::invalid_argument(name + ": float rows must be dense (row_stride == dim * itemsize)");
  } else {
    const int64_t need = cb + (t.kind == kQ8 ? 8 : 4);
    if (t.row_stride < need) {
      throw std::invalid_argument(name + ": packed rows of " + std::to_string(t.row_stride) + " bytes are too short for dim=" +
                                  std::to_string(t.dim) + " (need >= " + std::to_string(need) + ")");
    }
    d->code_off = tbe ? 4 : 0;
    d->qp_off = tbe ? 0 : static_cast<int32_t>(cb);
  }
  d->data = static_cast<const uint8_t*>(t.data);
  d->rows = t.num_rows;
  d->stride = t.row_stride;
  d->pad = t.padding_idx;
  d->dim = static_cast<int32_t>(t.dim);
  d->col = static_cast<int32_t>(col);
  d->kind = t.kind;
  d->is_max = t.mode == 2;
  d->is_mean = t.mode == 1;

  const uintptr_t base = reinterpret_cast<uintptr_t>(t.data) | static_cast<uintptr_t>(t.row_stride);
  const int w = alignment_of(base | static_cast<uintptr_t>(d->code_off));
  const bool qp_ok = !quant || alignment_of(base | static_cast<uintptr_t>(d->qp_off)) >= 4;
  int variant = kGeneric, width = 0;
  if (w >= 4 && qp_ok) {
    switch (t.kind) {
      case kF32: width = w; variant = w == 16 ? kF32x16 : w == 8 ? kF32x8 : kF32x4; break;
      case kF16: width = w; variant = w == 16 ? kF16x16 : w == 8 ? kF16x8 : kF16x4; break;
      case kQ8: width = std::min(w, 8); variant = width == 8 ? kQ8x8 : kQ8x4; break;
      case kQ8Half: width = 4; variant = kQ8Hx4; break;
      case kQ4: width = 4; variant = kQ4x4; break;
      default: width = 2; variant = kQ2x2; break;
    }
  }
  plan.variant = variant;
  const int64_t per_chunk = variant == kGeneric ? 1 : width * 8 / bits;
  const int64_t chunks = (t.dim + per_chunk - 1) / per_chunk;
  d->chunks = static_cast<int32_t>(chunks);
  int log2_group = 0;
  while ((int64_t{1} << log2_group) < chunks && log2_group < 5) ++log2_group;
  d->log2_group = static_cast<uint8_t>(log2_group);
  d->tiles = chunks > 32 ? static_cast<int32_t>((chunks + 31) / 32) : 1;
  const int64_t bags_per_warp = 32 >> log2_group;
  plan.warps = d->tiles > 1 ? batch * d->tiles : (batch + bags_per_warp - 1) / bags_per_warp;
  return plan;
}

template <class T>
void copy_to_host(T* dst, const void* src, size_t bytes, cudaStream_t stream) {
  FASTREC_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
  FASTREC_CUDA_CHECK(cudaStreamSynchronize(stream));
}

std::vector<int64_t> offsets_on_host(const BagsArgs& a, cudaStream_t stream) {
  std::vector<int64_t> off(a.num_offsets);
  if (a.offsets_int64) {
    copy_to_host(off.data(), a.offsets, a.num_offsets * sizeof(int64_t), stream);
  } else {
    std::vector<int32_t> o32(a.num_offsets);
    copy_to_host(o32.data(), a.offsets, a.num_offsets * sizeof(int32_t), stream);
    std::copy(o32.begin(), o32.end(), off.begin());
  }
  return off;
}

// The CPU op's offset checks and messages (csrc/cpu/embedding.cpp), on a host copy; run only
// after the kernel flagged the offsets.
void throw_offsets_error(const std::vector<int64_t>& off, int64_t num_indices) {
  const int64_t n = static_cast<int64_t>(off.size());
  if (off[0] != 0) throw std::invalid_argument("offsets[0] must be 0, got " + std::to_string(off[0]));
  for (int64_t i = 1; i < n; ++i) {
    if (off[i] < off[i - 1]) {
      throw std::invalid_argument("offsets must be non-decreasing: offsets[" + std::to_string(i) + "]=" +
                                  std::to_string(off[i]) + " < offsets[" + std::to_string(i - 1) + "]=" +
                                  std::to_string(off[i - 1]));
    }
  }
  if (off[n - 1] != num_indices) {
    throw std::invalid_argument("offsets[-1] must equal len(indices)=" + std::to_string(num_indices) + ", got " +
                                std::to_string(off[n - 1]));
  }
  throw std::runtime_error("fastrec CUDA embedding_bags: the kernel flagged the offsets but they check out on the host");
}

[[noreturn]] void throw_index_error(const BagsArgs& a, int64_t batch, int64_t pos, cudaStream_t stream) {
  int64_t value;
  if (a.indices_int64) {
    copy_to_host(&value, static_cast<const int64_t*>(a.indices) + pos, sizeof(int64_t), stream);
  } else {
    int32_t v32;
    copy_to_host(&v32, static_cast<const int32_t*>(a.indices) + pos, sizeof(int32_t), stream);
    value = v32;
  }
  int64_t bag;
  if (a.fixed_len >= 0) {
    bag = pos / a.fixed_len;  // pos < B * L, so L > 0
  } else {
    const std::vector<int64_t> off = offsets_on_host(a, stream);
    bag = (std::upper_bound(off.begin(), off.end(), pos) - off.begin()) - 1;
  }
  // In [0, T*B) for the offsets the kernel checked; clamped all the same, as a.tables[t] is read.
  bag = std::min<int64_t>(std::max<int64_t>(bag, 0), static_cast<int64_t>(a.tables.size()) * batch - 1);
  const int64_t t = bag / batch;
  throw std::out_of_range("index " + std::to_string(value) + " at position " + std::to_string(pos) + " (table " +
                          std::to_string(t) + ", bag " + std::to_string(bag % batch) + ") is out of range [0, " +
                          std::to_string(a.tables[t].num_rows) + ")");
}

}  // namespace

int64_t bags_batch_size(const BagsArgs& a) {
  const int64_t T = static_cast<int64_t>(a.tables.size());
  if (T == 0) throw std::invalid_argument("at least one table is required");
  if (a.num_offsets < 1 || (a.num_offsets - 1) % T != 0) {
    throw std::invalid_argument("offsets must have length T*B + 1 (T=" + std::to_string(T) + " tables), got length " +
                                std::to_string(a.num_offsets));
  }
  return (a.num_offsets - 1) / T;
}

namespace {

// embedding_bags up to its wait: the checks, the launches and the copy of the error slot to its
// pinned host half, all queued on the caller's stream. Null when there was nothing to launch
// (2-D ids with B = 0). *batch receives B.
std::unique_ptr<SlotLease> queue_bags(const BagsArgs& a, int64_t* batch_out) {
  const int64_t T = static_cast<int64_t>(a.tables.size());
  const int64_t batch = bags_batch_size(a);
  *batch_out = batch;
  if (a.num_indices < 0) throw std::invalid_argument("num_indices must be >= 0");
  if (a.fixed_len >= 0) {
    if (T != 1 || a.num_indices != batch * a.fixed_len) {
      throw std::invalid_argument("2-D indices: one table and B * L indices are required");
    }
  } else if (a.offsets == nullptr) {
    throw std::invalid_argument("offsets are required");
  }
  if (a.num_indices > 0 && a.indices == nullptr) throw std::invalid_argument("indices: null pointer");
  if (a.per_sample_weights != nullptr) {
    for (const BagTable& t : a.tables) {
      if (t.mode != 0) throw std::invalid_argument("per_sample_weights is only supported with mode 'sum'");
    }
  }

  std::vector<Planned> plans;
  plans.reserve(T);
  int64_t col = 0;
  for (int64_t t = 0; t < T; ++t) {
    plans.push_back(describe(a.tables[t], t, batch, col));
    col += a.tables[t].dim;
  }
  if (col > INT32_MAX) throw std::invalid_argument("the tables' dims add up to more than 2^31 columns");
  if (batch > 0 && col > 0 && a.out == nullptr) throw std::invalid_argument("out: null pointer");

  DeviceScope guard(a.device);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  if (a.fixed_len >= 0 && batch == 0) return nullptr;  // nothing to pool and no offsets to check

  // One launch per variant present (per kMaxTablesPerLaunch tables of it), in table order.
  std::vector<int64_t> order(T);
  for (int64_t t = 0; t < T; ++t) order[t] = t;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return plans[x].variant < plans[y].variant; });
  auto lease = std::make_unique<SlotLease>(a.device, stream);
  bool first_launch = true;
  for (int64_t i0 = 0; i0 < T;) {
    const int variant = plans[order[i0]].variant;
    Params p;
    std::memset(&p, 0, sizeof(p));
    int64_t total = 0, nt = 0;
    for (; i0 < T && nt < kMaxTablesPerLaunch && plans[order[i0]].variant == variant; ++i0, ++nt) {
      p.tab[nt] = plans[order[i0]].desc;
      p.tab[nt].warp_begin = total;
      total += plans[order[i0]].warps;
    }
    p.indices = a.indices;
    p.offsets = a.offsets;
    p.psw = a.per_sample_weights;
    p.out = a.out;
    p.err = lease->slot().dev;
    p.num_indices = a.num_indices;
    p.num_offsets = a.num_offsets;
    p.fixed_len = a.fixed_len;
    p.batch = batch;
    p.out_stride = col;
    p.total_warps = total;
    p.num_tables = static_cast<int32_t>(nt);
    p.off64 = a.offsets_int64;
    p.check_ends = first_launch && a.fixed_len < 0;
    first_launch = false;
    if (total == 0 && !p.check_ends) continue;
    const int64_t blocks = std::max<int64_t>(1, (total + kWarpsPerBlock - 1) / kWarpsPerBlock);
    if (blocks > INT32_MAX) throw std::invalid_argument("embedding_bags: batch too large for one launch");
    FASTREC_LAUNCH(pick_kernel(variant, a.indices_int64, a.per_sample_weights != nullptr),
                   static_cast<unsigned>(blocks), kBlockThreads, 0, stream)(p);
    FASTREC_CUDA_CHECK_LAUNCH();
  }
  FASTREC_CUDA_CHECK(cudaMemcpyAsync(lease->slot().host, lease->slot().dev, 2 * sizeof(unsigned long long),
                                     cudaMemcpyDeviceToHost, stream));
  return lease;
}

// After the stream has passed queue_bags' copy (the caller waited for it, on a.device): throws
// what the kernel flagged (std::invalid_argument for the offsets, std::out_of_range for an id).
// The slot goes back to the pool reset, error or not.
void finish_bags(const BagsArgs& a, int64_t batch, SlotLease& lease, cudaStream_t stream) {
  const unsigned long long* err = lease.slot().host;
  const unsigned long long bad_id = err[0], bad_off = err[1];
  if (bad_id == kNoError && bad_off == kNoError) {
    lease.set_clean();
    return;
  }
  FASTREC_CUDA_CHECK(cudaMemsetAsync(lease.slot().dev, 0xFF, 2 * sizeof(unsigned long long), stream));
  FASTREC_CUDA_CHECK(cudaStreamSynchronize(stream));
  lease.set_clean();
  if (bad_off != kNoError) throw_offsets_error(offsets_on_host(a, stream), a.num_indices);
  throw_index_error(a, batch, static_cast<int64_t>(bad_id), stream);
}

}  // namespace

void embedding_bags(const BagsArgs& a) {
  int64_t batch = 0;
  std::unique_ptr<SlotLease> lease = queue_bags(a, &batch);
  if (!lease) return;
  DeviceScope guard(a.device);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  FASTREC_CUDA_CHECK(cudaStreamSynchronize(stream));
  finish_bags(a, batch, *lease, stream);
}

struct PendingBags::State {
  BagsArgs args;
  int64_t batch = 0;
  std::unique_ptr<SlotLease> lease;  // null once checked (or when nothing was launched)
  std::mutex mu;
};

PendingBags::PendingBags(const BagsArgs& a) : s_(new State) {
  s_->args = a;
  s_->lease = queue_bags(s_->args, &s_->batch);
}

// Unchecked, the lease is dropped without set_clean(): its slot stays out of the pool, since the
// kernel or the copy may still write it.
PendingBags::~PendingBags() = default;

void PendingBags::check() {
  std::lock_guard<std::mutex> lock(s_->mu);
  if (!s_->lease) return;
  DeviceScope guard(s_->args.device);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(s_->args.stream);
  FASTREC_CUDA_CHECK(cudaStreamSynchronize(stream));  // (a failed wait leaves the check armed)
  std::unique_ptr<SlotLease> lease = std::move(s_->lease);  // read once from here on, error or not
  finish_bags(s_->args, s_->batch, *lease, stream);
}

}  // namespace cuda
}  // namespace fastrec
