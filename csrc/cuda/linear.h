// Host-side declarations of the CUDA int8 linear / MLP op (plain C++: included by the pybind11
// module). Kernels and launchers live in linear.cu.
//
// The op mirrors the CPU one (csrc/cpu/linear.cpp) bit for bit up to the epilogue: activations are
// quantized per row with the same float operations (scale = amax / 127, codes = round-half-even(
// x * (127 / amax)) clamped to [-127, 127], zero rows give zero codes and scale 0), the int32 sums
// are exact, and the epilogue is y = float(acc) * (row_scale * channel_scale) (+ bias) then ReLU or
// sigmoid, each operation rounded on its own (no FMA contraction), as the scalar CPU kernel does.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace fastrec {
namespace cuda {

enum LinearEpilogue : int { kEpiNone = 0, kEpiRelu = 1, kEpiSigmoid = 2, kEpiInt32 = 3 };

// One layer's int8 weights on one device, uploaded once: W padded with zeros to [Np][Kp] int8
// row-major (Np a multiple of 128, Kp of 64), per-channel scale and bias padded to Np.
class Int8LinearWeights {
 public:
  // w: N x K int8 row-major (nn.Linear orientation); scale: N; bias: N or null. Host pointers.
  Int8LinearWeights(int device, const int8_t* w, int64_t N, int64_t K, const float* scale, const float* bias);
  ~Int8LinearWeights();
  Int8LinearWeights(const Int8LinearWeights&) = delete;
  Int8LinearWeights& operator=(const Int8LinearWeights&) = delete;

  int device() const { return device_; }
  int64_t N() const { return N_; }
  int64_t K() const { return K_; }
  int64_t Np() const { return Np_; }
  int64_t Kp() const { return Kp_; }
  const int8_t* w() const { return w_; }
  const float* scale() const { return scale_; }
  const float* bias() const { return bias_; }  // null without bias

 private:
  int device_ = 0;
  int64_t N_ = 0, K_ = 0, Np_ = 0, Kp_ = 0;
  int8_t* w_ = nullptr;
  float* scale_ = nullptr;
  float* bias_ = nullptr;
};

// Layers run back to back on one stream (one layer for Int8Linear). Immutable once built, so one
// plan may run from many threads at once.
class Int8LinearPlan {
 public:
  Int8LinearPlan(std::vector<std::shared_ptr<const Int8LinearWeights>> layers, std::vector<int> activations);

  int device() const { return device_; }
  int64_t in_features() const { return layers_.front()->K(); }
  int64_t out_features() const { return layers_.back()->N(); }

  // Bytes of device scratch forward() needs for M rows: quantized activations [M][Kp_max] int8,
  // row scales [M] float, and for MLPs two [M][N_hidden_max] float buffers for the layers between.
  int64_t scratch_bytes(int64_t M) const;

  // y (M x N_last float32, row-major) = the layers applied to x (M x K float32, row-major), all
  // device pointers on device(), enqueued on `stream` (a cudaStream_t as an integer; 0 = legacy
  // default stream). The calling thread's current device is restored before returning.
  //
  // check_finite: every layer's quantization pass flags rows holding NaN/Inf into pinned host
  // memory; after enqueueing the last layer's GEMM the host waits for the last quantization pass
  // (one event wait, so also for all earlier work on the stream) and throws std::invalid_argument
  // naming the first bad row. Without it nothing waits, and such rows come out as NaN.
  void forward(const float* x, int64_t M, float* y, void* scratch, int64_t scratch_bytes, std::uintptr_t stream,
               bool check_finite) const;

 private:
  std::vector<std::shared_ptr<const Int8LinearWeights>> layers_;
  std::vector<int> acts_;
  int device_ = 0;
  int64_t kp_max_ = 0, hidden_max_ = 0;
};

// ---- test hooks ----------------------------------------------------------------------------
// The exact int32 sums y32 (M x N) = a . W^T for int8 activations a (M x Kp, row-major, zero
// padded from K to Kp) already on the device.
void int8_gemm_int32(const Int8LinearWeights& w, const int8_t* a, int64_t M, int32_t* y32, std::uintptr_t stream);

// The quantization pass alone: q (M x Kp int8, zero padded) and scale (M) for x (M x K float32).
// Rows with NaN/Inf get scale NaN. Kp must be a multiple of 64 and >= K.
void quantize_rows(int device, const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* q, float* scale,
                   std::uintptr_t stream);

// GEMM kernel choice, for tests: 0 = by shape (default), 1 = small-batch kernel (used only where
// M <= 32), 2 = 32x32 tiles, 3 = 64x64, 4 = 128x128. Process-wide.
void set_gemm_config(int config);
int gemm_config();

}  // namespace cuda
}  // namespace fastrec
