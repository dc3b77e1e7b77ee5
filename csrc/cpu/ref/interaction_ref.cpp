// Scalar reference of the dot interaction (also the AVX2 level's kernel: the loop is short and
// the compiler's baseline vectorisation is enough there).
#include "fastrec/dispatch.h"

namespace fastrec {
namespace ref {

void dot_interaction(const InteractionJob& j) {
  const int64_t width = j.D + (j.T + 1) * j.T / 2;
  for (int64_t b = j.b0; b < j.b1; ++b) {
    const float* x = j.bottom + b * j.D;
    const float* e = j.emb + b * j.T * j.D;
    float* o = j.out + b * width;
    for (int64_t d = 0; d < j.D; ++d) o[d] = x[d];
    int64_t at = j.D;
    for (int64_t i = 1; i <= j.T; ++i) {
      const float* vi = e + (i - 1) * j.D;
      for (int64_t k = 0; k < i; ++k) {
        const float* vk = k == 0 ? x : e + (k - 1) * j.D;
        float acc = 0.f;
        for (int64_t d = 0; d < j.D; ++d) acc += vi[d] * vk[d];
        o[at++] = acc;
      }
    }
  }
}

}  // namespace ref
}  // namespace fastrec
