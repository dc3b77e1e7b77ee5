// Fused scoring + top-k over an item catalogue (inner product).
//
// An ItemBlock is one immutable slice of the catalogue, packed once for the kernels. The
// search streams every block once per batch of queries: the kernels score a tile of
// (queries x items) that stays in cache, a SIMD threshold check drops every score that cannot
// enter a query's current top-k, and only the survivors reach the (rare) candidate buffer.
// The full Q x N score matrix never exists.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "fastrec/linear.h"

namespace fastrec {

enum class ItemPrecision : int32_t { kInt8 = 0, kF16 = 1, kF32 = 2 };

// Float items (fp32 or fp16) are packed in panels of 16 items: [Np/16][D][16].
// Scores rows [0, rows) of q (row stride ldq, D columns) against `npanels` panels starting at
// `panels`; writes c[r * ldc + 16 * p + lane].
struct FloatScoreJob {
  const float* q = nullptr;
  int64_t ldq = 0, rows = 0, D = 0;
  const void* panels = nullptr;  // float or uint16 (IEEE half) values
  bool f16 = false;
  int64_t npanels = 0;
  float* c = nullptr;
  int64_t ldc = 0;
};

// Fused int8 scoring + threshold check (VNNI): rows [0, rows) of u8 query codes a (row stride
// lda = b->Kp, per-row scales a_scale) against every item of the packed block b. Appends
// (row, item, score) for each score >= thr[row] to hits (room for rows * b->Np entries) and
// returns their count; the scores equal the int8 GEMM epilogue's bit for bit.
struct TopkHit {
  int32_t row, item;
  float score;
};
struct Int8TopkJob {
  const uint8_t* a = nullptr;
  int64_t lda = 0, rows = 0;
  const float* a_scale = nullptr;
  const PackedB* b = nullptr;
  const float* thr = nullptr;
  TopkHit* hits = nullptr;
};

// IEEE half -> float without any ISA extension (the scalar reference and packing use it).
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);  // round to nearest even

class ItemBlock {
 public:
  // items: N x D float32, row-major. keep_f32: keep the float32 rows (for reranking); they are
  // always kept for kF32.
  ItemBlock(const float* items, int64_t N, int64_t D, ItemPrecision precision, bool keep_f32);
  ItemBlock(const ItemBlock&) = delete;
  ItemBlock& operator=(const ItemBlock&) = delete;

  int64_t size() const { return N_; }
  int64_t dim() const { return D_; }
  ItemPrecision precision() const { return precision_; }
  bool has_f32() const { return has_f32_; }  // (true for an empty block built with them)
  int64_t nbytes() const;
  int64_t npanels() const { return (N_ + 15) / 16; }

  const Int8Layer* int8() const { return int8_.get(); }
  const void* panels() const;        // fp16/fp32 panels (null for int8)
  int64_t panel_bytes() const;       // bytes of one panel
  // Item `row` as float32 (has_f32() only): its first value, and in *step the distance between
  // its values (1 in the kept rows; 16 in the fp32 panels, which are the only copy for kF32).
  const float* f32_row(int64_t row, int64_t* step) const {
    if (!f32_.empty()) {
      *step = 1;
      return f32_.data() + row * D_;
    }
    *step = 16;
    return f32_panels_.data() + (row / 16) * D_ * 16 + row % 16;
  }
  const float* item_scale() const { return int8_scale_.data(); }
  // The items as float32 rows (N x D): the kept float32 rows, else the dequantized codes.
  void to_float(float* out) const;

 private:
  int64_t N_, D_;
  ItemPrecision precision_;
  std::unique_ptr<Int8Layer> int8_;
  std::vector<float> int8_scale_;
  std::vector<float> f32_panels_;
  std::vector<uint16_t> f16_panels_;
  std::vector<float> f32_;  // row-major N x D, for reranking int8 / fp16 items
  bool has_f32_ = false;
};

// One block of the catalogue as the search sees it.
struct SegmentRef {
  const ItemBlock* block = nullptr;
  const int64_t* ids = nullptr;      // external ids, one per item
  const uint8_t* removed = nullptr;  // 1 = removed (skipped); may be null
  // The float32 rows for the rerank (N x D, row-major) when the block keeps none of its own:
  // the caller's read-only mapping of them, borrowed. Null: the block's.
  const float* rows = nullptr;
};

struct TopKRequest {
  const float* queries = nullptr;  // Q x D, row-major
  int64_t Q = 0, D = 0, k = 0;
  int64_t candidates = 0;          // >= k: kept from the first pass (more when reranking)
  bool rerank = false;             // rescore candidates with the float32 rows, in float64
  const int64_t* exclude_ids = nullptr;      // per query, sorted: exclude_ids[exclude_off[q]..]
  const int64_t* exclude_offsets = nullptr;  // Q + 1, or null
};

// scores (Q x k, descending; ties by smaller id) and ids (-1 / -inf where fewer than k remain).
void topk_search(const std::vector<SegmentRef>& segments, const TopKRequest& req, float* scores, int64_t* ids);

}  // namespace fastrec
