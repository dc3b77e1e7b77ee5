// The CUDA runtime calls csrc/cuda/embedding.cu makes, for its host emulation
// (host_emulation.h): "device" memory is host memory, a stream runs its work at once (so every
// wait returns at once), and there is one device, 0.
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

namespace fastrec_emu {
thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;
}

namespace {
void* allocate(size_t bytes) { return std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256); }
}  // namespace

extern "C" {

cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = allocate(bytes);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}

cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned int) {
  *p = allocate(bytes);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

cudaError_t cudaGetLastError(void) { return cudaSuccess; }

const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaError (emulated)"; }

const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "error (host emulation)"; }

}  // extern "C"
