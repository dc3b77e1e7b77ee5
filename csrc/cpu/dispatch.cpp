// Chooses each kernel's variant. Baseline flags: nothing here executes ISA-specific code.
#include "fastrec/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace fastrec {
namespace {

constexpr KernelTable kScalarTable{Isa::kScalar, &ref::embedding_bag, &ref::gemm_s8, &ref::quantize_rows,
                                   "scalar reference", &ref::score_float, &ref::select_ge, nullptr,
                                   &ref::dot_interaction};
constexpr KernelTable kAvx2Table{Isa::kAvx2, &avx2::embedding_bag, &avx2::gemm_s8, &ref::quantize_rows,
                                 "avx2 (vpmaddwd, exact)", &avx2::score_float, &avx2::select_ge, nullptr,
                                 &ref::dot_interaction};
// AVX-512 without VNNI (Skylake-X) keeps the AVX2 int8 GEMM.
constexpr KernelTable kAvx512Table{Isa::kAvx512, &avx512::embedding_bag, &avx2::gemm_s8, &ref::quantize_rows,
                                   "avx2 (vpmaddwd, exact)", &avx512::score_float, &avx512::select_ge, nullptr,
                                   &avx512::dot_interaction};
constexpr KernelTable kAvx512VnniTable{Isa::kAvx512, &avx512::embedding_bag, &avx512vnni::gemm_s8,
                                       &avx512vnni::quantize_rows, "avx512-vnni (vpdpbusd)",
                                       &avx512::score_float, &avx512::select_ge, &avx512vnni::topk_s8,
                                       &avx512::dot_interaction};

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable* table_of(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return &kScalarTable;
    case Isa::kAvx2: return &kAvx2Table;
    case Isa::kAvx512: return cpu_features().avx512_vnni ? &kAvx512VnniTable : &kAvx512Table;
  }
  return &kScalarTable;
}

const KernelTable* initial_table() {
  const char* env = std::getenv("FASTREC_CPU_ISA");
  if (env == nullptr || *env == '\0') return table_of(best_isa());
  const Isa isa = parse_isa(env);
  if (!isa_supported(isa)) {
    throw std::invalid_argument(std::string("FASTREC_CPU_ISA=") + env +
                                " but this CPU (or its OS) does not support it; best available: " +
                                isa_name(best_isa()));
  }
  return table_of(isa);
}

}  // namespace

const KernelTable& kernels() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = initial_table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

const KernelTable& kernels_for(Isa isa) {
  if (!isa_supported(isa)) {
    throw std::invalid_argument(std::string("CPU ISA level '") + isa_name(isa) +
                                "' is not supported on this machine");
  }
  return *table_of(isa);
}

void set_isa(Isa isa) { g_table.store(&kernels_for(isa), std::memory_order_release); }

Isa current_isa() { return kernels().isa; }

}  // namespace fastrec
