// CPU feature detection with cpuid + xgetbv, compiled with baseline flags.
#include "fastrec/cpu_features.h"

#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>
#define FASTREC_X86 1
#endif

namespace fastrec {
namespace {

#ifdef FASTREC_X86
void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
}

unsigned long long xgetbv0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#ifdef FASTREC_X86
  unsigned r[4];
  cpuid(0, 0, r);
  const unsigned max_leaf = r[0];
  f.amd = r[1] == 0x68747541u && r[3] == 0x69746e65u && r[2] == 0x444d4163u;  // "Auth" "enti" "cAMD"
  if (max_leaf < 1) return f;
  cpuid(1, 0, r);
  const unsigned base_family = (r[0] >> 8) & 0xf;
  f.family = static_cast<int>(base_family == 0xf ? base_family + ((r[0] >> 20) & 0xff) : base_family);
  if (max_leaf < 7) return f;
  const bool osxsave = (r[2] >> 27) & 1;
  const bool fma = (r[2] >> 12) & 1;
  const bool f16c = (r[2] >> 29) & 1;
  if (!osxsave) return f;
  const unsigned long long xcr0 = xgetbv0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;
  const bool zmm_state = (xcr0 & 0xE6) == 0xE6;
  cpuid(7, 0, r);
  const unsigned ebx = r[1], ecx = r[2];
  const bool avx2 = (ebx >> 5) & 1;
  const bool avx512f = (ebx >> 16) & 1, avx512dq = (ebx >> 17) & 1;
  const bool avx512bw = (ebx >> 30) & 1, avx512vl = (ebx >> 31) & 1;
  const bool vnni = (ecx >> 11) & 1;
  f.avx2 = ymm_state && avx2 && fma && f16c;
  f.avx512 = f.avx2 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl;
  f.avx512_vnni = f.avx512 && vnni;
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();  // function-local: initialised on first use
  return f;
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return cpu_features().avx2;
    case Isa::kAvx512: return cpu_features().avx512;
  }
  return false;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  throw std::invalid_argument("unknown CPU ISA level '" + name +
                              "' (expected one of: scalar, avx2, avx512)");
}

Isa best_isa() {
  if (isa_supported(Isa::kAvx512)) return Isa::kAvx512;
  if (isa_supported(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kScalar;
}

}  // namespace fastrec
