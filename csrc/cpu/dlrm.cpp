// The fused DLRM forward: per block of rows, pool every table, run the bottom MLP, the dot
// interaction and the top MLP back to back inside one task.
#include "fastrec/dlrm.h"

#include <stdexcept>
#include <string>

#include "fastrec/dispatch.h"
#include "fastrec/interaction.h"

namespace fastrec {
namespace {

// Per-thread buffers of one task (grow-only, reused from call to call).
struct DlrmScratch {
  std::vector<float> emb, bottom, top_in;
};
DlrmScratch& dlrm_scratch() {
  thread_local DlrmScratch s;
  return s;
}

void check_shapes(const DlrmForward& f, int64_t T, int64_t D) {
  for (int64_t t = 0; t < T; ++t) {
    if (f.emb.tables[t].dim != D) throw std::invalid_argument("every table must have the same dim");
  }
  if (f.bottom.empty() || f.top.empty() || f.bottom_acts.size() != f.bottom.size() ||
      f.top_acts.size() != f.top.size()) {
    throw std::invalid_argument("the bottom and top MLPs need at least one layer and one activation per layer");
  }
  check_layer_chain(f.bottom.data(), f.bottom.size());
  check_layer_chain(f.top.data(), f.top.size());
  if (f.bottom.front()->in_features() != f.dense_dim ||
      f.bottom.back()->out_features() != D || f.top.front()->in_features() != D + T * (T + 1) / 2 ||
      f.top.back()->out_features() != 1) {
    throw std::invalid_argument("layer sizes do not fit a DLRM with " + std::to_string(T) + " tables of dim " +
                                std::to_string(D) + " and " + std::to_string(f.dense_dim) + " dense features");
  }
}

// Op by op over all rows (few rows: each op splits its own work over the threads).
void op_by_op(const DlrmForward& f, int64_t B, int64_t T, int64_t D) {
  std::vector<float> emb(static_cast<size_t>(B * T * D)), bottom(static_cast<size_t>(B * D));
  std::vector<float> top_in(static_cast<size_t>(B * (D + T * (T + 1) / 2)));
  MultiBagArgs a = f.emb;
  a.out = emb.data();
  embedding_bags(a);
  int8_layers_forward(f.bottom.data(), f.bottom_acts.data(), f.bottom.size(), f.dense, B, f.dense_dim, bottom.data(),
                      "bottom");
  dot_interaction(bottom.data(), emb.data(), B, T, D, top_in.data());
  int8_layers_forward(f.top.data(), f.top_acts.data(), f.top.size(), top_in.data(), B, D + T * (T + 1) / 2, f.out,
                      "top");
}

}  // namespace

void dlrm_forward(const DlrmForward& f) {
  const MultiBagArgs& a = f.emb;
  const int64_t T = static_cast<int64_t>(a.tables.size());
  const int64_t B = batch_size_of(a);
  const int64_t D = a.tables[0].dim;
  check_shapes(f, T, D);
  OffsetsCopy off64;
  const int64_t* off = checked_offsets(a, &off64);
  if (B == 0) return;
  if (!row_tasks_pay(B)) {
    op_by_op(f, B, T, D);
    return;
  }
  const KernelTable& k = kernels();
  const int64_t W = D + T * (T + 1) / 2;
  int64_t macs = T * D;  // rough work per row: the lookups count as little next to the MLPs
  for (const Int8Layer* l : f.bottom) macs += l->in_features() * l->out_features();
  for (const Int8Layer* l : f.top) macs += l->in_features() * l->out_features();
  const RowTasks rt(B, macs);
  std::vector<BagError> bag_errors(static_cast<size_t>(rt.tasks));
  std::vector<NonFinite> bad_rows(static_cast<size_t>(rt.tasks));
  rt.run([&](int64_t task, int64_t m0, int64_t m1) {
    const int64_t rows = m1 - m0;
    DlrmScratch& s = dlrm_scratch();
    float* emb = at_least(&s.emb, rows * T * D);
    float* bottom = at_least(&s.bottom, rows * D);
    float* top_in = at_least(&s.top_in, rows * W);
    for (int64_t t = 0; t < T; ++t) {
      BagError e;
      k.embedding_bag(bag_job(a, off, B, t, m0, m1, emb + t * D, T * D), &e);
      keep_first_error(e, &bag_errors[task]);
    }
    if (bag_errors[task].position >= 0) return;
    int layer = 0;
    const char* mlp = "bottom";
    int64_t r = int8_layers_on_rows(f.bottom.data(), f.bottom_acts.data(), f.bottom.size(), f.dense + m0 * f.dense_dim,
                                    f.dense_dim, rows, bottom, &layer);
    if (r < 0) {
      const InteractionJob ij(bottom, emb, T, D, top_in, 0, rows);
      k.dot_interaction(ij);
      mlp = "top";
      r = int8_layers_on_rows(f.top.data(), f.top_acts.data(), f.top.size(), top_in, W, rows, f.out + m0, &layer);
    }
    if (r >= 0) bad_rows[task] = NonFinite{m0 + r, layer, mlp};
  });
  BagError first;
  for (const BagError& e : bag_errors) keep_first_error(e, &first);
  if (first.position >= 0) throw_bag_error(first, a, off, B);
  throw_if_nonfinite(bad_rows);
}

}  // namespace fastrec
