// Host emulation of the little of CUDA that the embedding-bag kernel uses, so that the real
// csrc/cuda/embedding.cu compiles with a host C++ compiler and runs on the CPU, over host
// memory (fastrec._C_cuda_emu, a test-only module; tests/test_cuda_emulated.py).
//
// A launch runs every thread of every block one after another. That is faithful only for
// kernels whose threads never wait for or read from one another (no __syncthreads, shared
// memory, warp shuffles or votes): the embedding kernel is one (each lane pools its own
// columns of its own bags, and records errors with atomicMin). What it checks: the kernel's
// arithmetic, indexing, row decoding, modes, padding, weights and error reporting, and the
// launcher's planning and checks. What it cannot: timing, the memory model, occupancy, and any
// code path that only a GPU's hardware would take. Included ahead of the .cu source (see
// embedding_emu.cpp); the CUDA runtime calls it makes are implemented in runtime_emu.cpp.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __grid_constant__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)

namespace fastrec_emu {

extern thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

// kernel<<<grid, block, smem, stream>>>(args...): every thread in turn, on the calling thread.
struct Launch {
  dim3 grid, block;
  template <class Kernel, class... Args>
  void run(Kernel kernel, Args&&... args) const {
    grid_dim = grid;
    block_dim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx)
          for (unsigned tz = 0; tz < block.z; ++tz)
            for (unsigned ty = 0; ty < block.y; ++ty)
              for (unsigned tx = 0; tx < block.x; ++tx) {
                block_idx = dim3(bx, by, bz);
                thread_idx = dim3(tx, ty, tz);
                kernel(args...);
              }
  }
};

template <class Kernel>
struct Bound {
  Kernel kernel;
  Launch launch;
  template <class... Args>
  void operator()(Args&&... args) const { launch.run(kernel, std::forward<Args>(args)...); }
};

template <class Kernel>
Bound<Kernel> launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  if (smem != 0) throw std::logic_error("host emulation: kernels with dynamic shared memory are not emulated");
  return Bound<Kernel>{kernel, Launch{grid, block}};
}

}  // namespace fastrec_emu

#define FASTREC_LAUNCH(kernel, grid, block, smem, stream) ::fastrec_emu::launch((kernel), (grid), (block), (smem), (stream))

#define threadIdx ::fastrec_emu::thread_idx
#define blockIdx ::fastrec_emu::block_idx
#define blockDim ::fastrec_emu::block_dim
#define gridDim ::fastrec_emu::grid_dim

template <class T>
inline T __ldg(const T* p) { return *p; }

inline float __uint_as_float(unsigned int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int x;
  std::memcpy(&x, &f, 4);
  return x;
}

// PTX prmt (default mode): byte i of the result is byte (s >> 4i) & 7 of {y, x} (x the low word).
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
  const uint64_t both = (static_cast<uint64_t>(y) << 32) | x;
  unsigned int r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned int>((both >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
}

inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  if (v < old) *p = v;
  return old;
}

// CUDA's integer min / max overloads (mixed widths promote, as in device code)
template <class A, class B>
inline auto min(A a, B b) -> typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value,
                                                     typename std::common_type<A, B>::type>::type {
  using C = typename std::common_type<A, B>::type;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <class A, class B>
inline auto max(A a, B b) -> typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value,
                                                     typename std::common_type<A, B>::type>::type {
  using C = typename std::common_type<A, B>::type;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
