// The int8 linear driver: packs weights once, quantizes activations per row, splits the GEMM
// over (row block, channel block) tasks on the thread pool, applies a sigmoid where asked.
#include "fastrec/linear.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "fastrec/dispatch.h"
#include "fastrec/parallel.h"

namespace fastrec {
namespace {

constexpr int64_t kSerialMacs = int64_t{1} << 21;  // below this, one thread: waking the pool costs more
// The same for row tasks, whose tasks quantize their own rows and meet once, not per layer:
// the small 13-512-256-128 MLP at B=8 (1.4M multiply-adds) ran 10.1 us on one thread, 6.9 on two.
constexpr int64_t kRowTaskSerialMacs = int64_t{1} << 20;
constexpr int64_t kStaticMacs = int64_t{1} << 18;  // few-row calls above this split channels per core

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

std::string nonfinite_message(const NonFinite& e) {
  const std::string row = "(row " + std::to_string(e.row) + ")";
  if (e.in_input()) return "input contains NaN or Inf " + row;
  const bool top = std::string(e.mlp) == "top";
  return std::string("the input of layer ") + std::to_string(e.layer) + (e.mlp[0] ? " of the " : "") + e.mlp +
         (e.mlp[0] ? " MLP" : "") + " holds NaN or Inf " + row + ": an earlier layer's output overflowed float32" +
         (top ? ", or an embedding table holds NaN or Inf" : " (the input itself is finite)");
}

// u8 activations (q + 128, padded to Kp) and per-row scales for M rows of x, on this thread.
// `layer`: which layer's input x is, for the message.
void quantize(const KernelTable& k, const float* x, int64_t M, int64_t ldx, int64_t K, int64_t Kp,
              std::vector<uint8_t>* a, std::vector<float>* a_scale, int layer = 0, const char* mlp = "") {
  a->resize(static_cast<size_t>(M * Kp));
  a_scale->resize(static_cast<size_t>(M));
  const int64_t bad = k.quantize_rows(QuantizeJob{x, ldx, K, Kp, 0, M, a->data(), a_scale->data()});
  if (bad >= 0) throw std::invalid_argument(nonfinite_message(NonFinite{bad, layer, mlp}));
}

Epilogue epilogue_of(Activation act) { return act == Activation::kRelu ? Epilogue::kRelu : Epilogue::kNone; }

// The fields of a GEMM call every task shares; callers set the rows and channel blocks.
GemmJob gemm_job(const PackedB& b, const uint8_t* a, int64_t lda, const float* a_scale, Epilogue ep, float* c,
                 int32_t* c32, int64_t ldc) {
  GemmJob j;
  j.a = a;
  j.lda = lda;
  j.a_scale = a_scale;
  j.b = &b;
  j.epilogue = ep;
  j.c = c;
  j.c32 = c32;
  j.ldc = ldc;
  return j;
}

void run_gemm(const KernelTable& k, const PackedB& b, const uint8_t* a, int64_t lda, const float* a_scale,
              int64_t M, Epilogue ep, float* c, int32_t* c32, int64_t ldc) {
  const int64_t nblocks = b.Np / 16;
  const bool parallel = M * b.N * b.K >= kSerialMacs && get_num_threads() > 1;
  const GemmJob base = gemm_job(b, a, lda, a_scale, ep, c, c32, ldc);
  // A few rows (a single request): split the channels statically, so each core keeps its
  // slice of the weights in its own L2 from call to call; the GEMV is bound by reading them.
  if (!parallel && M <= 4 && M * b.N * b.K >= kStaticMacs && get_num_threads() > 1 && nblocks >= 2) {
    parallel_for_each_thread([&](int64_t t, int64_t n) {
      GemmJob j = base;
      j.m0 = 0;
      j.m1 = M;
      j.nb0 = nblocks * t / n;
      j.nb1 = nblocks * (t + 1) / n;
      if (j.nb1 > j.nb0) k.gemm_s8(j);
    });
    return;
  }
  if (!parallel) {
    GemmJob j = base;
    j.m0 = 0;
    j.m1 = M;
    j.nb0 = 0;
    j.nb1 = nblocks;
    k.gemm_s8(j);
    return;
  }
  // Tasks: 64 channels x up to 64 rows, fewer rows when that leaves threads idle.
  const int64_t nt = get_num_threads();
  const int64_t nchunks = (nblocks + 3) / 4;
  int64_t mc = 64;
  while (mc > 4 && ((M + mc - 1) / mc) * nchunks < 4 * nt) mc /= 2;
  const int64_t mchunks = (M + mc - 1) / mc;
  parallel_for(mchunks * nchunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      GemmJob j = base;
      j.m0 = (t / nchunks) * mc;
      j.m1 = std::min(M, j.m0 + mc);
      j.nb0 = (t % nchunks) * 4;
      j.nb1 = std::min(nblocks, j.nb0 + 4);
      k.gemm_s8(j);
    }
  });
}

