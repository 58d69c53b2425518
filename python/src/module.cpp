// SPDX-License-Identifier: Apache-2.0
// factorllm._core: the Python binding of the library (pybind11), re-exported by the package factorllm
// (python/factorllm/__init__.py). docs/python.md describes the API; this file keeps three rules:
//   - arrays cross without copies: an input is viewed through its buffer (dtype and layout checked, never converted),
//     an output is either the caller's array (written in place) or a fresh array that owns the C++ tensor;
//   - the GIL is released while a kernel runs (forward, PAR, clustering, router training, refit, distillation);
//   - a C++ error reaches Python as ValueError (shape_error, value_error), factorllm.FormatError (a ValueError
//     subclass: unreadable or malformed files) or RuntimeError (backend_error), with the C++ message; a wrong dtype or
//     a non-array raises TypeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <dlpack/dlpack.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include <factorllm/core/dtype.hpp>
#include <factorllm/core/error.hpp>
#include <factorllm/core/tensor.hpp>
#include <factorllm/core/workspace.hpp>
#include <factorllm/ffn/clustering.hpp>
#include <factorllm/ffn/factorize.hpp>
#include <factorllm/ffn/permutation.hpp>
#include <factorllm/io/factorized_checkpoint.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/train/distillation.hpp>
#include <factorllm/train/par_loss.hpp>
#include <factorllm/train/refit.hpp>
#include <factorllm/train/router_training.hpp>
#include <factorllm/version.hpp>

namespace py = pybind11;
namespace fl = factorllm;

