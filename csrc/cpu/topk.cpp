// The top-k driver: packs item blocks, splits the catalogue across threads, scores tiles of
// (queries x items) with the ISA kernels, keeps per-query candidates behind a threshold, merges
// the threads' candidates, reranks with the float32 rows, sorts.
#include "fastrec/topk.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "fastrec/dispatch.h"
#include "fastrec/parallel.h"

namespace fastrec {

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {                                                // subnormal or zero in half
    if (ax < 0x33000000u) return sign;                                   // < 2^-25: rounds to 0
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24 (value = m * 2^(e-150), half unit = 2^-24)
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = ((ax >> 13) - ((127u - 15u) << 10));
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

ItemBlock::ItemBlock(const float* items, int64_t N, int64_t D, ItemPrecision precision, bool keep_f32)
    : N_(N), D_(D), precision_(precision) {
  if (N < 0 || D < 1) throw std::invalid_argument("ItemBlock: need N >= 0 and D >= 1");
  const int64_t Np = npanels() * 16;
  if (precision == ItemPrecision::kInt8) {
    // Symmetric per-item int8: exactly the activation quantizer (linear.h).
    std::vector<int8_t> q(static_cast<size_t>(N * D));
    int8_scale_.resize(static_cast<size_t>(N));
    quantize_rows_int8(items, N, D, q.data(), int8_scale_.data());
    // An empty block has no panels, so nothing reads int8_ (an Int8Layer needs N >= 1).
    if (N > 0) int8_ = std::make_unique<Int8Layer>(q.data(), N, D, int8_scale_.data(), nullptr);
  } else if (precision == ItemPrecision::kF16) {
    f16_panels_.assign(static_cast<size_t>(Np * D), 0);
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t d = 0; d < D; ++d) f16_panels_[((i / 16) * D + d) * 16 + i % 16] = float_to_half(items[i * D + d]);
    }
  } else {
    f32_panels_.assign(static_cast<size_t>(Np * D), 0.f);
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t d = 0; d < D; ++d) f32_panels_[((i / 16) * D + d) * 16 + i % 16] = items[i * D + d];
    }
  }
  has_f32_ = keep_f32 || precision == ItemPrecision::kF32;
  // fp32 items are their panels already (f32_row reads them there): no second copy.
  if (has_f32_ && precision != ItemPrecision::kF32) f32_.assign(items, items + N * D);
}

int64_t ItemBlock::nbytes() const {
  int64_t n = static_cast<int64_t>(f32_.size() * 4 + f32_panels_.size() * 4 + f16_panels_.size() * 2 +
                                   int8_scale_.size() * 4);
  if (int8_) {
    const PackedB& b = int8_->view();
    n += b.Np * b.Kp + b.Np * 8;  // packed codes, comp + scale
  }
  return n;
}

void ItemBlock::to_float(float* out) const {
  if (!f32_.empty()) {
    std::copy(f32_.begin(), f32_.end(), out);
    return;
  }
  if (precision_ == ItemPrecision::kF32) {  // the panels, 16 rows at a time (reads in order)
    for (int64_t p = 0; p < npanels(); ++p) {
      const int64_t rows = std::min<int64_t>(16, N_ - p * 16);
      for (int64_t d = 0; d < D_; ++d) {
        const float* src = f32_panels_.data() + (p * D_ + d) * 16;
        for (int64_t r = 0; r < rows; ++r) out[(p * 16 + r) * D_ + d] = src[r];
      }
    }
    return;
  }
  for (int64_t i = 0; i < N_; ++i) {
    for (int64_t d = 0; d < D_; ++d) {
      if (precision_ == ItemPrecision::kInt8) {
        out[i * D_ + d] = static_cast<float>(packed_at(int8_->view(), i, d)) * int8_scale_[i];
      } else {
        out[i * D_ + d] = half_to_float(f16_panels_[((i / 16) * D_ + d) * 16 + i % 16]);
      }
    }
  }
}

