// SPDX-License-Identifier: Apache-2.0
// The C API shim (include/factorllm/c/factorllm.h): type-erased MoE layers over moe::MoeFfn<T, DefaultCpu> for the
// five weight formats, and one guard per entry point that turns every exception into a status code plus a
// thread-local message (docs/c_api.md). Only the fllm_* functions are exported (-fvisibility=hidden).
#define FLLM_C_BUILDING 1
#include "factorllm/c/factorllm.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "factorllm/core/dtype.hpp"
#include "factorllm/core/error.hpp"
#include "factorllm/core/quant.hpp"
#include "factorllm/ffn/factorize.hpp"
#include "factorllm/io/factorized_checkpoint.hpp"
#include "factorllm/moe/moe_ffn.hpp"
#include "factorllm/train/par_loss.hpp"
#include "factorllm/version.hpp"

namespace fl = factorllm;

namespace {

/// A required pointer argument was NULL (FLLM_ERR_NULL_POINTER); the C++ library has no such type.
class null_argument : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

thread_local std::string t_last_error;

fllm_status fail(fllm_status status, char const* function, char const* what) noexcept {
  try {
    // Every message starts with the C entry point's name; the C++ library's own messages (which start with its
    // function's name, e.g. "MoeFfn: argument 'router' ...") follow it.
    t_last_error = std::strncmp(what, function, std::strlen(function)) == 0 ? std::string(what)
                                                                            : std::string(function) + ": " + what;
  } catch (...) {
    // Not even the message fits in memory: the status code still tells the caller what happened.
  }
  return status;
}

/// Runs body and maps what it throws to a status (core/error.hpp: one code per exception type). Nothing escapes.
template <class Body>
fllm_status guard(char const* function, Body&& body) noexcept {
  try {
    body();
    return FLLM_OK;
  } catch (null_argument const& e) {
    return fail(FLLM_ERR_NULL_POINTER, function, e.what());
  } catch (fl::shape_error const& e) {
    return fail(FLLM_ERR_SHAPE, function, e.what());
  } catch (fl::value_error const& e) {
    return fail(FLLM_ERR_VALUE, function, e.what());
  } catch (fl::format_error const& e) {
    return fail(FLLM_ERR_FORMAT, function, e.what());
  } catch (fl::backend_error const& e) {
    return fail(FLLM_ERR_BACKEND, function, e.what());
  } catch (std::bad_alloc const&) {
    return fail(FLLM_ERR_OUT_OF_MEMORY, function, "out of memory");
  } catch (std::exception const& e) {
    return fail(FLLM_ERR_INTERNAL, function, e.what());
  } catch (...) {
    return fail(FLLM_ERR_INTERNAL, function, "unknown exception");
  }
}

void require_non_null(void const* p, char const* function, char const* argument) {
  if (p == nullptr) throw null_argument(fl::detail::concat(function, ": argument '", argument, "' is NULL"));
}

/// A row-major [rows, cols] matrix given by pointer and row stride, checked here so that the message names the C
/// argument (TensorView's own check would name none).
template <class T>
fl::MatrixView<T> checked_matrix(T* data, std::int64_t rows, std::int64_t cols, std::int64_t row_stride,
                                 char const* function, char const* argument, char const* stride_argument) {
  if (rows > 0) require_non_null(data, function, argument);
  if (row_stride < cols)
    throw fl::shape_error(fl::detail::concat(function, ": argument '", stride_argument, "' is ", row_stride,
                                             ", expected >= ", cols, " (the row length of '", argument, "', elements)"));
  return fl::matrix_view(data, rows, cols, rows > 0 ? row_stride : cols);
}

fl::CombineMode combine_mode(fllm_combine_mode mode, char const* function) {
  int const m = static_cast<int>(mode);
  if (m < FLLM_COMBINE_CODE_REF || m > FLLM_COMBINE_SIGMOID_TOPK)
    throw fl::value_error(fl::detail::concat(function, ": argument 'gating->mode' is ", m, ", expected 0..4 (fllm_combine_mode)"));
  return static_cast<fl::CombineMode>(m);
}

fllm_combine_mode c_mode(fl::CombineMode mode) noexcept { return static_cast<fllm_combine_mode>(static_cast<int>(mode)); }

char const* dtype_text(fllm_dtype dtype) noexcept {
  switch (dtype) {
    case FLLM_F32: return "FLLM_F32";
    case FLLM_BF16: return "FLLM_BF16";
    case FLLM_F16: return "FLLM_F16";
    case FLLM_Q8_0: return "FLLM_Q8_0";
    case FLLM_Q4_0: return "FLLM_Q4_0";
    default: return "unknown";
  }
}

void require_weight_dtype(fllm_dtype dtype, char const* function, char const* argument) {
  int const d = static_cast<int>(dtype);
  if (d < FLLM_F32 || d > FLLM_Q4_0)
    throw fl::value_error(fl::detail::concat(function, ": argument '", argument, "' is ", d, ", expected a fllm_dtype (0..4)"));
}

/// The dense teacher / source weights (f32 only: factorize copies and converts afterwards).
fl::ffn::DenseFfnView<float> dense_view(fllm_dense_ffn const* dense, char const* function) {
  require_non_null(dense, function, "dense");
  if (dense->dtype != FLLM_F32)
    throw fl::value_error(fl::detail::concat(function, ": argument 'dense->dtype' is ", dtype_text(dense->dtype), " (",
                                             static_cast<int>(dense->dtype), "), expected FLLM_F32"));
  if (dense->d_model < 1 || dense->d_ff < 1)
    throw fl::shape_error(fl::detail::concat(function, ": argument 'dense' has d_model = ", dense->d_model, ", d_ff = ",
                                             dense->d_ff, ", expected both >= 1"));
  require_non_null(dense->gate, function, "dense->gate");
  require_non_null(dense->up, function, "dense->up");
  require_non_null(dense->down, function, "dense->down");
  auto const* g = static_cast<float const*>(dense->gate);
  auto const* u = static_cast<float const*>(dense->up);
  auto const* d = static_cast<float const*>(dense->down);
  return fl::ffn::DenseFfnView<float>{
      checked_matrix(g, dense->d_ff, dense->d_model, dense->gate_row_stride, function, "dense->gate", "dense->gate_row_stride"),
      checked_matrix(u, dense->d_ff, dense->d_model, dense->up_row_stride, function, "dense->up", "dense->up_row_stride"),
      checked_matrix(d, dense->d_model, dense->d_ff, dense->down_row_stride, function, "dense->down", "dense->down_row_stride")};
}

fl::moe::Router<float> make_router(float const* weight, std::int64_t row_stride, float const* bias, std::int64_t n_experts,
                                   std::int64_t d_model, char const* function) {
  require_non_null(weight, function, "router_weight");
  auto const w = checked_matrix(weight, n_experts, d_model, row_stride, function, "router_weight", "router_row_stride");
  fl::Vector<float> b({n_experts});
  for (std::int64_t e = 0; e < n_experts; ++e) b[e] = bias != nullptr ? bias[e] : 0.0f;
  return fl::moe::Router<float>(fl::Matrix<float>(fl::MatrixView<float const>(w)), std::move(b));
}

/// What fllm_moe_forward needs of a layer, whatever its weight format.
class LayerBase {
 public:
  virtual ~LayerBase() = default;
  virtual fllm_dtype dtype() const noexcept = 0;
  virtual std::int64_t d_model() const noexcept = 0;
  virtual std::int64_t d_ff() const noexcept = 0;
  virtual std::int64_t n_experts() const noexcept = 0;
  virtual fl::moe::Gating const& gating() const noexcept = 0;
  virtual fl::moe::Router<float> const& router() const noexcept = 0;
  virtual void set_router(fl::moe::Router<float> router) = 0;
  virtual std::size_t workspace_bytes(std::int64_t n_tokens) const = 0;
  virtual void forward(fl::MatrixView<float const> x, fl::MatrixView<float> y, fl::Workspace& ws,
                       fl::moe::RoutingRecord<float>* record) const = 0;
  /// The experts in f32: the layer's own for an f32 layer (no copy: `scratch` untouched), else a converted copy
  /// in `scratch` (exact for every format: each widens or dequantizes).
  virtual fl::ffn::ExpertWeights<float> const& experts_f32(fl::ffn::ExpertWeights<float>& scratch) const = 0;
};

template <class T>
constexpr fllm_dtype dtype_of() {
  if constexpr (std::is_same_v<T, float>) return FLLM_F32;
  else if constexpr (std::is_same_v<T, fl::bf16>) return FLLM_BF16;
  else if constexpr (std::is_same_v<T, fl::f16>) return FLLM_F16;
  else if constexpr (std::is_same_v<T, fl::q8_0>) return FLLM_Q8_0;
  else return FLLM_Q4_0;
}

template <class T>
class Layer final : public LayerBase {
 public:
  explicit Layer(fl::moe::MoeFfn<T> layer) : layer_(std::move(layer)) {}
  fllm_dtype dtype() const noexcept override { return dtype_of<T>(); }
  std::int64_t d_model() const noexcept override { return layer_.d_model(); }
  std::int64_t d_ff() const noexcept override { return layer_.experts().d_ff(); }
  std::int64_t n_experts() const noexcept override { return layer_.n_experts(); }
  fl::moe::Gating const& gating() const noexcept override { return layer_.gating(); }
  fl::moe::Router<float> const& router() const noexcept override { return layer_.router(); }
  void set_router(fl::moe::Router<float> router) override { layer_.set_router(std::move(router)); }
  std::size_t workspace_bytes(std::int64_t n_tokens) const override { return layer_.workspace_bytes(n_tokens); }
  void forward(fl::MatrixView<float const> x, fl::MatrixView<float> y, fl::Workspace& ws,
               fl::moe::RoutingRecord<float>* record) const override {
    layer_.forward(x, y, ws, record);
  }
  fl::ffn::ExpertWeights<float> const& experts_f32(fl::ffn::ExpertWeights<float>& scratch) const override {
    if constexpr (std::is_same_v<T, float>) {
      return layer_.experts();
    } else {
      scratch = fl::ffn::convert_format<float>(layer_.experts());
      return scratch;
    }
  }
  fl::moe::MoeFfn<T> const& layer() const noexcept { return layer_; }

