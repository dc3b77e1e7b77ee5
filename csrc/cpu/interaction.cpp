// The dot-interaction driver: samples split over the thread pool.
#include "fastrec/interaction.h"

#include "fastrec/dispatch.h"
#include "fastrec/parallel.h"

namespace fastrec {

void dot_interaction(const float* bottom, const float* emb, int64_t B, int64_t T, int64_t D, float* out) {
  const KernelTable& k = kernels();
  InteractionJob base(bottom, emb, T, D, out, 0, B);
  const int64_t work = B * (T + 1) * T / 2 * D;
  if (work < (int64_t{1} << 18) || get_num_threads() == 1) {
    k.dot_interaction(base);
    return;
  }
  parallel_for(B, 32, [&](int64_t b0, int64_t b1) {
    InteractionJob j = base;
    j.b0 = b0;
    j.b1 = b1;
    k.dot_interaction(j);
  });
}

}  // namespace fastrec