namespace {

static_assert(sizeof(fl::bf16) == sizeof(std::uint16_t), "bf16 crosses as uint16: it must be 2 bytes");

// ---------------------------------------------------------------------------------------------------------------
// Arrays in: views of the caller's buffer, after checking dtype (TypeError) and shape / layout (ValueError).

/// The NumPy dtype an element type crosses as (bf16 as its raw uint16 bits).
template <class E> py::dtype np_dtype() { return py::dtype::of<E>(); }
template <> py::dtype np_dtype<fl::bf16>() { return py::dtype::of<std::uint16_t>(); }

template <class E> char const* np_name();
template <> char const* np_name<float>() { return "float32"; }
template <> char const* np_name<fl::bf16>() { return "uint16 (bf16 bits)"; }

std::string shape_of(py::array const& a) {
  std::string s = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

/// Imports an object with __dlpack__ (a torch tensor, ...) as a NumPy array over the same memory; a NumPy array is
/// returned as is. Anything else raises TypeError naming fn and arg.
py::array as_array(py::handle obj, char const* fn, char const* arg);

/// Checks that `a` holds E with `rank` dimensions whose last is dense (stride one element) and the others are
/// non-negative multiples of the element size: the layouts a TensorView can name without a copy.
template <class E>
py::array checked(py::handle obj, int rank, char const* fn, char const* arg, bool writable = false) {
  py::array a = as_array(obj, fn, arg);
  if (!a.dtype().is(np_dtype<E>()))
    throw py::type_error(fl::detail::concat(fn, ": argument '", arg, "' must be a ", np_name<E>(), " array, got ",
                                            std::string(py::str(py::handle(a.dtype())))));
  if (a.ndim() != rank)
    throw py::value_error(fl::detail::concat(fn, ": argument '", arg, "' must have ", rank, " dimension(s), got shape ",
                                             shape_of(a)));
  auto const item = static_cast<py::ssize_t>(sizeof(E));
  for (int i = 0; i < rank && a.size() > 0; ++i) {  // NumPy gives an empty array any strides
    bool const last = i == rank - 1;
    if (a.shape(i) > 1 && ((last && a.strides(i) != item) || (!last && (a.strides(i) < 0 || a.strides(i) % item != 0))))
      throw py::value_error(fl::detail::concat(fn, ": argument '", arg, "' must be row-major with a contiguous last "
                                               "dimension (no copy is made); pass numpy.ascontiguousarray(", arg, ")"));
  }
  if (writable && !a.writeable())
    throw py::value_error(fl::detail::concat(fn, ": argument '", arg, "' is read-only"));
  return a;
}

template <class E, int Rank>
fl::TensorView<E, Rank> view_of(py::array const& a) {
  std::array<std::ptrdiff_t, Rank> ext{}, str{};
  for (int i = Rank - 1; i >= 0; --i) {
    auto const u = static_cast<std::size_t>(i);
    ext[u] = a.shape(i);
    // NumPy gives a dimension of extent <= 1 any stride; the view wants the dense one there.
    std::ptrdiff_t const dense = i == Rank - 1 ? 1 : str[u + 1] * std::max<std::ptrdiff_t>(ext[u + 1], 1);
    str[u] = (i == Rank - 1 || ext[u] <= 1) ? dense : a.strides(i) / static_cast<py::ssize_t>(sizeof(E));
  }
  // Writability is checked by the caller (checked(..., writable)); inputs are viewed as const.
  auto* p = static_cast<std::remove_const_t<E>*>(const_cast<void*>(a.data()));
  return fl::TensorView<E, Rank>(p, ext, str);
}

template <class E, int Rank>
fl::TensorView<E const, Rank> in(py::handle obj, char const* fn, char const* arg, py::array& keep) {
  keep = checked<E>(obj, Rank, fn, arg);
  return fl::TensorView<E const, Rank>(view_of<E, Rank>(keep));
}

/// A dense FFN given as three arrays (gate, up [d_ff, d_model], down [d_model, d_ff]).
template <class T>
struct DenseIn {
  py::array keep[3];
  fl::ffn::DenseFfnView<T> view;
  DenseIn(py::handle g, py::handle u, py::handle d, char const* fn)
      : view{in<T, 2>(g, fn, "gate", keep[0]), in<T, 2>(u, fn, "up", keep[1]), in<T, 2>(d, fn, "down", keep[2])} {}
};

// ---------------------------------------------------------------------------------------------------------------
// Arrays out: a fresh NumPy array that owns the C++ tensor (moved to the heap; the capsule frees it).

template <class T, int Rank>
py::array own(fl::Tensor<T, Rank>&& t) {
  auto* heap = new fl::Tensor<T, Rank>(std::move(t));
  py::capsule owner(heap, [](void* p) { delete static_cast<fl::Tensor<T, Rank>*>(p); });
  std::vector<py::ssize_t> shape(heap->extents().begin(), heap->extents().end()), strides(Rank);
  py::ssize_t s = sizeof(T);
  for (int i = Rank - 1; i >= 0; --i) {
    strides[static_cast<std::size_t>(i)] = s;
    s *= shape[static_cast<std::size_t>(i)];
  }
  return py::array(np_dtype<T>(), shape, strides, heap->data(), owner);
}

/// A copy of a view as a fresh array (for the small tensors of reports and routers).
template <class T, int Rank>
py::array copy_out(fl::TensorView<T const, Rank> v) { return own(fl::Tensor<T, Rank>(v)); }

py::array int_vector(std::vector<std::int32_t> const& v) {
  py::array_t<std::int32_t> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(std::int32_t));
  return std::move(a);
}

/// An integer sequence (list or integer array) as int32 indices; TypeError for non-integers, ValueError for a value
/// outside int32 (never wrapped).
std::vector<std::int32_t> int_list(py::handle obj, char const* fn, char const* arg) {
  py::array a = py::array::ensure(obj);
  if (!a || (a.dtype().kind() != 'i' && a.dtype().kind() != 'u'))
    throw py::type_error(fl::detail::concat(fn, ": argument '", arg, "' must be a sequence of integers"));
  auto v = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!v || v.ndim() != 1)
    throw py::value_error(fl::detail::concat(fn, ": argument '", arg, "' must be one-dimensional, got shape ", shape_of(a)));
  std::vector<std::int32_t> out(static_cast<std::size_t>(v.size()));
  for (py::ssize_t i = 0; i < v.size(); ++i) {
    std::int64_t const x = v.data()[i];
    if (x < std::numeric_limits<std::int32_t>::min() || x > std::numeric_limits<std::int32_t>::max())
      throw py::value_error(fl::detail::concat(fn, ": argument '", arg, "'[", i, "] = ", x, " is outside int32"));
    out[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(x);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// DLPack (dlpack.h 0.6): import any producer's tensor as a NumPy array over its memory, export an array.

char const* const kCapsule = "dltensor";
char const* const kUsedCapsule = "used_dltensor";

py::dtype dtype_of(DLDataType t, char const* fn) {
  if (t.lanes == 1) {
    if (t.code == kDLFloat && t.bits == 32) return py::dtype::of<float>();
    if (t.code == kDLFloat && t.bits == 64) return py::dtype::of<double>();
    if (t.code == kDLBfloat && t.bits == 16) return py::dtype::of<std::uint16_t>();  // bf16 crosses as its bits
    if (t.code == kDLFloat && t.bits == 16) return py::dtype("float16");
    if (t.code == kDLInt && t.bits == 32) return py::dtype::of<std::int32_t>();
    if (t.code == kDLInt && t.bits == 64) return py::dtype::of<std::int64_t>();
    if (t.code == kDLUInt && t.bits == 16) return py::dtype::of<std::uint16_t>();
    if (t.code == kDLUInt && t.bits == 8) return py::dtype::of<std::uint8_t>();
  }
  throw py::type_error(fl::detail::concat(fn, ": DLPack dtype (code ", int(t.code), ", bits ", int(t.bits), ", lanes ",
                                          t.lanes, ") is not one factorllm reads (float32, float64, bfloat16, float16, "
                                          "int32, int64, uint8, uint16)"));
}

py::array from_dlpack(py::object obj) {
  char const* fn = "factorllm.from_dlpack";
  if (py::isinstance<py::array>(obj)) return obj;
  py::object cap = obj;
  if (py::hasattr(obj, "__dlpack_device__")) {
    auto dev = obj.attr("__dlpack_device__")().cast<std::pair<int, int>>();
    if (dev.first != kDLCPU)
      throw py::value_error(fl::detail::concat(fn, ": the tensor is on device type ", dev.first,
                                               "; factorllm was built without CUDA support for tensors from Python: "
                                               "move it to the CPU first"));
  }
  if (py::hasattr(obj, "__dlpack__")) cap = obj.attr("__dlpack__")();
  if (!PyCapsule_CheckExact(cap.ptr()))
    throw py::type_error(fl::detail::concat(fn, ": expected an object with __dlpack__ or a DLPack capsule, got ",
                                            std::string(py::str(py::type::of(obj).attr("__name__")))));
  if (!PyCapsule_IsValid(cap.ptr(), kCapsule))
    throw py::value_error(fl::detail::concat(fn, ": the DLPack capsule was already consumed (named '",
                                             PyCapsule_GetName(cap.ptr()), "')"));
  auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), kCapsule));
  DLTensor const& t = mt->dl_tensor;
  if (t.device.device_type != kDLCPU)
    throw py::value_error(fl::detail::concat(fn, ": the tensor is on device type ", int(t.device.device_type),
                                             "; factorllm was built without CUDA support for tensors from Python"));
  py::dtype dt = dtype_of(t.dtype, fn);
  std::vector<py::ssize_t> shape(t.shape, t.shape + t.ndim), strides(static_cast<std::size_t>(t.ndim));
  py::ssize_t const item = dt.itemsize();
  py::ssize_t dense = item;
  for (int i = t.ndim - 1; i >= 0; --i) {
    auto const u = static_cast<std::size_t>(i);
    strides[u] = t.strides != nullptr ? t.strides[i] * item : dense;
    dense *= shape[u];
  }
  // From here the capsule's tensor is ours: rename it so the producer's capsule destructor leaves it alone, and let
  // the array's base call the producer's deleter when the last view goes.
  py::capsule owner(mt, [](void* p) {
    auto* m = static_cast<DLManagedTensor*>(p);
    if (m->deleter != nullptr) m->deleter(m);
  });
  PyCapsule_SetName(cap.ptr(), kUsedCapsule);
  return py::array(dt, shape, strides, static_cast<char*>(t.data) + t.byte_offset, owner);
}

py::array as_array(py::handle obj, char const* fn, char const* arg) {
  if (py::isinstance<py::array>(obj)) return py::reinterpret_borrow<py::array>(obj);
  if (py::hasattr(obj, "__dlpack__")) return from_dlpack(py::reinterpret_borrow<py::object>(obj));
  throw py::type_error(fl::detail::concat(fn, ": argument '", arg, "' must be a numpy array or support __dlpack__, got ",
                                          std::string(py::str(py::type::of(obj).attr("__name__")))));
}

/// What an exported DLManagedTensor keeps alive: the array and its shape / strides in elements.
struct ExportCtx {
  py::object array;
  std::vector<std::int64_t> shape, strides;
};

