#pragma once
#include <string>
#include <vector>

namespace fastrec {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct CpuFeatures {
  bool avx2 = false;      // AVX2 + FMA + F16C, with OS support for YMM state
  bool avx512 = false;    // AVX-512 F/BW/VL/DQ, with OS support for ZMM state
  bool avx512_vnni = false;
  bool amd = false;       // vendor AuthenticAMD (a few prefetch choices differ by vendor)
  int family = 0;         // display family (cpuid leaf 1: base family + extended family); AMD Zen 4 = 25, Zen 5 = 26
};

// Detected once (cpuid + xgetbv); cheap to call afterwards.
const CpuFeatures& cpu_features();
bool isa_supported(Isa isa);
const char* isa_name(Isa isa);
// Parses "scalar" / "avx2" / "avx512"; throws std::invalid_argument otherwise.
Isa parse_isa(const std::string& name);
Isa best_isa();

}  // namespace fastrec
