// AVX-512 top-k kernels: fp32/fp16 panel scoring (8 queries x 32 items a tile, FMA) and the
// threshold check (compare + compress-store of the surviving positions).
#include <immintrin.h>

#include "fastrec/dispatch.h"

namespace fastrec {
namespace avx512 {
namespace {

template <bool H>
inline __m512 load_panel(const void* base, int64_t at) {
  if (H) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + at)));
  }
  return _mm512_loadu_ps(static_cast<const float*>(base) + at);
}

// MR queries x NP panels of 16 items; accumulators stay in registers (MR * NP <= 16).
template <int MR, int NP, bool H>
void tile(const FloatScoreJob& j, int64_t r0, int64_t p0) {
  __m512 acc[MR][NP];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_ps();
  }
  const float* q = j.q + r0 * j.ldq;
  const int64_t pstride = j.D * 16;
  const int64_t base = p0 * pstride;
  for (int64_t d = 0; d < j.D; ++d) {
    __m512 w[NP];
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) w[p] = load_panel<H>(j.panels, base + p * pstride + d * 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 qv = _mm512_set1_ps(q[r * j.ldq + d]);
#pragma GCC unroll 2
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_fmadd_ps(qv, w[p], acc[r][p]);
    }
  }
  float* c = j.c + r0 * j.ldc + p0 * 16;
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(c + r * j.ldc + p * 16, acc[r][p]);
  }
}

template <int MR, bool H>
void rows(const FloatScoreJob& j, int64_t r0) {
  int64_t p = 0;
  for (; p + 2 <= j.npanels; p += 2) tile<MR, 2, H>(j, r0, p);
  if (p < j.npanels) tile<MR, 1, H>(j, r0, p);
}

template <bool H>
void score(const FloatScoreJob& j) {
  int64_t r = 0;
  for (; r + 8 <= j.rows; r += 8) rows<8, H>(j, r);
  switch (j.rows - r) {
    case 7: rows<7, H>(j, r); break;
    case 6: rows<6, H>(j, r); break;
    case 5: rows<5, H>(j, r); break;
    case 4: rows<4, H>(j, r); break;
    case 3: rows<3, H>(j, r); break;
    case 2: rows<2, H>(j, r); break;
    case 1: rows<1, H>(j, r); break;
    default: break;
  }
}

}  // namespace

void score_float(const FloatScoreJob& j) {
  if (j.f16) {
    score<true>(j);
  } else {
    score<false>(j);
  }
}

int64_t select_ge(const float* s, int64_t n, float thr, int32_t* pos) {
  const __m512 t = _mm512_set1_ps(thr);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t cnt = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + i), t, _CMP_GE_OQ);
    if (m) {
      _mm512_mask_compressstoreu_epi32(pos + cnt, m, idx);
      cnt += __builtin_popcount(m);
    }
    idx = _mm512_add_epi32(idx, step);
  }
  if (i < n) {
    const __mmask16 live = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __mmask16 m = _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, s + i), t, _CMP_GE_OQ);
    if (m) {
      _mm512_mask_compressstoreu_epi32(pos + cnt, m, idx);
      cnt += __builtin_popcount(m);
    }
  }
  return cnt;
}

}  // namespace avx512
}  // namespace fastrec