const void* ItemBlock::panels() const {
  if (precision_ == ItemPrecision::kF16) return f16_panels_.data();
  if (precision_ == ItemPrecision::kF32) return f32_panels_.data();
  return nullptr;
}

int64_t ItemBlock::panel_bytes() const { return D_ * 16 * (precision_ == ItemPrecision::kF16 ? 2 : 4); }

namespace {

constexpr int64_t kPanelsPerChunk = 32;  // 512 items a tile: 32 KB of int8 D=64 items
constexpr int64_t kQueryBlock = 64;      // 64 x 512 float scores: 128 KB, stays in L2
constexpr int64_t kSerialWork = int64_t{1} << 21;
constexpr int64_t kSplitQueriesPerThread = 32;  // int8 catalogues: split the queries from this many a thread

struct Cand {
  float score;
  int32_t seg;
  int64_t row;
};

struct Better {
  const std::vector<SegmentRef>* segs;
  int64_t id(const Cand& c) const { return (*segs)[c.seg].ids[c.row]; }
  bool operator()(const Cand& a, const Cand& b) const {
    if (a.score != b.score) return a.score > b.score;
    return id(a) < id(b);
  }
};

// One query's candidates in one thread: everything that may still be among its `keep` best.
// Scores below `thr` (the keep-th best score at the last compaction) never enter.
struct TopBuf {
  float thr = -std::numeric_limits<float>::infinity();
  std::vector<Cand> v;
};

struct Search {
  const std::vector<SegmentRef>& segs;
  const TopKRequest& req;
  const KernelTable& kt;
  Better better;
  int64_t keep = 0;  // candidates kept per query
  size_t cap = 0;    // buffer size that triggers a compaction
  std::vector<std::vector<int64_t>> exclude;  // per query, sorted

  bool excluded(int64_t q, const Cand& c) const {
    if (exclude.empty()) return false;
    const auto& ex = exclude[static_cast<size_t>(q)];
    return !ex.empty() && std::binary_search(ex.begin(), ex.end(), better.id(c));
  }

