// How close the AVX-512 VNNI int8 GEMM kernel runs to the machine's vpdpbusd peak, without
// Python, quantization or the thread pool: (1) a register-only loop of independent vpdpbusd
// (the peak: one 512-bit vpdpbusd is 64 multiply-adds), then (2) fastrec's own kernel
// (csrc/cpu/avx512/gemm_avx512vnni.cpp, compiled into this file) on one task's shapes, called
// again and again, on each thread at once with its own data. Not part of the build; used for
// BENCHMARKS.md's int8 section (Zen 4, 2026-11-24).
//
//   g++ -O2 -std=c++17 -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -I csrc/include -o /tmp/gemm_ceiling benches/cpp/gemm_ceiling.cpp csrc/common/cpu_features.cpp -lpthread
//   /tmp/gemm_ceiling <threads>            # the peak and the kernel's rate on each shape
//   /tmp/gemm_ceiling <threads> kslices    # K-slice sizes compared, interleaved
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "fastrec/dispatch.h"
#include "fastrec/gemm.h"

// The kernel file calls the scalar reference for rows too small to scale, and for jobs whose
// scales' product overflows (zero_sum_guard_needed); neither is reached here (it aborts if so).
namespace fastrec {
namespace ref {
int64_t quantize_rows(const QuantizeJob&) { return -1; }
void gemm_s8(const GemmJob&) {
  std::fprintf(stderr, "gemm_ceiling: the scalar reference was called: the timing would be wrong\n");
  std::abort();
}
}  // namespace ref
}  // namespace fastrec
// k-groups per K slice for the `kslices` comparison (0: the kernel's own choice by vendor).
static int64_t g_k_slice = 0;
#define FASTREC_GEMM_K_SLICE_GROUPS g_k_slice
#include "../../csrc/cpu/avx512/gemm_avx512vnni.cpp"

using fastrec::Epilogue;
using fastrec::GemmJob;
using fastrec::PackedB;
using Clock = std::chrono::steady_clock;

// One thread's loop of independent vpdpbusd (12 accumulators, no loads); `sink` keeps it.
// Vec: __m512i or __m256i (the 256-bit form checks that no CPU here runs it at a higher rate per
// multiply-add: on the Zen 4, both give 64 multiply-adds a cycle).
template <class Vec>
static void peak_loop(int64_t iters, int32_t* sink) {
  Vec a, b, c0;
  std::memset(&a, 1, sizeof(a));
  std::memset(&b, 2, sizeof(b));
  std::memset(&c0, 0, sizeof(c0));
  Vec c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  for (int64_t i = 0; i < iters; ++i) {
#define FASTREC_D(x) asm volatile("vpdpbusd %1, %2, %0" : "+v"(x) : "v"(a), "v"(b));
    FASTREC_D(c0) FASTREC_D(c1) FASTREC_D(c2) FASTREC_D(c3) FASTREC_D(c4) FASTREC_D(c5)
    FASTREC_D(c6) FASTREC_D(c7) FASTREC_D(c8) FASTREC_D(c9) FASTREC_D(c10) FASTREC_D(c11)
#undef FASTREC_D
  }
  const Vec all[12] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11};
  int32_t sum[16] = {0};
  for (const Vec& v : all) {
    int32_t lanes[16] = {0};
    std::memcpy(lanes, &v, sizeof(v));
    for (int l = 0; l < 16; ++l) sum[l] += lanes[l];
  }
  std::memcpy(sink, sum, sizeof(sum));
}

// Seconds of wall time of `fn(thread)` run on every thread at once.
template <class Fn>
static double on_threads(int threads, Fn fn) {
  const auto t0 = Clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { fn(t); });
  for (auto& th : pool) th.join();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Best of 7 rounds of on_threads(threads, fn).
template <class Fn>
static double best_round(int threads, Fn fn) {
  double best = 1e30;
  for (int round = 0; round < 7; ++round) best = std::min(best, on_threads(threads, fn));
  return best;
}

// Multiply-adds per second of `threads` threads running only vpdpbusd (64 each at 512 bits).
template <class Vec = __m512i>
static double peak(int threads) {
  const int64_t iters = 20000000;
  std::vector<int32_t> sink(static_cast<size_t>(threads) * 16);
  const double s = best_round(threads, [&](int t) { peak_loop<Vec>(iters, sink.data() + 16 * t); });
  return static_cast<double>(threads) * 12.0 * static_cast<double>(sizeof(Vec)) * static_cast<double>(iters) / s;
}