 private:
  fl::moe::MoeFfn<T> layer_;
};

/// Builds the layer in weight format `dtype` from f32 experts (moved for f32, converted otherwise).
std::unique_ptr<LayerBase> make_layer(fl::ffn::ExpertWeights<float> experts, fl::moe::Router<float> router,
                                      fl::moe::Gating gating, fllm_dtype dtype) {
  auto build = [&](auto tag) -> std::unique_ptr<LayerBase> {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      return std::make_unique<Layer<T>>(fl::moe::MoeFfn<T>(std::move(experts), std::move(router), std::move(gating)));
    } else {
      return std::make_unique<Layer<T>>(
          fl::moe::MoeFfn<T>(fl::ffn::convert_format<T>(experts), std::move(router), std::move(gating)));
    }
  };
  switch (dtype) {
    case FLLM_F32: return build(float{});
    case FLLM_BF16: return build(fl::bf16{});
    case FLLM_F16: return build(fl::f16{});
    case FLLM_Q8_0: return build(fl::q8_0{});
    case FLLM_Q4_0: return build(fl::q4_0{});
    default: break;
  }
  throw fl::value_error("make_layer: unknown weight dtype");  // unreachable: callers check the dtype first
}

}  // namespace

/// What a forward call may mutate: scratch, the routing record, and the bf16 conversion buffers.
struct fllm_workspace {
  fl::Workspace ws;
  fl::moe::RoutingRecord<float> record;
  std::vector<float> x_f32;
  std::vector<float> y_f32;
};

