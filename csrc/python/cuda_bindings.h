// Each group of CUDA ops binds itself into fastrec._C_cuda from its own file.
#pragma once

#include <pybind11/pybind11.h>

#include "release_gil.h"

namespace fastrec {
namespace python {

void bind_cuda_embedding(pybind11::module_& m);  // cuda_embedding_bind.cpp
void bind_cuda_linear(pybind11::module_& m);     // cuda_linear_bind.cpp
void bind_cuda_topk(pybind11::module_& m);       // cuda_topk_bind.cpp

}  // namespace python
}  // namespace fastrec
