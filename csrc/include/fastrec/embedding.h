#pragma once
#include <cstdint>
#include <vector>

#include "fastrec/tensor.h"

namespace fastrec {

// Pools T tables over table-major CSR offsets (length T*B + 1) into out[B, sum(D_t)].
// Validates offsets (std::invalid_argument) and ids (std::out_of_range, naming the first
// bad position and value), then runs every (table, bag-chunk) in one parallel pass with
// the GIL released by the caller.
struct MultiBagArgs {
  std::vector<TableView> tables;
  std::vector<PoolMode> modes;        // one per table
  std::vector<int64_t> padding_idx;   // one per table, -1 for none
  const void* indices = nullptr;
  bool indices_int64 = true;
  int64_t num_indices = 0;
  const void* offsets = nullptr;
  bool offsets_int64 = true;
  int64_t num_offsets = 0;            // T*B + 1
  const float* per_sample_weights = nullptr;
  float* out = nullptr;               // B x sum(D_t), row-major
};

// B, after checking num_offsets against T and one mode and padding_idx per table.
int64_t batch_size_of(const MultiBagArgs& a);
void embedding_bags(const MultiBagArgs& a);

// The offsets' private copy: on the stack for small requests (no allocation per call).
struct OffsetsCopy {
  int64_t small[256];
  std::vector<int64_t> big;
};
// The offsets as int64, always copied into *storage (the caller's array may be written by
// another thread once the GIL is released; the copy is what is checked and used), checked:
// offsets[0] == 0, non-decreasing, offsets[-1] == num_indices (std::invalid_argument otherwise).
const int64_t* checked_offsets(const MultiBagArgs& a, OffsetsCopy* storage);
// The kernel job for bags [b0, b1) of table t (off from checked_offsets); bag b0's row goes
// to out, the next to out + out_stride, ...
BagJob bag_job(const MultiBagArgs& a, const int64_t* off, int64_t B, int64_t t, int64_t b0, int64_t b1, float* out,
               int64_t out_stride);
// Whether the fast path also prefetches quantized rows into L1 (see embedding_kernel.inc):
// by default everywhere but on AMD CPUs; set_embedding_l1_prefetch(1 / 0) forces it on / off
// and -1 restores the default (for tests, which run both paths on any CPU).
bool embedding_l1_prefetch();
void set_embedding_l1_prefetch(int mode);
// Whether the fast path's far prefetch of float (fp32 / fp16) rows goes into L1, 64 ids ahead,
// instead of into L2, 128 ahead: by default on AMD family 26 (Zen 5) and later only; the
// setter as above.
bool embedding_float_l1_prefetch();
void set_embedding_float_l1_prefetch(int mode);
// Keeps the error with the lowest position in *first.
void keep_first_error(const BagError& e, BagError* first);
// Throws the std::out_of_range for a bad id that every embedding entry point raises.
[[noreturn]] void throw_bag_error(const BagError& e, const MultiBagArgs& a, const int64_t* off, int64_t B);

}  // namespace fastrec