void export_deleter(DLManagedTensor* m) {
  // A consumer may free the tensor from a thread without the GIL (torch does): take it to drop the reference.
  py::gil_scoped_acquire gil;
  delete static_cast<ExportCtx*>(m->manager_ctx);
  delete m;
}

/// Wraps a NumPy array for the DLPack protocol: torch.utils.dlpack.from_dlpack(factorllm.to_dlpack(a)) and
/// np.from_dlpack both view a's memory.
struct DLPackExport {
  py::array array;

  py::capsule dlpack(py::object stream) const {
    if (!stream.is_none())
      throw py::value_error("DLPackExport.__dlpack__: stream must be None for a CPU array");
    DLDataType dt{};
    py::dtype const d = array.dtype();
    char const kind = d.kind();
    dt.lanes = 1;
    dt.bits = static_cast<std::uint8_t>(d.itemsize() * 8);
    if (kind == 'f') dt.code = kDLFloat;
    else if (kind == 'i') dt.code = kDLInt;
    else if (kind == 'u') dt.code = kDLUInt;
    else throw py::type_error(fl::detail::concat("factorllm.to_dlpack: dtype ", std::string(py::str(py::handle(d))), " has no DLPack code"));
    auto ctx = std::make_unique<ExportCtx>();
    ctx->array = array;
    for (py::ssize_t i = 0; i < array.ndim(); ++i) {
      if (array.strides(i) % d.itemsize() != 0)
        throw py::value_error("factorllm.to_dlpack: a stride is not a multiple of the element size");
      ctx->shape.push_back(array.shape(i));
      ctx->strides.push_back(array.strides(i) / d.itemsize());
    }
    auto* m = new DLManagedTensor{};
    m->dl_tensor.data = const_cast<void*>(array.data());
    m->dl_tensor.device = DLDevice{kDLCPU, 0};
    m->dl_tensor.ndim = static_cast<int>(array.ndim());
    m->dl_tensor.dtype = dt;
    m->dl_tensor.shape = ctx->shape.data();
    m->dl_tensor.strides = ctx->strides.data();
    m->dl_tensor.byte_offset = 0;
    m->manager_ctx = ctx.release();
    m->deleter = export_deleter;
    // An unconsumed capsule frees the tensor itself; a consumer renames it to "used_dltensor" and owns it then.
    PyObject* cap = PyCapsule_New(m, kCapsule, [](PyObject* c) {
      if (PyCapsule_IsValid(c, kCapsule)) {
        auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, kCapsule));
        delete static_cast<ExportCtx*>(mt->manager_ctx);
        delete mt;
      }
    });
    if (cap == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::capsule>(cap);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// MoeFfn: one layer in f32 or bf16 experts (activations float32 either way), with its own reusable workspace.

using Moe32 = fl::moe::MoeFfn<float>;
using MoeBf = fl::moe::MoeFfn<fl::bf16>;

struct PyRecord {
  fl::moe::RoutingRecord<float> rec;
};

struct PyMoe {
  std::variant<Moe32, MoeBf> layer;
  /// Scratch reused across calls; a call that finds it busy (another Python thread) allocates its own.
  std::mutex ws_mutex;
  fl::Workspace ws;

  explicit PyMoe(std::variant<Moe32, MoeBf> l) : layer(std::move(l)) {}

  template <class F>
  decltype(auto) visit(F&& f) const { return std::visit(std::forward<F>(f), layer); }
  bool is_bf16() const { return layer.index() == 1; }
  Moe32& f32(char const* fn) {
    if (is_bf16())
      throw py::type_error(fl::detail::concat(fn, ": the layer has bf16 experts; this step runs on float32 experts "
                                              "(load or build the layer in float32)"));
    return std::get<0>(layer);
  }
};

fl::moe::Gating make_gating(std::ptrdiff_t top_k, std::string const& mode, std::optional<py::handle> selection_bias,
                            float output_scale, bool sigmoid_renormalize) {
  fl::moe::Gating g;
  g.mode = fl::combine_mode_from_string(mode);
  g.top_k = top_k;
  g.output_scale = output_scale;
  g.sigmoid_renormalize = sigmoid_renormalize;
  if (selection_bias && !selection_bias->is_none()) {
    py::array keep;
    auto v = in<float, 1>(*selection_bias, "MoeFfn", "selection_bias", keep);
    g.selection_bias.assign(v.data(), v.data() + v.size());
  }
  return g;
}

fl::moe::Router<float> make_router(py::handle w, py::handle b, char const* fn) {
  py::array kw, kb;
  return fl::moe::Router<float>::from_views(in<float, 2>(w, fn, "router_weight", kw), in<float, 1>(b, fn, "router_bias", kb));
}

template <class T>
std::unique_ptr<PyMoe> build_layer(py::handle gate, py::handle up, py::handle down, py::handle rw, py::handle rb,
                                   std::ptrdiff_t top_k, std::string const& mode,
                                   std::optional<fl::ffn::ExpertPartition> partition, std::optional<py::handle> bias,
                                   float output_scale, bool sigmoid_renormalize) {
  char const* fn = "MoeFfn";
  py::array kg, ku, kd;
  auto g = in<T, 3>(gate, fn, "gate", kg);
  auto u = in<T, 3>(up, fn, "up", ku);
  auto d = in<T, 3>(down, fn, "down", kd);
  auto part = partition ? *partition : fl::ffn::ExpertPartition::contiguous(g.extent(0) * g.extent(1), g.extent(0));
  fl::ffn::ExpertWeights<T> experts(fl::Tensor<T, 3>(g), fl::Tensor<T, 3>(u), fl::Tensor<T, 3>(d), std::move(part));
  return std::make_unique<PyMoe>(fl::moe::MoeFfn<T>(std::move(experts), make_router(rw, rb, fn),
                                                    make_gating(top_k, mode, bias, output_scale, sigmoid_renormalize)));
}

/// factorize + MoeFfn without the intermediate arrays: the experts are built once, inside the layer.
template <class T>
std::unique_ptr<PyMoe> layer_from_dense(py::handle gate, py::handle up, py::handle down,
                                        fl::ffn::ExpertPartition const& partition, py::handle rw, py::handle rb,
                                        std::ptrdiff_t top_k, std::string const& mode, std::optional<py::handle> bias,
                                        float output_scale, bool sigmoid_renormalize) {
  char const* fn = "MoeFfn.from_dense";
  DenseIn<T> dense(gate, up, down, fn);
  auto router = make_router(rw, rb, fn);
  auto gating = make_gating(top_k, mode, bias, output_scale, sigmoid_renormalize);
  fl::ffn::ExpertWeights<T> experts;
  {
    py::gil_scoped_release nogil;
    experts = fl::ffn::factorize(dense.view, partition);
  }
  return std::make_unique<PyMoe>(fl::moe::MoeFfn<T>(std::move(experts), std::move(router), std::move(gating)));
}

bool is_bf16_array(py::handle obj) {
  return py::isinstance<py::array>(obj) && py::reinterpret_borrow<py::array>(obj).dtype().is(py::dtype::of<std::uint16_t>());
}

/// y = layer(x) in place into `out` (allocated when None); the GIL is released while the kernels run.
py::array forward(PyMoe& self, py::handle x_obj, py::object out_obj, PyRecord* record) {
  char const* fn = "MoeFfn.forward";
  py::array xa = checked<float>(x_obj, 2, fn, "x");
  auto const x = fl::MatrixView<float const>(view_of<float, 2>(xa));
  std::ptrdiff_t const d_model = self.visit([](auto const& l) { return l.d_model(); });
  if (x.cols() != d_model)
    throw py::value_error(fl::detail::concat(fn, ": argument 'x' has shape ", shape_of(xa), ", expected [n_tokens, ",
                                             d_model, "]"));
  py::array ya = out_obj.is_none() ? py::array(py::array_t<float>({x.rows(), d_model}))
                                   : checked<float>(out_obj, 2, fn, "out", true);
  auto const y = view_of<float, 2>(ya);
  if (y.rows() != x.rows() || y.cols() != d_model)
    throw py::value_error(fl::detail::concat(fn, ": argument 'out' has shape ", shape_of(ya), ", expected [", x.rows(),
                                             ", ", d_model, "]"));
  if (x.size() > 0) {
    auto const* xb = reinterpret_cast<char const*>(x.data());
    auto const* yb = reinterpret_cast<char const*>(y.data());
    auto const xe = xb + (x.rows() - 1) * x.row_stride() * 4 + x.cols() * 4;
    auto const ye = yb + (y.rows() - 1) * y.row_stride() * 4 + y.cols() * 4;
    if (xb < ye && yb < xe) throw py::value_error(fl::detail::concat(fn, ": argument 'out' overlaps 'x' (in place is not supported)"));
  }
  auto* rec = record != nullptr ? &record->rec : nullptr;
  {
    py::gil_scoped_release nogil;
    std::unique_lock<std::mutex> lock(self.ws_mutex, std::try_to_lock);
    fl::Workspace local;
    fl::Workspace& ws = lock.owns_lock() ? self.ws : local;
    self.visit([&](auto const& l) {
      ws.reserve(l.workspace_bytes(x.rows()));
      l.forward(x, y, ws, rec);
    });
  }
  return ya;
}

/// The overhead benchmark's C++ side: `iters` forward calls from C++ on the same arrays; returns seconds.
double forward_loop(PyMoe& self, py::handle x_obj, py::handle out_obj, int iters) {
  py::array xa = checked<float>(x_obj, 2, "_forward_loop", "x"), ya = checked<float>(out_obj, 2, "_forward_loop", "out", true);
  auto const x = fl::MatrixView<float const>(view_of<float, 2>(xa));
  auto const y = view_of<float, 2>(ya);
  py::gil_scoped_release nogil;
  std::lock_guard<std::mutex> lock(self.ws_mutex);
  return self.visit([&](auto const& l) {
    self.ws.reserve(l.workspace_bytes(x.rows()));
    auto const t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) l.forward(x, y, self.ws);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  });
}

