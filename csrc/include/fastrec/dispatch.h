// Kernel dispatch table: one function pointer per kernel, filled for the chosen ISA.
#pragma once
#include "fastrec/cpu_features.h"
#include "fastrec/tensor.h"

namespace fastrec {

using EmbeddingBagFn = void (*)(const BagJob& job, BagError* err);

struct KernelTable {
  Isa isa;
  EmbeddingBagFn embedding_bag;
};

// Per-ISA entry points, each defined in its own translation unit with its own flags.
namespace ref { void embedding_bag(const BagJob& job, BagError* err); }
namespace avx2 { void embedding_bag(const BagJob& job, BagError* err); }
namespace avx512 { void embedding_bag(const BagJob& job, BagError* err); }

// The table in use. Chosen at import (FASTREC_CPU_ISA or the best the CPU has).
const KernelTable& kernels();
// Switches every kernel to `isa`; throws std::invalid_argument if this CPU lacks it.
void set_isa(Isa isa);
Isa current_isa();
// The table for a given ISA (used by tests to compare variants); throws if unsupported.
const KernelTable& kernels_for(Isa isa);

}  // namespace fastrec
