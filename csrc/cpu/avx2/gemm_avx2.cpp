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

template <int MR>
void block(const GemmJob& j, int64_t m, int64_t nb) {
  const PackedB& b = *j.b;
  const int64_t kg = b.Kp / 4;
  __m256i acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_si256();
  const int8_t* w = b.packed + nb * 16 * b.Kp;
  const __m128i k128 = _mm_set1_epi16(128);
  for (int64_t g = 0; g < kg; ++g) {
    __m256i a16[MR];
    for (int r = 0; r < MR; ++r) {
      int32_t four;
      std::memcpy(&four, j.a + (m + r) * j.lda + 4 * g, 4);
      const __m128i q = _mm_sub_epi16(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(four)), k128);  // 4 x int16
      a16[r] = _mm256_broadcastq_epi64(q);
    }
    for (int i = 0; i < 4; ++i) {
      const __m256i w16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * 64 + 16 * i)));
      for (int r = 0; r < MR; ++r) acc[r][i] = _mm256_add_epi32(acc[r][i], _mm256_madd_epi16(w16, a16[r]));
    }
  }
  const int64_t n0 = nb * 16;
  const int64_t valid = b.N - n0 < 16 ? b.N - n0 : 16;
  for (int r = 0; r < MR; ++r) {
    __m256i sums[2];
    reduce16(acc[r], &sums[0], &sums[1]);
    alignas(32) int32_t s32[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(s32), sums[0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(s32 + 8), sums[1]);
    if (j.epilogue == Epilogue::kInt32) {
      std::memcpy(j.c32 + (m + r) * j.ldc + n0, s32, static_cast<size_t>(valid) * 4);
      continue;
    }
    alignas(32) float y[16];
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_mul_ps(_mm256_set1_ps(j.a_scale[m + r]), _mm256_loadu_ps(b.scale + n0 + 8 * h));
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(sums[h]), s);
      if (b.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(b.bias + n0 + 8 * h));
      if (j.epilogue == Epilogue::kRelu) v = _mm256_max_ps(v, _mm256_setzero_ps());
      _mm256_store_ps(y + 8 * h, v);
    }
    std::memcpy(j.c + (m + r) * j.ldc + n0, y, static_cast<size_t>(valid) * 4);
  }
}

}  // namespace

void gemm_s8(const GemmJob& j) {
  for (int64_t nb = j.nb0; nb < j.nb1; ++nb) {
    int64_t m = j.m0;
    for (; m + 2 <= j.m1; m += 2) block<2>(j, m, nb);
    if (m < j.m1) block<1>(j, m, nb);
  }
}

}  // namespace avx2
}  // namespace fastrec