struct fllm_moe {
  std::unique_ptr<LayerBase> impl;
  // The handle's one mutable part: the scratch of the calls that pass ws == NULL, and the lock serializing them.
  mutable std::mutex internal_mutex;
  mutable fllm_workspace internal;
};

namespace {

LayerBase const& layer_of(fllm_moe const* moe, char const* function) {
  require_non_null(moe, function, "moe");
  return *moe->impl;
}

fl::moe::Gating make_gating(fllm_gating const* gating, std::int64_t n_experts, char const* function) {
  require_non_null(gating, function, "gating");
  fl::moe::Gating g;
  g.mode = combine_mode(gating->mode, function);
  g.top_k = gating->top_k;
  g.sigmoid_renormalize = gating->sigmoid_renormalize != 0;
  if (gating->selection_bias != nullptr) g.selection_bias.assign(gating->selection_bias, gating->selection_bias + n_experts);
  g.output_scale = gating->output_scale;
  return g;
}

void forward_impl(LayerBase const& layer, fllm_workspace& w, fllm_dtype act_dtype, void const* x, std::int64_t x_stride,
                  void* y, std::int64_t y_stride, std::int64_t n_tokens, fllm_routing const* routing) {
  char const* fn = "fllm_moe_forward";
  std::int64_t const d = layer.d_model();
  if (act_dtype != FLLM_F32 && act_dtype != FLLM_BF16)
    throw fl::value_error(fl::detail::concat(fn, ": argument 'act_dtype' is ", dtype_text(act_dtype), " (",
                                             static_cast<int>(act_dtype), "), expected FLLM_F32 or FLLM_BF16"));
  if (n_tokens < 0) throw fl::shape_error(fl::detail::concat(fn, ": argument 'n_tokens' is ", n_tokens, ", expected >= 0"));
  std::size_t const elem = act_dtype == FLLM_F32 ? sizeof(float) : sizeof(std::uint16_t);
  auto const xv = checked_matrix(static_cast<unsigned char const*>(x), n_tokens, d, x_stride, fn, "x", "x_row_stride");
  auto const yv = checked_matrix(static_cast<unsigned char*>(y), n_tokens, d, y_stride, fn, "y", "y_row_stride");
  if (n_tokens > 0) {
    // Byte ranges [first element, one past the last): overlapping buffers would be read after being written.
    auto const span = [&](void const* p, std::int64_t stride) {
      auto const begin = reinterpret_cast<std::uintptr_t>(p);
      return std::pair<std::uintptr_t, std::uintptr_t>(
          begin, begin + (static_cast<std::uintptr_t>((n_tokens - 1) * stride + d)) * elem);
    };
    auto const [x0, x1] = span(xv.data(), x_stride);
    auto const [y0, y1] = span(yv.data(), y_stride);
    if (x0 < y1 && y0 < x1) throw fl::shape_error(fl::detail::concat(fn, ": argument 'y' overlaps argument 'x'"));
  }
  w.ws.reserve(layer.workspace_bytes(n_tokens));
  bool const want_record =
      routing != nullptr && (routing->ids != nullptr || routing->weights != nullptr || routing->logits != nullptr);
  fl::moe::RoutingRecord<float>* record = want_record ? &w.record : nullptr;
  if (act_dtype == FLLM_F32) {
    layer.forward(fl::matrix_view(static_cast<float const*>(x), n_tokens, d, n_tokens > 0 ? x_stride : d),
                  fl::matrix_view(static_cast<float*>(y), n_tokens, d, n_tokens > 0 ? y_stride : d), w.ws, record);
  } else {
    // bf16 activations: widened into a float buffer, the float result rounded back (RNE). The buffers grow with the
    // largest call and are reused after.
    auto const n = static_cast<std::size_t>(n_tokens * d);
    if (w.x_f32.size() < n) w.x_f32.resize(n);
    if (w.y_f32.size() < n) w.y_f32.resize(n);
    auto const* xb = static_cast<std::uint16_t const*>(x);
    for (std::int64_t t = 0; t < n_tokens; ++t)
      for (std::int64_t k = 0; k < d; ++k)
        w.x_f32[static_cast<std::size_t>(t * d + k)] = fl::bf16::from_bits(xb[t * x_stride + k]).to_float();
    layer.forward(fl::matrix_view(static_cast<float const*>(w.x_f32.data()), n_tokens, d),
                  fl::matrix_view(w.y_f32.data(), n_tokens, d), w.ws, record);
    auto* yb = static_cast<std::uint16_t*>(y);
    for (std::int64_t t = 0; t < n_tokens; ++t)
      for (std::int64_t k = 0; k < d; ++k)
        yb[t * y_stride + k] = fl::bf16::from_float_bits(w.y_f32[static_cast<std::size_t>(t * d + k)]);
  }
  if (record != nullptr) {
    std::int64_t const k = layer.gating().top_k, n = layer.n_experts();
    for (std::int64_t t = 0; t < n_tokens; ++t) {
      for (std::int64_t j = 0; j < k; ++j) {
        if (routing->ids != nullptr) routing->ids[t * k + j] = w.record.ids(t, j);
        if (routing->weights != nullptr) routing->weights[t * k + j] = w.record.weights(t, j);
      }
      if (routing->logits != nullptr)
        for (std::int64_t e = 0; e < n; ++e) routing->logits[t * n + e] = w.record.logits(t, e);
    }
  }
}

template <class T>
void save_as(std::vector<LayerBase const*> const& layers, std::string const& path, fl::io::SafetensorsDtype dtype) {
  std::vector<fl::moe::MoeFfn<T> const*> typed;
  typed.reserve(layers.size());
  for (auto const* l : layers) typed.push_back(&static_cast<Layer<T> const*>(l)->layer());
  fl::io::FactorizedSaveOptions options;
  options.expert_dtype = dtype;
  fl::io::save_factorized(path, typed, options);
}

template <class T>
std::unique_ptr<LayerBase> load_as(std::string const& path, std::int64_t layer) {
  auto layers = fl::io::load_factorized<fl::DefaultCpu, T>(path);
  if (layer < 0 || layer >= static_cast<std::int64_t>(layers.size()))
    throw fl::value_error(fl::detail::concat("fllm_moe_load: argument 'layer' is ", layer, ", expected in [0, ",
                                             layers.size(), ") (the layers of '", path, "')"));
  return std::make_unique<Layer<T>>(std::move(layers[static_cast<std::size_t>(layer)]));
}

}  // namespace

