// fastrec._C: the CPU module. Converts Python objects into views, re-checks everything the
// kernels rely on, releases the GIL and calls the drivers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sys/mman.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "fastrec/cpu_features.h"
#include "fastrec/dispatch.h"
#include "fastrec/dlrm.h"
#include "fastrec/embedding.h"
#include "fastrec/linear.h"
#include "fastrec/interaction.h"
#include "fastrec/topk.h"
#include "fastrec/parallel.h"
#include "release_gil.h"

namespace py = pybind11;
using namespace fastrec;

namespace {

// The C++ object behind `self`, an instance of T, or nullptr while its __init__ has not run
// (made with `cls.__new__(cls)`: pybind11 would hand out its unconstructed storage, and
// reading it crashed). One type lookup: initialised() runs once per table on every call's path.
template <class T>
T* constructed(py::handle self) {
  auto* inst = reinterpret_cast<py::detail::instance*>(self.ptr());
  auto vh = inst->get_value_and_holder(py::detail::get_type_info(typeid(T)), /*throw_if_missing=*/false);
  return vh && vh.holder_constructed() ? vh.template value_ptr<T>() : nullptr;
}

// The C++ object behind `self`: TypeError for an object of another type or one whose
// __init__ never ran.
template <class T>
T& initialised(py::handle self, const char* what) {
  if (!py::isinstance<T>(self)) throw py::type_error(std::string("expected a ") + what);
  T* obj = constructed<T>(self);
  if (obj == nullptr) throw py::type_error(std::string(what) + " is not initialised (its __init__ was never called)");
  return *obj;
}

// Whether self is a T whose __init__ has run (pybind11 ignores a second __init__).
template <class T>
bool is_initialised(py::handle self) {
  return py::isinstance<T>(self) && constructed<T>(self) != nullptr;
}

// A sequence of T objects (Int8LayerCore, ItemBlock) as shared pointers: TypeError for None,
// another type or an object whose __init__ never ran (pybind11's own conversion let None
// through as a null pointer and failed on the latter with a RuntimeError).
template <class T>
std::vector<std::shared_ptr<T>> held_list(py::handle seq, const char* what, const char* type_name) {
  if (!py::isinstance<py::sequence>(seq) || py::isinstance<py::str>(seq)) {
    throw py::type_error(std::string(what) + " must be a sequence of " + type_name + " objects");
  }
  std::vector<std::shared_ptr<T>> out;
  // py::object, not a borrowed handle: a sequence may hand out a new object per item, which
  // would be freed before it is read
  for (py::object item : py::reinterpret_borrow<py::sequence>(seq)) {
    const std::string where = std::string(what) + "[" + std::to_string(out.size()) + "]";
    if (item.is_none()) throw py::type_error(where + " is None, not a " + type_name);
    initialised<T>(item, type_name);
    out.push_back(item.cast<std::shared_ptr<T>>());
  }
  return out;
}

// Row-wise quantized table storage, the base of fastrec.QuantizedTable. Holds the packed
// bytes (R, row_stride) uint8 and how to read them; the Python subclass adds the methods.
struct PackedTable {
  py::array data;  // uint8, C-contiguous, (R, row_stride)
  int bits = 8;
  int64_t dim = 0;
  std::string layout;  // "fbgemm" or "tbe"
  TableView view;
};

const PackedTable& packed_table(py::handle self) { return initialised<PackedTable>(self, "QuantizedTable"); }

int64_t code_bytes(int bits, int64_t dim) {
  const int64_t per_byte = 8 / bits;
  return (dim + per_byte - 1) / per_byte;
}

void init_packed(PackedTable& self, py::array data, int bits, int64_t dim, const std::string& layout) {
  if (bits != 8 && bits != 4 && bits != 2) throw py::value_error("bits must be 8, 4 or 2, got " + std::to_string(bits));
  if (layout != "fbgemm" && layout != "tbe") throw py::value_error("layout must be 'fbgemm' or 'tbe', got '" + layout + "'");
  if (!py::isinstance<py::array_t<uint8_t>>(data) || data.dtype().kind() != 'u' || data.itemsize() != 1) {
    throw py::type_error("packed table data must be a uint8 array, got dtype " + std::string(py::str(data.dtype())));
  }
  if (data.ndim() != 2) throw py::value_error("packed table data must be 2-D (rows, bytes per row)");
  if (!(data.flags() & py::array::c_style)) throw py::value_error("packed table data must be C-contiguous");
  if (dim < 1) throw py::value_error("dim must be >= 1, got " + std::to_string(dim));
  const bool tbe = layout == "tbe";
  const int64_t qbytes = (bits == 8 && !tbe) ? 8 : 4;
  const int64_t stride = data.shape(1);
  // Compared before code_bytes(dim), which would overflow for a huge dim.
  if (dim > (stride - qbytes) * (8 / bits)) {
    throw py::value_error("packed rows of " + std::to_string(stride) + " bytes are too short for dim=" +
                          std::to_string(dim) + " at " + std::to_string(bits) + " bits in layout '" + layout + "'");
  }
  const int64_t cb = code_bytes(bits, dim);
  const int64_t need = cb + qbytes;
  // FBGEMM's rows have the scale and bias right after the codes: a smaller dim would read
  // them from inside the codes. Only TBE rows may be padded.
  if (!tbe && stride != need) {
    throw py::value_error("packed rows of " + std::to_string(stride) + " bytes do not match dim=" + std::to_string(dim) +
                          " at " + std::to_string(bits) + " bits in layout 'fbgemm' (" + std::to_string(cb) +
                          " code bytes + " + std::to_string(qbytes) + " = " + std::to_string(need) +
                          " bytes a row; only layout 'tbe' rows may be padded)");
  }
  self.data = data;
  self.bits = bits;
  self.dim = dim;
  self.layout = layout;
  TableView& v = self.view;
  v.data = static_cast<const uint8_t*>(data.data());
  v.num_rows = data.shape(0);
  v.dim = dim;
  v.row_stride = stride;
  v.kind = bits == 8 ? (tbe ? RowKind::kQ8Half : RowKind::kQ8) : bits == 4 ? RowKind::kQ4 : RowKind::kQ2;
  v.row_bytes = need;
  if (tbe) {
    v.qparam_offset = 0;
    v.code_offset = 4;
    v.qparams_fp16 = true;
  } else {
    v.code_offset = 0;
    v.qparam_offset = cb;
    v.qparams_fp16 = bits != 8;
  }
}

// C-contiguous and aligned for its dtype: what the kernels read without a copy. (A buffer
// viewed at an odd byte offset is contiguous but misaligned; reading it as int64 / float is UB.)
bool is_c_aligned(const py::array& a) {
  return (a.flags() & py::array::c_style) && (a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_);
}

// A C-contiguous, aligned array of a's values (a itself when it already is), optionally as `dtype`.
py::array c_aligned(const py::array& a, const char* dtype = nullptr) {
  py::object dt = dtype ? py::object(py::str(dtype)) : py::object(py::none());
  return py::module_::import("numpy").attr("require")(a, dt, "CA");
}

// NumPy type numbers (stable across NumPy 1.x and 2.x).
constexpr int kNpyInt32 = 5, kNpyLong = 7, kNpyLongLong = 9, kNpyFloat32 = 11, kNpyFloat16 = 23;

// Whether `a` holds NumPy type `type_num` in native byte order.
bool has_native_type(const py::array& a, int type_num) {
  const auto* d = py::detail::array_descriptor_proxy(py::detail::array_proxy(a.ptr())->descr);
  return d->type_num == type_num && d->byteorder != '>';
}

// Fast path for the common case (a C-contiguous, native-order float32/float16 2-D ndarray):
// reads the array header directly, no temporary dtype objects. Returns false to fall back.
bool fast_float_view(py::handle obj, TableView* v) {
  if (!py::isinstance<py::array>(obj)) return false;
  const auto* a = py::detail::array_proxy(obj.ptr());
  if (a->nd != 2 || !(a->flags & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_) ||
      !(a->flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
    return false;
  }
  const auto* d = py::detail::array_descriptor_proxy(a->descr);
  if (d->byteorder == '>') return false;
  int64_t itemsize;
  if (d->type_num == kNpyFloat32) {
    v->kind = RowKind::kF32;
    itemsize = 4;
  } else if (d->type_num == kNpyFloat16) {
    v->kind = RowKind::kF16;
    itemsize = 2;
  } else {
    return false;
  }
  v->data = reinterpret_cast<const uint8_t*>(a->data);
  v->num_rows = a->dimensions[0];
  v->dim = a->dimensions[1];
  v->row_stride = v->dim * itemsize;
  v->row_bytes = v->row_stride;
  return true;
}

// The general path: anything numpy can view as an array, with a clear error otherwise.
// `convert` (optional, from fastrec.ops) turns non-numpy inputs such as torch tensors into
// arrays, or raises the TypeError a user should see.
TableView float_view(py::handle obj, size_t t, std::vector<py::object>& keep, const py::object& convert) {
  TableView v;
  if (fast_float_view(obj, &v)) {
    keep.push_back(py::reinterpret_borrow<py::object>(obj));
    return v;
  }
  py::object src = py::reinterpret_borrow<py::object>(obj);
  if (!py::isinstance<py::array>(src) && !convert.is_none()) src = convert(src);
  py::array arr = py::array::ensure(src);
  if (!arr) throw py::type_error("table " + std::to_string(t) + " must be a numpy array or QuantizedTable");
  const py::dtype dt = arr.dtype();
  RowKind kind;
  if (dt.kind() == 'f' && dt.itemsize() == 4) {  // any byte order: normalised below
    kind = RowKind::kF32;
  } else if (dt.kind() == 'f' && dt.itemsize() == 2) {
    kind = RowKind::kF16;
  } else {
    throw py::type_error("table " + std::to_string(t) + " must be float32 or float16 (or a QuantizedTable), got " +
                         std::string(py::str(dt)));
  }
  if (arr.ndim() != 2) throw py::value_error("table " + std::to_string(t) + " must be 2-D (rows, dim), got " +
                                             std::to_string(arr.ndim()) + "-D");
  // Non-contiguous, misaligned or non-native byte order: one normalised copy for this call.
  arr = c_aligned(arr, kind == RowKind::kF32 ? "float32" : "float16");
  if (!fast_float_view(arr, &v)) throw py::type_error("table " + std::to_string(t) + " could not be normalised");
  keep.push_back(arr);
  return v;
}

// int32 / int64 arrays: the element size, or 0 for any other dtype.
int64_t int_itemsize(const py::array& a) {
  const auto* d = py::detail::array_descriptor_proxy(py::detail::array_proxy(a.ptr())->descr);
  if (d->byteorder == '>') return 0;
  if (d->type_num == kNpyInt32) return 4;
  if (d->type_num == kNpyLongLong || (d->type_num == kNpyLong && sizeof(long) == 8)) return 8;
  return 0;
}

py::array contiguous_1d(const py::array& a, const char* what) {
  if (a.ndim() != 1) throw py::value_error(std::string(what) + " must be 1-D, got " + std::to_string(a.ndim()) + "-D");
  if (!is_c_aligned(a)) return c_aligned(a);
  return a;
}

// embedding_bags' arguments as views, with the Python objects that keep their memory alive.
struct BagArgs {
  MultiBagArgs a;
  std::vector<py::object> keep;
  py::array indices, offsets, psw;
};

void parse_bag_args(BagArgs* out, const py::sequence& tables, py::array indices, py::array offsets,
                    const std::vector<int>& modes, py::object per_sample_weights,
                    const std::vector<int64_t>& padding_idx, const py::object& convert) {
  MultiBagArgs& a = out->a;
  const size_t T = py::len(tables);
  a.tables.reserve(T);
  out->keep.reserve(T);
  PyTypeObject* packed_type = reinterpret_cast<PyTypeObject*>(py::type::of<PackedTable>().ptr());
  for (size_t t = 0; t < T; ++t) {
    py::object obj = tables[t];
    if (PyObject_TypeCheck(obj.ptr(), packed_type)) {
      a.tables.push_back(packed_table(obj).view);
      out->keep.push_back(std::move(obj));
    } else {
      a.tables.push_back(float_view(obj, t, out->keep, convert));
    }
  }
  const int64_t isz = int_itemsize(indices), osz = int_itemsize(offsets);
  if (isz == 0) throw py::type_error("indices must be int32 or int64, got " + std::string(py::str(indices.dtype())));
  if (osz == 0) throw py::type_error("offsets must be int32 or int64, got " + std::string(py::str(offsets.dtype())));
  out->indices = contiguous_1d(indices, "indices");
  out->offsets = contiguous_1d(offsets, "offsets");
  a.indices = out->indices.data();
  a.indices_int64 = isz == 8;
  a.num_indices = out->indices.shape(0);
  a.offsets = out->offsets.data();
  a.offsets_int64 = osz == 8;
  a.num_offsets = out->offsets.shape(0);
  for (int m : modes) {
    if (m < 0 || m > 2) throw py::value_error("mode code must be 0 (sum), 1 (mean) or 2 (max)");
    a.modes.push_back(static_cast<PoolMode>(m));
  }
  a.padding_idx = padding_idx;
  if (!per_sample_weights.is_none()) {
    py::array psw = py::array::ensure(per_sample_weights);
    if (!psw || !has_native_type(psw, kNpyFloat32)) throw py::type_error("per_sample_weights must be float32");
    out->psw = contiguous_1d(psw, "per_sample_weights");
    if (out->psw.shape(0) != a.num_indices) {
      throw py::value_error("per_sample_weights must have one weight per index (" + std::to_string(a.num_indices) +
                            "), got " + std::to_string(out->psw.shape(0)));
    }
    if (a.modes.size() != T) throw py::value_error("one mode per table is required");
    for (size_t t = 0; t < T; ++t) {
      if (a.modes[t] != PoolMode::kSum) throw py::value_error("per_sample_weights is only supported with mode 'sum'");
    }
    a.per_sample_weights = static_cast<const float*>(out->psw.data());
  }
}

py::array embedding_bags_py(const py::sequence& tables, py::array indices, py::array offsets,
                            const std::vector<int>& modes, py::object per_sample_weights,
                            const std::vector<int64_t>& padding_idx, const py::object& convert) {
  BagArgs args;
  parse_bag_args(&args, tables, indices, offsets, modes, per_sample_weights, padding_idx, convert);
  MultiBagArgs& a = args.a;
  const int64_t B = batch_size_of(a);
  int64_t total_dim = 0;
  for (const TableView& v : a.tables) {
    // (0-row tables cost no memory, so their dims can add up past int64: the sum wrapped and
    // the output was allocated too narrow for the kernel's writes)
    if (__builtin_add_overflow(total_dim, v.dim, &total_dim)) {
      throw py::value_error("the tables' dims add up to more than 2**63 - 1 output columns");
    }
  }
  py::array_t<float> out({B, total_dim});
  a.out = out.mutable_data();
  {
    ReleaseGil release;
    embedding_bags(a);
  }
  return out;
}

// ---- Model requests: a dict of per-feature bags as one table-major CSR pair ----------------

// One element of a 1-D int32 / int64 array at any stride and alignment.
int64_t int_at(const char* base, int64_t stride, int64_t itemsize, int64_t i) {
  const char* p = base + i * stride;
  if (itemsize == 4) {
    int32_t v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  int64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

struct BagPart {
  py::array indices, offsets;  // (the references that keep the memory alive)
  const char* ind = nullptr;   // raw views, taken while holding the GIL: pybind11's itemsize()
  const char* off = nullptr;   // touches the dtype's reference count, which needs it
  int64_t ind_stride = 0, ind_size = 0, off_stride = 0, off_size = 0;
  int64_t n = 0, start = 0;
};

// The common case of fastrec.Model's dict requests: pairs[t] = (indices, offsets), each a 1-D
// native int32 / int64 ndarray, offsets of B + 1 entries (B = -1: take the first pair's),
// offsets[0] == 0 and offsets[B] == len(indices). Returns (indices int64, offsets int64 of
// T*B + 1, B, starts) in table-major order, or None when any pair is not of that form: the
// Python path then finds the problem and words the error. (Non-decreasing offsets are checked
// by the embedding kernels on the combined offsets, as on the Python path.)
py::object pack_bags(const py::list& pairs, int64_t B) {
  const size_t T = pairs.size();
  if (T == 0) return py::none();
  std::vector<BagPart> parts(T);
  int64_t total = 0;
  for (size_t t = 0; t < T; ++t) {
    PyObject* p = PyList_GET_ITEM(pairs.ptr(), static_cast<Py_ssize_t>(t));
    // (exact tuples: a subclass may override __getitem__, which PyTuple_GET_ITEM would skip)
    if (!PyTuple_CheckExact(p) || PyTuple_GET_SIZE(p) != 2) return py::none();
    py::handle ih(PyTuple_GET_ITEM(p, 0)), oh(PyTuple_GET_ITEM(p, 1));
    if (!py::isinstance<py::array>(ih) || !py::isinstance<py::array>(oh)) return py::none();
    BagPart& part = parts[t];
    part.indices = py::reinterpret_borrow<py::array>(ih);
    part.offsets = py::reinterpret_borrow<py::array>(oh);
    const py::array &ind = part.indices, &off = part.offsets;
    part.ind_size = int_itemsize(ind);
    part.off_size = int_itemsize(off);
    if (ind.ndim() != 1 || off.ndim() != 1 || part.ind_size == 0 || part.off_size == 0) return py::none();
    const int64_t nb = off.shape(0) - 1;
    if (nb < 0 || (B >= 0 && nb != B)) return py::none();
    B = nb;
    part.n = ind.shape(0);
    part.ind = static_cast<const char*>(ind.data());
    part.off = static_cast<const char*>(off.data());
    part.ind_stride = ind.strides(0);
    part.off_stride = off.strides(0);
    if (int_at(part.off, part.off_stride, part.off_size, 0) != 0 ||
        int_at(part.off, part.off_stride, part.off_size, B) != part.n) {
      return py::none();
    }
    part.start = total;
    // (only arrays of stride 0 can hold this many ids: no memory could hold the output)
    if (__builtin_add_overflow(total, part.n, &total)) throw std::bad_alloc();
  }
  int64_t num_offsets = 0;
  if (__builtin_mul_overflow(static_cast<int64_t>(T), B, &num_offsets) ||
      __builtin_add_overflow(num_offsets, int64_t{1}, &num_offsets)) {
    throw std::bad_alloc();
  }
  py::array_t<int64_t> indices(total), offsets(num_offsets);
  int64_t* ip = indices.mutable_data();
  int64_t* op = offsets.mutable_data();
  bool wrapped = false;
  {
    ReleaseGil release;  // (parts holds references to every array)
    for (size_t t = 0; t < T && !wrapped; ++t) {
      const BagPart& part = parts[t];
      if (part.ind_size == 8 && part.ind_stride == 8) {
        std::memcpy(ip + part.start, part.ind, static_cast<size_t>(part.n) * 8);
      } else {
        for (int64_t i = 0; i < part.n; ++i) ip[part.start + i] = int_at(part.ind, part.ind_stride, part.ind_size, i);
      }
      int64_t* dst = op + static_cast<int64_t>(t) * B;
      for (int64_t b = 0; b < B; ++b) {
        // (an offset near 2**63 wraps when moved by the earlier features' ids: bad offsets,
        // which the Python path reports)
        wrapped |= __builtin_add_overflow(int_at(part.off, part.off_stride, part.off_size, b), part.start, &dst[b]);
      }
    }
    op[num_offsets - 1] = total;
  }
  if (wrapped) return py::none();
  py::list starts;
  for (const BagPart& part : parts) starts.append(part.start);
  return py::make_tuple(indices, offsets, B, starts);
}

void advise_hugepages(py::array arr) {
  // Advice only: asks the kernel to back the page-aligned 2 MiB-multiple middle of the
  // buffer with transparent huge pages. Harmless where THP is off.
  const uintptr_t begin = reinterpret_cast<uintptr_t>(arr.data());
  const uintptr_t end = begin + static_cast<uintptr_t>(arr.nbytes());
  const uintptr_t huge = 2u << 20;
  const uintptr_t b = (begin + huge - 1) & ~(huge - 1), e = end & ~(huge - 1);
#ifdef MADV_HUGEPAGE
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#endif
}

// ---- int8 linear -----------------------------------------------------------------------

using F32Array = py::array_t<float, py::array::c_style>;

py::array require(py::handle obj, int type_num, const char* what, const char* dtype_name, int ndim) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(what) + " must be a numpy array");
  py::array arr = py::reinterpret_borrow<py::array>(obj);
  if (!has_native_type(arr, type_num)) {
    throw py::type_error(std::string(what) + " must be " + dtype_name + ", got " + std::string(py::str(arr.dtype())));
  }
  if (arr.ndim() != ndim) {
    throw py::value_error(std::string(what) + " must be " + std::to_string(ndim) + "-D, got " + std::to_string(arr.ndim()) + "-D");
  }
  if (!is_c_aligned(arr)) arr = c_aligned(arr);
  return arr;
}

constexpr int kNpyInt8 = 1;

std::shared_ptr<Int8Layer> make_layer(py::handle w, py::handle scale, py::handle bias) {
  py::array wa = require(w, kNpyInt8, "weight_int8", "int8", 2);
  py::array sa = require(scale, kNpyFloat32, "weight_scale", "float32", 1);
  const int64_t N = wa.shape(0), K = wa.shape(1);
  if (sa.shape(0) != N) throw py::value_error("weight_scale must have one scale per output channel");
  const float* bp = nullptr;
  py::array ba;
  if (!bias.is_none()) {
    ba = require(bias, kNpyFloat32, "bias", "float32", 1);
    if (ba.shape(0) != N) throw py::value_error("bias must have one value per output channel");
    bp = static_cast<const float*>(ba.data());
  }
  const int8_t* wp = static_cast<const int8_t*>(wa.data());
  const float* sp = static_cast<const float*>(sa.data());
  ReleaseGil release;  // packing a large layer takes a while; wa, sa, ba stay alive
  return std::make_shared<Int8Layer>(wp, N, K, sp, bp);
}

py::array check_x(py::handle x, int64_t K) {
  py::array xa = require(x, kNpyFloat32, "x", "float32", 2);
  if (xa.shape(1) != K) {
    throw py::value_error("x has " + std::to_string(xa.shape(1)) + " features, the layer expects " + std::to_string(K));
  }
  return xa;
}

Activation activation_of(int code) {
  if (code < 0 || code > 2) throw py::value_error("activation code must be 0 (none), 1 (relu) or 2 (sigmoid)");
  return static_cast<Activation>(code);
}

// ---- top-k ------------------------------------------------------------------------------

constexpr int kNpyInt64 = 7;
constexpr int kNpyUint8 = 2;

std::shared_ptr<ItemBlock> make_item_block(py::handle items, int precision, bool keep_f32) {
  py::array xa = require(items, kNpyFloat32, "items", "float32", 2);
  if (precision < 0 || precision > 2) throw py::value_error("precision code must be 0 (int8), 1 (fp16) or 2 (fp32)");
  if (xa.shape(1) < 1) throw py::value_error("items must have at least one column");
  const float* p = static_cast<const float*>(xa.data());
  const int64_t N = xa.shape(0), D = xa.shape(1);
  ReleaseGil release;
  return std::make_shared<ItemBlock>(p, N, D, static_cast<ItemPrecision>(precision), keep_f32);
}

// (ids and removed as py::object: a sequence may hand out new objects, which a borrowed handle
// would not keep alive)
// rows: per block, None or the float32 rows (N x D) the rerank reads where the block keeps none.
py::tuple topk_search_py(py::handle blocks_obj, const std::vector<py::object>& ids,
                         const std::vector<py::object>& removed, py::handle queries, int64_t k, int64_t candidates,
                         bool rerank, py::handle exclude_ids, py::handle exclude_offsets,
                         const std::vector<py::object>& rows) {
  const std::vector<std::shared_ptr<ItemBlock>> blocks = held_list<ItemBlock>(blocks_obj, "blocks", "ItemBlock");
  if (ids.size() != blocks.size() || removed.size() != blocks.size() || (!rows.empty() && rows.size() != blocks.size())) {
    throw py::value_error("blocks, ids, removed (and rows) must have the same length");
  }
  py::array qa = require(queries, kNpyFloat32, "queries", "float32", 2);
  const int64_t Q = qa.shape(0), D = qa.shape(1);
  std::vector<py::array> keep;  // holds the arrays while the GIL is released
  std::vector<SegmentRef> segs(blocks.size());
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (!blocks[i]) throw py::type_error("blocks must be ItemBlock objects");
    py::array ia = require(ids[i], kNpyInt64, "ids", "int64", 1);
    if (ia.shape(0) != blocks[i]->size()) throw py::value_error("ids must have one id per item");
    keep.push_back(ia);
    segs[i].block = blocks[i].get();
    segs[i].ids = static_cast<const int64_t*>(ia.data());
    if (!removed[i].is_none()) {
      py::array ra = require(removed[i], kNpyUint8, "removed", "uint8", 1);
      if (ra.shape(0) != blocks[i]->size()) throw py::value_error("removed must have one flag per item");
      keep.push_back(ra);
      segs[i].removed = static_cast<const uint8_t*>(ra.data());
    }
    if (!rows.empty() && !rows[i].is_none()) {
      py::array xa = require(rows[i], kNpyFloat32, "rows", "float32", 2);
      if (xa.shape(0) != blocks[i]->size() || xa.shape(1) != blocks[i]->dim()) {
        throw py::value_error("rows must be the block's items, one float32 row of its dimension each");
      }
      keep.push_back(xa);
      segs[i].rows = static_cast<const float*>(xa.data());
    }
  }
  TopKRequest req;
  req.queries = static_cast<const float*>(qa.data());
  req.Q = Q;
  req.D = D;
  req.k = k;
  req.candidates = candidates;
  req.rerank = rerank;
  py::array ea, eo;
  std::vector<int64_t> ex_off;  // a copy, checked and used: the caller's array may change once the GIL is released
  if (!exclude_offsets.is_none()) {
    ea = require(exclude_ids, kNpyInt64, "exclude ids", "int64", 1);
    eo = require(exclude_offsets, kNpyInt64, "exclude offsets", "int64", 1);
    if (eo.shape(0) != Q + 1) throw py::value_error("exclude offsets must have Q + 1 entries");
    ex_off.assign(static_cast<const int64_t*>(eo.data()), static_cast<const int64_t*>(eo.data()) + Q + 1);
    const int64_t* o = ex_off.data();
    if (o[0] != 0 || o[Q] != ea.shape(0)) throw py::value_error("exclude offsets must start at 0 and end at len(exclude ids)");
    for (int64_t q = 0; q < Q; ++q) {
      if (o[q + 1] < o[q]) throw py::value_error("exclude offsets must be non-decreasing");
    }
    req.exclude_ids = static_cast<const int64_t*>(ea.data());
    req.exclude_offsets = o;
  }
  if (k < 1) throw py::value_error("k must be >= 1");
  F32Array scores({Q, k});
  py::array_t<int64_t> out_ids({Q, k});
  {
    ReleaseGil release;
    topk_search(segs, req, scores.mutable_data(), out_ids.mutable_data());
  }
  return py::make_tuple(scores, out_ids);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrec CPU kernels (internal; use fastrec.ops)";
  kernels();  // resolve FASTREC_CPU_ISA now so a bad value fails the import with a clear message

  py::class_<PackedTable>(m, "PackedTable", py::dynamic_attr())
      .def(py::init([](py::array data, int bits, int64_t dim, const std::string& layout) {
             PackedTable t;
             init_packed(t, data, bits, dim, layout);
             return t;
           }),
           py::arg("data"), py::arg("bits"), py::arg("dim"), py::arg("layout") = "fbgemm")
      // A view: the table keeps a pointer into the array, so a caller must not be able to resize
      // it (numpy lets the only other owner of an array resize it in place, freeing the rows).
      .def_property_readonly("data", [](py::handle self) { return packed_table(self).data.attr("view")(); })
      .def_property_readonly("bits", [](py::handle self) { const PackedTable& t = packed_table(self); return t.bits; })
      .def_property_readonly("dim", [](py::handle self) { const PackedTable& t = packed_table(self); return t.dim; })
      .def_property_readonly("num_rows", [](py::handle self) { const PackedTable& t = packed_table(self); return t.view.num_rows; })
      .def_property_readonly("row_stride", [](py::handle self) { const PackedTable& t = packed_table(self); return t.view.row_stride; })
      .def_property_readonly("layout", [](py::handle self) { const PackedTable& t = packed_table(self); return t.layout; });

  py::class_<ItemBlock, std::shared_ptr<ItemBlock>>(m, "ItemBlock")
      .def(py::init(&make_item_block), py::arg("items"), py::arg("precision"), py::arg("keep_f32"))
      .def("__len__", [](py::handle self) { return initialised<ItemBlock>(self, "ItemBlock").size(); })
      .def_property_readonly("dim", [](py::handle self) { return initialised<ItemBlock>(self, "ItemBlock").dim(); })
      .def_property_readonly("nbytes", [](py::handle self) { return initialised<ItemBlock>(self, "ItemBlock").nbytes(); })
      .def_property_readonly("has_f32", [](py::handle self) { return initialised<ItemBlock>(self, "ItemBlock").has_f32(); })
      .def("to_float",
           [](py::handle self) {
             const ItemBlock& b = initialised<ItemBlock>(self, "ItemBlock");
             F32Array out({b.size(), b.dim()});
             float* o = out.mutable_data();
             {
               ReleaseGil release;  // (ItemIndex merges segments with it)
               b.to_float(o);
             }
             return out;
           })
      .def_property_readonly("precision", [](py::handle self) {
        return static_cast<int>(initialised<ItemBlock>(self, "ItemBlock").precision());
      });
  m.def(
      "dot_interaction",
      [](py::handle bottom, py::handle emb, int64_t T) {
        py::array xa = require(bottom, kNpyFloat32, "bottom", "float32", 2);
        py::array ea = require(emb, kNpyFloat32, "emb", "float32", 2);
        const int64_t B = xa.shape(0), D = xa.shape(1);
        // (T and D are the caller's: T * D and (T + 1) * T must not overflow)
        int64_t td = 0;
        if (T < 0 || T > (int64_t{1} << 30) || __builtin_mul_overflow(T, D, &td) || ea.shape(0) != B ||
            ea.shape(1) != td) {
          throw py::value_error("emb must be (B, T * D) for bottom (B, D)");
        }
        F32Array out({B, D + (T + 1) * T / 2});
        const float* xp = static_cast<const float*>(xa.data());
        const float* ep = static_cast<const float*>(ea.data());
        float* op = out.mutable_data();
        {
          ReleaseGil release;
          dot_interaction(xp, ep, B, T, D, op);
        }
        return out;
      },
      py::arg("bottom"), py::arg("emb"), py::arg("T"),
      "DLRM dot interaction: [bottom, dot(v_i, v_j) for i > j] per sample (v_0 = bottom, v_t = emb table t-1).");
  m.def("topk_search", &topk_search_py, py::arg("blocks"), py::arg("ids"), py::arg("removed"), py::arg("queries"),
        py::arg("k"), py::arg("candidates"), py::arg("rerank"), py::arg("exclude_ids") = py::none(),
        py::arg("exclude_offsets") = py::none(), py::arg("rows") = std::vector<py::object>());

  m.def("embedding_bags", &embedding_bags_py, py::arg("tables"), py::arg("indices"), py::arg("offsets"),
        py::arg("modes"), py::arg("per_sample_weights"), py::arg("padding_idx"), py::arg("convert") = py::none());

  py::class_<Int8Layer, std::shared_ptr<Int8Layer>>(m, "Int8LayerCore")
      .def(py::init(&make_layer), py::arg("weight_int8"), py::arg("weight_scale"), py::arg("bias") = py::none())
      .def_property_readonly("in_features", [](py::handle self) { return initialised<Int8Layer>(self, "Int8LayerCore").in_features(); })
      .def_property_readonly("out_features", [](py::handle self) { return initialised<Int8Layer>(self, "Int8LayerCore").out_features(); });
  m.def("int8_linear", [](py::handle x, py::handle layer_obj, int act) {
    const Int8Layer& layer = initialised<Int8Layer>(layer_obj, "Int8LayerCore");
    py::array xa = check_x(x, layer.in_features());
    const int64_t M = xa.shape(0);
    const Activation a = activation_of(act);
    F32Array y({M, layer.out_features()});
    float* yp = y.mutable_data();
    const float* xp = static_cast<const float*>(xa.data());
    {
      ReleaseGil release;
      int8_linear_forward(layer, xp, M, layer.in_features(), a, yp);
    }
    return y;
  }, py::arg("x"), py::arg("layer"), py::arg("activation") = 0);
  m.def("int8_linear_int32", [](py::handle q, py::handle layer_obj) {
    const Int8Layer& layer = initialised<Int8Layer>(layer_obj, "Int8LayerCore");
    py::array qa = require(q, kNpyInt8, "q", "int8", 2);
    if (qa.shape(1) != layer.in_features()) throw py::value_error("q has the wrong number of features");
    const int64_t M = qa.shape(0);
    py::array_t<int32_t> y({M, layer.out_features()});
    int32_t* yp = y.mutable_data();
    const int8_t* qp = static_cast<const int8_t*>(qa.data());
    {
      ReleaseGil release;
      int8_linear_int32(layer, qp, M, yp);
    }
    return y;
  }, py::arg("q"), py::arg("layer"));
  m.def("int8_mlp", [](py::handle x, py::handle layers_obj, const std::vector<int>& acts) {
    const auto layers = held_list<Int8Layer>(layers_obj, "layers", "Int8LayerCore");
    if (layers.empty()) throw py::value_error("an MLP needs at least one layer");
    if (acts.size() != layers.size()) throw py::value_error("one activation per layer is required");
    py::array xa = check_x(x, layers[0]->in_features());
    const int64_t M = xa.shape(0);
    std::vector<const Int8Layer*> ls;
    std::vector<Activation> as;
    for (size_t i = 0; i < layers.size(); ++i) {
      ls.push_back(layers[i].get());
      as.push_back(activation_of(acts[i]));
    }
    F32Array y({M, layers.back()->out_features()});
    float* yp = y.mutable_data();
    const float* xp = static_cast<const float*>(xa.data());
    {
      ReleaseGil release;
      int8_mlp_forward(ls, as, xp, M, yp);
    }
    return y;
  }, py::arg("x"), py::arg("layers"), py::arg("activations"));
  m.def(
      "dlrm_forward",
      [](const py::sequence& tables, py::array indices, py::array offsets, const std::vector<int>& modes,
         const std::vector<int64_t>& padding_idx, py::handle dense,
         py::handle bottom_obj, const std::vector<int>& bottom_acts, py::handle top_obj,
         const std::vector<int>& top_acts) {
        const auto bottom = held_list<Int8Layer>(bottom_obj, "bottom", "Int8LayerCore");
        const auto top = held_list<Int8Layer>(top_obj, "top", "Int8LayerCore");
        BagArgs args;
        parse_bag_args(&args, tables, indices, offsets, modes, py::none(), padding_idx, py::none());
        if (bottom.empty() || top.empty()) throw py::value_error("the bottom and top MLPs need at least one layer");
        py::array xa = check_x(dense, bottom[0]->in_features());
        DlrmForward f;
        f.emb = args.a;
        const int64_t B = batch_size_of(f.emb);
        if (xa.shape(0) != B) {
          throw py::value_error("dense has " + std::to_string(xa.shape(0)) + " rows but the offsets describe " +
                                std::to_string(B) + " samples");
        }
        f.dense = static_cast<const float*>(xa.data());
        f.dense_dim = xa.shape(1);
        for (const auto& l : bottom) f.bottom.push_back(l.get());
        for (const auto& l : top) f.top.push_back(l.get());
        for (int c : bottom_acts) f.bottom_acts.push_back(activation_of(c));
        for (int c : top_acts) f.top_acts.push_back(activation_of(c));
        F32Array out(B);
        f.out = out.mutable_data();
        {
          ReleaseGil release;
          dlrm_forward(f);
        }
        return out;
      },
      py::arg("tables"), py::arg("indices"), py::arg("offsets"), py::arg("modes"), py::arg("padding_idx"),
      py::arg("dense"), py::arg("bottom"), py::arg("bottom_activations"), py::arg("top"), py::arg("top_activations"),
      "The whole int8 DLRM forward (fastrec.Model.score): embedding bags, bottom MLP, dot interaction, top MLP.");
  m.def("quantize_rows_int8", [](py::handle x) {
    py::array xa = require(x, kNpyFloat32, "x", "float32", 2);
    const int64_t M = xa.shape(0), K = xa.shape(1);
    py::array_t<int8_t> q({M, K});
    py::array_t<float> s(M);
    const float* xp = static_cast<const float*>(xa.data());
    int8_t* qp = q.mutable_data();
    float* sp = s.mutable_data();
    {
      ReleaseGil release;
      quantize_rows_int8(xp, M, K, qp, sp);
    }
    return py::make_tuple(q, s);
  }, py::arg("x"));
  m.def("gemm_variant", [] { return std::string(kernels().gemm_name); });
  m.def("advise_hugepages", &advise_hugepages, py::arg("array"));
  m.def("_trim_heap", [] {
#ifdef __GLIBC__
    malloc_trim(0);
#endif
  }, "Returns freed heap memory to the OS (glibc's malloc_trim; nothing elsewhere).");
  m.def("pack_bags", &pack_bags, py::arg("pairs"), py::arg("batch_size"),
        "fastrec.Model's dict requests: T (indices, offsets) pairs as one table-major CSR pair, or None.");
  m.def("get_num_threads", &get_num_threads);
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("current_isa", [] { return std::string(isa_name(current_isa())); });
  m.def("_set_embedding_l1_prefetch", &set_embedding_l1_prefetch, py::arg("mode"),
        "Tests only: 1 / 0 force the embedding kernels' L1 prefetch of quantized rows on / off, -1 restores the default.");
  m.def("_embedding_l1_prefetch", &embedding_l1_prefetch);
  m.def("_set_embedding_float_l1_prefetch", &set_embedding_float_l1_prefetch, py::arg("mode"),
        "Tests only: 1 / 0 force the far prefetch of float rows into L1 (64 ids ahead) / L2 (128 ahead), -1 restores the default.");
  m.def("_embedding_float_l1_prefetch", &embedding_float_l1_prefetch);
  m.def("_cpu_family", [] { return cpu_features().family; });
  m.def("_set_pool_join_delay_us", &set_pool_join_delay_for_tests, py::arg("us"),
        "Tests only: pool workers sleep this long before joining a call (a worker slow to wake).");
  m.def("_cpu_vendor_amd", [] { return cpu_features().amd; });
  m.def("_packed_table_initialised", &is_initialised<PackedTable>, py::arg("obj"),
        "Whether obj is a PackedTable whose __init__ has run (pybind11 ignores a second __init__).");
  m.def("set_isa", [](const std::string& name) { set_isa(parse_isa(name)); }, py::arg("name"));
  m.def("available_isas", [] {
    std::vector<std::string> out;
    for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
      if (isa_supported(i)) out.emplace_back(isa_name(i));
    }
    return out;
  });
  m.def("cpu_features", [] {
    const CpuFeatures& f = cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["avx512"] = f.avx512;
    d["avx512_vnni"] = f.avx512_vnni;
    return d;
  });
  m.def("build_info", [] {
    py::dict d;
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["compiler"] = std::string("unknown");
#endif
    d["openmp"] = false;  // fastrec uses its own thread pool (csrc/common/parallel.cpp)
    d["thread_pool"] = std::string("fastrec (std::thread)");
    return d;
  });
}
