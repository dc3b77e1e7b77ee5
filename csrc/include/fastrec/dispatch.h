// Kernel dispatch table: one function pointer per kernel, filled for the chosen ISA.
#pragma once
#include "fastrec/cpu_features.h"
#include "fastrec/gemm.h"
#include "fastrec/tensor.h"

namespace fastrec {

using EmbeddingBagFn = void (*)(const BagJob& job, BagError* err);
using GemmFn = void (*)(const GemmJob& job);
using QuantizeFn = int64_t (*)(const QuantizeJob& job);

struct KernelTable {
  Isa isa;
  EmbeddingBagFn embedding_bag;
  GemmFn gemm_s8;          // int8 GEMM + epilogue
  QuantizeFn quantize_rows;  // per-row symmetric int8 activation quantization
  const char* gemm_name;   // which int8 GEMM variant (reported by fastrec.info)
};

// Per-ISA entry points, each defined in its own translation unit with its own flags.
namespace ref {
void embedding_bag(const BagJob& job, BagError* err);
void gemm_s8(const GemmJob& job);
int64_t quantize_rows(const QuantizeJob& job);
}  // namespace ref
namespace avx2 {
void embedding_bag(const BagJob& job, BagError* err);
void gemm_s8(const GemmJob& job);
}  // namespace avx2
namespace avx512 {
void embedding_bag(const BagJob& job, BagError* err);
}  // namespace avx512
namespace avx512vnni {
void gemm_s8(const GemmJob& job);
int64_t quantize_rows(const QuantizeJob& job);
}  // namespace avx512vnni

// The table in use. Chosen at import (FASTREC_CPU_ISA or the best the CPU has).
const KernelTable& kernels();
// Switches every kernel to `isa`; throws std::invalid_argument if this CPU lacks it.
void set_isa(Isa isa);
Isa current_isa();
// The table for a given ISA (used by tests to compare variants); throws if unsupported.
const KernelTable& kernels_for(Isa isa);

}  // namespace fastrec
