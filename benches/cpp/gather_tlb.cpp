// Standalone fp32 gather loop (the kernel's: prefetcht2 128 ids ahead, straight-line): ids
// uniform over K rows of each of 8 tables of 1M x 64 fp32 rows (16 bytes past a line), the K
// rows either contiguous (rows 0..K-1: few pages), scattered over the table (a random
// permutation: one page each, and more lines: a row 16 bytes past a line spans 5), or in random
// runs of 16 consecutive rows (as few pages as contiguous ones, the same lines), B=2048 bags of
// 32 ids, one thread. Not part of the build; used for BENCHMARKS.md's
// embedding notes (Zen 4, 2026-11-24).
//
//   g++ -O3 -mavx512f -mavx512vl -mavx512bw -mavx512dq -o gather_tlb gather_tlb.cpp -lpthread
//   ./gather_tlb
#include <chrono>
#include <cstdio>
#include "gather_common.h"
int main() {
  const int64_t R = 1000000, T = 8, B = 2048, L = 32, N = B * L;
  float* tab = make_tables(R, T, 16);
  std::mt19937_64 g(1);
  std::vector<int32_t> perm(R);
  for (int64_t i = 0; i < R; i++) perm[i] = static_cast<int32_t>(i);
  std::shuffle(perm.begin(), perm.end(), g);
  std::vector<float> out(B * 64);
  for (int K : {1000, 4000, 16000, 64000}) {
    for (int scattered = 0; scattered < 3; scattered++) {
      // 0: rows 0..K-1; 1: K rows one per random place; 2: K/16 random 4 KB-sized runs of 16
      // rows (the pages of 1, the footprint of 0)
      std::vector<int32_t> ids(N * T);
      std::uniform_int_distribution<int> u(0, K - 1);
      for (auto& x : ids) {
        const int k = u(g);
        x = scattered == 0 ? k : scattered == 1 ? perm[k] : (perm[k / 16] / 16 * 16 + k % 16);
      }
      std::vector<double> ts;
      for (int rep = 0; rep < 30; rep++) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int t = 0; t < T; t++) gather_straight(tab + static_cast<int64_t>(t) * R * 64, ids.data() + t * N, N, L, out.data());
        ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(ts.begin(), ts.end());
      const char* names[] = {"contiguous", "scattered rows", "scattered runs of 16"};
      std::printf("K=%6d %-20s: %.2f ms  %.1f ns/row\n", K, names[scattered], ts[15], ts[15] * 1e6 / (N * T));
    }
  }
}
