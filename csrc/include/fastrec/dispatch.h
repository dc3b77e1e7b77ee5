// Kernel dispatch table: one function pointer per kernel, filled for the chosen ISA.
#pragma once
#include "fastrec/cpu_features.h"
#include "fastrec/gemm.h"
#include "fastrec/interaction.h"
#include "fastrec/tensor.h"
#include "fastrec/topk.h"

namespace fastrec {

using EmbeddingBagFn = void (*)(const BagJob& job, BagError* err);
using GemmFn = void (*)(const GemmJob& job);
using QuantizeFn = int64_t (*)(const QuantizeJob& job);
using ScoreFloatFn = void (*)(const FloatScoreJob& job);
// Positions i in [0, n) with s[i] >= thr, in order, written to pos; returns their count.
using SelectGeFn = int64_t (*)(const float* s, int64_t n, float thr, int32_t* pos);
using TopkS8Fn = int64_t (*)(const Int8TopkJob& job);
using InteractionFn = void (*)(const InteractionJob& job);

struct KernelTable {
  Isa isa;
  EmbeddingBagFn embedding_bag;
  GemmFn gemm_s8;          // int8 GEMM + epilogue
  QuantizeFn quantize_rows;  // per-row symmetric int8 activation quantization
  const char* gemm_name;   // which int8 GEMM variant (reported by fastrec.info)
  ScoreFloatFn score_float;  // fp32/fp16 item panels x fp32 queries (top-k scoring)
  SelectGeFn select_ge;      // the threshold check of the top-k selection
  TopkS8Fn topk_s8;          // fused int8 scoring + threshold check, or null (GEMM + select_ge)
  InteractionFn dot_interaction;  // DLRM's pairwise dot interaction
};

// Per-ISA entry points, each defined in its own translation unit with its own flags.
namespace ref {
void dot_interaction(const InteractionJob& job);
void score_float(const FloatScoreJob& job);
int64_t select_ge(const float* s, int64_t n, float thr, int32_t* pos);
void embedding_bag(const BagJob& job, BagError* err);
void gemm_s8(const GemmJob& job);
int64_t quantize_rows(const QuantizeJob& job);
}  // namespace ref
namespace avx2 {
void score_float(const FloatScoreJob& job);
int64_t select_ge(const float* s, int64_t n, float thr, int32_t* pos);
void embedding_bag(const BagJob& job, BagError* err);
void gemm_s8(const GemmJob& job);
}  // namespace avx2
namespace avx512 {
void dot_interaction(const InteractionJob& job);
void score_float(const FloatScoreJob& job);
int64_t select_ge(const float* s, int64_t n, float thr, int32_t* pos);
void embedding_bag(const BagJob& job, BagError* err);
}  // namespace avx512
namespace avx512vnni {
int64_t topk_s8(const Int8TopkJob& job);
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
