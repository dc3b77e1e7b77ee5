// AVX-512 dot interaction. For D a multiple of 16 up to 128, v_i is held in NC registers while
// it meets every v_j with j < i; four dot products are reduced together (one shuffle tree for
// four sums instead of four). Other D: masked loads, one dot at a time.
#include <immintrin.h>

#include "fastrec/dispatch.h"

namespace fastrec {
namespace avx512 {
namespace {

// Sums of the 16 lanes of a, b, c, d -> lanes 0..3 of the result.
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // 512 -> 256: add the halves
  const __m256 a2 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  const __m256 b2 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
  const __m256 c2 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
  const __m256 d2 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
  // pairwise horizontal adds: [a01 a23 b01 b23 | a45 a67 b45 b67], same for c, d
  const __m256 ab = _mm256_hadd_ps(a2, b2);
  const __m256 cd = _mm256_hadd_ps(c2, d2);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // [a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7]
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

template <int NC>
void sample_fixed(const float* x, const float* e, int64_t T, float* o) {
  constexpr int64_t D = NC * 16;
  for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_loadu_ps(x + d));
  int64_t at = D;
  for (int64_t i = 1; i <= T; ++i) {
    const float* vi = e + (i - 1) * D;
    __m512 r[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) r[c] = _mm512_loadu_ps(vi + 16 * c);
    auto dot = [&](int64_t k) {
      const float* vk = k == 0 ? x : e + (k - 1) * D;
      __m512 acc = _mm512_mul_ps(r[0], _mm512_loadu_ps(vk));
#pragma GCC unroll 8
      for (int c = 1; c < NC; ++c) acc = _mm512_fmadd_ps(r[c], _mm512_loadu_ps(vk + 16 * c), acc);
      return acc;
    };
    int64_t k = 0;
    for (; k + 4 <= i; k += 4) {
      _mm_storeu_ps(o + at, hsum4(dot(k), dot(k + 1), dot(k + 2), dot(k + 3)));
      at += 4;
    }
    for (; k < i; ++k) o[at++] = _mm512_reduce_add_ps(dot(k));
  }
}

void sample_any(const float* x, const float* e, int64_t T, int64_t D, float* o) {
  const int64_t full = D / 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (D % 16)) - 1u);
  for (int64_t d = 0; d < D; ++d) o[d] = x[d];
  int64_t at = D;
  for (int64_t i = 1; i <= T; ++i) {
    const float* vi = e + (i - 1) * D;
    for (int64_t k = 0; k < i; ++k) {
      const float* vk = k == 0 ? x : e + (k - 1) * D;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < full; ++c) {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(vi + 16 * c), _mm512_loadu_ps(vk + 16 * c), acc);
      }
      if (tail) {
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, vi + 16 * full),
                              _mm512_maskz_loadu_ps(tail, vk + 16 * full), acc);
      }
      o[at++] = _mm512_reduce_add_ps(acc);
    }
  }
}

}  // namespace

void dot_interaction(const InteractionJob& j) {
  const int64_t width = j.D + (j.T + 1) * j.T / 2;
  for (int64_t b = j.b0; b < j.b1; ++b) {
    const float* x = j.bottom + b * j.D;
    const float* e = j.emb + b * j.T * j.D;
    float* o = j.out + b * width;
    switch (j.D) {
      case 16: sample_fixed<1>(x, e, j.T, o); break;
      case 32: sample_fixed<2>(x, e, j.T, o); break;
      case 64: sample_fixed<4>(x, e, j.T, o); break;
      case 128: sample_fixed<8>(x, e, j.T, o); break;
      default: sample_any(x, e, j.T, j.D, o); break;
    }
  }
}

}  // namespace avx512
}  // namespace fastrec
