// DLRM's dot interaction: for each sample, the vectors v_0 = bottom[b] and v_t = emb[b, t-1]
// (t = 1..T), and out[b] = [v_0, dot(v_i, v_j) for i in 1..T for j in 0..i-1] (the strictly
// lower triangle in row-major order, numpy's tril_indices(T + 1, -1)).
#pragma once

#include <cstdint>

namespace fastrec {

struct InteractionJob {
  const float* bottom = nullptr;  // B x D
  const float* emb = nullptr;     // B x (T * D): table-major columns, as embedding_bags returns
  int64_t T = 0, D = 0;
  float* out = nullptr;           // B x (D + (T + 1) * T / 2)
  int64_t b0 = 0, b1 = 0;         // samples of this call

  InteractionJob() = default;
  InteractionJob(const float* bottom_, const float* emb_, int64_t T_, int64_t D_, float* out_, int64_t b0_, int64_t b1_)
      : bottom(bottom_), emb(emb_), T(T_), D(D_), out(out_), b0(b0_), b1(b1_) {}
};

// Runs the kernel for the chosen ISA over all B samples on the thread pool.
void dot_interaction(const float* bottom, const float* emb, int64_t B, int64_t T, int64_t D, float* out);

}  // namespace fastrec
