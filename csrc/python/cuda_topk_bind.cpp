// Bindings of the CUDA top-k op into fastrec._C_cuda (see csrc/cuda/topk.h).
//
// Everything arrives as device pointers (Python ints) into arrays the caller's framework owns
// (fastrec/_cuda_topk.py lays out the catalogue and allocates outputs and scratch), plus shapes
// and the caller's stream as an integer. The GIL is released around the launches and the
// read-back of the per-query flags.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "../cuda/topk.h"
#include "cuda_bindings.h"

namespace py = pybind11;

namespace fastrec {
namespace python {
namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cuda::TopkIndexView index_view(int precision, int64_t n, int64_t np, int64_t dim, int64_t row_bytes, std::uintptr_t codes,
                               std::uintptr_t scales, std::uintptr_t rows, int64_t stride_item, int64_t stride_d,
                               std::uintptr_t ids) {
  cuda::TopkIndexView v;
  v.precision = precision;
  v.n = n;
  v.np = np;
  v.dim = dim;
  v.row_bytes = row_bytes;
  v.codes = ptr<const void>(codes);
  v.scales = ptr<const float>(scales);
  v.rows = ptr<const float>(rows);
  v.stride_item = stride_item;
  v.stride_d = stride_d;
  v.ids = ptr<const int64_t>(ids);
  return v;
}

}  // namespace

void bind_cuda_topk(py::module_& m) {
  py::class_<cuda::TopkIndexView>(m, "TopkIndexView", "A device catalogue laid out by fastrec._cuda_topk (pointers only).",
                                  py::module_local())  // (fastrec._C_cuda_emu binds it too)
      .def(py::init(&index_view), py::arg("precision"), py::arg("n"), py::arg("np"), py::arg("dim"), py::arg("row_bytes"),
           py::arg("codes"), py::arg("scales"), py::arg("rows"), py::arg("stride_item"), py::arg("stride_d"),
           py::arg("ids"));
  m.def("topk_cap", &cuda::topk_cap, py::arg("keep"), py::arg("n"), py::arg("growth"),
        "Candidate buffer entries per query (growth: 1, then 4, 16, ... on overflow retries).");
  m.def("topk_max_keep", &cuda::topk_max_keep);
  m.def("topk_scratch_bytes", &cuda::topk_scratch_bytes, py::arg("index"), py::arg("Q"), py::arg("cap"));
  m.def(
      "topk_search",
      [](int device, const cuda::TopkIndexView& idx, std::uintptr_t queries, int64_t Q, int64_t k, int64_t keep,
         int64_t cap, bool rerank, std::uintptr_t ex_ids, std::uintptr_t ex_off, std::uintptr_t scores,
         std::uintptr_t out_ids, std::uintptr_t scratch, int64_t scratch_bytes, std::uintptr_t stream) {
        cuda::TopkRequest r;
        r.queries = ptr<const float>(queries);
        r.Q = Q;
        r.k = k;
        r.keep = keep;
        r.cap = cap;
        r.rerank = rerank;
        r.exclude_ids = ptr<const int64_t>(ex_ids);
        r.exclude_offsets = ptr<const int64_t>(ex_off);
        r.scores = ptr<float>(scores);
        r.out_ids = ptr<int64_t>(out_ids);
        cuda::TopkStatus st;
        {
          ReleaseGil release;
          st = cuda::search(device, idx, r, ptr<void>(scratch), scratch_bytes, stream);
        }
        return py::make_tuple(st.bad_query, st.overflowed);
      },
      py::arg("device"), py::arg("index"), py::arg("queries"), py::arg("Q"), py::arg("k"), py::arg("keep"),
      py::arg("cap"), py::arg("rerank"), py::arg("exclude_ids"), py::arg("exclude_offsets"), py::arg("scores"),
      py::arg("ids"), py::arg("scratch"), py::arg("scratch_bytes"), py::arg("stream"),
      "Fused scoring + top-k on the device; waits for the stream. Returns (first bad query or -1, "
      "[queries whose candidate buffer overflowed: re-run them with a larger cap]).");
}

}  // namespace python
}  // namespace fastrec
