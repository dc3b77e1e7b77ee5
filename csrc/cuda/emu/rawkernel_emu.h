// A CuPy RawKernel's source (kernels/*.py), compiled for the host under host_emulation.h, with
// one C entry point that launches it from an array of 64-bit argument words (what CuPy passes:
// numpy scalars and device pointers). tests/cuda_emu_rawkernel.py includes the kernel's source
// between host_emulation.h and this header, defines FASTREC_EMU_KERNEL as its name, and calls
// fastrec_emu_launch through ctypes: the CuPy kernels' tests then run without a GPU.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <type_traits>
#include <utility>

#include "host_emulation.h"

namespace fastrec_emu {

template <class T>
T from_word(uint64_t w) {
  if constexpr (std::is_pointer<T>::value) {
    return reinterpret_cast<T>(static_cast<uintptr_t>(w));
  } else {
    static_assert(std::is_arithmetic<T>::value && sizeof(T) <= 8, "RawKernel arguments are scalars or pointers");
    T v;
    std::memcpy(&v, &w, sizeof(T));  // (little-endian: the low bytes)
    return v;
  }
}

template <class... P, size_t... I>
void launch_words(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, const uint64_t* words,
                  std::index_sequence<I...>) {
  FASTREC_LAUNCH(kernel, grid, block, smem, nullptr)(from_word<P>(words[I])...);
}

// 0, or 1 with the reason in err (a wrong argument count, or what the emulator threw).
template <class... P>
int launch_raw(void (*kernel)(P...), const unsigned* grid, const unsigned* block, size_t smem, const uint64_t* words,
               int count, char* err, size_t err_len) {
  try {
    if (count != static_cast<int>(sizeof...(P))) {
      std::snprintf(err, err_len, "the kernel takes %d arguments, got %d", static_cast<int>(sizeof...(P)), count);
      return 1;
    }
    launch_words(kernel, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), smem, words,
                 std::index_sequence_for<P...>{});
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
    return 1;
  }
}

}  // namespace fastrec_emu

extern "C" __attribute__((visibility("default"))) int fastrec_emu_launch(const unsigned* grid, const unsigned* block,
                                                                         size_t smem, const uint64_t* words,
                                                                         int count, char* err, size_t err_len) {
  return fastrec_emu::launch_raw(&FASTREC_EMU_KERNEL, grid, block, smem, words, count, err, err_len);
}
