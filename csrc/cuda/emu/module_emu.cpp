// fastrec._C_cuda_emu: fastrec._C_cuda's ops (the same binding files over the same
// csrc/cuda/*.cu kernels and launchers) compiled for the host under host_emulation.h, over host
// memory. A test-only module (built with FASTREC_CUDA_EMU=ON): the "emulated" cases of
// tests/test_cuda_*.py run the CUDA ops' Python layer and these on CPU tensors posing as CUDA
// tensors on device 0.
#include <pybind11/pybind11.h>

#include "../../python/cuda_bindings.h"

void bind_emulation_selftest(pybind11::module_& m);  // selftest_emu.cpp

PYBIND11_MODULE(_C_cuda_emu, m) {
  m.doc() = "fastrec's CUDA kernels, emulated on the host (tests only)";
  m.def("device_count", []() { return 1; }, "One emulated device, 0.");
  fastrec::python::bind_cuda_embedding(m);
  fastrec::python::bind_cuda_linear(m);
  fastrec::python::bind_cuda_topk(m);
  bind_emulation_selftest(m);
}
