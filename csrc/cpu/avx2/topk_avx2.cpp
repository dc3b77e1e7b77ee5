// AVX2 top-k kernels: fp32/fp16 panel scoring (4 queries x 16 items a tile, FMA; F16C for
// fp16) and the threshold check (compare + movemask, survivors are rare).
#include <immintrin.h>

#include "fastrec/dispatch.h"

namespace fastrec {
namespace avx2 {
namespace {

template <bool H>
inline __m256 load8(const void* base, int64_t at) {
  if (H) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + at)));
  }
  return _mm256_loadu_ps(static_cast<const float*>(base) + at);
}

// MR queries x one panel of 16 items (two ymm): 2 * MR accumulators.
template <int MR, bool H>
void tile(const FloatScoreJob& j, int64_t r0, int64_t p) {
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  const float* q = j.q + r0 * j.ldq;
  const int64_t base = p * j.D * 16;
  for (int64_t d = 0; d < j.D; ++d) {
    const __m256 w0 = load8<H>(j.panels, base + d * 16);
    const __m256 w1 = load8<H>(j.panels, base + d * 16 + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 qv = _mm256_broadcast_ss(q + r * j.ldq + d);
      lo[r] = _mm256_fmadd_ps(qv, w0, lo[r]);
      hi[r] = _mm256_fmadd_ps(qv, w1, hi[r]);
    }
  }
  float* c = j.c + r0 * j.ldc + p * 16;
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * j.ldc, lo[r]);
    _mm256_storeu_ps(c + r * j.ldc + 8, hi[r]);
  }
}

template <int MR, bool H>
void rows(const FloatScoreJob& j, int64_t r0) {
  for (int64_t p = 0; p < j.npanels; ++p) tile<MR, H>(j, r0, p);
}

template <bool H>
void score(const FloatScoreJob& j) {
  int64_t r = 0;
  for (; r + 6 <= j.rows; r += 6) rows<6, H>(j, r);
  switch (j.rows - r) {
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
  const __m256 t = _mm256_set1_ps(thr);
  int64_t cnt = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + i), t, _CMP_GE_OQ)));
    while (m) {
      pos[cnt++] = static_cast<int32_t>(i + __builtin_ctz(m));
      m &= m - 1;
    }
  }
  for (; i < n; ++i) {
    if (s[i] >= thr) pos[cnt++] = static_cast<int32_t>(i);
  }
  return cnt;
}

}  // namespace avx2
}  // namespace fastrec
