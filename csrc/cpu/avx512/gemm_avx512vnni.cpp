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

template <int MR, int NR>
void tile(const GemmJob& j, int64_t m, int64_t nb) {
  const PackedB& b = *j.b;
  const int64_t kg = b.Kp / 4;
  __m512i acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_si512();
  const int8_t* w = b.packed + nb * 16 * b.Kp;  // block nb starts at nb * (Kp/4) * 64 bytes
  const uint8_t* a = j.a + m * j.lda;
  for (int64_t g = 0; g < kg; ++g) {
    __m512i wv[NR];
    for (int c = 0; c < NR; ++c) wv[c] = _mm512_loadu_si512(w + (c * kg + g) * 64);
    for (int r = 0; r < MR; ++r) {
      int32_t four;
      std::memcpy(&four, a + r * j.lda + 4 * g, 4);
      const __m512i av = _mm512_set1_epi32(four);
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], av, wv[c]);
    }
  }
  for (int c = 0; c < NR; ++c) {
    const int64_t n0 = (nb + c) * 16;
    const int64_t valid = b.N - n0 < 16 ? b.N - n0 : 16;
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
    const __m512i comp = _mm512_loadu_si512(b.comp + n0);
    const __m512 ws = _mm512_loadu_ps(b.scale + n0);
    const __m512 bias = b.bias ? _mm512_loadu_ps(b.bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      const __m512i exact = _mm512_sub_epi32(acc[r][c], comp);
      if (j.epilogue == Epilogue::kInt32) {
        _mm512_mask_storeu_epi32(j.c32 + (m + r) * j.ldc + n0, mask, exact);
        continue;
      }
      const __m512 s = _mm512_mul_ps(_mm512_set1_ps(j.a_scale[m + r]), ws);
      __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(exact), s), bias);
      if (j.epilogue == Epilogue::kRelu) y = _mm512_max_ps(y, _mm512_setzero_ps());
      _mm512_mask_storeu_ps(j.c + (m + r) * j.ldc + n0, mask, y);
    }
  }
}

template <int MR>
void row_block(const GemmJob& j, int64_t m) {
  int64_t nb = j.nb0;
  for (; nb + 4 <= j.nb1; nb += 4) tile<MR, 4>(j, m, nb);
  switch (j.nb1 - nb) {
    case 3: tile<MR, 3>(j, m, nb); break;
    case 2: tile<MR, 2>(j, m, nb); break;
    case 1: tile<MR, 1>(j, m, nb); break;
    default: break;
  }
}

}  // namespace

void gemm_s8(const GemmJob& j) {
  int64_t m = j.m0;
  for (; m + 4 <= j.m1; m += 4) row_block<4>(j, m);
  switch (j.m1 - m) {
    case 3: row_block<3>(j, m); break;
    case 2: row_block<2>(j, m); break;
    case 1: row_block<1>(j, m); break;
    default: break;
  }
}

int64_t quantize_rows(const QuantizeJob& j) {
  int64_t bad_row = -1;
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t m = j.m0; m < j.m1; ++m) {
    const float* x = j.x + m * j.ldx;
    uint8_t* a = j.a + m * j.Kp;
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 nonfinite = 0;
    for (int64_t k = 0; k < j.K; k += 16) {
      const __mmask16 mk = static_cast<__mmask16>(j.K - k >= 16 ? 0xFFFF : (1u << (j.K - k)) - 1u);
      const __m512 v = _mm512_and_ps(_mm512_maskz_loadu_ps(mk, x + k), abs_mask);
      // |x| >= inf or NaN: compare not-less-than-infinity (true for NaN and Inf).
      nonfinite |= _mm512_mask_cmp_ps_mask(mk, v, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);
      vmax = _mm512_max_ps(vmax, v);
    }
    if (nonfinite && bad_row < 0) bad_row = m;
    const float amax = _mm512_reduce_max_ps(vmax);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    j.a_scale[m] = amax / 127.f;
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t k = 0; k < j.K; k += 16) {
      const __mmask16 mk = static_cast<__mmask16>(j.K - k >= 16 ? 0xFFFF : (1u << (j.K - k)) - 1u);
      __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + k), vinv),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm512_min_ps(_mm512_set1_ps(127.f), _mm512_max_ps(_mm512_set1_ps(-127.f), q));
      const __m512i qi = _mm512_add_epi32(_mm512_cvtps_epi32(q), _mm512_set1_epi32(128));
      _mm_mask_storeu_epi8(a + k, mk, _mm512_cvtepi32_epi8(qi));
    }
    for (int64_t k = j.K; k < j.Kp; ++k) a[k] = 128;
  }
  return bad_row;
}

}  // namespace avx512vnni
}  // namespace fastrec