// One thread's data for an M x K x N call of the kernel, ReLU epilogue, as a row task runs it.
struct Problem {
  int64_t M, K, N, Np, Kp;
  std::vector<int8_t> packed;
  std::vector<int32_t> comp;
  std::vector<float> scale, bias, a_scale, c;
  std::vector<uint8_t> a;
  PackedB b;
  GemmJob j;
  Problem(int64_t M_, int64_t K_, int64_t N_, unsigned seed) : M(M_), K(K_), N(N_) {
    Np = (N + 15) / 16 * 16;
    Kp = (K + 3) / 4 * 4;
    std::mt19937 g(seed);
    packed.resize(static_cast<size_t>(Np * Kp));
    for (auto& v : packed) v = static_cast<int8_t>(static_cast<int>(g() % 255) - 127);
    comp.assign(static_cast<size_t>(Np), 0);
    scale.assign(static_cast<size_t>(Np), 0.01f);
    bias.assign(static_cast<size_t>(Np), 0.1f);
    a_scale.assign(static_cast<size_t>(M), 0.02f);
    c.assign(static_cast<size_t>(M * N), 0.f);
    a.resize(static_cast<size_t>(M * Kp));
    for (auto& v : a) v = static_cast<uint8_t>(g());
    b.N = N; b.K = K; b.Np = Np; b.Kp = Kp;
    b.packed = packed.data(); b.comp = comp.data(); b.scale = scale.data(); b.bias = bias.data();
    b.max_abs_scale = 0.01f;  // (left at its default, infinity, every job went to the scalar reference)
    j.a = a.data(); j.lda = Kp; j.a_scale = a_scale.data(); j.b = &b;
    j.m0 = 0; j.m1 = M; j.nb0 = 0; j.nb1 = Np / 16;
    j.epilogue = Epilogue::kRelu; j.c = c.data(); j.ldc = N;
  }
};

// Multiply-adds per second of the kernel on every thread at once, `reps` calls each.
static double kernel_rate(int threads, int64_t M, int64_t K, int64_t N, int64_t reps) {
  std::vector<Problem*> ps;
  for (int t = 0; t < threads; ++t) ps.push_back(new Problem(M, K, N, 1u + static_cast<unsigned>(t)));
  const double s = best_round(threads, [&](int t) {
    for (int64_t r = 0; r < reps; ++r) fastrec::avx512vnni::gemm_s8(ps[t]->j);
  });
  for (Problem* p : ps) delete p;
  return static_cast<double>(threads) * M * K * N * reps / s;
}

// `kslices`: the kernel with K in slices of 64 k-groups (the Xeon's choice) against the whole K
// and 512-group slices, interleaved (the order rotates each round), 40 rounds of ~0.3 G
// multiply-adds per thread; speed relative to the 64-group slices, median and IQR of rounds.
static void compare_k_slices(int threads) {
  const int64_t choices[] = {64, int64_t{1} << 30, 512, 64};
  const char* names[] = {"64-group slices", "whole K", "512-group slices", "64-group again"};
  const int nv = 4;
  const int64_t shapes[][3] = {{128, 1024, 1024}, {128, 1024, 512}, {128, 2048, 1024}, {128, 4096, 512},
                               {128, 8192, 256},  {1024, 1024, 1024}, {16, 1024, 1024}};
  for (const auto& s : shapes) {
    std::vector<Problem*> ps;
    for (int t = 0; t < threads; ++t) ps.push_back(new Problem(s[0], s[1], s[2], 1u + static_cast<unsigned>(t)));
    const int64_t reps = std::max<int64_t>(1, 300000000LL / (s[0] * s[1] * s[2]));
    std::vector<std::vector<double>> speed(nv);
    for (int round = 0; round < 40; ++round) {
      double secs[nv];
      for (int i = 0; i < nv; ++i) {
        const int v = (i + round) % nv;
        g_k_slice = choices[v];
        secs[v] = on_threads(threads, [&](int t) {
          for (int64_t r = 0; r < reps; ++r) fastrec::avx512vnni::gemm_s8(ps[t]->j);
        });
      }
      for (int v = 0; v < nv; ++v) speed[v].push_back(secs[0] / secs[v]);
    }
    for (int v = 0; v < nv; ++v) {
      std::vector<double>& r = speed[v];
      std::sort(r.begin(), r.end());
      std::printf("M=%-4lld K=%-5lld N=%-5lld %-17s %.3fx (IQR %.3f-%.3f)\n", static_cast<long long>(s[0]),
                  static_cast<long long>(s[1]), static_cast<long long>(s[2]), names[v], r[r.size() / 2],
                  r[r.size() / 4], r[3 * r.size() / 4]);
    }
    for (Problem* p : ps) delete p;
  }
  g_k_slice = 0;
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  if (threads < 1 || threads > 256) {
    std::fprintf(stderr, "usage: %s <threads> [kslices]\n", argv[0]);
    return 2;
  }
  if (argc > 2 && std::string(argv[2]) == "kslices") {
    compare_k_slices(threads);
    return 0;
  }
  const double top = peak(threads);
  std::printf("vpdpbusd peak, %d thread(s): %.0f GMAC/s (the 256-bit form: %.0f)\n", threads, top / 1e9,
              peak<__m256i>(threads) / 1e9);
  // Rows per call as one row task of a large-batch MLP (60), and the widths of
  // benches/bench_linear.py's layers and of the 1024-1024-512-256-1 MLP.
  const int64_t shapes[][3] = {{60, 1024, 1024}, {60, 1024, 512}, {60, 512, 256}, {60, 512, 512},
                               {60, 256, 64},    {60, 1024, 4096}, {6, 1024, 64}};
  for (const auto& s : shapes) {
    const int64_t reps = std::max<int64_t>(1, 2000000000LL / (s[0] * s[1] * s[2]));
    const double r = kernel_rate(threads, s[0], s[1], s[2], reps);
    std::printf("kernel M=%-4lld K=%-5lld N=%-5lld %6.0f GMAC/s  %5.1f%% of peak\n", static_cast<long long>(s[0]),
                static_cast<long long>(s[1]), static_cast<long long>(s[2]), r / 1e9, 100.0 * r / top);
  }
  return 0;
}
