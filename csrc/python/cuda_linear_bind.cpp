// Bindings of the CUDA linear ops into fastrec._C_cuda (see csrc/cuda/linear.h).
//
// Weights come in as host numpy arrays (uploaded once per device); activations, outputs and
// scratch as device pointers (Python ints) allocated by the caller's framework; the stream as an
// integer handle. The GIL is released around the launches, the finite-check wait and the
// device wait of deleting a layer's weights.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../cuda/linear.h"
#include "cuda_bindings.h"

namespace py = pybind11;

namespace fastrec {
namespace python {
namespace {

using cuda::Int8LinearPlan;
using cuda::Int8LinearWeights;

template <typename T>
py::array_t<T, py::array::c_style> host_array(py::handle obj, const char* what, int ndim) {
  if (!py::isinstance<py::array_t<T>>(obj)) {
    throw py::type_error(std::string(what) + " must be a numpy array of " + py::str(py::dtype::of<T>()).cast<std::string>());
  }
  auto a = py::array_t<T, py::array::c_style>::ensure(obj);
  if (!a) throw py::type_error(std::string(what) + " could not be read as a C-contiguous array");
  if (a.ndim() != ndim) {
    throw py::value_error(std::string(what) + " must be " + std::to_string(ndim) + "-D, got " +
                          std::to_string(a.ndim()) + "-D");
  }
  return a;
}

unsigned long g_main_thread = 0;  // threading.main_thread().ident, read at import

// Deleting a layer's weights waits for their device (kernels may still read them; see
// ~Int8LinearWeights). Python's garbage collector does it with the GIL held: on the main thread,
// release it, so other Python threads, and host callbacks on the GPU's streams that need the
// GIL, go on meanwhile. Only there: another (daemon) thread asking for the GIL back once
// finalization has begun is ended by Python with pthread_exit, whose unwind cannot pass the
// shared_ptr's noexcept release (std::terminate); and never during finalization itself.
struct DeleteWithoutGil {
  void operator()(Int8LinearWeights* w) const {
    if (Py_IsInitialized() && !python_is_finalizing() && PyThread_get_thread_ident() == g_main_thread &&
        PyGILState_Check()) {
      ReleaseGil release;
      delete w;
    } else {
      delete w;
    }
  }
};

std::shared_ptr<Int8LinearWeights> make_weights(int device, py::handle w, py::handle scale, py::handle bias) {
  auto wa = host_array<int8_t>(w, "weight_int8", 2);
  auto sa = host_array<float>(scale, "weight_scale", 1);
  const int64_t N = wa.shape(0), K = wa.shape(1);
  if (sa.shape(0) != N) throw py::value_error("weight_scale must have one scale per output channel");
  py::array_t<float, py::array::c_style> ba;
  const float* bp = nullptr;
  if (!bias.is_none()) {
    ba = host_array<float>(bias, "bias", 1);
    if (ba.shape(0) != N) throw py::value_error("bias must have one value per output channel");
    bp = ba.data();
  }
  const int8_t* wp = wa.data();
  const float* sp = sa.data();
  Int8LinearWeights* made;
  {
    ReleaseGil release;
    made = new Int8LinearWeights(device, wp, N, K, sp, bp);
  }
  return std::shared_ptr<Int8LinearWeights>(made, DeleteWithoutGil{});
}

}  // namespace

void bind_cuda_linear(py::module_& m) {
  g_main_thread = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  py::class_<Int8LinearWeights, std::shared_ptr<Int8LinearWeights>>(
      m, "Int8LinearWeights", "One int8 layer's weights uploaded to one device (padded for the kernels).",
      py::module_local())  // (module-local: fastrec._C_cuda_emu binds the same types from this file)
      .def(py::init(&make_weights), py::arg("device"), py::arg("weight_int8"), py::arg("weight_scale"),
           py::arg("bias") = py::none())
      .def_property_readonly("device", &Int8LinearWeights::device)
      .def_property_readonly("in_features", &Int8LinearWeights::K)
      .def_property_readonly("out_features", &Int8LinearWeights::N)
      .def_property_readonly("padded_in_features", &Int8LinearWeights::Kp)
      .def_property_readonly("padded_out_features", &Int8LinearWeights::Np);

  py::class_<Int8LinearPlan, std::shared_ptr<Int8LinearPlan>>(
      m, "Int8LinearPlan", "Layers (with their activation codes) run back to back on one stream.", py::module_local())
      .def(py::init([](const std::vector<std::shared_ptr<Int8LinearWeights>>& layers, const std::vector<int>& acts) {
             std::vector<std::shared_ptr<const Int8LinearWeights>> ls(layers.begin(), layers.end());
             return std::make_shared<Int8LinearPlan>(std::move(ls), acts);
           }),
           py::arg("layers"), py::arg("activations"))
      .def_property_readonly("device", &Int8LinearPlan::device)
      .def_property_readonly("in_features", &Int8LinearPlan::in_features)
      .def_property_readonly("out_features", &Int8LinearPlan::out_features)
      .def("scratch_bytes", &Int8LinearPlan::scratch_bytes, py::arg("rows"))
      .def(
          "forward",
          [](const Int8LinearPlan& p, std::uintptr_t x, int64_t rows, std::uintptr_t y, std::uintptr_t scratch,
             int64_t scratch_bytes, std::uintptr_t stream, bool check_finite) {
            ReleaseGil release;
            p.forward(reinterpret_cast<const float*>(x), rows, reinterpret_cast<float*>(y),
                      reinterpret_cast<void*>(scratch), scratch_bytes, stream, check_finite);
          },
          py::arg("x"), py::arg("rows"), py::arg("y"), py::arg("scratch"), py::arg("scratch_bytes"),
          py::arg("stream"), py::arg("check_finite") = true,
          "y (rows x out_features float32) = the layers on x (rows x in_features float32); device pointers.");

  m.def(
      "int8_gemm_int32",
      [](const Int8LinearWeights& w, std::uintptr_t a, int64_t rows, std::uintptr_t y32, std::uintptr_t stream) {
        ReleaseGil release;
        cuda::int8_gemm_int32(w, reinterpret_cast<const int8_t*>(a), rows, reinterpret_cast<int32_t*>(y32), stream);
      },
      py::arg("weights"), py::arg("a"), py::arg("rows"), py::arg("y32"), py::arg("stream"),
      "Test hook: exact int32 sums of int8 activations a (rows x padded_in_features, zero padded).");
  m.def(
      "quantize_rows_int8",
      [](int device, std::uintptr_t x, int64_t rows, int64_t K, int64_t Kp, std::uintptr_t q, std::uintptr_t scale,
         std::uintptr_t stream) {
        ReleaseGil release;
        cuda::quantize_rows(device, reinterpret_cast<const float*>(x), rows, K, Kp, reinterpret_cast<int8_t*>(q),
                            reinterpret_cast<float*>(scale), stream);
      },
      py::arg("device"), py::arg("x"), py::arg("rows"), py::arg("K"), py::arg("Kp"), py::arg("q"), py::arg("scale"),
      py::arg("stream"), "Test hook: the activation quantization pass alone.");
  m.def("set_linear_gemm_config", &cuda::set_gemm_config, py::arg("config"),
        "Testing: force the GEMM kernel (0 = by shape, 2/3/4 = 32/64/128-wide tiles; process-wide).");
  m.def("linear_gemm_config", &cuda::gemm_config);
}

}  // namespace python
}  // namespace fastrec
