// Shared by the standalone gather loops in this folder (not part of the build).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <immintrin.h>

// Fills ids with draws over R rows: Zipf(zipf) with the hot rows scattered by a fixed random
// permutation (returned: rank -> row), or uniform when zipf == 0. Same generator state, same ids.
inline std::vector<int32_t> fill_ids(std::vector<int32_t>& ids, int64_t R, double zipf, std::mt19937_64& g) {
  std::vector<int32_t> perm(R);
  for (int64_t i = 0; i < R; ++i) perm[i] = static_cast<int32_t>(i);
  if (zipf <= 0) {
    std::uniform_int_distribution<int64_t> u(0, R - 1);
    for (auto& x : ids) x = static_cast<int32_t>(u(g));
    return perm;
  }
  std::vector<double> cdf(R);
  double s = 0;
  for (int64_t i = 0; i < R; ++i) cdf[i] = s += 1 / std::pow(static_cast<double>(i + 1), zipf);
  std::shuffle(perm.begin(), perm.end(), g);
  std::uniform_real_distribution<double> u(0, s);
  for (auto& x : ids) x = perm[std::lower_bound(cdf.begin(), cdf.end(), u(g)) - cdf.begin()];
  return perm;
}

// T tables of R x 64 fp32 rows back to back in one 2 MB-aligned block (huge pages advised,
// every byte written), the first starting `off` bytes in. Never freed (the loops exit).
inline float* make_tables(int64_t R, int64_t T, int off) {
  const size_t bytes = static_cast<size_t>(R) * 64 * 4 * T + 4096;
  const size_t huge = size_t{2} << 20;
  char* raw = static_cast<char*>(aligned_alloc(huge, (bytes + huge) & ~(huge - 1)));
  madvise(raw, bytes, MADV_HUGEPAGE);
  memset(raw, 1, bytes);
  return reinterpret_cast<float*>(raw + off);
}

// The kernel's fp32 D=64 loop: prefetcht2 128 ids ahead as straight-line code (the lines at
// +0, +64, +128, +192 and the row's last byte), four 16-float accumulators, one bag of L ids at
// a time into out (64 floats per bag).
inline void gather_straight(const float* base, const int32_t* ind, int64_t n, int L, float* out) {
  const int PD = 128;
  auto pf2 = [](uintptr_t a) { asm volatile("prefetcht2 %0" : : "m"(*reinterpret_cast<const char*>(a))); };
  for (int64_t b = 0; b < n / L; b++) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t p = b * L; p < (b + 1) * L; p++) {
      if (p + PD < n) {
        const uintptr_t r = reinterpret_cast<uintptr_t>(base + static_cast<int64_t>(ind[p + PD]) * 64);
        pf2(r); pf2(r + 64); pf2(r + 128); pf2(r + 192); pf2(r + 255);
      }
      const float* r = base + static_cast<int64_t>(ind[p]) * 64;
      a0 = _mm512_add_ps(a0, _mm512_loadu_ps(r)); a1 = _mm512_add_ps(a1, _mm512_loadu_ps(r + 16));
      a2 = _mm512_add_ps(a2, _mm512_loadu_ps(r + 32)); a3 = _mm512_add_ps(a3, _mm512_loadu_ps(r + 48));
    }
    _mm512_storeu_ps(out + b * 64, a0); _mm512_storeu_ps(out + b * 64 + 16, a1);
    _mm512_storeu_ps(out + b * 64 + 32, a2); _mm512_storeu_ps(out + b * 64 + 48, a3);
  }
}
