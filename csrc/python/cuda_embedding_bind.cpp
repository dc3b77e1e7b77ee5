// Bindings of the CUDA embedding ops into fastrec._C_cuda. fastrec/_cuda_embedding.py
// validates and normalises the Python inputs and allocates the output in the caller's
// framework; this file turns the pointers into a launcher call with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

#include "../cuda/embedding.h"
#include "cuda_bindings.h"

namespace py = pybind11;

namespace fastrec {
namespace python {
namespace {

// (data_ptr, num_rows, dim, row_stride, kind, tbe, mode, padding_idx)
using TableTuple = std::tuple<uintptr_t, int64_t, int64_t, int64_t, int32_t, bool, int32_t, int64_t>;

cuda::BagsArgs bags_args(const std::vector<TableTuple>& tables, uintptr_t indices, int64_t num_indices,
                         bool indices_int64, uintptr_t offsets, int64_t num_offsets, bool offsets_int64,
                         int64_t fixed_len, uintptr_t per_sample_weights, uintptr_t out, int device,
                         uintptr_t stream) {
  cuda::BagsArgs a;
  a.tables.reserve(tables.size());
  for (const TableTuple& t : tables) {
    cuda::BagTable b;
    b.data = reinterpret_cast<const void*>(std::get<0>(t));
    b.num_rows = std::get<1>(t);
    b.dim = std::get<2>(t);
    b.row_stride = std::get<3>(t);
    b.kind = std::get<4>(t);
    b.tbe = std::get<5>(t);
    b.mode = std::get<6>(t);
    b.padding_idx = std::get<7>(t);
    a.tables.push_back(b);
  }
  a.indices = reinterpret_cast<const void*>(indices);
  a.num_indices = num_indices;
  a.indices_int64 = indices_int64;
  a.offsets = reinterpret_cast<const void*>(offsets);
  a.num_offsets = num_offsets;
  a.offsets_int64 = offsets_int64;
  a.fixed_len = fixed_len;
  a.per_sample_weights = reinterpret_cast<const float*>(per_sample_weights);
  a.out = reinterpret_cast<float*>(out);
  a.device = device;
  a.stream = stream;
  return a;
}

void embedding_bags(const std::vector<TableTuple>& tables, uintptr_t indices, int64_t num_indices,
                    bool indices_int64, uintptr_t offsets, int64_t num_offsets, bool offsets_int64,
                    int64_t fixed_len, uintptr_t per_sample_weights, uintptr_t out, int device,
                    uintptr_t stream) {
  const cuda::BagsArgs a = bags_args(tables, indices, num_indices, indices_int64, offsets, num_offsets,
                                     offsets_int64, fixed_len, per_sample_weights, out, device, stream);
  ReleaseGil release;
  cuda::embedding_bags(a);
}

std::unique_ptr<cuda::PendingBags> embedding_bags_deferred(
    const std::vector<TableTuple>& tables, uintptr_t indices, int64_t num_indices, bool indices_int64,
    uintptr_t offsets, int64_t num_offsets, bool offsets_int64, int64_t fixed_len, uintptr_t per_sample_weights,
    uintptr_t out, int device, uintptr_t stream) {
  const cuda::BagsArgs a = bags_args(tables, indices, num_indices, indices_int64, offsets, num_offsets,
                                     offsets_int64, fixed_len, per_sample_weights, out, device, stream);
  ReleaseGil release;
  return std::make_unique<cuda::PendingBags>(a);
}

}  // namespace

void bind_cuda_embedding(py::module_& m) {
  m.def("embedding_bags", &embedding_bags, py::arg("tables"), py::arg("indices"), py::arg("num_indices"),
        py::arg("indices_int64"), py::arg("offsets"), py::arg("num_offsets"), py::arg("offsets_int64"),
        py::arg("fixed_len"), py::arg("per_sample_weights"), py::arg("out"), py::arg("device"), py::arg("stream"),
        "Pools T device tables over device ids into out[B, sum(D)] on `stream` (pointers as ints; "
        "tables as (ptr, rows, dim, row_stride, kind, tbe, mode, padding_idx)). Waits for the kernel "
        "(16-byte readback of the bounds check); raises IndexError / ValueError like the CPU op.");
  // (module_local: fastrec._C_cuda_emu binds the same C++ type from this file, and both may be loaded)
  py::class_<cuda::PendingBags>(m, "PendingBags",
                                "The bounds and offsets check of an embedding_bags_deferred call, not yet read.",
                                py::module_local())
      .def("check", [](cuda::PendingBags& p) {
             ReleaseGil release;
             p.check();
           },
           "Waits for the stream and raises IndexError / ValueError as embedding_bags would have "
           "(the first call only; later ones return at once).");
  m.def("embedding_bags_deferred", &embedding_bags_deferred, py::arg("tables"), py::arg("indices"),
        py::arg("num_indices"), py::arg("indices_int64"), py::arg("offsets"), py::arg("num_offsets"),
        py::arg("offsets_int64"), py::arg("fixed_len"), py::arg("per_sample_weights"), py::arg("out"),
        py::arg("device"), py::arg("stream"),
        "embedding_bags without the wait: queues the kernels and returns a PendingBags whose check() "
        "raises what embedding_bags would have. Keep the ids, offsets, weights and out alive and "
        "unchanged until check() has returned.");
  m.attr("embedding_max_tables_per_launch") = cuda::kMaxTablesPerLaunch;
}

}  // namespace python
}  // namespace fastrec
