// The whole DLRM forward in one call: embedding bags, bottom MLP, dot interaction, top MLP.
#pragma once
#include <cstdint>
#include <vector>

#include "fastrec/embedding.h"
#include "fastrec/linear.h"

namespace fastrec {

struct DlrmForward {
  MultiBagArgs emb;  // T tables of dim D, table-major offsets (T*B + 1); emb.out is unused
  const float* dense = nullptr;  // B x dense_dim, row-major
  int64_t dense_dim = 0;
  std::vector<const Int8Layer*> bottom, top;  // bottom: dense_dim -> D; top: D + T(T+1)/2 -> 1
  std::vector<Activation> bottom_acts, top_acts;
  float* out = nullptr;  // B outputs of the top MLP
};

// From 36 rows a thread (or on one thread) each task runs the whole model on up to 60 rows,
// so the pooled embeddings, the bottom MLP's output and the interaction never leave the
// thread's caches; fewer rows run op by op, each op over all threads. Errors as the ops
// raise them: std::invalid_argument (shapes, offsets, NaN/Inf rows), std::out_of_range (ids).
void dlrm_forward(const DlrmForward& f);

}  // namespace fastrec
