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

int64_t batch_size_of(const MultiBagArgs& a);  // checks num_offsets against T
void embedding_bags(const MultiBagArgs& a);

}  // namespace fastrec
