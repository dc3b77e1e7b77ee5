// AVX2 + FMA + F16C embedding bag. Compiled with its own flags; only ever called after
// cpu_features() said the CPU and the OS support it. AVX2 has no byte-masked loads, so a
// partial last block is copied into a zeroed buffer first (never reading past the row).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "fastrec/dispatch.h"
#include "fastrec/embedding.h"

namespace fastrec {
namespace avx2 {
namespace {

struct V {
  using reg = __m256;
  static constexpr int kLanes = 8;
  static __m256i lane_mask(int r) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static reg zero() { return _mm256_setzero_ps(); }
  static reg neg_inf() { return _mm256_set1_ps(-__builtin_inff()); }
  static reg set1(float f) { return _mm256_set1_ps(f); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  // Loads `nbytes` (< 16 for a partial block) into the low bytes of a zeroed xmm.
  static __m128i load_partial(const void* p, int nbytes) {
    alignas(16) uint8_t buf[16] = {0};
    std::memcpy(buf, p, static_cast<size_t>(nbytes));
    return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
  }
  static reg load_f32(const float* p, int r) {
    return r == kLanes ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lane_mask(r));
  }
  static reg load_f16(const uint16_t* p, int r) {
    const __m128i h = r == kLanes ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)) : load_partial(p, 2 * r);
    return _mm256_cvtph_ps(h);
  }
  static reg load_q8(const uint8_t* p, int r) {
    const __m128i b = r == kLanes ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)) : load_partial(p, r);
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  }
  static reg load_q4(const uint8_t* p, int r) {
    int32_t word;
    __m128i b;
    if (r == kLanes) {
      std::memcpy(&word, p, 4);
      b = _mm_cvtsi32_si128(word);
    } else {
      b = load_partial(p, (r + 1) / 2);
    }
    const __m128i dup = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(dup), _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4)),
                                       _mm256_set1_epi32(0xF));
    return _mm256_cvtepi32_ps(q);
  }
  static reg load_q2(const uint8_t* p, int r) {
    int16_t half;
    __m128i b;
    if (r == kLanes) {
      std::memcpy(&half, p, 2);
      b = _mm_cvtsi32_si128(static_cast<uint16_t>(half));
    } else {
      b = load_partial(p, (r + 3) / 4);
    }
    const __m128i dup = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(dup), _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)),
                                       _mm256_set1_epi32(0x3));
    return _mm256_cvtepi32_ps(q);
  }
  static void store(float* p, reg v, int r) {
    if (r == kLanes) {
      _mm256_storeu_ps(p, v);
    } else {
      _mm256_maskstore_ps(p, lane_mask(r), v);
    }
  }
  static float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
};

#include "../embedding_kernel.inc"

}  // namespace

void embedding_bag(const BagJob& job, BagError* err) { run_embedding_bag(job, err); }

}  // namespace avx2
}  // namespace fastrec
