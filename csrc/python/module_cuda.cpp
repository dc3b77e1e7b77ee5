// fastrec._C_cuda: the CUDA kernels. Importing it never touches the GPU (the CUDA runtime is
// linked statically and initialised on first use), so it imports on machines without a driver.
//
// Calling convention of every op: device pointers as integers (from __cuda_array_interface__),
// shapes, and the caller's stream as an integer (0 = the legacy default stream). Outputs are
// allocated by the caller's framework in Python, so memory stays under its allocator and stream.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../cuda/device.h"
#include "cuda_bindings.h"

namespace py = pybind11;

#ifndef FASTREC_CUDA_ARCH_LIST
#define FASTREC_CUDA_ARCH_LIST ""
#endif

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastrec CUDA kernels";
  m.def("device_count", &fastrec::cuda::device_count, "Number of CUDA devices (0 without a driver or GPU).");
  m.def(
      "device_info",
      [](int device) {
        auto d = fastrec::cuda::device_info(device);
        py::dict r;
        r["name"] = d.name;
        r["compute_capability"] = py::make_tuple(d.major, d.minor);
        r["multiprocessors"] = d.multiprocessors;
        r["total_memory"] = d.total_memory;
        r["l2_bytes"] = d.l2_bytes;
        r["smem_per_block_optin"] = d.smem_per_block_optin;
        return r;
      },
      py::arg("device") = 0);
  m.def("build_info", []() {
    py::dict r;
    r["archs"] = std::string(FASTREC_CUDA_ARCH_LIST);
    r["runtime_version"] = fastrec::cuda::runtime_version();
    return r;
  });
  m.def("driver_version", &fastrec::cuda::driver_version);
  fastrec::python::bind_cuda_embedding(m);
  fastrec::python::bind_cuda_linear(m);
  fastrec::python::bind_cuda_topk(m);
}