extern "C" {

const char* fllm_version(void) {
#define FLLM_C_STR2(x) #x
#define FLLM_C_STR(x) FLLM_C_STR2(x)
  return FLLM_C_STR(FLLM_VERSION_MAJOR) "." FLLM_C_STR(FLLM_VERSION_MINOR) "." FLLM_C_STR(FLLM_VERSION_PATCH);
#undef FLLM_C_STR
#undef FLLM_C_STR2
}

const char* fllm_last_error(void) { return t_last_error.c_str(); }

const char* fllm_status_name(fllm_status status) {
  switch (status) {
    case FLLM_OK: return "FLLM_OK";
    case FLLM_ERR_NULL_POINTER: return "FLLM_ERR_NULL_POINTER";
    case FLLM_ERR_SHAPE: return "FLLM_ERR_SHAPE";
    case FLLM_ERR_VALUE: return "FLLM_ERR_VALUE";
    case FLLM_ERR_FORMAT: return "FLLM_ERR_FORMAT";
    case FLLM_ERR_BACKEND: return "FLLM_ERR_BACKEND";
    case FLLM_ERR_OUT_OF_MEMORY: return "FLLM_ERR_OUT_OF_MEMORY";
    case FLLM_ERR_INTERNAL: return "FLLM_ERR_INTERNAL";
    default: return "unknown status";
  }
}

fllm_gating fllm_gating_default(int64_t top_k) {
  fllm_gating g;
  g.mode = FLLM_COMBINE_SOFTMAX_TOPK_RENORM;
  g.top_k = top_k;
  g.sigmoid_renormalize = 0;
  g.selection_bias = nullptr;
  g.output_scale = 1.0f;
  return g;
}

fllm_par_config fllm_par_config_default(void) {
  fl::ParLossConfig const c;
  return fllm_par_config{c.par_weight, c.balance_weight, c.clip};
}

fllm_status fllm_moe_create_from_dense(const fllm_dense_ffn* dense, const int32_t* permutation, int64_t n_experts,
                                       const float* router_weight, int64_t router_row_stride, const float* router_bias,
                                       const fllm_gating* gating, fllm_dtype weight_dtype, fllm_moe** out) {
  char const* fn = "fllm_moe_create_from_dense";
  return guard(fn, [&] {
    require_non_null(out, fn, "out");
    auto const dv = dense_view(dense, fn);
    require_weight_dtype(weight_dtype, fn, "weight_dtype");
    if (n_experts < 1 || dense->d_ff % n_experts != 0)
      throw fl::value_error(fl::detail::concat(fn, ": argument 'n_experts' is ", n_experts,
                                               ", expected >= 1 and a divisor of d_ff = ", dense->d_ff));
    fl::ffn::ExpertPartition partition =
        permutation == nullptr
            ? fl::ffn::ExpertPartition::contiguous(dense->d_ff, n_experts)
            : fl::ffn::ExpertPartition::from_permutation(std::vector<std::int32_t>(permutation, permutation + dense->d_ff),
                                                         n_experts);
    auto router = make_router(router_weight, router_row_stride, router_bias, n_experts, dense->d_model, fn);
    auto g = make_gating(gating, n_experts, fn);
    auto moe = std::make_unique<fllm_moe>();
    moe->impl = make_layer(fl::ffn::factorize(dv, partition), std::move(router), std::move(g), weight_dtype);
    *out = moe.release();
  });
}

fllm_status fllm_checkpoint_n_layers(const char* path, int64_t* n_layers) {
  char const* fn = "fllm_checkpoint_n_layers";
  return guard(fn, [&] {
    require_non_null(path, fn, "path");
    require_non_null(n_layers, fn, "n_layers");
    *n_layers = static_cast<int64_t>(fl::io::load_factorized<fl::DefaultCpu, float>(std::string(path)).size());
  });
}

fllm_status fllm_moe_load(const char* path, int64_t layer, fllm_dtype weight_dtype, fllm_moe** out) {
  char const* fn = "fllm_moe_load";
  return guard(fn, [&] {
    require_non_null(path, fn, "path");
    require_non_null(out, fn, "out");
    require_weight_dtype(weight_dtype, fn, "weight_dtype");
    auto moe = std::make_unique<fllm_moe>();
    std::string const p(path);
    switch (weight_dtype) {
      case FLLM_F32: moe->impl = load_as<float>(p, layer); break;
      case FLLM_BF16: moe->impl = load_as<fl::bf16>(p, layer); break;
      case FLLM_F16: moe->impl = load_as<fl::f16>(p, layer); break;
      case FLLM_Q8_0:
      case FLLM_Q4_0: {
        auto f32 = load_as<float>(p, layer);
        auto const& l = static_cast<Layer<float> const&>(*f32).layer();
        moe->impl = make_layer(l.experts(), l.router(), l.gating(), weight_dtype);
        break;
      }
      default: break;  // refused by require_weight_dtype
    }
    *out = moe.release();
  });
}

fllm_status fllm_moe_save(const fllm_moe* const* layers, int64_t n_layers, const char* path) {
  char const* fn = "fllm_moe_save";
  return guard(fn, [&] {
    require_non_null(layers, fn, "layers");
    require_non_null(path, fn, "path");
    if (n_layers < 1) throw fl::value_error(fl::detail::concat(fn, ": argument 'n_layers' is ", n_layers, ", expected >= 1"));
    std::vector<LayerBase const*> impls;
    for (int64_t l = 0; l < n_layers; ++l) {
      if (layers[l] == nullptr)
        throw null_argument(fl::detail::concat(fn, ": argument 'layers[", l, "]' is NULL"));
      impls.push_back(layers[l]->impl.get());
      if (impls.back()->dtype() != impls.front()->dtype())
        throw fl::value_error(fl::detail::concat(fn, ": argument 'layers[", l, "]' has weights ",
                                                 dtype_text(impls.back()->dtype()), " but layers[0] has ",
                                                 dtype_text(impls.front()->dtype()), "; a checkpoint has one format"));
    }
    std::string const p(path);
    switch (impls.front()->dtype()) {
      case FLLM_F32: save_as<float>(impls, p, fl::io::SafetensorsDtype::f32); break;
      case FLLM_BF16: save_as<fl::bf16>(impls, p, fl::io::SafetensorsDtype::bf16); break;
      case FLLM_F16: save_as<fl::f16>(impls, p, fl::io::SafetensorsDtype::f16); break;
      case FLLM_Q8_0:
      case FLLM_Q4_0:
        throw fl::value_error(fl::detail::concat(fn, ": argument 'layers' holds ", dtype_text(impls.front()->dtype()),
                                                 " weights; the factorized checkpoint stores F32, F16 or BF16 (save the "
                                                 "layer before quantizing, load it with the quantized weight_dtype)"));
      default: break;  // a layer's dtype is always one of the above
    }
  });
}

void fllm_moe_destroy(fllm_moe* moe) { delete moe; }

fllm_status fllm_moe_get_info(const fllm_moe* moe, fllm_moe_info* info) {
  char const* fn = "fllm_moe_get_info";
  return guard(fn, [&] {
    LayerBase const& l = layer_of(moe, fn);
    require_non_null(info, fn, "info");
    info->d_model = l.d_model();
    info->d_ff = l.d_ff();
    info->n_experts = l.n_experts();
    info->d_expert = l.d_ff() / l.n_experts();
    info->top_k = l.gating().top_k;
    info->weight_dtype = l.dtype();
    info->mode = c_mode(l.gating().mode);
  });
}

fllm_status fllm_moe_get_router(const fllm_moe* moe, float* weight, float* bias) {
  char const* fn = "fllm_moe_get_router";
  return guard(fn, [&] {
    LayerBase const& l = layer_of(moe, fn);
    auto const& r = l.router();
    std::int64_t const n = l.n_experts(), d = l.d_model();
    if (weight != nullptr)
      for (std::int64_t e = 0; e < n; ++e)
        for (std::int64_t k = 0; k < d; ++k) weight[e * d + k] = r.weight()(e, k);
    if (bias != nullptr)
      for (std::int64_t e = 0; e < n; ++e) bias[e] = r.bias()(e);
  });
}

fllm_status fllm_moe_set_router(fllm_moe* moe, const float* weight, int64_t weight_row_stride, const float* bias) {
  char const* fn = "fllm_moe_set_router";
  return guard(fn, [&] {
    require_non_null(moe, fn, "moe");
    LayerBase& l = *moe->impl;
    l.set_router(make_router(weight, weight_row_stride, bias, l.n_experts(), l.d_model(), fn));
  });
}

fllm_status fllm_workspace_create(fllm_workspace** out) {
  char const* fn = "fllm_workspace_create";
  return guard(fn, [&] {
    require_non_null(out, fn, "out");
    *out = new fllm_workspace();
  });
}

void fllm_workspace_destroy(fllm_workspace* ws) { delete ws; }

fllm_status fllm_workspace_reserve(fllm_workspace* ws, const fllm_moe* moe, int64_t max_tokens) {
  char const* fn = "fllm_workspace_reserve";
  return guard(fn, [&] {
    require_non_null(ws, fn, "ws");
    LayerBase const& l = layer_of(moe, fn);
    ws->ws.reserve(l.workspace_bytes(max_tokens));
    auto const n = static_cast<std::size_t>(max_tokens * l.d_model());
    if (ws->x_f32.size() < n) ws->x_f32.resize(n);
    if (ws->y_f32.size() < n) ws->y_f32.resize(n);
  });
}

fllm_status fllm_moe_forward(const fllm_moe* moe, fllm_workspace* ws, fllm_dtype act_dtype, const void* x,
                             int64_t x_row_stride, void* y, int64_t y_row_stride, int64_t n_tokens,
                             const fllm_routing* routing) {
  char const* fn = "fllm_moe_forward";
  return guard(fn, [&] {
    LayerBase const& l = layer_of(moe, fn);
    if (ws != nullptr) {
      forward_impl(l, *ws, act_dtype, x, x_row_stride, y, y_row_stride, n_tokens, routing);
    } else {
      // The handle is shared read-only; only its internal scratch needs the lock.
      std::lock_guard<std::mutex> lock(moe->internal_mutex);
      forward_impl(l, moe->internal, act_dtype, x, x_row_stride, y, y_row_stride, n_tokens, routing);
    }
  });
}

fllm_status fllm_moe_par_loss(const fllm_moe* moe, const fllm_dense_ffn* dense, const float* x, int64_t x_row_stride,
                              int64_t n_tokens, const fllm_par_config* config, fllm_par_result* result) {
  char const* fn = "fllm_moe_par_loss";
  return guard(fn, [&] {
    LayerBase const& l = layer_of(moe, fn);
    require_non_null(result, fn, "result");
    auto const dv = dense_view(dense, fn);
    if (n_tokens < 1)
      throw fl::shape_error(fl::detail::concat(fn, ": argument 'n_tokens' is ", n_tokens, ", expected >= 1 (the loss is a mean over tokens)"));
    require_non_null(x, fn, "x");
    auto const xv = checked_matrix(x, n_tokens, dense->d_model, x_row_stride, fn, "x", "x_row_stride");
    fl::ParLossConfig cfg;
    if (config != nullptr) {
      cfg.par_weight = config->par_weight;
      cfg.balance_weight = config->balance_weight;
      cfg.clip = config->clip;
    }
    fl::ffn::ExpertWeights<float> scratch;
    auto const& experts = l.experts_f32(scratch);
    auto const r = fl::train::par_loss(xv, dv, experts, l.router(), l.gating().top_k, cfg);
    std::int64_t const n = l.n_experts(), d = l.d_model();
    result->par_loss = r.par_loss;
    result->balance_loss = r.balance_loss;
    result->total_loss = r.total_loss;
    result->label_accuracy = r.label_accuracy;
    if (result->grad_weight != nullptr)
      for (std::int64_t e = 0; e < n; ++e)
        for (std::int64_t k = 0; k < d; ++k) result->grad_weight[e * d + k] = r.grad_weight(e, k);
    if (result->grad_bias != nullptr)
      for (std::int64_t e = 0; e < n; ++e) result->grad_bias[e] = r.grad_bias[e];
  });
}

}  // extern "C"
