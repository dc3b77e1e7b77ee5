// Standalone fp32 gather loop (the kernel's: prefetcht2 128 ids ahead, straight-line) on Zipf
// ids over 8 tables of 1M x 64 fp32 rows (16 bytes past a line), B=2048 bags of 32 ids, split
// into what its hot and cold ids cost: the ids themselves; every cold id (Zipf rank >= HOT)
// replaced by one of the 1,000 hottest rows; every hot id replaced by one row (L1); the cold ids
// alone. Where the first is the sum of the others, the cold rows' misses do not overlap the hot
// rows' work. Not part of the build; used for BENCHMARKS.md's embedding notes (Zen 4, 2026-11-24).
//
//   g++ -O3 -mavx512f -mavx512vl -mavx512bw -mavx512dq -o gather_overlap gather_overlap.cpp -lpthread
//   ./gather_overlap <threads> <HOT, e.g. 12000: about what the 32 MB L3 holds of 8 tables>
#include <chrono>
#include <cstdio>
#include <thread>
#include "gather_common.h"
int main(int argc, char** argv) {
  const int nthr = argc > 1 ? atoi(argv[1]) : 1, HOT = argc > 2 ? atoi(argv[2]) : 12000;
  const int64_t R = 1000000, T = 8, B = 2048, L = 32, NR = 8;
  float* tab = make_tables(R, T, 16);
  std::mt19937_64 g(1);
  std::vector<int32_t> ind(T * B * L * NR);
  const std::vector<int32_t> perm = fill_ids(ind, R, 1.05, g);  // one permutation for every table
  std::vector<int32_t> rank(R);
  for (int64_t i = 0; i < R; i++) rank[perm[i]] = static_cast<int32_t>(i);
  std::vector<int32_t> hot_only = ind, cold_only_padded = ind, cold;
  for (size_t i = 0; i < ind.size(); i++) {
    if (rank[ind[i]] >= HOT) {
      hot_only[i] = perm[rank[ind[i]] % 1000];
      cold.push_back(ind[i]);
    } else {
      cold_only_padded[i] = perm[0];
    }
  }
  std::printf("cold fraction %.3f\n", static_cast<double>(cold.size()) / ind.size());
  const int64_t cold_per = static_cast<int64_t>(cold.size() / NR / T / L * L);  // whole bags per (request, table)
  std::vector<float> out(T * B * 64 * 2);
  const std::vector<int32_t>* sets[4] = {&ind, &hot_only, &cold_only_padded, &cold};
  const char* names[] = {"zipf", "cold->hot", "hot->1 row", "cold only"};
  std::vector<std::vector<double>> ts(4);
  for (int rep = 0; rep < 120; rep++) {
    for (int v = 0; v < 4; v++) {
      const int req = rep % NR;
      const std::vector<int32_t>& I = *sets[v];
      const int64_t per = v == 3 ? cold_per : B * L;
      const auto t0 = std::chrono::steady_clock::now();
      std::vector<std::thread> th;
      for (int tt = 0; tt < nthr; tt++) {
        th.emplace_back([&, tt] {
          for (int tb = tt; tb < T; tb += nthr) {
            const int32_t* ids = I.data() + (static_cast<int64_t>(req) * T + tb) * per;
            gather_straight(tab + static_cast<int64_t>(tb) * R * 64, ids, per, L, out.data() + tt * B * 64);
          }
        });
      }
      for (auto& x : th) x.join();
      ts[v].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  for (int v = 0; v < 4; v++) {
    std::sort(ts[v].begin(), ts[v].end());
    std::printf("%-10s median %.2f ms (IQR %.2f-%.2f)\n", names[v], ts[v][60], ts[v][30], ts[v][90]);
  }
}
