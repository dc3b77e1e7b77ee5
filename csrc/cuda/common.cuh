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
    // Clear the runtime's sticky last error (non-sticky errors only), so that the next launch
    // check on this thread does not report this failure again as its own.
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(e) + " (" +
                             cudaGetErrorString(e) + ")");
  }
}

inline unsigned ceil_div(long long a, long long b) { return static_cast<unsigned>((a + b - 1) / b); }

// Makes `device` current for the scope and restores the caller's device afterwards: the
// frameworks read the current device back, so leaving it changed would move the caller's next
// allocation. Every launcher that takes a device index opens one.
class DeviceScope {
 public:
  explicit DeviceScope(int device) : device_(device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device_) check(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceScope() {
    if (prev_ != device_) cudaSetDevice(prev_);  // errors ignored: a destructor must not throw
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int device_, prev_ = 0;
};

}  // namespace cuda
}  // namespace fastrec

#define FASTREC_CUDA_CHECK(expr) ::fastrec::cuda::check((expr), #expr)
// After a launch: a bad configuration shows up here, not at the next call.
#define FASTREC_CUDA_CHECK_LAUNCH() ::fastrec::cuda::check(cudaGetLastError(), "kernel launch")

// kernel<<<grid, block, smem, stream>>>, as FASTREC_LAUNCH(kernel, grid, block, smem, stream)(args):
// csrc/cuda/emu/host_emulation.h defines it to run the kernel on the host instead.
#ifndef FASTREC_LAUNCH
#define FASTREC_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif
// extern __shared__ type name[]: a kernel's dynamic shared memory.
#ifndef FASTREC_DYNAMIC_SMEM
#define FASTREC_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif
