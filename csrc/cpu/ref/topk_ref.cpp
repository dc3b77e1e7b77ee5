// Scalar reference of the top-k kernels: the float scoring and the threshold check.
#include "fastrec/dispatch.h"

namespace fastrec {
namespace ref {

void score_float(const FloatScoreJob& j) {
  const float* pf = static_cast<const float*>(j.panels);
  const uint16_t* ph = static_cast<const uint16_t*>(j.panels);
  for (int64_t r = 0; r < j.rows; ++r) {
    const float* q = j.q + r * j.ldq;
    for (int64_t p = 0; p < j.npanels; ++p) {
      for (int lane = 0; lane < 16; ++lane) {
        float acc = 0.f;
        for (int64_t d = 0; d < j.D; ++d) {
          const int64_t at = (p * j.D + d) * 16 + lane;
          const float w = j.f16 ? half_to_float(ph[at]) : pf[at];
          acc += q[d] * w;
        }
        j.c[r * j.ldc + p * 16 + lane] = acc;
      }
    }
  }
}

int64_t select_ge(const float* s, int64_t n, float thr, int32_t* pos) {
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (s[i] >= thr) pos[cnt++] = static_cast<int32_t>(i);
  }
  return cnt;
}

}  // namespace ref
}  // namespace fastrec
