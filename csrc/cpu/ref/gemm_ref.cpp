// Scalar reference int8 GEMM and activation quantization: plain loops that define the exact
// integer result every optimised variant must reproduce bit for bit.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "fastrec/dispatch.h"

namespace fastrec {
namespace ref {

int64_t quantize_rows(const QuantizeJob& j) {
  int64_t bad_row = -1;
  for (int64_t m = j.m0; m < j.m1; ++m) {
    const float* x = j.x + m * j.ldx;
    uint8_t* a = j.a + m * j.Kp;
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < j.K; ++k) {
      finite = finite && std::isfinite(x[k]);
      amax = std::fmax(amax, std::fabs(x[k]));
    }
    if (!finite && bad_row < 0) bad_row = m;
    // q = round-half-even(x * (127 / amax)), the same float operations as the SIMD variants.
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    // Below amax ~ 3.7e-37, 127 / amax overflows: the row is first scaled by 2^100 (exact),
    // and the codes are those of the scaled row (x * up * (127 / (amax * up)), up = 2^100).
    // Without this, zeros came out as 0 * inf = NaN and every other value saturated. The
    // scale, amax / 127, is still the unscaled one: subnormal below amax ~1.5e-36, so such rows
    // come back with less relative precision (~0.4% at 1e-38; all of it below ~1.3e-43).
    float up = 1.f;
    if (!(inv <= std::numeric_limits<float>::max())) {
      up = 0x1p100f;
      inv = 127.f / (amax * up);
    }
    j.a_scale[m] = amax / 127.f;
    for (int64_t k = 0; k < j.K; ++k) {
      float q = std::nearbyint((x[k] * up) * inv);
      q = std::fmin(127.f, std::fmax(-127.f, q));
      a[k] = static_cast<uint8_t>(static_cast<int32_t>(q) + 128);
    }
    for (int64_t k = j.K; k < j.Kp; ++k) a[k] = 128;
  }
  return bad_row;
}

void gemm_s8(const GemmJob& j) {
  const PackedB& b = *j.b;
  const int64_t n_end = std::min<int64_t>(b.N, j.nb1 * 16);
  std::vector<int8_t> w(static_cast<size_t>(b.Kp));
  for (int64_t n = j.nb0 * 16; n < n_end; ++n) {
    // Channel n's weights, gathered from the packed layout (4 bytes every 64) once for all rows.
    const int8_t* src = packed_channel(b, n);
    for (int64_t g = 0; g < b.Kp / 4; ++g) std::memcpy(&w[static_cast<size_t>(4 * g)], src + 64 * g, 4);
    for (int64_t m = j.m0; m < j.m1; ++m) {
      const uint8_t* a = j.a + m * j.lda;
      int32_t acc = 0;
      for (int64_t k = 0; k < b.K; ++k) acc += (static_cast<int32_t>(a[k]) - 128) * static_cast<int32_t>(w[static_cast<size_t>(k)]);
      if (j.epilogue == Epilogue::kInt32) {
        j.c32[m * j.ldc + n] = acc;
        continue;
      }
      // A zero sum gives 0 (with the scales' sign, as 0 * s) even where a_scale * w_scale
      // overflows (huge inputs times huge weights), not 0 * inf = NaN; any other sum overflows
      // there, as the true product does.
      const float s = j.a_scale[m] * b.scale[n];
      float y = acc == 0 ? std::copysign(0.f, s) : static_cast<float>(acc) * s;
      if (b.bias) y += b.bias[n];
      if (j.epilogue == Epilogue::kRelu) y = std::fmax(y, 0.f);
      j.c[m * j.ldc + n] = y;
    }
  }
}

}  // namespace ref
}  // namespace fastrec
