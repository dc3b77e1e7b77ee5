// Scalar reference embedding bag: plain loops, obviously correct, baseline compile flags.
// Every optimised variant is tested against this one (and against float64 numpy).
#include <cmath>
#include <cstring>
#include <limits>

#include "fastrec/dispatch.h"

namespace fastrec {
namespace ref {
namespace {

float half_to_float(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);  // zero or subnormal
  } else if (exp == 31) {
    v = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}

// Value of element d of a row.
float element(const TableView& t, const uint8_t* row, int64_t d) {
  switch (t.kind) {
    case RowKind::kF32: {
      float v;
      std::memcpy(&v, row + 4 * d, 4);
      return v;
    }
    case RowKind::kF16: {
      uint16_t h;
      std::memcpy(&h, row + 2 * d, 2);
      return half_to_float(h);
    }
    default: break;
  }
  const uint8_t* codes = row + t.code_offset;
  uint32_t q = 0;
  if (t.kind == RowKind::kQ8 || t.kind == RowKind::kQ8Half) q = codes[d];
  if (t.kind == RowKind::kQ4) q = (codes[d / 2] >> (4 * (d % 2))) & 0xFu;
  if (t.kind == RowKind::kQ2) q = (codes[d / 4] >> (2 * (d % 4))) & 0x3u;
  float scale, bias;
  if (t.qparams_fp16) {
    uint16_t h[2];
    std::memcpy(h, row + t.qparam_offset, 4);
    scale = half_to_float(h[0]);
    bias = half_to_float(h[1]);
  } else {
    float f[2];
    std::memcpy(f, row + t.qparam_offset, 8);
    scale = f[0];
    bias = f[1];
  }
  return scale * static_cast<float>(q) + bias;
}

template <class Idx>
void run(const BagJob& j, BagError* err) {
  const TableView& t = j.table;
  const Idx* ind = static_cast<const Idx*>(j.indices);
  for (int64_t b = j.bag_begin; b < j.bag_end; ++b) {
    float* o = j.out + b * j.out_stride;
    const float init = j.mode == PoolMode::kMax ? -std::numeric_limits<float>::infinity() : 0.f;
    for (int64_t d = 0; d < t.dim; ++d) o[d] = init;
    int64_t count = 0;
    for (int64_t p = j.offsets[b]; p < j.offsets[b + 1]; ++p) {
      const int64_t idx = static_cast<int64_t>(ind[p]);
      if (idx < 0 || idx >= t.num_rows) {
        if (err->position < 0 || p < err->position) *err = BagError{p, idx};
        continue;
      }
      if (idx == j.padding_idx) continue;
      const uint8_t* row = t.data + idx * t.row_stride;
      const float w = j.per_sample_weights ? j.per_sample_weights[p] : 1.f;
      for (int64_t d = 0; d < t.dim; ++d) {
        const float v = element(t, row, d);
        o[d] = j.mode == PoolMode::kMax ? std::fmax(o[d], v) : o[d] + w * v;
      }
      ++count;
    }
    if (count == 0) {
      for (int64_t d = 0; d < t.dim; ++d) o[d] = 0.f;
    } else if (j.mode == PoolMode::kMean) {
      const float inv = 1.f / static_cast<float>(count);
      for (int64_t d = 0; d < t.dim; ++d) o[d] *= inv;
    }
  }
}

}  // namespace

void embedding_bag(const BagJob& job, BagError* err) {
  if (job.indices_int64) {
    run<int64_t>(job, err);
  } else {
    run<int32_t>(job, err);
  }
}

}  // namespace ref
}  // namespace fastrec
