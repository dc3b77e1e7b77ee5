// The machine's ceiling for random-row gathers: how many cache lines per nanosecond two (or one)
// threads pull from DRAM when each random place is one line, or a row of 5 consecutive lines (a
// 256-byte fp32 D=64 row 16 bytes past a line, as numpy's tables are), each line prefetched D
// places ahead (prefetcht0 or prefetcht2) and then loaded. 2 GB buffer, huge pages advised.
// Not part of the build; used for BENCHMARKS.md's Zen 5 notes (2026-11-24).
//
//   g++ -O3 -mavx512f -o gather_lines gather_lines.cpp -lpthread
//   ./gather_lines
#include <immintrin.h>
#include <sys/mman.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

// Lines per ns over all threads; each thread takes an equal slice of the places.
template <int D, int Hint, int Lines>
double lines_per_ns(const char* buf, const std::vector<uint64_t>& places, int nthreads) {
  std::vector<float> sink(nthreads);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < nthreads; ++t) {
    threads.emplace_back([&, t] {
      const size_t n = places.size() / nthreads;
      const uint64_t* p = places.data() + t * n;
      __m512 acc = _mm512_setzero_ps();
      for (size_t i = 0; i < n; ++i) {
        if (i + D < n) {
          for (int l = 0; l < Lines; ++l) {
            _mm_prefetch(buf + p[i + D] + 64 * l, Hint == 0 ? _MM_HINT_T0 : _MM_HINT_T2);
          }
        }
        for (int l = 0; l < Lines; ++l) {
          acc = _mm512_add_ps(acc, _mm512_load_ps(reinterpret_cast<const float*>(buf + p[i] + 64 * l)));
        }
      }
      sink[t] = _mm512_reduce_add_ps(acc);  // keeps the loads
    });
  }
  for (auto& th : threads) th.join();
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  return static_cast<double>(places.size()) * Lines / ns;
}

int main() {
  const size_t bytes = size_t{2} << 30;
  char* buf = static_cast<char*>(aligned_alloc(size_t{2} << 20, bytes));
  madvise(buf, bytes, MADV_HUGEPAGE);
  memset(buf, 1, bytes);
  std::mt19937_64 g(1);
  std::uniform_int_distribution<uint64_t> u(0, bytes / 512 - 1);  // places 512 bytes apart
  for (int rep = 0; rep < 2; ++rep) {
    std::vector<uint64_t> one(4000000), five(800000);
    for (auto& x : one) x = u(g) * 512;
    for (auto& x : five) x = u(g) * 512;
    printf("1 line a place,  2 threads: t0 64 ahead %.2f, t0 256 ahead %.2f, t2 256 ahead %.2f; 1 thread t0 64 ahead %.2f lines/ns\n",
           lines_per_ns<64, 0, 1>(buf, one, 2), lines_per_ns<256, 0, 1>(buf, one, 2),
           lines_per_ns<256, 2, 1>(buf, one, 2), lines_per_ns<64, 0, 1>(buf, one, 1));
    printf("5 lines a place, 2 threads: t0 64 ahead %.2f, t0 16 ahead %.2f, t2 128 ahead %.2f; 1 thread t0 64 ahead %.2f lines/ns\n",
           lines_per_ns<64, 0, 5>(buf, five, 2), lines_per_ns<16, 0, 5>(buf, five, 2),
           lines_per_ns<128, 2, 5>(buf, five, 2), lines_per_ns<64, 0, 5>(buf, five, 1));
  }
}
