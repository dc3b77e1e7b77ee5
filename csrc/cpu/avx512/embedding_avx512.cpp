// AVX-512 (F/BW/VL/DQ + F16C/FMA) embedding bag. Compiled with its own flags; only ever
// called after cpu_features() said the CPU and the OS support it.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "fastrec/dispatch.h"
#include "fastrec/embedding.h"

namespace fastrec {
namespace avx512 {
namespace {

struct V {
  using reg = __m512;
  static constexpr int kLanes = 16;
  static __mmask16 mask(int r) { return static_cast<__mmask16>((1u << r) - 1u); }
  static reg zero() { return _mm512_setzero_ps(); }
  static reg neg_inf() { return _mm512_set1_ps(-__builtin_inff()); }
  static reg set1(float f) { return _mm512_set1_ps(f); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg load_f32(const float* p, int r) { return _mm512_maskz_loadu_ps(mask(r), p); }
  static reg load_f16(const uint16_t* p, int r) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(r), p));
  }
  static reg load_q8(const uint8_t* p, int r) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask(r), p)));
  }
  // 16 nibbles from 8 bytes: duplicate each byte, then shift lanes by 0 / 4 and mask.
  static reg load_q4(const uint8_t* p, int r) {
    const __m128i bytes = _mm_maskz_loadu_epi8(mask((r + 1) / 2), p);
    const __m128i dup = _mm_shuffle_epi8(bytes, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
    const __m512i shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(dup), shifts), _mm512_set1_epi32(0xF));
    return _mm512_cvtepi32_ps(q);
  }
  // 16 two-bit codes from 4 bytes.
  static reg load_q2(const uint8_t* p, int r) {
    const __m128i bytes = _mm_maskz_loadu_epi8(mask((r + 3) / 4), p);
    const __m128i dup = _mm_shuffle_epi8(bytes, _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
    const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(dup), shifts), _mm512_set1_epi32(0x3));
    return _mm512_cvtepi32_ps(q);
  }
  static void store(float* p, reg v, int r) { _mm512_mask_storeu_ps(p, mask(r), v); }
  static float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
};

#include "../embedding_kernel.inc"

}  // namespace

void embedding_bag(const BagJob& job, BagError* err) { run_embedding_bag(job, err); }

}  // namespace avx512
}  // namespace fastrec
