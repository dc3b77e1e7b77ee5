#pragma once
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "fastrec/gemm.h"

namespace fastrec {

// The most input features an int8 layer takes: every dot product of K codes in [-127, 127]
// then fits the int32 accumulators (127 * 127 * 133144 < 2**31). The kernels' u8 (q + 128)
// partial sums may wrap before the compensation is subtracted; that is exact modulo 2**32.
constexpr int64_t kMaxInt8K = (int64_t{1} << 31) / (127 * 127);

// One int8 linear layer with its weights packed once for the kernels.
class Int8Layer {
 public:
  // w: N x K int8 (row-major, nn.Linear orientation); scale: N; bias: N or null.
  Int8Layer(const int8_t* w, int64_t N, int64_t K, const float* scale, const float* bias);
  const PackedB& view() const { return view_; }
  int64_t in_features() const { return view_.K; }
  int64_t out_features() const { return view_.N; }

 private:
  std::vector<int8_t> packed_;
  std::vector<int32_t> comp_;
  std::vector<float> scale_, bias_;
  PackedB view_;
};

enum class Activation : int32_t { kNone = 0, kRelu = 1, kSigmoid = 2 };

// y (M x N, row stride N) = act(int8_linear(x)). x is M x K float32, row stride ldx.
// Throws std::invalid_argument naming the first row that holds NaN or Inf.
void int8_linear_forward(const Int8Layer& layer, const float* x, int64_t M, int64_t ldx, Activation act, float* y);

// The exact integer sums for already-quantized activations q (M x K int8): y32 = q . w^T.
void int8_linear_int32(const Int8Layer& layer, const int8_t* q, int64_t M, int32_t* y32);

// Layers run back to back (no Python in between); y is M x N_last.
void int8_mlp_forward(const std::vector<const Int8Layer*>& layers, const std::vector<Activation>& acts,
                      const float* x, int64_t M, float* y);

// n layers back to back over M rows of x (row stride ldx) into y (M x N_last): each layer's
// channels split over the threads for a few rows, else tasks of up to 60 rows running every
// layer (the rows' activations stay in the thread's caches; no barrier between layers).
// Throws std::invalid_argument naming the first row that holds NaN or Inf; `mlp` ("", "bottom"
// or "top") names the MLP in that message.
void int8_layers_forward(const Int8Layer* const* layers, const Activation* acts, size_t n, const float* x, int64_t M,
                         int64_t ldx, float* y, const char* mlp = "");

// The same on the calling thread alone, for a few rows (<= 60) inside a caller's task; y has
// row stride N_last. Returns the first row holding NaN or Inf (relative to x), or -1; *layer
// (if given) gets the layer whose input held it (> 0: an earlier layer overflowed float32).
int64_t int8_layers_on_rows(const Int8Layer* const* layers, const Activation* acts, size_t n, const float* x,
                            int64_t ldx, int64_t rows, float* y, int* layer = nullptr);

// Row tasks for callers that run a whole pipeline per block of rows (int8 MLPs, the fused
// DLRM forward): one task per thread with the rows split evenly up to 144 rows a thread on
// the pool (or when one task holds them all); above, tasks of at most 60 rows (whole 6-row
// tiles), on the pool a multiple of the thread count.
// row_tasks_pay(M): whether M rows are enough for that (one thread, or >= 4 rows a thread);
// below it, splitting each layer's channels over the threads is faster.
bool row_tasks_pay(int64_t M);
struct RowTasks {
  // On the pool when M * macs_per_row is worth waking it.
  RowTasks(int64_t M, int64_t macs_per_row);
  // fn(task, m0, m1) for every task, on the pool when parallel; fn must not throw.
  void run(const std::function<void(int64_t, int64_t, int64_t)>& fn) const;
  int64_t M = 0, tiles = 0, tasks = 0;
  bool parallel = false, even = false;
};

// Where a NaN or Inf was found: the row, and the layer whose input held it (in the MLP named
// `mlp`, "" for a lone MLP). Layer 0 of the first MLP reads the caller's input; any other
// layer's input held a value that overflowed float32 inside the model.
struct NonFinite {
  int64_t row = -1;
  int layer = 0;
  const char* mlp = "";
  // Found in the caller's own input (layer 0 of a lone MLP or of the bottom MLP).
  bool in_input() const { return layer == 0 && (mlp[0] == '\0' || std::strcmp(mlp, "bottom") == 0); }
};
// Throws the NaN/Inf std::invalid_argument for the first entry with row >= 0 (one per task).
void throw_if_nonfinite(const std::vector<NonFinite>& bad);
// Throws std::invalid_argument when a layer's inputs do not match the previous one's outputs.
void check_layer_chain(const Int8Layer* const* layers, size_t n);

// Grows *v (never shrinks) to at least n elements; returns its data.
template <class T>
T* at_least(std::vector<T>* v, int64_t n) {
  if (static_cast<int64_t>(v->size()) < n) v->resize(static_cast<size_t>(n));
  return v->data();
}

// Per-row symmetric quantization as the kernels do it (for tests): q M x K int8, scale M.
void quantize_rows_int8(const float* x, int64_t M, int64_t K, int8_t* q, float* scale);

}  // namespace fastrec
