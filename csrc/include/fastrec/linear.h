#pragma once
#include <cstdint>
#include <vector>

#include "fastrec/gemm.h"

namespace fastrec {

// One int8 linear layer with its weights packed once for the kernels.
class Int8Layer {
 public:
  // w: N x K int8 (row-major, nn.Linear orientation); scale: N; bias: N or null.
  Int8Layer(const int8_t* w, int64_t N, int64_t K, const float* scale, const float* bias);
  const PackedB& view() const { return view_; }
  int64_t in_features() const { return view_.K; }
  int64_t out_features() const { return view_.N; }

 private:
  std::vector<int8_t> packed_, rowmajor_;
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

// Per-row symmetric quantization as the kernels do it (for tests): q M x K int8, scale M.
void quantize_rows_int8(const float* x, int64_t M, int64_t K, int8_t* q, float* scale);

}  // namespace fastrec