py::dict par_loss(PyMoe& self, py::handle x_obj, py::handle g, py::handle u, py::handle d, double par_weight,
                  double balance_weight, double clip) {
  char const* fn = "par_loss";
  Moe32 const& l = self.f32(fn);
  py::array kx;
  auto const x = in<float, 2>(x_obj, fn, "x", kx);
  DenseIn<float> dense(g, u, d, fn);
  fl::train::ParLossConfig cfg{par_weight, balance_weight, clip};
  fl::train::ParLossResult<float> r;
  {
    py::gil_scoped_release nogil;
    r = fl::train::par_loss(x, dense.view, l.experts(), l.router(), l.top_k(), cfg);
  }
  py::dict out;
  out["par_loss"] = r.par_loss;
  out["balance_loss"] = r.balance_loss;
  out["total_loss"] = r.total_loss;
  out["label_accuracy"] = r.label_accuracy;
  out["grad_weight"] = own(std::move(r.grad_weight));
  out["grad_bias"] = own(std::move(r.grad_bias));
  out["grad_weight_par"] = own(std::move(r.grad_weight_par));
  out["grad_bias_par"] = own(std::move(r.grad_bias_par));
  out["grad_weight_balance"] = own(std::move(r.grad_weight_balance));
  out["grad_bias_balance"] = own(std::move(r.grad_bias_balance));
  out["mse_to_target"] = own(std::move(r.mse_to_target));
  out["pseudo_label"] = own(std::move(r.pseudo_label));
  out["router_topk"] = own(std::move(r.router_topk));
  return out;
}

template <class T>
py::tuple experts_tuple(fl::ffn::ExpertWeights<T> const& e) {
  return py::make_tuple(copy_out(e.gate_tensor().cview()), copy_out(e.up_tensor().cview()), copy_out(e.down_tensor().cview()));
}

template <class T>
py::tuple factorize_t(py::handle g, py::handle u, py::handle d, fl::ffn::ExpertPartition const& p) {
  DenseIn<T> dense(g, u, d, "factorize");
  fl::ffn::ExpertWeights<T> e;
  {
    py::gil_scoped_release nogil;
    e = fl::ffn::factorize(dense.view, p);
  }
  return py::make_tuple(own(fl::Tensor<T, 3>(e.gate_tensor())), own(fl::Tensor<T, 3>(e.up_tensor())),
                        own(fl::Tensor<T, 3>(e.down_tensor())));
}

template <class T>
py::tuple unfactorize_t(py::handle g, py::handle u, py::handle d, fl::ffn::ExpertPartition const& p) {
  char const* fn = "unfactorize";
  py::array kg, ku, kd;
  fl::ffn::ExpertWeights<T> e(fl::Tensor<T, 3>(in<T, 3>(g, fn, "gate", kg)), fl::Tensor<T, 3>(in<T, 3>(u, fn, "up", ku)),
                              fl::Tensor<T, 3>(in<T, 3>(d, fn, "down", kd)), p);
  auto dense = fl::ffn::unfactorize(e);
  return py::make_tuple(own(std::move(dense.gate)), own(std::move(dense.up)), own(std::move(dense.down)));
}

