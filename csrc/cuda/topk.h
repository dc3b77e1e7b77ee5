// Host-side declarations of the CUDA top-k / retrieval op (plain C++: included by the pybind11
// module). Kernels and launchers live in topk.cu.
//
// The device catalogue is laid out by fastrec/_cuda_topk.py (uploaded through the caller's
// framework) with the items in ascending external-id order, so "ties broken by the smaller id"
// is "ties broken by the smaller row", and a candidate is one 64-bit key:
//     key = ordered_bits(score) << 32 | (0xFFFFFFFF - row)       (0 = no candidate)
// a larger key is a better candidate, and keys of distinct rows never tie.
//
// Search, per chunk of queries (never a Q x N score matrix):
//   stage 0   the first `cap` items are scored and all kept (threshold -inf);
//   select    per query, an exact block-wide radix select finds the `keep`-th best candidate
//             (exclusions dropped first), compacts the buffer to the `keep` best and sets the
//             query's threshold to that score. The keep-th best of any subset of the catalogue
//             is a lower bound of the keep-th best of the whole, so no true candidate is lost;
//   stage j   the next, geometrically larger range of items is scored in one fused pass (IMMA
//             int8 / HMMA fp16 tensor cores, FMA for fp32); only scores above the threshold
//             (>= while it is -inf) are appended (atomic counter) to the query's bounded buffer:
//             a later item that only ties the threshold has a larger row than the kept key and
//             would lose the tie; then select again;
//   final     the last select keeps `keep`, optionally reranks them in float64 over the float32
//             rows, sorts (bitonic, shared memory) and writes the k best, padding with (-inf, -1).
// A buffer that overflows (more than `cap` scores passed a threshold) is detected and reported
// per query; the caller re-runs those queries with a larger cap (results are never dropped).
#pragma once

#include <cstdint>
#include <vector>

namespace fastrec {
namespace cuda {

enum TopkPrecision : int { kTopkInt8 = 0, kTopkF16 = 1, kTopkF32 = 2 };

// The device catalogue (all device pointers).
struct TopkIndexView {
  int precision = kTopkF32;
  int64_t n = 0;           // items
  int64_t np = 0;          // padded item count (multiple of 512; padding rows are zero)
  int64_t dim = 0;         // D
  int64_t row_bytes = 0;   // int8 / fp16: bytes of one padded item row (multiple of 64)
  const void* codes = nullptr;    // int8 [np][row_bytes] / fp16 [np][row_bytes / 2];
                                  // fp32: transposed [round_up(D, 4)][np]
  const float* scales = nullptr;  // int8: [np] per-item scale
  const float* rows = nullptr;    // rerank rows (float32), element (i, d) at i * stride_item + d * stride_d
  int64_t stride_item = 0, stride_d = 0;
  const int64_t* ids = nullptr;   // [n] external ids, ascending
};

struct TopkRequest {
  const float* queries = nullptr;  // [Q][D] float32, device
  int64_t Q = 0, k = 0, keep = 0, cap = 0;
  bool rerank = false;
  const int64_t* exclude_ids = nullptr;      // per query, sorted ascending (device), or null
  const int64_t* exclude_offsets = nullptr;  // [Q + 1] (device), or null
  float* scores = nullptr;                   // [Q][k] out
  int64_t* out_ids = nullptr;                // [Q][k] out
};

// The per-query candidate capacity for `keep` candidates, times `growth` (a power of 4 on retries).
int64_t topk_cap(int64_t keep, int64_t n, int64_t growth);
// The largest `keep` (after min(keep, n)) the final shared-memory sort takes.
int64_t topk_max_keep();
// Bytes of device scratch search() needs; queries go in chunks of at most this many.
int64_t topk_query_chunk(const TopkIndexView& idx, int64_t Q, int64_t cap);
int64_t topk_scratch_bytes(const TopkIndexView& idx, int64_t Q, int64_t cap);

struct TopkStatus {
  int64_t bad_query = -1;          // first query holding NaN / Inf, or -1
  std::vector<int64_t> overflowed;  // queries whose candidate buffer overflowed (re-run them)
};

// Runs the search on `stream` on `device` (restoring the caller's current device), then waits
// for the stream (one small read-back of the per-query flags).
TopkStatus search(int device, const TopkIndexView& idx, const TopkRequest& req, void* scratch,
                  int64_t scratch_bytes, std::uintptr_t stream);

}  // namespace cuda
}  // namespace fastrec
