// AVX-512 VNNI int8 GEMM: vpdpbusd multiplies u8 activations (q + 128) by s8 weights and adds
// groups of four into int32 lanes, exactly; the +128 is undone with the per-channel
// compensation 128 * sum_k w. Register tile: MR rows x NR blocks of 16 channels. Only called
// when cpu_features() reports AVX-512 VNNI.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "fastrec/dispatch.h"

namespace fastrec {
namespace avx512vnni {
namespace {

// Epilogue for one 16-channel block of one row.
inline void store_block(const GemmJob& j, int64_t m, int64_t n0, __m512i acc) {
  const PackedB& b = *j.b;
  const int64_t valid = b.N - n0 < 16 ? b.N - n0 : 16;
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
  const __m512i exact = _mm512_sub_epi32(acc, _mm512_loadu_si512(b.comp + n0));
  if (j.epilogue == Epilogue::kInt32) {
    _mm512_mask_storeu_epi32(j.c32 + m * j.ldc + n0, mask, exact);
    return;
  }
  const __m512 s = _mm512_mul_ps(_mm512_set1_ps(j.a_scale[m]), _mm512_loadu_ps(b.scale + n0));
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), s);
  if (b.bias) y = _mm512_add_ps(y, _mm512_loadu_ps(b.bias + n0));
  if (j.epilogue == Epilogue::kRelu) y = _mm512_max_ps(y, _mm512_setzero_ps());
  _mm512_mask_storeu_ps(j.c + m * j.ldc + n0, mask, y);
}

// acc += dot4(a, b) per int32 lane, through inline asm that ties the accumulator to one
// register: with the intrinsic, GCC 12 copies every accumulator between registers on every
// iteration (and spills the edge tiles' arrays), which costs about half the throughput.
__attribute__((always_inline)) inline void dpbusd(__m512i& acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

inline __m512i broadcast4(const uint8_t* p) {
  // Four u8 activations broadcast straight from memory (a load-port broadcast; going through
  // a general register would put a shuffle on the port vpdpbusd needs).
  return _mm512_castps_si512(_mm512_broadcastss_ps(_mm_load_ss(reinterpret_cast<const float*>(p))));
}

// The main tile: MR (1-6) rows x 4 blocks of 16 channels, accumulators as named variables.
// (GCC copies an array of accumulators between register sets on every iteration, which
// halves the throughput; named variables keep the loop to loads and vpdpbusd.)
//
// K-blocking: with part != null the tile covers k-groups [g0, g1) only; it starts from the
// int32 partial sums in part (MR rows x 64 channels, row stride 64) unless `first`, and either
// stores its sums back there or, when `last`, runs the epilogue.
template <int MR>
void tile4(const GemmJob& j, int64_t m, int64_t nb, int64_t g0, int64_t g1, int32_t* part, bool first, bool last) {
  const PackedB& b = *j.b;
  const int64_t kg = b.Kp / 4;
  const int8_t* w0 = b.packed + nb * 16 * b.Kp;
  const int8_t* w1 = w0 + kg * 64;
  const int8_t* w2 = w1 + kg * 64;
  const int8_t* w3 = w2 + kg * 64;
  const uint8_t* a0 = j.a + m * j.lda;
  const uint8_t* a1 = a0 + (MR > 1 ? j.lda : 0);
  const uint8_t* a2 = a0 + (MR > 2 ? 2 * j.lda : 0);
  const uint8_t* a3 = a0 + (MR > 3 ? 3 * j.lda : 0);
  const uint8_t* a4 = a0 + (MR > 4 ? 4 * j.lda : 0);
  const uint8_t* a5 = a0 + (MR > 5 ? 5 * j.lda : 0);
#define FASTREC_Z(r) __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = c##r##0, c##r##2 = c##r##0, c##r##3 = c##r##0;
  FASTREC_Z(0) FASTREC_Z(1) FASTREC_Z(2) FASTREC_Z(3) FASTREC_Z(4) FASTREC_Z(5)
#undef FASTREC_Z
  if (part != nullptr && !first) {
#define FASTREC_LOAD(r)                                      \
  if constexpr (MR > r) {                                    \
    c##r##0 = _mm512_loadu_si512(part + (r) * 64);           \
    c##r##1 = _mm512_loadu_si512(part + (r) * 64 + 16);      \
    c##r##2 = _mm512_loadu_si512(part + (r) * 64 + 32);      \
    c##r##3 = _mm512_loadu_si512(part + (r) * 64 + 48);      \
  }
    FASTREC_LOAD(0) FASTREC_LOAD(1) FASTREC_LOAD(2) FASTREC_LOAD(3) FASTREC_LOAD(4) FASTREC_LOAD(5)
#undef FASTREC_LOAD
  }
  for (int64_t g = g0; g < g1; ++g) {
    const __m512i b0 = _mm512_loadu_si512(w0 + g * 64), b1 = _mm512_loadu_si512(w1 + g * 64);
    const __m512i b2 = _mm512_loadu_si512(w2 + g * 64), b3 = _mm512_loadu_si512(w3 + g * 64);
#define FASTREC_ROW(r)                                   \
  if constexpr (MR > r) {                                \
    const __m512i av = broadcast4(a##r + 4 * g);         \
    dpbusd(c##r##0, av, b0);      \
    dpbusd(c##r##1, av, b1);      \
    dpbusd(c##r##2, av, b2);      \
    dpbusd(c##r##3, av, b3);      \
  }
    FASTREC_ROW(0) FASTREC_ROW(1) FASTREC_ROW(2) FASTREC_ROW(3) FASTREC_ROW(4) FASTREC_ROW(5)
#undef FASTREC_ROW
  }
  if (part != nullptr && !last) {
#define FASTREC_KEEP(r)                                      \
  if constexpr (MR > r) {                                    \
    _mm512_storeu_si512(part + (r) * 64, c##r##0);           \
    _mm512_storeu_si512(part + (r) * 64 + 16, c##r##1);      \
    _mm512_storeu_si512(part + (r) * 64 + 32, c##r##2);      \
    _mm512_storeu_si512(part + (r) * 64 + 48, c##r##3);      \
  }
    FASTREC_KEEP(0) FASTREC_KEEP(1) FASTREC_KEEP(2) FASTREC_KEEP(3) FASTREC_KEEP(4) FASTREC_KEEP(5)
#undef FASTREC_KEEP
    return;
  }
  const int64_t n0 = nb * 16;
#define FASTREC_STORE(r)                                                      \
  if constexpr (MR > r) {                                                     \
    store_block(j, m + r, n0, c##r##0);                                       \
    store_block(j, m + r, n0 + 16, c##r##1);                                  \
    store_block(j, m + r, n0 + 32, c##r##2);                                  \
    store_block(j, m + r, n0 + 48, c##r##3);                                  \
  }
  FASTREC_STORE(0) FASTREC_STORE(1) FASTREC_STORE(2) FASTREC_STORE(3) FASTREC_STORE(4) FASTREC_STORE(5)
#undef FASTREC_STORE
}

// Edge tiles (fewer than 4 blocks left): MR rows x NR (1-3) blocks.
template <int MR, int NR>
void tile(const GemmJob& j, int64_t m, int64_t nb) {
  const PackedB& b = *j.b;
  const int64_t kg = b.Kp / 4;
  __m512i acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_si512();
  const int8_t* w = b.packed + nb * 16 * b.Kp;
  const uint8_t* a = j.a + m * j.lda;
  for (int64_t g = 0; g < kg; ++g) {
    __m512i wv[NR];
    for (int c = 0; c < NR; ++c) wv[c] = _mm512_loadu_si512(w + (c * kg + g) * 64);
    for (int r = 0; r < MR; ++r) {
      const __m512i av = broadcast4(a + r * j.lda + 4 * g);
      for (int c = 0; c < NR; ++c) dpbusd(acc[r][c], av, wv[c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) store_block(j, m + r, (nb + c) * 16, acc[r][c]);
}

template <int MR>
void row_block(const GemmJob& j, int64_t m) {
  int64_t nb = j.nb0;
  for (; nb + 4 <= j.nb1; nb += 4) tile4<MR>(j, m, nb, 0, j.b->Kp / 4, nullptr, true, true);
  switch (j.nb1 - nb) {
    case 3: tile<MR, 3>(j, m, nb); break;
    case 2: tile<MR, 2>(j, m, nb); break;
    case 1: tile<MR, 1>(j, m, nb); break;
    default: break;
  }
}

// Every row of the job over its channel blocks, whole K.
void all_rows(const GemmJob& j) {
  int64_t m = j.m0;
  for (; m + 6 <= j.m1; m += 6) row_block<6>(j, m);
  switch (j.m1 - m) {
    case 5: row_block<5>(j, m); break;
    case 4: row_block<4>(j, m); break;
    case 3: row_block<3>(j, m); break;
    case 2: row_block<2>(j, m); break;
    case 1: row_block<1>(j, m); break;
    default: break;
  }
}

// Rows [m0, m1) of one 64-channel column, k-groups [g0, g1), partial sums in part (row m at
// part + (m - m0) * 64).
void column_kblock(const GemmJob& j, int64_t m0, int64_t m1, int64_t nb, int64_t g0, int64_t g1, int32_t* part,
                   bool first, bool last) {
  int64_t m = m0;
  for (; m + 6 <= m1; m += 6) tile4<6>(j, m, nb, g0, g1, part + (m - m0) * 64, first, last);
  int32_t* p = part + (m - m0) * 64;
  switch (m1 - m) {
    case 5: tile4<5>(j, m, nb, g0, g1, p, first, last); break;
    case 4: tile4<4>(j, m, nb, g0, g1, p, first, last); break;
    case 3: tile4<3>(j, m, nb, g0, g1, p, first, last); break;
    case 2: tile4<2>(j, m, nb, g0, g1, p, first, last); break;
    case 1: tile4<1>(j, m, nb, g0, g1, p, first, last); break;
    default: break;
  }
}

// Long rows (K > 512): a 4-panel weight slice of the whole K no longer fits in L1 (it is
// 64 KB at K = 1024) and every 6-row tile would stream it from L2 again. Blocking K into
// 256-byte slices keeps a 16 KB slice in L1 while all rows of the job pass over it; the int32
// partial sums (60 rows x 64 channels, 15 KB) wait in a stack buffer between slices. That won
// on the Intel Xeon it was tuned on. On AMD Zen 4, streaming the whole panel from L2 for every
// tile was faster: rows x K x N on 2 threads, whole K against 64-group slices, interleaved
// (`gemm_ceiling 2 kslices`, benches/cpp/): 128 x 1024 x 1024 1.06x, 128 x 1024 x 512 1.06x,
// 128 x 2048 x 1024 1.09x, 128 x 4096 x 512 1.07x, 128 x 8192 x 256 1.06x, 1024 x 1024 x 1024
// 1.04x, 16 x 1024 x 1024 1.03x. There slices are 1024 groups (a 256 KB panel), so K <= 8192
// runs whole.
constexpr int64_t kKGroupsPerBlock = 64;
constexpr int64_t kKGroupsPerBlockAmd = 1024;
constexpr int64_t kRowsPerChunk = 60;  // ten 6-row tiles
// > 0: this many k-groups a slice whatever the vendor. benches/cpp/gemm_ceiling.cpp (which
// compiles this file in) defines it as a variable to compare slice sizes in one process.
#ifndef FASTREC_GEMM_K_SLICE_GROUPS
#define FASTREC_GEMM_K_SLICE_GROUPS 0
#endif

bool gemm_kblocked(const GemmJob& j) {
  const int64_t kg = j.b->Kp / 4;
  if (j.nb1 - j.nb0 < 4) return false;
  // Up to 2 slices' worth of K runs as one slice: no partial sums to keep.
  const int64_t forced = FASTREC_GEMM_K_SLICE_GROUPS;
  const int64_t block = forced > 0 ? forced : cpu_features().amd ? kKGroupsPerBlockAmd : kKGroupsPerBlock;
  const int64_t slice = kg <= 2 * block ? kg : block;
  alignas(64) int32_t part[kRowsPerChunk * 64];
  const int64_t full_end = j.nb0 + (j.nb1 - j.nb0) / 4 * 4;
  for (int64_t m0 = j.m0; m0 < j.m1; m0 += kRowsPerChunk) {
    const int64_t m1 = m0 + kRowsPerChunk < j.m1 ? m0 + kRowsPerChunk : j.m1;
    for (int64_t nb = j.nb0; nb < full_end; nb += 4) {
      for (int64_t g0 = 0; g0 < kg; g0 += slice) {
        const int64_t g1 = g0 + slice < kg ? g0 + slice : kg;
        column_kblock(j, m0, m1, nb, g0, g1, part, g0 == 0, g1 == kg);
      }
    }
  }
  if (full_end < j.nb1) {  // the last 1-3 channel blocks: unblocked edge tiles
    GemmJob rest = j;
    rest.nb0 = full_end;
    all_rows(rest);
  }
  return true;
}

}  // namespace

void gemm_s8(const GemmJob& j) {
  if (zero_sum_guard_needed(j)) return ref::gemm_s8(j);
  if (!gemm_kblocked(j)) all_rows(j);
}

// Two passes over each row (the second from L1): the row maximum of |x|, then the codes.
// Pass 1 takes the maximum of the |x| bit patterns as integers: for non-negative floats the
// integer order is the float order, and Inf / NaN patterns (>= 0x7f800000) sort above every
// finite value, so one max finds both the scale and any non-finite value (a float max would
// drop NaNs). Four accumulators keep the max chains off the critical path.
int64_t quantize_rows(const QuantizeJob& j) {
  int64_t bad_row = -1;
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const int64_t K = j.K, K64 = K / 64 * 64, K16 = K / 16 * 16;
  for (int64_t m = j.m0; m < j.m1; ++m) {
    const float* x = j.x + m * j.ldx;
    uint8_t* a = j.a + m * j.Kp;
    __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
    int64_t k = 0;
    const char* next = reinterpret_cast<const char*>(x + j.ldx);  // the next row, a line at a time
    for (; k < K64; k += 64) {
      // Rows are read once, from L3 or memory: fetch the next row's lines while this row runs
      // (a row of 1024 floats spans two 4 KB pages, where the hardware streamer starts over).
      for (int l = 0; l < 4; ++l) _mm_prefetch(next + 4 * k + 64 * l, _MM_HINT_T0);
      m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(x + k), abs_mask));
      m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_loadu_si512(x + k + 16), abs_mask));
      m2 = _mm512_max_epu32(m2, _mm512_and_si512(_mm512_loadu_si512(x + k + 32), abs_mask));
      m3 = _mm512_max_epu32(m3, _mm512_and_si512(_mm512_loadu_si512(x + k + 48), abs_mask));
    }
    for (; k < K; k += 16) {
      const __mmask16 mk = static_cast<__mmask16>(K - k >= 16 ? 0xFFFF : (1u << (K - k)) - 1u);
      m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_maskz_loadu_epi32(mk, x + k), abs_mask));
    }
    const uint32_t bits = _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_max_epu32(m0, m1), _mm512_max_epu32(m2, m3)));
    if (bits >= 0x7f800000u && bad_row < 0) bad_row = m;
    float amax;
    std::memcpy(&amax, &bits, sizeof amax);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    j.a_scale[m] = amax / 127.f;
    if (!(inv <= 3.4e38f)) {  // amax < ~4e-37: 127 / amax overflows; the reference scales the row first
      QuantizeJob one = j;
      one.m0 = m;
      one.m1 = m + 1;
      ref::quantize_rows(one);
      continue;
    }
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m128i bias = _mm_set1_epi8(static_cast<char>(0x80));
    // |x * inv| <= 127 (+ rounding) by construction, so rounding to the nearest integer (half
    // to even, as the reference) and narrowing with signed saturation gives q in [-127, 127];
    // xor 0x80 adds 128.
    for (k = 0; k < K16; k += 16) {
      const __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a + k), _mm_xor_si128(_mm512_cvtsepi32_epi8(q), bias));
    }
    if (k < K) {
      const __mmask16 mk = static_cast<__mmask16>((1u << (K - k)) - 1u);
      const __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + k), vinv),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_mask_storeu_epi8(a + k, mk, _mm_xor_si128(_mm512_cvtsepi32_epi8(q), bias));
    }
    for (k = K; k < j.Kp; ++k) a[k] = 128;
  }
  return bad_row;
}

}  // namespace avx512vnni
}  // namespace fastrec
