// Host-side declarations of the CUDA embedding-bag launcher (plain C++: included by the
// pybind11 binding, which never sees CUDA types).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace fastrec {
namespace cuda {

// One table as the launcher takes it. `kind` is a fastrec::RowKind code (tensor.h):
// 0 f32, 1 f16, 2 8-bit with fp32 scale/bias, 3 4-bit, 4 2-bit, 5 8-bit with fp16 scale/bias.
// `tbe`: quantized rows in the fbgemm_gpu / TorchRec inference layout (fp16 scale and bias
// first, then the codes); otherwise FBGEMM's CPU layout (codes first). Float tables are dense:
// row_stride == dim * element size.
struct BagTable {
  const void* data = nullptr;  // device pointer, row r at data + r * row_stride
  int64_t num_rows = 0;
  int64_t dim = 0;
  int64_t row_stride = 0;      // bytes
  int32_t kind = 0;
  bool tbe = false;
  int32_t mode = 0;            // 0 sum, 1 mean, 2 max
  int64_t padding_idx = -1;    // -1: none, else in [0, num_rows)
};

// Pools T tables over table-major CSR offsets (length T*B + 1) into out[B, sum(D_t)], all on
// `device` and ordered on `stream` (a cudaStream_t as an integer; 0 is the legacy default).
// With fixed_len >= 0 there are no offsets: bag g is indices[g*L, (g+1)*L) (the 2-D (B, L)
// form, one table) and num_offsets must be B + 1.
//
// Every table runs in one launch (tables beyond kMaxTablesPerLaunch in further launches on the
// same stream). Ids are range-checked in the kernel, which skips bad ones and records the
// smallest bad position; offsets are checked in the same pass. The launcher then reads 16 bytes
// back (one device-to-host copy and a wait on the stream, every call) and throws
// std::invalid_argument (bad offsets, same message as the CPU op) or std::out_of_range (bad id:
// position, value, table, bag) with the CUDA context left intact. A failed CUDA call throws
// std::runtime_error. Blocks the calling thread until the kernel is done.
struct BagsArgs {
  std::vector<BagTable> tables;
  const void* indices = nullptr;
  bool indices_int64 = true;
  int64_t num_indices = 0;
  const void* offsets = nullptr;  // null with fixed_len >= 0
  bool offsets_int64 = true;
  int64_t num_offsets = 0;
  int64_t fixed_len = -1;
  const float* per_sample_weights = nullptr;  // one per index, or null
  float* out = nullptr;                       // B x sum(D_t), row-major, float32
  int device = 0;
  uintptr_t stream = 0;
};

constexpr int kMaxTablesPerLaunch = 48;  // table descriptors travel as kernel parameters

int64_t bags_batch_size(const BagsArgs& a);  // checks num_offsets against T (std::invalid_argument)
void embedding_bags(const BagsArgs& a);

// embedding_bags without its wait: the constructor checks the arguments and queues the kernels
// and the 16-byte copy back (throwing, before anything is queued, what embedding_bags throws
// for bad arguments); check() waits for the stream (everything queued on it so far) and throws
// what the kernel found, as embedding_bags does. Until check() has returned, the ids, offsets,
// weights and output must stay alive and unchanged. Only the first check() checks. Destroyed
// unchecked, its 16-byte slot is never reused (the kernel may still write it).
class PendingBags {
 public:
  explicit PendingBags(const BagsArgs& a);
  ~PendingBags();
  PendingBags(const PendingBags&) = delete;
  PendingBags& operator=(const PendingBags&) = delete;
  void check();

 private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace cuda
}  // namespace fastrec
