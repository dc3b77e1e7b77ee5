# Per-ISA compile flags. Each ISA's files get exactly these flags and nothing else does;
# the default build never uses -march=native, so one wheel runs on every x86-64 CPU and the
# dispatcher (csrc/cpu/dispatch.cpp) picks the variant at run time.
set(FASTREC_FLAGS_avx2 -mavx2 -mfma -mf16c)
set(FASTREC_FLAGS_avx512 -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq)
set(FASTREC_FLAGS_avx512vnni ${FASTREC_FLAGS_avx512} -mavx512vnni)

function(fastrec_isa_sources isa)
  foreach(src ${ARGN})
    set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS "${FASTREC_FLAGS_${isa}}")
  endforeach()
endfunction()
