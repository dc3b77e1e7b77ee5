// Plain views of the memory the kernels read and write. No ownership, no templates shared
// across ISA files: every kernel variant sees the same POD structs.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fastrec {

// How the rows of an embedding table are stored.
enum class RowKind : int32_t {
  kF32 = 0,  // D float32
  kF16 = 1,  // D float16
  kQ8 = 2,   // 8-bit codes + scale + bias
  kQ4 = 3,   // 4-bit codes (two per byte, low nibble first) + scale + bias
  kQ2 = 4,   // 2-bit codes (four per byte, lowest bits first) + scale + bias
  kQ8Half = 5,  // 8-bit codes with fp16 scale + bias (the TBE layout); kQ8 has fp32 ones
};

enum class PoolMode : int32_t { kSum = 0, kMean = 1, kMax = 2 };

// One embedding table, as the kernels see it.
struct TableView {
  const uint8_t* data = nullptr;  // row r starts at data + r * row_stride
  int64_t num_rows = 0;
  int64_t dim = 0;
  int64_t row_stride = 0;  // bytes between rows
  int64_t row_bytes = 0;   // bytes of a row the kernels read (<= row_stride)
  RowKind kind = RowKind::kF32;
  // Quantized rows only: where the codes start and where (scale, bias) sit, in bytes from
  // the row start, and whether scale/bias are fp16 (else fp32; fp16 for kQ8Half/kQ4/kQ2).
  int64_t code_offset = 0;
  int64_t qparam_offset = 0;
  bool qparams_fp16 = false;
};

// The work of one kernel call: bags [bag_begin, bag_end) of one table.
struct BagJob {
  TableView table;
  const void* indices = nullptr;  // int32 or int64, flat
  bool indices_int64 = true;
  const int64_t* offsets = nullptr;  // offsets of this table's bags; bag b is [offsets[b], offsets[b+1])
  int64_t bag_begin = 0;
  int64_t bag_end = 0;
  const float* per_sample_weights = nullptr;  // aligned with indices, or null
  PoolMode mode = PoolMode::kSum;
  int64_t padding_idx = -1;  // -1: none (ids are range-checked before this is compared)
  float* out = nullptr;      // row of bag b is out + b * out_stride
  int64_t out_stride = 0;    // floats
};

// What a kernel reports about bad ids: the first bad position it met (-1 if none) and the
// value there. A kernel never reads a row for an id out of range.
struct BagError {
  int64_t position = -1;
  int64_t value = 0;
};

}  // namespace fastrec