void sigmoid_inplace(float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = 1.f / (1.f + std::exp(-y[i]));
}


// Per-thread scratch of the row tasks (grow-only, reused from call to call).
struct RowScratch {
  std::vector<uint8_t> a;
  std::vector<float> a_scale, out;
};
RowScratch& row_scratch() {
  thread_local RowScratch s;
  return s;
}

// The layer-by-layer path (few rows on several threads): each layer's channels are split
// over the threads, with a pool barrier between layers.
void layer_by_layer(const KernelTable& k, const Int8Layer* const* layers, const Activation* acts, size_t n,
                    const float* x, int64_t M, int64_t ldx, float* y, const char* mlp) {
  std::vector<uint8_t> a;
  std::vector<float> a_scale, bufs[2];
  const float* in = x;
  int64_t ld = ldx;
  for (size_t i = 0; i < n; ++i) {
    const PackedB& b = layers[i]->view();
    const bool last = i + 1 == n;
    float* out = y;
    if (!last) {
      bufs[i % 2].resize(static_cast<size_t>(M * b.N));
      out = bufs[i % 2].data();
    }
    quantize(k, in, M, ld, b.K, b.Kp, &a, &a_scale, static_cast<int>(i), mlp);
    run_gemm(k, b, a.data(), b.Kp, a_scale.data(), M, epilogue_of(acts[i]), out, nullptr, b.N);
    if (acts[i] == Activation::kSigmoid) sigmoid_inplace(out, M * b.N);
    in = out;
    ld = b.N;
  }
}

}  // namespace

// Rows per task: at most 10 six-row register tiles, so a task's activations (60 x K bytes)
// and its weight slice stay in L1/L2 while every row of the task reuses the weights.
constexpr int64_t kTileRows = 6;
constexpr int64_t kMaxTilesPerTask = 10;
// Row tasks from this many rows per thread; below it, each layer's channels are split. Each
// thread then reads every layer's weights once per call for its rows (4 rows of reuse per
// weight byte at the threshold), where the channel split reads a share of them but quantizes
// each layer's input on one thread and meets the other threads after every layer: measured
// on 2 threads, row tasks ran the 1024-1024-512-256-1 MLP 15-25% faster from 8 rows up and
// the small 13-512-256-128 one up to 1.5x faster (BENCHMARKS.md, "Row tasks from 8 rows").
constexpr int64_t kRowTaskRowsPerThread = 4;
// Up to this many tiles a thread (144 rows), one task per thread with the rows split evenly
// beats tasks of at most kMaxTilesPerTask whole tiles, whose sums per thread came out uneven
// (B=128 on 2 threads: tasks of 30, 36, 30 and 32 rows; B=256: 42 x 5 and 46). Measured on 2
// threads (same build, the threshold switched by a temporary environment variable, interleaved,
// 20 rounds, BENCHMARKS.md "One task per thread up to 144 rows"): the 1024-1024-512-256-1 MLP
// 1.068x faster at B=128, 1.023x at 160, 1.034x at 200, 1.015x at 256, 0.994x at 288 (the
// largest batch it applies to on 2 threads); the bench's DLRM 1.083x at B=128, 1.031x at 200,
// 1.036x at 270. Below 120 rows on 2 threads nothing changes (one task per thread already).
constexpr int64_t kMaxTilesPerEvenTask = 24;

bool row_tasks_pay(int64_t M) {
  const int64_t nt = get_num_threads();
  return nt == 1 || M >= kRowTaskRowsPerThread * nt;
}