  // Keeps the candidates scoring at least the keep-th best score (ties at the boundary all
  // stay, so the final exact sort breaks them by id). Selecting on bare floats is much cheaper
  // than on candidates; only a pathological run of equal scores needs the exact comparator.
  void compact(TopBuf& b, std::vector<float>& scratch) const {
    scratch.resize(b.v.size());
    for (size_t i = 0; i < b.v.size(); ++i) scratch[i] = b.v[i].score;
    std::nth_element(scratch.begin(), scratch.begin() + (keep - 1), scratch.end(), std::greater<float>());
    const float kth = scratch[static_cast<size_t>(keep - 1)];
    size_t n = 0;
    for (size_t i = 0; i < b.v.size(); ++i) {
      if (b.v[i].score >= kth) b.v[n++] = b.v[i];
    }
    b.v.resize(n);
    if (b.v.size() >= cap) {  // more ties than the buffer holds: cut exactly
      std::nth_element(b.v.begin(), b.v.begin() + (keep - 1), b.v.end(), better);
      b.v.resize(static_cast<size_t>(keep));
    }
    b.thr = kth;
  }
};

// Per-thread scratch: score tile, surviving positions, quantized query rows use the shared copy.
struct ThreadState {
  std::vector<TopBuf> bufs;  // one per query of the chunk
  std::vector<float> tile;
  std::vector<int32_t> pos;
  std::vector<float> scratch;
  std::vector<float> thr;       // fused kernel: the block's thresholds
  std::vector<TopkHit> hits;    // fused kernel: the scores that passed
};

// Appends one candidate that passed the (possibly stale) threshold check.
inline void offer(const Search& s, ThreadState& ts, TopBuf& tb, int64_t q, const SegmentRef& seg, const Cand& c) {
  if (c.score < tb.thr || (seg.removed && seg.removed[c.row]) || s.excluded(q, c)) return;
  tb.v.push_back(c);
  if (tb.v.size() >= s.cap) s.compact(tb, ts.scratch);
}

// Queries q0 .. q0 + nq (candidates in ts.bufs[buf0 ..]) against panels [g0, g1) of the
// catalogue (panels numbered across the segments).
void scan(const Search& s, ThreadState& ts, int64_t q0, int64_t nq, int64_t buf0, const uint8_t* qa,
          const float* qa_scale, int64_t Kp, int64_t g0, int64_t g1) {
  const int64_t ldc = kPanelsPerChunk * 16;
  int64_t base = 0;  // global panel index of the segment's first panel
  for (size_t si = 0; si < s.segs.size(); ++si) {
    const SegmentRef& seg = s.segs[si];
    const ItemBlock& blk = *seg.block;
    const int64_t np = blk.npanels();
    const int64_t p0 = std::max<int64_t>(g0 - base, 0), p1 = std::min<int64_t>(g1 - base, np);
    base += np;
    for (int64_t pc = p0; pc < p1; pc += kPanelsPerChunk) {
      const int64_t pn = std::min(kPanelsPerChunk, p1 - pc);
      const int64_t item0 = pc * 16;
      const int64_t nvalid = std::min(pn * 16, blk.size() - item0);
      PackedB sub;
      if (blk.precision() == ItemPrecision::kInt8) {
        const PackedB& b = blk.int8()->view();
        sub = b;
        sub.packed = b.packed + item0 * b.Kp;
        sub.comp = b.comp + item0;
        sub.scale = b.scale + item0;
        sub.bias = nullptr;
        sub.N = nvalid;
        sub.Np = pn * 16;
      }
      for (int64_t qb = 0; qb < nq; qb += kQueryBlock) {
        const int64_t rows = std::min(kQueryBlock, nq - qb);
        if (blk.precision() == ItemPrecision::kInt8 && s.kt.topk_s8) {
          Int8TopkJob job;
          job.a = qa + qb * Kp;
          job.lda = Kp;
          job.rows = rows;
          job.a_scale = qa_scale + qb;
          job.b = &sub;
          for (int64_t r = 0; r < rows; ++r) {
            ts.thr[static_cast<size_t>(r)] = ts.bufs[static_cast<size_t>(buf0 + qb + r)].thr;
          }
          job.thr = ts.thr.data();
          job.hits = ts.hits.data();
          const int64_t nh = s.kt.topk_s8(job);
          for (int64_t h = 0; h < nh; ++h) {
            const TopkHit& hit = ts.hits[static_cast<size_t>(h)];
            offer(s, ts, ts.bufs[static_cast<size_t>(buf0 + qb + hit.row)], q0 + qb + hit.row, seg,
                  Cand{hit.score, static_cast<int32_t>(si), item0 + hit.item});
          }
          continue;
        }
        if (blk.precision() == ItemPrecision::kInt8) {
          GemmJob g;
          g.a = qa + qb * Kp;
          g.lda = Kp;
          g.a_scale = qa_scale + qb;
          g.b = &sub;
          g.m0 = 0;
          g.m1 = rows;
          g.nb0 = 0;
          g.nb1 = pn;
          g.epilogue = Epilogue::kNone;
          g.c = ts.tile.data();
          g.ldc = ldc;
          s.kt.gemm_s8(g);
        } else {
          FloatScoreJob f;
          f.q = s.req.queries + (q0 + qb) * s.req.D;
          f.ldq = s.req.D;
          f.rows = rows;
          f.D = s.req.D;
          f.panels = static_cast<const char*>(blk.panels()) + pc * blk.panel_bytes();
          f.f16 = blk.precision() == ItemPrecision::kF16;
          f.npanels = pn;
          f.c = ts.tile.data();
          f.ldc = ldc;
          s.kt.score_float(f);
        }
        for (int64_t r = 0; r < rows; ++r) {
          TopBuf& tb = ts.bufs[static_cast<size_t>(buf0 + qb + r)];
          const float* sc = ts.tile.data() + r * ldc;
          const int64_t cnt = s.kt.select_ge(sc, nvalid, tb.thr, ts.pos.data());
          for (int64_t i = 0; i < cnt; ++i) {
            const int32_t at = ts.pos[static_cast<size_t>(i)];
            offer(s, ts, tb, q0 + qb + r, seg, Cand{sc[at], static_cast<int32_t>(si), item0 + at});
          }
        }
      }
    }
  }
}

}  // namespace

