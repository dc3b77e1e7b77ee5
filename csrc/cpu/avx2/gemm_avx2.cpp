// AVX2 int8 GEMM. vpmaddubsw would saturate its 16-bit pair sums (u8 x s8), so this kernel
// sign-extends both operands to 16 bits and uses vpmaddwd, whose int16 x int16 pair sums fit
// int32 exactly: the result equals the scalar reference bit for bit. It reads the same packed
// weight blocks as the VNNI kernel ([Np/16][Kp/4][16 channels][4 k]).
#include <immintrin.h>

#include <cstring>

#include "fastrec/dispatch.h"

namespace fastrec {
namespace avx2 {
namespace {

// The 16 int32 sums of one block from four accumulators of (channel, k-pair) partial sums.
inline void reduce16(const __m256i acc[4], __m256i* lo, __m256i* hi) {
  *lo = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[0], acc[1]), 0xD8);  // channels 0-7
  *hi = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[2], acc[3]), 0xD8);  // channels 8-15
}

// Epilogue for one row of one 16-channel block, from its four accumulators.
void finish(const GemmJob& j, int64_t m, int64_t nb, const __m256i acc[4]) {
  const PackedB& b = *j.b;
  const int64_t n0 = nb * 16;
  const int64_t valid = b.N - n0 < 16 ? b.N - n0 : 16;
  __m256i sums[2];
  reduce16(acc, &sums[0], &sums[1]);
  alignas(32) int32_t s32[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(s32), sums[0]);
  _mm256_store_si256(reinterpret_cast<__m256i*>(s32 + 8), sums[1]);
  if (j.epilogue == Epilogue::kInt32) {
    std::memcpy(j.c32 + m * j.ldc + n0, s32, static_cast<size_t>(valid) * 4);
    return;
  }
  alignas(32) float y[16];
  for (int h = 0; h < 2; ++h) {
    const __m256 s = _mm256_mul_ps(_mm256_set1_ps(j.a_scale[m]), _mm256_loadu_ps(b.scale + n0 + 8 * h));
    __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(sums[h]), s);
    if (b.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(b.bias + n0 + 8 * h));
    if (j.epilogue == Epilogue::kRelu) v = _mm256_max_ps(v, _mm256_setzero_ps());
    _mm256_store_ps(y + 8 * h, v);
  }
  std::memcpy(j.c + m * j.ldc + n0, y, static_cast<size_t>(valid) * 4);
}

// 16 channels of MR (1-2) rows. Accumulators are named variables: with arrays GCC 12 spilled
// all of them to the stack on every iteration.
template <int MR>
void block(const GemmJob& j, int64_t m, int64_t nb) {
  const PackedB& b = *j.b;
  const int64_t kg = b.Kp / 4;
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c03 = c00;
  __m256i c10 = c00, c11 = c00, c12 = c00, c13 = c00;
  const int8_t* w = b.packed + nb * 16 * b.Kp;
  const uint8_t* a0 = j.a + m * j.lda;
  const uint8_t* a1 = a0 + (MR > 1 ? j.lda : 0);
  const __m128i k128 = _mm_set1_epi16(128);
  for (int64_t g = 0; g < kg; ++g) {
    // Four u8 activations -> four int16 (q = u8 - 128), repeated across the register.
    int32_t f0, f1;
    std::memcpy(&f0, a0 + 4 * g, 4);
    const __m256i q0 = _mm256_broadcastq_epi64(_mm_sub_epi16(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(f0)), k128));
    __m256i q1 = q0;
    if constexpr (MR > 1) {
      std::memcpy(&f1, a1 + 4 * g, 4);
      q1 = _mm256_broadcastq_epi64(_mm_sub_epi16(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(f1)), k128));
    }
    const int8_t* wg = w + g * 64;
#define FASTREC_STEP(i)                                                                                        \
  {                                                                                                            \
    const __m256i w16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 16 * i))); \
    c0##i = _mm256_add_epi32(c0##i, _mm256_madd_epi16(w16, q0));                                               \
    if constexpr (MR > 1) c1##i = _mm256_add_epi32(c1##i, _mm256_madd_epi16(w16, q1));                         \
  }
    FASTREC_STEP(0) FASTREC_STEP(1) FASTREC_STEP(2) FASTREC_STEP(3)
#undef FASTREC_STEP
  }
  const __m256i r0[4] = {c00, c01, c02, c03};
  finish(j, m, nb, r0);
  if constexpr (MR > 1) {
    const __m256i r1[4] = {c10, c11, c12, c13};
    finish(j, m + 1, nb, r1);
  }
}

}  // namespace

void gemm_s8(const GemmJob& j) {
  if (zero_sum_guard_needed(j)) return ref::gemm_s8(j);
  for (int64_t nb = j.nb0; nb < j.nb1; ++nb) {
    int64_t m = j.m0;
    for (; m + 2 <= j.m1; m += 2) block<2>(j, m, nb);
    if (m < j.m1) block<1>(j, m, nb);
  }
}

}  // namespace avx2
}  // namespace fastrec
