// fastrec._C_cuda_emu: fastrec._C_cuda's embedding ops (the same binding file, the same
// csrc/cuda/embedding.cu) compiled for the host under host_emulation.h, over host memory. A
// test-only module (built with FASTREC_CUDA_EMU=ON): tests/test_cuda_emulated.py runs the CUDA
// op's Python layer and this launcher on CPU tensors posing as CUDA ones on device 0.
#include <pybind11/pybind11.h>

#include "../../python/cuda_bindings.h"

PYBIND11_MODULE(_C_cuda_emu, m) {
  m.doc() = "fastrec's CUDA embedding kernel, emulated on the host (tests only)";
  m.def("device_count", []() { return 1; }, "One emulated device, 0.");
  fastrec::python::bind_cuda_embedding(m);
}
