// Shared helpers for the CUDA kernels and their launchers.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace fastrec {
namespace cuda {

// A failed CUDA call becomes a C++ exception (pybind11 turns it into RuntimeError).
inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(e) + " (" +
                             cudaGetErrorString(e) + ")");
  }
}

inline unsigned ceil_div(long long a, long long b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace cuda
}  // namespace fastrec

#define FASTREC_CUDA_CHECK(expr) ::fastrec::cuda::check((expr), #expr)
// After a launch: a bad configuration shows up here, not at the next call.
#define FASTREC_CUDA_CHECK_LAUNCH() ::fastrec::cuda::check(cudaGetLastError(), "kernel launch")
