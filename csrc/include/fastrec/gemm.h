// int8 GEMM with fused epilogue: C[m, n] = act(scale_a[m] * scale_b[n] * sum_k qa[m, k] * qb[n, k] + bias[n]).
// Activations are quantized per row (symmetric int8, stored as u8 = q + 128 for VNNI);
// weights per output channel (symmetric int8), packed once at load.
#pragma once
#include <cstdint>
#include <limits>

namespace fastrec {

// Weights packed for the kernels: blocks of 16 output channels x 4 k-values, 64 bytes each,
// laid out [Np/16][Kp/4][16][4] (VNNI's u8 x s8 dot-product operand; the AVX2 kernel reads
// the same blocks). Padding is zero.
struct PackedB {
  int64_t N = 0, K = 0;    // logical
  int64_t Np = 0, Kp = 0;  // padded to 16 and 4
  const int8_t* packed = nullptr;    // Np * Kp bytes (the only copy of the weights: see packed_at)
  const int32_t* comp = nullptr;     // Np: 128 * sum_k qb[n, k] (undoes the +128 of u8 activations)
  const float* scale = nullptr;      // Np, zero padded
  const float* bias = nullptr;       // Np or null
  // max |scale[n]|: see zero_sum_guard_needed. Infinity (the default) means "unknown".
  float max_abs_scale = std::numeric_limits<float>::infinity();
};

// Channel n's first weight in the packed layout; its weight k is (k / 4) * 64 + k % 4 further.
inline const int8_t* packed_channel(const PackedB& b, int64_t n) {
  return b.packed + (n / 16) * (b.Kp / 4) * 64 + (n % 16) * 4;
}

// Weight (n, k) of a packed matrix (what the scalar reference and unpacking read).
inline int8_t packed_at(const PackedB& b, int64_t n, int64_t k) { return packed_channel(b, n)[(k / 4) * 64 + k % 4]; }

enum class Epilogue : int32_t { kNone = 0, kRelu = 1, kInt32 = 3 };

// One kernel call: rows [m0, m1) x 16-channel blocks [nb0, nb1).
struct GemmJob {
  const uint8_t* a = nullptr;  // u8 activations (q + 128), row stride lda (= Kp), padding 128
  int64_t lda = 0;
  const float* a_scale = nullptr;  // per row
  const PackedB* b = nullptr;
  int64_t m0 = 0, m1 = 0, nb0 = 0, nb1 = 0;
  Epilogue epilogue = Epilogue::kNone;
  float* c = nullptr;       // float output (row stride ldc) unless epilogue == kInt32
  int32_t* c32 = nullptr;   // int32 output: sum_k qa * qb exactly
  int64_t ldc = 0;
};

// Whether some row of the job has a_scale * scale[n] overflowing for some n (huge inputs times
// huge weights). There a zero sum must give 0 (+ bias), not 0 * inf = NaN: the reference
// kernel does that, and the SIMD kernels hand such jobs to it (no cost on their hot path).
inline bool zero_sum_guard_needed(const GemmJob& j) {
  if (j.epilogue == Epilogue::kInt32) return false;
  for (int64_t m = j.m0; m < j.m1; ++m) {
    if (!(j.a_scale[m] * j.b->max_abs_scale <= std::numeric_limits<float>::max())) return true;  // NaN too
  }
  return false;
}

// Quantizes rows [m0, m1) of x (row stride ldx, K columns) to u8 (q + 128, padded with 128
// to Kp) and per-row scales. Returns the first row holding NaN/Inf, or -1.
struct QuantizeJob {
  const float* x = nullptr;
  int64_t ldx = 0, K = 0, Kp = 0, m0 = 0, m1 = 0;
  uint8_t* a = nullptr;
  float* a_scale = nullptr;
};

}  // namespace fastrec
