// Bindings of the CUDA embedding ops into fastrec._C_cuda.
#include "cuda_bindings.h"

namespace py = pybind11;

namespace fastrec {
namespace python {

void bind_cuda_embedding(py::module_& m) { (void)m; }

}  // namespace python
}  // namespace fastrec