void topk_search(const std::vector<SegmentRef>& segments, const TopKRequest& req, float* scores, int64_t* ids) {
  const int64_t Q = req.Q, k = req.k, D = req.D;
  if (k < 1) throw std::invalid_argument("k must be >= 1");
  if (req.candidates < k) throw std::invalid_argument("candidates must be >= k");
  int64_t total = 0, panels = 0;
  bool int8 = false, all_int8 = true;
  for (const SegmentRef& s : segments) {
    if (s.block->dim() != D) throw std::invalid_argument("item block dimension differs from the queries'");
    if (req.rerank && !s.block->has_f32() && !s.rows) throw std::invalid_argument("rerank needs the float32 rows");
    total += s.block->size();
    panels += s.block->npanels();
    int8 = int8 || s.block->precision() == ItemPrecision::kInt8;
    all_int8 = all_int8 && s.block->precision() == ItemPrecision::kInt8;
  }
  for (int64_t i = 0; i < Q * k; ++i) {
    scores[i] = -std::numeric_limits<float>::infinity();
    ids[i] = -1;
  }
  if (Q == 0 || total == 0) return;

  Search s{segments, req, kernels(), Better{&segments}};
  s.keep = std::min(req.candidates, total);
  s.cap = static_cast<size_t>(std::max<int64_t>(2 * s.keep, s.keep + 256));
  if (req.exclude_offsets) {
    s.exclude.resize(static_cast<size_t>(Q));
    for (int64_t q = 0; q < Q; ++q) {
      auto& ex = s.exclude[static_cast<size_t>(q)];
      ex.assign(req.exclude_ids + req.exclude_offsets[q], req.exclude_ids + req.exclude_offsets[q + 1]);
      std::sort(ex.begin(), ex.end());
    }
  }

  const int64_t Kp = (D + 3) / 4 * 4;
  const int nthreads = get_num_threads();
  const bool parallel = nthreads > 1 && Q * total * D >= kSerialWork && panels >= 2 * nthreads;
  const int64_t slots = parallel ? nthreads : 1;
  // Queries go in chunks so the candidate buffers stay bounded (~128 MB at most).
  const int64_t per_query = static_cast<int64_t>(s.cap) * static_cast<int64_t>(sizeof(Cand)) * slots;
  const int64_t qchunk = std::max<int64_t>(1, std::min<int64_t>(Q, (int64_t{128} << 20) / per_query));

  std::vector<ThreadState> states(static_cast<size_t>(slots));
  for (auto& ts : states) {
    ts.tile.resize(static_cast<size_t>(kQueryBlock * kPanelsPerChunk * 16));
    ts.pos.resize(static_cast<size_t>(kPanelsPerChunk * 16));
    if (int8 && s.kt.topk_s8) {
      ts.thr.resize(static_cast<size_t>(kQueryBlock));
      ts.hits.resize(static_cast<size_t>(kQueryBlock * kPanelsPerChunk * 16));
      if (all_int8) {  // (float blocks in the same search still score into the tile)
        ts.tile.clear();
        ts.tile.shrink_to_fit();
      }
    }
    ts.bufs.resize(static_cast<size_t>(std::min(qchunk, Q)));
    for (auto& b : ts.bufs) b.v.reserve(s.cap);
    ts.scratch.reserve(s.cap);
  }
  std::vector<uint8_t> qa;
  std::vector<float> qa_scale;

  for (int64_t q0 = 0; q0 < Q; q0 += qchunk) {
    const int64_t nq = std::min(qchunk, Q - q0);
    if (int8) {
      qa.resize(static_cast<size_t>(nq * Kp));
      qa_scale.resize(static_cast<size_t>(nq));
      QuantizeJob qj{req.queries + q0 * D, D, D, Kp, 0, nq, qa.data(), qa_scale.data()};
      s.kt.quantize_rows(qj);  // queries were checked for NaN/Inf by the caller
    }
    for (auto& ts : states) {
      for (int64_t i = 0; i < nq; ++i) {
        TopBuf& b = ts.bufs[static_cast<size_t>(i)];
        b.v.clear();
        b.thr = -std::numeric_limits<float>::infinity();
      }
    }
    // int8 and enough queries for every thread: each thread takes its share of the queries over
    // the whole catalogue (reading it once per thread, from L3 or memory: cheap next to the
    // scoring there). Each query's candidates then come from one stream of all the items, whose
    // running threshold climbs further than in a stream of a thread's share of them: fewer
    // scores pass it, fewer candidates to keep (1M x 64 items, k=100, 2 threads: Q=256 71 ms
    // against 83, Q=128 38 against 43, Q=64 22 against 24; Q=32 14.5 against 13.4, so not
    // there). Float catalogues read 2-4x the bytes per item and lost (fp32, Q=64: 60-64 ms
    // against 52-56). Otherwise each thread takes its share of the items for every query.
    const bool split_queries = all_int8 && nq >= kSplitQueriesPerThread * slots;
    auto run = [&](int64_t t, int64_t n) {
      if (split_queries) {
        const int64_t i0 = nq * t / n, i1 = nq * (t + 1) / n;
        scan(s, states[static_cast<size_t>(t)], q0 + i0, i1 - i0, i0, qa.data() + i0 * Kp, qa_scale.data() + i0, Kp,
             0, panels);  // (all int8: the queries are quantized)
      } else {
        const int64_t g0 = panels * t / n, g1 = panels * (t + 1) / n;
        scan(s, states[static_cast<size_t>(t)], q0, nq, 0, qa.data(), qa_scale.data(), Kp, g0, g1);
      }
    };
    if (parallel) {
      parallel_for_each_thread([&](int64_t t, int64_t n) {
        if (n == slots) {
          run(t, n);
        } else if (t == 0) {  // the pool was busy: this thread does every slot
          for (int64_t u = 0; u < slots; ++u) run(u, slots);
        }
      });
    } else {
      run(0, 1);
    }

    // Merge the threads' candidates, rerank, sort, write out (queries in parallel).
    auto finish = [&](int64_t i0, int64_t i1) {
      std::vector<Cand> merged;
      merged.reserve(s.cap * states.size());
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t q = q0 + i;
        merged.clear();
        for (auto& ts : states) {
          const auto& v = ts.bufs[static_cast<size_t>(i)].v;
          merged.insert(merged.end(), v.begin(), v.end());
        }
        if (static_cast<int64_t>(merged.size()) > s.keep) {
          std::nth_element(merged.begin(), merged.begin() + (s.keep - 1), merged.end(), s.better);
          merged.resize(static_cast<size_t>(s.keep));
        }
        if (req.rerank) {
          const float* qv = req.queries + q * D;
          for (Cand& c : merged) {
            int64_t step = 1;
            const SegmentRef& seg = segments[static_cast<size_t>(c.seg)];
            const float* x = seg.rows ? seg.rows + c.row * D : seg.block->f32_row(c.row, &step);
            double acc = 0.0;
            for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(qv[d]) * static_cast<double>(x[d * step]);
            c.score = static_cast<float>(acc);
          }
        }
        const int64_t out = std::min<int64_t>(k, static_cast<int64_t>(merged.size()));
        std::partial_sort(merged.begin(), merged.begin() + out, merged.end(), s.better);
        for (int64_t j = 0; j < out; ++j) {
          scores[q * k + j] = merged[static_cast<size_t>(j)].score;
          ids[q * k + j] = s.better.id(merged[static_cast<size_t>(j)]);
        }
      }
    };
    if (parallel && nq >= 8) {
      parallel_for(nq, 4, finish);
    } else {
      finish(0, nq);
    }
  }
}

}  // namespace fastrec
