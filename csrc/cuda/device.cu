// Device queries used by fastrec.info and by the launchers (multiprocessor count, shared memory).
#include "device.h"

#include "common.cuh"

namespace fastrec {
namespace cuda {

int device_count() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: not an error for a query, just zero devices
    return 0;
  }
  return n;
}

DeviceInfo device_info(int device) {
  cudaDeviceProp p;
  FASTREC_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  DeviceInfo d;
  d.name = p.name;
  d.major = p.major;
  d.minor = p.minor;
  d.multiprocessors = p.multiProcessorCount;
  d.total_memory = p.totalGlobalMem;
  d.l2_bytes = p.l2CacheSize;
  d.smem_per_block_optin = p.sharedMemPerBlockOptin;
  return d;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

}  // namespace cuda
}  // namespace fastrec
