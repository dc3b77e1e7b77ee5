// Tensor-core matrix instructions (sm_80+) shared by the int8 GEMM and the top-k scoring.
#pragma once

#include <cstdint>

namespace fastrec {
namespace cuda {

// c (16x8 int32 fragment) += a (16x32 s8, row) * b (32x8 s8, col): mma.sync m16n8k32.
__device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
#if defined(FASTREC_HOST_EMULATION)  // (csrc/cuda/emu: tests without a GPU)
  fastrec_emu::mma_s8(c, a0, a1, a2, a3, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // never built: the module targets sm_80 and newer
#endif
}

// c (16x8 fp32 fragment) += a (16x16 f16, row) * b (16x8 f16, col): mma.sync m16n8k16.
__device__ __forceinline__ void mma_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1) {
#if defined(FASTREC_HOST_EMULATION)
  fastrec_emu::mma_f16(c, a0, a1, a2, a3, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

}  // namespace cuda
}  // namespace fastrec
