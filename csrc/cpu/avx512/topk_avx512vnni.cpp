// AVX-512 VNNI fused int8 scoring + threshold check for the top-k search.
//
// One register tile is MR queries (up to 6) x NR panels of 16 items (up to 4): vpdpbusd
// accumulates u8 query codes (q + 128) times s8 item codes; accumulators start at -comp, which
// undoes the +128. The epilogue turns each accumulator into scores with the same float
// operations as the GEMM epilogue (float(acc) * (a_scale * item_scale)), compares them with the
// query's threshold, and writes only the scores that pass: the score tile never goes to memory.
// Only called when cpu_features() reports AVX-512 VNNI.
#include <immintrin.h>

#include "fastrec/dispatch.h"

namespace fastrec {
namespace avx512vnni {
namespace {

inline __m512i broadcast4(const uint8_t* p) {
  return _mm512_castps_si512(_mm512_broadcastss_ps(_mm_load_ss(reinterpret_cast<const float*>(p))));
}

// acc += dot4(a, b) per int32 lane. Inline asm ties the accumulator to one register: with the
// intrinsic, GCC 12 copies every accumulator between registers (and spills) each iteration.
__attribute__((always_inline)) inline void dpbusd(__m512i& acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

inline __mmask16 lanes(int64_t valid) {
  return valid >= 16 ? static_cast<__mmask16>(0xffff) : valid <= 0 ? 0 : static_cast<__mmask16>((1u << valid) - 1u);
}

// Scores of one row against NR panels (accumulators by value: no array, so they stay in
// registers); appends the passing ones.
template <int NR>
__attribute__((always_inline)) inline void emit_row(const Int8TopkJob& j, int64_t r, int64_t p0, __m512i x0,
                                                    __m512i x1, __m512i x2, __m512i x3, __m512 bs0, __m512 bs1,
                                                    __m512 bs2, __m512 bs3, __mmask16 v0, __mmask16 v1,
                                                    __mmask16 v2, __mmask16 v3, int64_t* nhits) {
  const __m512 as = _mm512_set1_ps(j.a_scale[r]);
  const __m512 th = _mm512_set1_ps(j.thr[r]);
  const __m512 s0 = _mm512_mul_ps(_mm512_cvtepi32_ps(x0), _mm512_mul_ps(as, bs0));
  const __m512 s1 = NR > 1 ? _mm512_mul_ps(_mm512_cvtepi32_ps(x1), _mm512_mul_ps(as, bs1)) : s0;
  const __m512 s2 = NR > 2 ? _mm512_mul_ps(_mm512_cvtepi32_ps(x2), _mm512_mul_ps(as, bs2)) : s0;
  const __m512 s3 = NR > 3 ? _mm512_mul_ps(_mm512_cvtepi32_ps(x3), _mm512_mul_ps(as, bs3)) : s0;
  const unsigned m0 = _mm512_mask_cmp_ps_mask(v0, s0, th, _CMP_GE_OQ);
  const unsigned m1 = NR > 1 ? _mm512_mask_cmp_ps_mask(v1, s1, th, _CMP_GE_OQ) : 0u;
  const unsigned m2 = NR > 2 ? _mm512_mask_cmp_ps_mask(v2, s2, th, _CMP_GE_OQ) : 0u;
  const unsigned m3 = NR > 3 ? _mm512_mask_cmp_ps_mask(v3, s3, th, _CMP_GE_OQ) : 0u;
  if (__builtin_expect((m0 | m1 | m2 | m3) == 0, 1)) return;
  alignas(64) float tmp[4][16];
  _mm512_store_ps(tmp[0], s0);
  _mm512_store_ps(tmp[1], s1);
  _mm512_store_ps(tmp[2], s2);
  _mm512_store_ps(tmp[3], s3);
  const unsigned masks[4] = {m0, m1, m2, m3};
  for (int c = 0; c < NR; ++c) {
    for (unsigned bits = masks[c]; bits; bits &= bits - 1) {
      const int lane = __builtin_ctz(bits);
      TopkHit& h = j.hits[(*nhits)++];
      h.row = static_cast<int32_t>(r);
      h.item = static_cast<int32_t>((p0 + c) * 16 + lane);
      h.score = tmp[c][lane];
    }
  }
}

// Named accumulators (GCC spills arrays of them); rows and panels beyond MR / NR are dead code.
template <int MR, int NR>
void tile(const Int8TopkJob& j, int64_t r0, int64_t p0, int64_t* nhits) {
  const PackedB& b = *j.b;
  const int64_t kg = b.Kp / 4;
  const int8_t* w = b.packed + p0 * 16 * b.Kp;
  const uint8_t* a = j.a + r0 * j.lda;
  const __m512i zero = _mm512_setzero_si512();
  const __m512i i0 = _mm512_sub_epi32(zero, _mm512_loadu_si512(b.comp + p0 * 16));
  const __m512i i1 = NR > 1 ? _mm512_sub_epi32(zero, _mm512_loadu_si512(b.comp + p0 * 16 + 16)) : zero;
  const __m512i i2 = NR > 2 ? _mm512_sub_epi32(zero, _mm512_loadu_si512(b.comp + p0 * 16 + 32)) : zero;
  const __m512i i3 = NR > 3 ? _mm512_sub_epi32(zero, _mm512_loadu_si512(b.comp + p0 * 16 + 48)) : zero;
#define FASTREC_INIT(r) __m512i c##r##0 = i0, c##r##1 = i1, c##r##2 = i2, c##r##3 = i3;
  FASTREC_INIT(0) FASTREC_INIT(1) FASTREC_INIT(2) FASTREC_INIT(3) FASTREC_INIT(4) FASTREC_INIT(5)
#undef FASTREC_INIT
  for (int64_t g = 0; g < kg; ++g) {
    if constexpr (MR <= 2) {
      // Few queries: the kernel streams items from memory; fetch the tile after next (8 KB
      // ahead) so several cache lines are always in flight.
      const int8_t* ahead = w + 8 * kg * 64 + g * 64;
      _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead + kg * 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead + 2 * kg * 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead + 3 * kg * 64), _MM_HINT_T0);
    }
    const __m512i b0 = _mm512_loadu_si512(w + g * 64);
    const __m512i b1 = NR > 1 ? _mm512_loadu_si512(w + (kg + g) * 64) : b0;
    const __m512i b2 = NR > 2 ? _mm512_loadu_si512(w + (2 * kg + g) * 64) : b0;
    const __m512i b3 = NR > 3 ? _mm512_loadu_si512(w + (3 * kg + g) * 64) : b0;
#define FASTREC_ROW(r)                                                    \
  if constexpr (MR > r) {                                                 \
    const __m512i av = broadcast4(a + r * j.lda + g * 4);                 \
    dpbusd(c##r##0, av, b0);                       \
    if constexpr (NR > 1) dpbusd(c##r##1, av, b1); \
    if constexpr (NR > 2) dpbusd(c##r##2, av, b2); \
    if constexpr (NR > 3) dpbusd(c##r##3, av, b3); \
  }
    FASTREC_ROW(0) FASTREC_ROW(1) FASTREC_ROW(2) FASTREC_ROW(3) FASTREC_ROW(4) FASTREC_ROW(5)
#undef FASTREC_ROW
  }
  const __m512 bs0 = _mm512_loadu_ps(b.scale + p0 * 16);
  const __m512 bs1 = NR > 1 ? _mm512_loadu_ps(b.scale + p0 * 16 + 16) : bs0;
  const __m512 bs2 = NR > 2 ? _mm512_loadu_ps(b.scale + p0 * 16 + 32) : bs0;
  const __m512 bs3 = NR > 3 ? _mm512_loadu_ps(b.scale + p0 * 16 + 48) : bs0;
  const __mmask16 v0 = lanes(b.N - p0 * 16), v1 = lanes(b.N - p0 * 16 - 16);
  const __mmask16 v2 = lanes(b.N - p0 * 16 - 32), v3 = lanes(b.N - p0 * 16 - 48);
#define FASTREC_EMIT(r)                                                                                   \
  if constexpr (MR > r) {                                                                                 \
    emit_row<NR>(j, r0 + r, p0, c##r##0, c##r##1, c##r##2, c##r##3, bs0, bs1, bs2, bs3, v0, v1, v2, v3, \
                 nhits);                                                                                  \
  }
  FASTREC_EMIT(0) FASTREC_EMIT(1) FASTREC_EMIT(2) FASTREC_EMIT(3) FASTREC_EMIT(4) FASTREC_EMIT(5)
#undef FASTREC_EMIT
}

template <int MR>
void row_block(const Int8TopkJob& j, int64_t r0, int64_t* nhits) {
  const int64_t np = j.b->Np / 16;
  int64_t p = 0;
  for (; p + 4 <= np; p += 4) tile<MR, 4>(j, r0, p, nhits);
  switch (np - p) {
    case 3: tile<MR, 3>(j, r0, p, nhits); break;
    case 2: tile<MR, 2>(j, r0, p, nhits); break;
    case 1: tile<MR, 1>(j, r0, p, nhits); break;
    default: break;
  }
}

}  // namespace

int64_t topk_s8(const Int8TopkJob& j) {
  int64_t nhits = 0;
  int64_t r = 0;
  for (; r + 6 <= j.rows; r += 6) row_block<6>(j, r, &nhits);
  switch (j.rows - r) {
    case 5: row_block<5>(j, r, &nhits); break;
    case 4: row_block<4>(j, r, &nhits); break;
    case 3: row_block<3>(j, r, &nhits); break;
    case 2: row_block<2>(j, r, &nhits); break;
    case 1: row_block<1>(j, r, &nhits); break;
    default: break;
  }
  return nhits;
}

}  // namespace avx512vnni
}  // namespace fastrec