void translate(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (fl::shape_error const& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (fl::value_error const& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (fl::backend_error const& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (fl::error const& e) {  // any other library error (format_error has its own translator)
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
}

/// The recovery steps' common frame: on the f32 layer `s`, with the GIL released, runs
/// step(experts, layer, x, dense) on a copy of the layer's experts, then rebuilds the layer with them (in place, as
/// the Python docstrings say). Returns step's report.
template <class Step>
auto recover_experts(PyMoe& s, py::handle x, py::handle g, py::handle u, py::handle d, char const* fn, Step&& step) {
  Moe32& l = s.f32(fn);
  DenseIn<float> dense(g, u, d, fn);
  py::array kx;
  auto xv = in<float, 2>(x, fn, "x", kx);
  py::gil_scoped_release nogil;
  auto experts = l.experts();
  auto rep = step(experts, l, xv, dense.view);
  l = Moe32(std::move(experts), l.router(), l.gating());
  return rep;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "factorllm's C++ kernels (the compiled half of the package factorllm; import factorllm instead).";
  m.attr("__version__") = fl::detail::concat(FLLM_VERSION_MAJOR, ".", FLLM_VERSION_MINOR, ".", FLLM_VERSION_PATCH);
  py::register_exception_translator(translate);
  // Registered after the generic translator, so tried first: unreadable or malformed files.
  py::register_exception<fl::format_error>(m, "FormatError", PyExc_ValueError);

  py::class_<fl::ffn::ExpertPartition>(m, "ExpertPartition", R"doc(
How the d_ff hidden neurons of a SwiGLU FFN are split into n_experts equal experts (docs/math.md section 1.2).

Expert e owns the neurons permutation[e * d_expert : (e + 1) * d_expert]; the same permutation applies to the gate
rows, up rows and down columns, so the sum of all experts equals the dense FFN. Build one with contiguous, random,
from_permutation, from_assignment, or the clustering functions cluster_weights / cluster_activations.)doc")
      .def_static("contiguous", &fl::ffn::ExpertPartition::contiguous, py::arg("d_ff"), py::arg("n_experts"),
                  "Identity permutation: expert e owns neurons [e*m, (e+1)*m) (the paper's code). ValueError unless "
                  "n_experts divides d_ff.")
      .def_static("random", &fl::ffn::ExpertPartition::random, py::arg("d_ff"), py::arg("n_experts"), py::arg("seed"),
                  "A uniformly random permutation from a seeded generator (the same on every platform).")
      .def_static("from_permutation",
                  [](py::handle perm, std::int64_t n) {
                    return fl::ffn::ExpertPartition::from_permutation(int_list(perm, "from_permutation", "permutation"), n);
                  },
                  py::arg("permutation"), py::arg("n_experts"),
                  "Uses a caller-given permutation of range(d_ff). ValueError if it is not one, or n_experts does "
                  "not divide its length.")
      .def_static("from_assignment",
                  [](py::handle a, std::int64_t n) {
                    return fl::ffn::ExpertPartition::from_assignment(int_list(a, "from_assignment", "assignment"), n);
                  },
                  py::arg("assignment"), py::arg("n_experts"),
                  "Builds the partition from the expert of each neuron; every expert must get d_ff / n_experts neurons.")
      .def_property_readonly("d_ff", &fl::ffn::ExpertPartition::d_ff, "Number of hidden neurons.")
      .def_property_readonly("n_experts", &fl::ffn::ExpertPartition::n_experts, "Number of experts.")
      .def_property_readonly("d_expert", &fl::ffn::ExpertPartition::d_expert, "Neurons per expert (d_ff / n_experts).")
      .def_property_readonly("permutation", [](fl::ffn::ExpertPartition const& p) { return int_vector(p.permutation()); },
                             "permutation[p] = original neuron placed at position p (an int32 copy).")
      .def("__repr__", [](fl::ffn::ExpertPartition const& p) {
        return fl::detail::concat("ExpertPartition(d_ff=", p.d_ff(), ", n_experts=", p.n_experts(), ")");
      });

  m.def("factorize",
        [](py::handle g, py::handle u, py::handle d, fl::ffn::ExpertPartition const& p) {
          return is_bf16_array(g) ? factorize_t<fl::bf16>(g, u, d, p) : factorize_t<float>(g, u, d, p);
        },
        py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("partition"), R"doc(
Splits a dense SwiGLU FFN into partition.n_experts experts (docs/math.md section 1.2).

gate, up: [d_ff, d_model]; down: [d_model, d_ff]; float32, or uint16 holding bf16 bits (all three alike).
Returns (gate, up, down) stacked as llama.cpp's ffn_*_exps: [n_experts, d_expert, d_model] twice and
[n_experts, d_model, d_expert], in the input's dtype. The dense arrays are read in place, never modified.)doc");
  m.def("unfactorize",
        [](py::handle g, py::handle u, py::handle d, fl::ffn::ExpertPartition const& p) {
          return is_bf16_array(g) ? unfactorize_t<fl::bf16>(g, u, d, p) : unfactorize_t<float>(g, u, d, p);
        },
        py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("partition"),
        "Inverse of factorize: the dense (gate [d_ff, d_model], up, down [d_model, d_ff]) of stacked experts.");

  py::class_<PyRecord>(m, "RoutingRecord", R"doc(
The routing decisions of one MoeFfn.forward call (pass record=RoutingRecord() to forward). Reused across calls:
storage is reallocated only when the shapes change. Every property returns a copy:
  logits [n_tokens, n_experts] float32; ids [n_tokens, top_k] int32 (best selection score first);
  weights [n_tokens, top_k] float32 (combine weight of ids); offsets [n_experts + 1] int64 (expert e owns
  slots[offsets[e]:offsets[e+1]]); slots [n_tokens * top_k] int32 (slot t * top_k + j, grouped by expert).)doc")
      .def(py::init<>())
      .def_property_readonly("logits", [](PyRecord const& r) { return copy_out(r.rec.logits.cview()); })
      .def_property_readonly("ids", [](PyRecord const& r) { return copy_out(r.rec.ids.cview()); })
      .def_property_readonly("weights", [](PyRecord const& r) { return copy_out(r.rec.weights.cview()); })
      .def_property_readonly("offsets", [](PyRecord const& r) { return copy_out(r.rec.offsets.cview()); })
      .def_property_readonly("slots", [](PyRecord const& r) { return copy_out(r.rec.slots.cview()); })
      .def("load", [](PyRecord const& r, std::ptrdiff_t e) {
        if (e < 0 || e + 1 >= r.rec.offsets.extent(0))
          throw py::value_error(fl::detail::concat("RoutingRecord.load: expert ", e, " outside [0, ", r.rec.offsets.extent(0) - 1, ")"));
        return r.rec.load(e);
      }, py::arg("expert"), "Number of tokens routed to expert e in the recorded call.");

  py::class_<PyMoe>(m, "MoeFfn", R"doc(
A K-of-N mixture-of-experts SwiGLU layer: z = x W_r^T + b_r; S = TopK(z + selection_bias);
y = output_scale * sum over n in S of w_n * E_n(x) (docs/design.md section 2, gating modes in moe/gating.hpp).

MoeFfn(gate, up, down, router_weight, router_bias, top_k, mode="softmax_topk_renorm", partition=None,
       selection_bias=None, output_scale=1.0, sigmoid_renormalize=False)
  gate, up [n_experts, d_expert, d_model]; down [n_experts, d_model, d_expert]: float32, or uint16 arrays holding
  bf16 bits (the experts then stay bf16; activations are float32 either way). router_weight [n_experts, d_model],
  router_bias [n_experts], selection_bias [n_experts] or None: float32. mode: code_ref, softmax_topk,
  softmax_topk_renorm, topk_softmax or sigmoid_topk. partition: the ExpertPartition the experts came from
  (contiguous by default; unfactorize and save use it).
The weights are copied once into the layer; forward never copies. Bad shapes, modes or values raise ValueError,
wrong dtypes TypeError, with the C++ library's message. The layer is safe to call from several Python threads
(each call beyond the first running concurrently uses its own scratch).)doc")
      .def(py::init([](py::handle g, py::handle u, py::handle d, py::handle rw, py::handle rb, std::ptrdiff_t k,
                       std::string const& mode, std::optional<fl::ffn::ExpertPartition> p, py::object bias, float scale,
                       bool renorm) {
             std::optional<py::handle> b;
             if (!bias.is_none()) b = bias;
             return is_bf16_array(g) ? build_layer<fl::bf16>(g, u, d, rw, rb, k, mode, std::move(p), b, scale, renorm)
                                     : build_layer<float>(g, u, d, rw, rb, k, mode, std::move(p), b, scale, renorm);
           }),
           py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("router_weight"), py::arg("router_bias"),
           py::arg("top_k"), py::arg("mode") = "softmax_topk_renorm", py::arg("partition") = py::none(),
           py::arg("selection_bias") = py::none(), py::arg("output_scale") = 1.0f,
           py::arg("sigmoid_renormalize") = false)
      .def_static("from_dense",
                  [](py::handle g, py::handle u, py::handle d, fl::ffn::ExpertPartition const& p, py::handle rw,
                     py::handle rb, std::ptrdiff_t k, std::string const& mode, py::object bias, float scale, bool renorm) {
                    std::optional<py::handle> b;
                    if (!bias.is_none()) b = bias;
                    return is_bf16_array(g) ? layer_from_dense<fl::bf16>(g, u, d, p, rw, rb, k, mode, b, scale, renorm)
                                            : layer_from_dense<float>(g, u, d, p, rw, rb, k, mode, b, scale, renorm);
                  },
                  py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("partition"), py::arg("router_weight"),
                  py::arg("router_bias"), py::arg("top_k"), py::arg("mode") = "softmax_topk_renorm",
                  py::arg("selection_bias") = py::none(), py::arg("output_scale") = 1.0f,
                  py::arg("sigmoid_renormalize") = false,
                  "The layer of a dense FFN (gate, up [d_ff, d_model], down [d_model, d_ff]; float32 or bf16 bits) "
                  "split by `partition`: factorize and construct in one step, the experts built once inside the layer.")
      .def("forward", &forward, py::arg("x"), py::arg("out") = py::none(), py::arg("record") = nullptr, R"doc(
y = layer(x). x: float32 [n_tokens, d_model], rows contiguous (any row stride), a NumPy array or any object with
__dlpack__ (a CPU torch tensor): read in place. out: float32 [n_tokens, d_model] written in place and returned
(allocated when None); must not overlap x. record: a RoutingRecord that receives this call's routing.
The GIL is released while the kernels run.)doc")
      .def("__call__", &forward, py::arg("x"), py::arg("out") = py::none(), py::arg("record") = nullptr,
           "Same as forward.")
      .def("_forward_loop", &forward_loop, py::arg("x"), py::arg("out"), py::arg("iters"),
           "Benchmark helper: runs forward(x, out) iters times inside C++ and returns the seconds taken.")
      .def("workspace_bytes", [](PyMoe const& s, std::ptrdiff_t t) { return s.visit([&](auto const& l) { return l.workspace_bytes(t); }); },
           py::arg("n_tokens"), "Bytes of scratch a forward call of n_tokens tokens needs (kept inside the layer).")
      .def("set_router", [](PyMoe& s, py::handle w, py::handle b) {
             auto r = make_router(w, b, "MoeFfn.set_router");
             std::visit([&](auto& l) { l.set_router(std::move(r)); }, s.layer);
           },
           py::arg("router_weight"), py::arg("router_bias"),
           "Replaces the router (copied). Not while another thread runs forward on this layer.")
      .def_property_readonly("d_model", [](PyMoe const& s) { return s.visit([](auto const& l) { return l.d_model(); }); }, "Width of the layer's input and output.")
      .def_property_readonly("n_experts", [](PyMoe const& s) { return s.visit([](auto const& l) { return l.n_experts(); }); }, "Number of experts N.")
      .def_property_readonly("d_expert", [](PyMoe const& s) { return s.visit([](auto const& l) { return l.d_expert(); }); }, "Hidden neurons per expert (d_ff / n_experts).")
      .def_property_readonly("top_k", [](PyMoe const& s) { return s.visit([](auto const& l) { return l.top_k(); }); }, "Experts per token K.")
      .def_property_readonly("mode", [](PyMoe const& s) {
        return std::string(fl::to_string(s.visit([](auto const& l) { return l.gating().mode; })));
      }, "The gating mode's name.")
      .def_property_readonly("output_scale", [](PyMoe const& s) { return s.visit([](auto const& l) { return l.gating().output_scale; }); }, "Factor on every combine weight.")
      .def_property_readonly("weight_dtype", [](PyMoe const& s) { return std::string(s.is_bf16() ? "bf16" : "f32"); },
                             "'f32' or 'bf16': the experts' storage format.")
      .def_property_readonly("ffn_flops_fraction", [](PyMoe const& s) { return s.visit([](auto const& l) { return l.ffn_flops_fraction(); }); },
                             "top_k / n_experts: the fraction of the dense FFN's FLOPs one token costs.")
      .def_property_readonly("partition", [](PyMoe const& s) { return s.visit([](auto const& l) { return l.experts().partition(); }); },
                             "The ExpertPartition the experts came from (a copy).")
      .def_property_readonly("router_weight", [](PyMoe const& s) { return s.visit([](auto const& l) { return copy_out(l.router().weight()); }); },
                             "A copy of W_r [n_experts, d_model].")
      .def_property_readonly("router_bias", [](PyMoe const& s) { return s.visit([](auto const& l) { return copy_out(l.router().bias()); }); },
                             "A copy of b_r [n_experts].")
      .def_property_readonly("experts", [](PyMoe const& s) { return s.visit([](auto const& l) { return experts_tuple(l.experts()); }); },
                             "Copies of the stacked (gate, up, down) expert tensors, in the layer's dtype.")
      .def("__repr__", [](PyMoe const& s) {
        return s.visit([&](auto const& l) {
          return fl::detail::concat("MoeFfn(d_model=", l.d_model(), ", n_experts=", l.n_experts(), ", d_expert=",
                                    l.d_expert(), ", top_k=", l.top_k(), ", mode='", fl::to_string(l.gating().mode),
                                    "', weights=", s.is_bf16() ? "bf16" : "f32", ")");
        });
      });

  m.def("par_loss", &par_loss, py::arg("layer"), py::arg("x"), py::arg("dense_gate"), py::arg("dense_up"),
        py::arg("dense_down"), py::arg("par_weight") = 0.05, py::arg("balance_weight") = 0.01, py::arg("clip") = 1e-7,
        R"doc(
PAR and balance losses of a float32 layer's router against its dense teacher (docs/math.md section 3.2), with the
gradients w.r.t. the router. x: [n_tokens, d_model] FFN inputs; dense_*: the dense FFN the experts came from.
Returns a dict: par_loss, balance_loss, total_loss, label_accuracy (floats); grad_weight [n_experts, d_model],
grad_bias [n_experts] (of the total) and their _par / _balance parts; mse_to_target [n_tokens, n_experts];
pseudo_label, router_topk [n_tokens, top_k] int32.)doc");

  m.def("cluster_weights",
        [](py::handle g, py::handle u, py::handle d, std::int64_t n, std::uint64_t seed, int iters) {
          DenseIn<float> dense(g, u, d, "cluster_weights");
          py::gil_scoped_release nogil;
          return fl::ffn::cluster_weights(dense.view, n, seed, iters);
        },
        py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("n_experts"), py::arg("seed") = 0,
        py::arg("iterations") = 20,
        "Balanced k-means of the neurons on their normalized [gate row | up row] (float32 dense FFN): an "
        "ExpertPartition.");
  m.def("cluster_activations",
        [](py::handle g, py::handle u, py::handle d, py::handle x, std::int64_t n, std::uint64_t seed, int iters) {
          DenseIn<float> dense(g, u, d, "cluster_activations");
          py::array kx;
          auto xv = in<float, 2>(x, "cluster_activations", "x", kx);
          py::gil_scoped_release nogil;
          return fl::ffn::cluster_activations(dense.view, xv, n, seed, iters);
        },
        py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("x"), py::arg("n_experts"), py::arg("seed") = 0,
        py::arg("iterations") = 20,
        "Balanced k-means of the neurons on their |activation| profiles over calibration inputs x [n_tokens, "
        "d_model] (co-activation clustering): an ExpertPartition.");
  m.def("router_from_partition",
        [](py::handle g, py::handle u, py::handle d, fl::ffn::ExpertPartition const& p, double scale) {
          DenseIn<float> dense(g, u, d, "router_from_partition");
          auto r = fl::train::router_from_partition(dense.view, p, scale);
          return py::make_tuple(copy_out(r.weight()), copy_out(r.bias()));
        },
        py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("partition"), py::arg("scale") = 1.0,
        "A router initialized from the partition's mean gate directions: (router_weight, router_bias).");
  m.def("train_router",
        [](PyMoe& s, py::handle x, py::handle g, py::handle u, py::handle d, int steps, int batch_tokens, double lr,
           std::uint64_t seed, bool train_bias, double par_weight, double balance_weight, std::string const& labels) {
          char const* fn = "train_router";
          Moe32& l = s.f32(fn);
          DenseIn<float> dense(g, u, d, fn);
          py::array kx;
          auto xv = in<float, 2>(x, fn, "x", kx);
          fl::train::RouterTrainConfig cfg;
          cfg.steps = steps;
          cfg.batch_tokens = batch_tokens;
          cfg.lr = lr;
          cfg.seed = seed;
          cfg.train_bias = train_bias;
          cfg.loss.par_weight = par_weight;
          cfg.loss.balance_weight = balance_weight;
          if (labels == "par") cfg.labels = fl::train::LabelKind::par;
          else if (labels == "subset") cfg.labels = fl::train::LabelKind::subset;
          else throw py::value_error("train_router: labels must be 'par' or 'subset', got '" + labels + "'");
          fl::train::RouterTrainReport rep;
          {
            py::gil_scoped_release nogil;
            auto router = l.router();
            rep = fl::train::train_router(router, xv, dense.view, l.experts(), l.top_k(), cfg);
            l.set_router(std::move(router));
          }
          py::dict o;
          o["initial_loss"] = rep.initial_loss;
          o["final_loss"] = rep.final_loss;
          o["initial_label_accuracy"] = rep.initial_label_accuracy;
          o["final_label_accuracy"] = rep.final_label_accuracy;
          o["steps"] = rep.steps;
          return o;
        },
        py::arg("layer"), py::arg("x"), py::arg("dense_gate"), py::arg("dense_up"), py::arg("dense_down"),
        py::arg("steps") = 200, py::arg("batch_tokens") = 256, py::arg("lr") = 1e-2, py::arg("seed") = 0,
        py::arg("train_bias") = true, py::arg("par_weight") = 0.05, py::arg("balance_weight") = 0.01,
        py::arg("labels") = "par",
        "Trains the layer's router in place (Adam on PAR + balance, experts and teacher frozen; docs/math.md "
        "section 3.2). Returns a dict: initial_loss, final_loss, initial_label_accuracy, final_label_accuracy, steps.");
  m.def("recover_refit",
        [](PyMoe& s, py::handle x, py::handle g, py::handle u, py::handle d, double ridge) {
          fl::train::RefitReport const rep =
              recover_experts(s, x, g, u, d, "recover_refit", [&](auto& experts, Moe32 const& l, auto xv, auto dense) {
                return fl::train::recover_refit(experts, l.router(), l.gating(), xv, dense, ridge);
              });
          py::dict o;
          o["initial_relative_error"] = rep.initial_relative_error;
          o["final_relative_error"] = rep.final_relative_error;
          o["lambda"] = rep.lambda;
          o["n_tokens"] = rep.n_tokens;
          return o;
        },
        py::arg("layer"), py::arg("x"), py::arg("dense_gate"), py::arg("dense_up"), py::arg("dense_down"),
        py::arg("ridge") = 1e-3,
        "Refits the layer's down projections in closed form under its routing (ridge regression toward the dense "
        "output) in place. Returns a dict: initial_relative_error, final_relative_error, lambda, n_tokens.");
  m.def("recover_distill",
        [](PyMoe& s, py::handle x, py::handle g, py::handle u, py::handle d, int steps, int batch_tokens, double lr,
           std::uint64_t seed) {
          fl::train::DistillConfig cfg;
          cfg.steps = steps;
          cfg.batch_tokens = batch_tokens;
          cfg.lr = lr;
          cfg.seed = seed;
          fl::train::DistillReport const rep =
              recover_experts(s, x, g, u, d, "recover_distill", [&](auto& experts, Moe32 const& l, auto xv, auto dense) {
                return fl::train::recover_distill(experts, l.router(), l.gating(), xv, dense, cfg);
              });
          py::dict o;
          o["initial_loss"] = rep.initial_loss;
          o["final_loss"] = rep.final_loss;
          o["initial_relative_error"] = rep.initial_relative_error;
          o["final_relative_error"] = rep.final_relative_error;
          o["steps"] = rep.steps;
          return o;
        },
        py::arg("layer"), py::arg("x"), py::arg("dense_gate"), py::arg("dense_up"), py::arg("dense_down"),
        py::arg("steps") = 300, py::arg("batch_tokens") = 128, py::arg("lr") = 1e-3, py::arg("seed") = 0,
        "Distills the dense FFN into the layer's experts in place (Adam on the output MSE under the layer's "
        "routing). Returns a dict: initial_loss, final_loss, initial_relative_error, final_relative_error, steps.");

  m.def("load",
        [](std::string const& path, std::string const& dtype) {
          std::vector<std::unique_ptr<PyMoe>> out;
          if (dtype == "f32") {
            for (auto& l : fl::io::load_factorized<fl::DefaultCpu, float>(path)) out.push_back(std::make_unique<PyMoe>(std::move(l)));
          } else if (dtype == "bf16") {
            for (auto& l : fl::io::load_factorized<fl::DefaultCpu, fl::bf16>(path)) out.push_back(std::make_unique<PyMoe>(std::move(l)));
          } else {
            throw py::value_error("load: dtype must be 'f32' or 'bf16', got '" + dtype + "'");
          }
          py::list res;
          for (auto& p : out) res.append(py::cast(std::move(p)));
          return res;
        },
        py::arg("path"), py::arg("dtype") = "f32",
        "Loads the MoE layers of a factorized-model file (safetensors written by save or the factorllm CLI), with "
        "experts in 'f32' or 'bf16'. Every layer is validated; FormatError (a ValueError) names the problem.");
  m.def("save",
        [](std::string const& path, std::vector<PyMoe*> const& layers, std::string const& expert_dtype) {
          fl::io::FactorizedSaveOptions opt;
          if (expert_dtype == "f32") opt.expert_dtype = fl::io::SafetensorsDtype::f32;
          else if (expert_dtype == "bf16") opt.expert_dtype = fl::io::SafetensorsDtype::bf16;
          else if (expert_dtype == "f16") opt.expert_dtype = fl::io::SafetensorsDtype::f16;
          else throw py::value_error("save: expert_dtype must be 'f32', 'bf16' or 'f16', got '" + expert_dtype + "'");
          if (layers.empty()) throw py::value_error("save: argument 'layers' is empty");
          bool const bf = layers.front()->is_bf16();
          for (auto const* l : layers)
            if (l == nullptr || l->is_bf16() != bf)
              throw py::type_error("save: all layers must have the same weight dtype (all f32 or all bf16)");
          if (bf) {
            std::vector<MoeBf const*> ls;
            for (auto const* l : layers) ls.push_back(&std::get<1>(l->layer));
            fl::io::save_factorized(path, ls, opt);
          } else {
            std::vector<Moe32 const*> ls;
            for (auto const* l : layers) ls.push_back(&std::get<0>(l->layer));
            fl::io::save_factorized(path, ls, opt);
          }
        },
        py::arg("path"), py::arg("layers"), py::arg("expert_dtype") = "f32",
        "Saves MoE layers (one per decoder layer) as a factorized-model safetensors file; experts stored as "
        "'f32', 'bf16' or 'f16' (routers always f32).");

  m.def("from_dlpack", &from_dlpack, py::arg("tensor"), R"doc(
A NumPy array over the memory of a DLPack tensor (a torch tensor, a NumPy array, any object with __dlpack__, or a
"dltensor" capsule): no copy. CPU only. bfloat16 arrives as uint16 (its bits). The producer's memory stays alive as
long as the array does.)doc");
  py::class_<DLPackExport>(m, "DLPackExport", "A NumPy array offered through the DLPack protocol (see to_dlpack).")
      .def("__dlpack__", &DLPackExport::dlpack, py::arg("stream") = py::none(),
           "A 'dltensor' capsule over the array's memory (consumed once).")
      .def("__dlpack_device__", [](DLPackExport const&) { return py::make_tuple(static_cast<int>(kDLCPU), 0); })
      .def_readonly("array", &DLPackExport::array, "The wrapped array.");
  m.def("to_dlpack",
        [](py::handle a) { return DLPackExport{as_array(a, "to_dlpack", "array")}; }, py::arg("array"), R"doc(
Wraps an array for DLPack consumers without copying: torch.utils.dlpack.from_dlpack(factorllm.to_dlpack(y)) or
numpy.from_dlpack(...) view y's memory, which stays alive as long as they do.)doc");
}