RowTasks::RowTasks(int64_t M_, int64_t macs_per_row) : M(M_) {
  const int64_t nt = get_num_threads();
  parallel = nt > 1 && M * macs_per_row >= kRowTaskSerialMacs;
  tiles = (M + kTileRows - 1) / kTileRows;
  tasks = (tiles + kMaxTilesPerTask - 1) / kMaxTilesPerTask;
  if (parallel) tasks = (tasks + nt - 1) / nt * nt;  // the threads end together
  // At most one task per thread, or up to kMaxTilesPerEvenTask tiles a thread on the pool:
  // one task per thread, the rows split evenly (16 rows on 2 threads: 8 + 8, not one 6-row
  // tile + 10 rows). More: whole tiles a task.
  even = tasks <= nt || (parallel && tiles <= nt * kMaxTilesPerEvenTask);
  if (even && parallel) tasks = nt;
  tasks = std::min(tasks, even ? M : tiles);
}

void RowTasks::run(const std::function<void(int64_t, int64_t, int64_t)>& fn) const {
  auto body = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = even ? M * t / tasks : std::min(M, tiles * t / tasks * kTileRows);
      const int64_t m1 = even ? M * (t + 1) / tasks : std::min(M, tiles * (t + 1) / tasks * kTileRows);
      if (m1 > m0) fn(t, m0, m1);
    }
  };
  if (parallel) {
    parallel_for(tasks, 1, body);
  } else {
    body(0, tasks);
  }
}

void throw_if_nonfinite(const std::vector<NonFinite>& bad) {
  // The caller's own input first (layer 0 of the first MLP): one task's overflow inside the
  // model must not hide another task's NaN in the input.
  for (const NonFinite& e : bad) {
    if (e.row >= 0 && e.in_input()) throw std::invalid_argument(nonfinite_message(e));
  }
  for (const NonFinite& e : bad) {
    if (e.row >= 0) throw std::invalid_argument(nonfinite_message(e));
  }
}

int64_t int8_layers_on_rows(const Int8Layer* const* layers, const Activation* acts, size_t n, const float* x,
                            int64_t ldx, int64_t rows, float* y, int* layer) {
  const KernelTable& k = kernels();
  RowScratch& s = row_scratch();
  const float* in = x;
  int64_t ld = ldx;
  for (size_t i = 0; i < n; ++i) {
    const PackedB& b = layers[i]->view();
    const QuantizeJob q{in, ld, b.K, b.Kp, 0, rows, at_least(&s.a, rows * b.Kp), at_least(&s.a_scale, rows)};
    const int64_t bad = k.quantize_rows(q);
    if (bad >= 0) {
      if (layer) *layer = static_cast<int>(i);
      return bad;
    }
    float* out = i + 1 == n ? y : at_least(&s.out, rows * b.N);  // `in` is consumed by now
    GemmJob j = gemm_job(b, q.a, b.Kp, q.a_scale, epilogue_of(acts[i]), out, nullptr, b.N);
    j.m0 = 0;
    j.m1 = rows;
    j.nb0 = 0;
    j.nb1 = b.Np / 16;
    k.gemm_s8(j);
    if (acts[i] == Activation::kSigmoid) sigmoid_inplace(out, rows * b.N);
    in = out;
    ld = b.N;
  }
  return -1;
}

void int8_layers_forward(const Int8Layer* const* layers, const Activation* acts, size_t n, const float* x, int64_t M,
                         int64_t ldx, float* y, const char* mlp) {
  if (M == 0) return;
  if (!row_tasks_pay(M)) {  // run_gemm decides per layer whether to split
    layer_by_layer(kernels(), layers, acts, n, x, M, ldx, y, mlp);
    return;
  }
  int64_t macs = 0;
  for (size_t i = 0; i < n; ++i) macs += layers[i]->in_features() * layers[i]->out_features();
  const RowTasks rt(M, macs);
  std::vector<NonFinite> bad(static_cast<size_t>(rt.tasks));
  const int64_t ldy = layers[n - 1]->out_features();
  rt.run([&](int64_t t, int64_t m0, int64_t m1) {
    int layer = 0;
    const int64_t r = int8_layers_on_rows(layers, acts, n, x + m0 * ldx, ldx, m1 - m0, y + m0 * ldy, &layer);
    if (r >= 0) bad[t] = NonFinite{m0 + r, layer, mlp};
  });
  throw_if_nonfinite(bad);
}

void check_layer_chain(const Int8Layer* const* layers, size_t n) {
  for (size_t i = 1; i < n; ++i) {
    if (layers[i]->in_features() != layers[i - 1]->out_features()) {
      throw std::invalid_argument("layer " + std::to_string(i) + " takes " + std::to_string(layers[i]->in_features()) +
                                  " features but layer " + std::to_string(i - 1) + " gives " +
                                  std::to_string(layers[i - 1]->out_features()));
    }
  }
}

