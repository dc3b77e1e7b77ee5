// The embedding-bag driver: validates offsets, splits (table, bag) work into chunks, runs
// them in one parallel pass with the chosen kernel, and reports the first bad id.
#include "fastrec/embedding.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastrec/dispatch.h"
#include "fastrec/parallel.h"

namespace fastrec {
namespace {

// Below this many bytes of rows to read a call runs on the calling thread: waking the pool
// costs more than it saves.
constexpr int64_t kSerialBytes = 256 * 1024;

struct Chunk {
  int32_t table;
  int64_t bag_begin, bag_end;
};

int64_t row_read_bytes(const TableView& t) {
  switch (t.kind) {
    case RowKind::kF32: return 4 * t.dim;
    case RowKind::kF16: return 2 * t.dim;
    default: return t.row_bytes;
  }
}

}  // namespace

int64_t batch_size_of(const MultiBagArgs& a) {
  const int64_t T = static_cast<int64_t>(a.tables.size());
  if (T == 0) throw std::invalid_argument("at least one table is required");
  if (a.num_offsets < 1 || (a.num_offsets - 1) % T != 0) {
    throw std::invalid_argument("offsets must have length T*B + 1 (T=" + std::to_string(T) +
                                " tables), got length " + std::to_string(a.num_offsets));
  }
  if (static_cast<int64_t>(a.modes.size()) != T || static_cast<int64_t>(a.padding_idx.size()) != T) {
    throw std::invalid_argument("one mode and one padding_idx per table are required");
  }
  return (a.num_offsets - 1) / T;
}

// The offsets are always copied (T*B + 1 values), and the copy is what is checked and used:
// the caller's array may be written by another Python thread while the GIL is released, and
// offsets re-read after the check could send the kernels past the indices.
const int64_t* checked_offsets(const MultiBagArgs& a, OffsetsCopy* storage) {
  int64_t* copy = storage->small;
  if (a.num_offsets > static_cast<int64_t>(sizeof storage->small / sizeof storage->small[0])) {
    storage->big.resize(static_cast<size_t>(a.num_offsets));
    copy = storage->big.data();
  }
  if (a.offsets_int64) {
    const int64_t* o64 = static_cast<const int64_t*>(a.offsets);
    std::copy(o64, o64 + a.num_offsets, copy);
  } else {
    const int32_t* o32 = static_cast<const int32_t*>(a.offsets);
    std::copy(o32, o32 + a.num_offsets, copy);
  }
  const int64_t* off = copy;
  if (off[0] != 0) {
    throw std::invalid_argument("offsets[0] must be 0, got " + std::to_string(off[0]));
  }
  for (int64_t i = 1; i < a.num_offsets; ++i) {
    if (off[i] < off[i - 1]) {
      throw std::invalid_argument("offsets must be non-decreasing: offsets[" + std::to_string(i) + "]=" +
                                  std::to_string(off[i]) + " < offsets[" + std::to_string(i - 1) +
                                  "]=" + std::to_string(off[i - 1]));
    }
  }
  if (off[a.num_offsets - 1] != a.num_indices) {
    throw std::invalid_argument("offsets[-1] must equal len(indices)=" + std::to_string(a.num_indices) +
                                ", got " + std::to_string(off[a.num_offsets - 1]));
  }
  return off;
}

BagJob bag_job(const MultiBagArgs& a, const int64_t* off, int64_t B, int64_t t, int64_t b0, int64_t b1, float* out,
               int64_t out_stride) {
  BagJob job;
  job.table = a.tables[t];
  job.indices = a.indices;
  job.indices_int64 = a.indices_int64;
  job.offsets = off + t * B + b0;
  job.bag_begin = 0;
  job.bag_end = b1 - b0;
  job.per_sample_weights = a.per_sample_weights;
  job.mode = a.modes[t];
  job.padding_idx = a.padding_idx[t];
  job.out = out;
  job.out_stride = out_stride;
  return job;
}

namespace {
std::atomic<int> l1_prefetch_mode{-1};
}  // namespace

bool embedding_l1_prefetch() {
  const int mode = l1_prefetch_mode.load(std::memory_order_relaxed);
  return mode < 0 ? !cpu_features().amd : mode != 0;
}

void set_embedding_l1_prefetch(int mode) { l1_prefetch_mode.store(mode < 0 ? -1 : (mode != 0), std::memory_order_relaxed); }

namespace {
std::atomic<int> float_l1_prefetch_mode{-1};
}  // namespace

bool embedding_float_l1_prefetch() {
  const int mode = float_l1_prefetch_mode.load(std::memory_order_relaxed);
  return mode < 0 ? cpu_features().amd && cpu_features().family >= 26 : mode != 0;
}

void set_embedding_float_l1_prefetch(int mode) {
  float_l1_prefetch_mode.store(mode < 0 ? -1 : (mode != 0), std::memory_order_relaxed);
}

void keep_first_error(const BagError& e, BagError* first) {
  if (e.position >= 0 && (first->position < 0 || e.position < first->position)) *first = e;
}

void throw_bag_error(const BagError& e, const MultiBagArgs& a, const int64_t* off, int64_t B) {
  // Which table the position belongs to, for the message.
  const int64_t* hit = std::upper_bound(off, off + a.num_offsets, e.position);
  const int64_t bag = (hit - off) - 1;
  const int64_t t = bag / B;
  throw std::out_of_range("index " + std::to_string(e.value) + " at position " + std::to_string(e.position) +
                          " (table " + std::to_string(t) + ", bag " + std::to_string(bag % B) +
                          ") is out of range [0, " + std::to_string(a.tables[t].num_rows) + ")");
}

void embedding_bags(const MultiBagArgs& a) {
  const int64_t T = static_cast<int64_t>(a.tables.size());
  const int64_t B = batch_size_of(a);
  OffsetsCopy off64;
  const int64_t* off = checked_offsets(a, &off64);
  if (B == 0) return;

  std::vector<int64_t> col(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) col[t + 1] = col[t] + a.tables[t].dim;
  const int64_t out_stride = col[T];

  // Cost model: bytes of rows read plus bytes written. Chunks of about a quarter of a
  // thread's share keep both threads busy when tables differ in cost.
  int64_t total = 0;
  std::vector<int64_t> table_cost(T);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = off[(t + 1) * B] - off[t * B];
    table_cost[t] = n * row_read_bytes(a.tables[t]) + B * 4 * a.tables[t].dim;
    total += table_cost[t];
  }
  const int nthreads = total < kSerialBytes ? 1 : get_num_threads();
  const int64_t target = std::max<int64_t>(16 * 1024, total / (static_cast<int64_t>(nthreads) * 8));
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t pieces = nthreads == 1 ? 1 : std::min<int64_t>(B, std::max<int64_t>(1, table_cost[t] / target));
    for (int64_t p = 0; p < pieces; ++p) {
      chunks.push_back(Chunk{static_cast<int32_t>(t), B * p / pieces, B * (p + 1) / pieces});
    }
  }

  const KernelTable& k = kernels();
  std::vector<BagError> errors(chunks.size());
  auto run_chunks = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      const BagJob job = bag_job(a, off, B, ch.table, ch.bag_begin, ch.bag_end,
                                 a.out + ch.bag_begin * out_stride + col[ch.table], out_stride);
      k.embedding_bag(job, &errors[c]);
    }
  };
  if (nthreads == 1) {
    run_chunks(0, static_cast<int64_t>(chunks.size()));
  } else {
    parallel_for(static_cast<int64_t>(chunks.size()), 1, run_chunks);
  }

  BagError first;
  for (const BagError& e : errors) keep_first_error(e, &first);
  if (first.position >= 0) throw_bag_error(first, a, off, B);
}

}  // namespace fastrec