Int8Layer::Int8Layer(const int8_t* w, int64_t N, int64_t K, const float* scale, const float* bias) {
  if (N < 1 || K < 1) throw std::invalid_argument("an int8 layer needs N >= 1 and K >= 1");
  if (K > kMaxInt8K) {
    throw std::invalid_argument("an int8 layer takes at most " + std::to_string(kMaxInt8K) + " input features, got " +
                                std::to_string(K) + ": beyond, a sum of 127 * 127 * K overflows the int32 accumulators");
  }
  const int64_t Np = round_up(N, 16), Kp = round_up(K, 4);
  packed_.assign(static_cast<size_t>(Np * Kp), 0);
  comp_.assign(static_cast<size_t>(Np), 0);
  scale_.assign(static_cast<size_t>(Np), 0.f);
  std::copy(scale, scale + N, scale_.begin());
  float max_abs_scale = 0.f;
  for (int64_t n = 0; n < N; ++n) max_abs_scale = std::max(max_abs_scale, std::fabs(scale[n]));
  if (bias) {
    bias_.assign(static_cast<size_t>(Np), 0.f);
    std::copy(bias, bias + N, bias_.begin());
  }
  const int64_t kg = Kp / 4;
  for (int64_t n = 0; n < N; ++n) {
    int32_t sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int8_t v = w[n * K + k];
      sum += v;
      // block n/16, group k/4, lane n%16, byte k%4
      packed_[static_cast<size_t>(((n / 16) * kg + k / 4) * 64 + (n % 16) * 4 + k % 4)] = v;
    }
    // 128 * sum can pass int32 for K near kMaxInt8K: wrap it modulo 2**32 as the kernels' sums do
    comp_[static_cast<size_t>(n)] = static_cast<int32_t>(128u * static_cast<uint32_t>(sum));
  }
  view_.N = N;
  view_.K = K;
  view_.Np = Np;
  view_.Kp = Kp;
  view_.packed = packed_.data();
  view_.comp = comp_.data();
  view_.scale = scale_.data();
  view_.bias = bias ? bias_.data() : nullptr;
  view_.max_abs_scale = max_abs_scale;
}

void int8_linear_forward(const Int8Layer& layer, const float* x, int64_t M, int64_t ldx, Activation act, float* y) {
  const Int8Layer* l = &layer;
  int8_layers_forward(&l, &act, 1, x, M, ldx, y);
}

void int8_linear_int32(const Int8Layer& layer, const int8_t* q, int64_t M, int32_t* y32) {
  if (M == 0) return;
  const PackedB& b = layer.view();
  std::vector<uint8_t> a(static_cast<size_t>(M * b.Kp), 128);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t kk = 0; kk < b.K; ++kk) a[m * b.Kp + kk] = static_cast<uint8_t>(q[m * b.K + kk] + 128);
  std::vector<float> ones(static_cast<size_t>(M), 1.f);
  run_gemm(kernels(), b, a.data(), b.Kp, ones.data(), M, Epilogue::kInt32, nullptr, y32, b.N);
}

void int8_mlp_forward(const std::vector<const Int8Layer*>& layers, const std::vector<Activation>& acts,
                      const float* x, int64_t M, float* y) {
  if (layers.empty()) throw std::invalid_argument("an MLP needs at least one layer");
  if (acts.size() != layers.size()) throw std::invalid_argument("one activation per layer is required");
  check_layer_chain(layers.data(), layers.size());
  int8_layers_forward(layers.data(), acts.data(), layers.size(), x, M, layers[0]->in_features(), y);
}

void quantize_rows_int8(const float* x, int64_t M, int64_t K, int8_t* q, float* scale) {
  const int64_t Kp = round_up(K, 4);
  std::vector<uint8_t> a;
  std::vector<float> s;
  quantize(kernels(), x, M, K, K, Kp, &a, &s);
  for (int64_t m = 0; m < M; ++m) {
    scale[m] = s[m];
    for (int64_t k = 0; k < K; ++k) q[m * K + k] = static_cast<int8_t>(static_cast<int32_t>(a[m * Kp + k]) - 128);
  }
}

}  // namespace fastrec
