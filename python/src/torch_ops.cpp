// SPDX-License-Identifier: Apache-2.0
// PyTorch operators (TORCH_LIBRARY "factorllm") over the library's training kernels: MoE FFN forward/backward,
// PAR loss with its router gradients, and the balance term. Loaded from Python with torch.ops.load_library;
// the autograd.Functions that use them are in python/factorllm/torch.py (factorllm.torch).
//
// Contract for every tensor argument: CPU, strided (dense) layout, contiguous, and the dtype of the layer
// (float32 -> the cpu_simd kernels, float64 -> the scalar oracle, for gradcheck). Anything else raises a Python
// exception naming the argument and what was expected (TypeError for dtypes, ValueError otherwise): the ops never
// copy a tensor to fix its layout, so a huge non-contiguous tensor is never silently duplicated.
// CUDA tensors: par_loss and moe_infer have CUDA kernels in torch_ops_cuda.cpp when the build has them
// (FLLM_TORCH_WITH_CUDA, python/torch_ops.cmake); every other op refuses them here (kCudaHint says why).
#include <torch/custom_class.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "torch_checks.hpp"

#include <factorllm/ffn/factorize.hpp>
#include <factorllm/train/moe_backward.hpp>
#include <factorllm/train/par_loss.hpp>

namespace fl = factorllm;

namespace {

// What a CUDA tensor reaching a CPU kernel is told (docs/python.md "CUDA tensors"). With FLLM_TORCH_WITH_CUDA the
// CUDA kernels (torch_ops_cuda.cpp) take par_loss and moe_infer, so only the ops without one get here.
#ifdef FLLM_TORCH_WITH_CUDA
constexpr char const* kCudaHint =
    " (this op has no CUDA kernel: the training moe_forward / moe_backward need a device-side MoeRouting, not "
    "implemented; on CUDA tensors factorllm runs par_loss and moe_infer)";
#else
constexpr char const* kCudaHint = " (factorllm was built without CUDA support for torch tensors)";
#endif

using factorllm_torch::shape_str;

/// Checks device, layout, dtype, shape (-1 = any) and contiguity of `t`, naming `arg` of `fn` in the error.
void check_tensor(at::Tensor const& t, char const* fn, char const* arg, at::ScalarType dtype,
                  std::vector<std::int64_t> const& shape, char const* shape_names) {
  TORCH_CHECK_VALUE(t.defined(), fn, ": argument '", arg, "' is undefined (None)");
  TORCH_CHECK_VALUE(t.device().is_cpu(), fn, ": argument '", arg, "' must be a CPU tensor, got device ", t.device(),
                    t.is_cuda() ? kCudaHint : "");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, fn, ": argument '", arg, "' must have dtype ", c10::toString(dtype),
                   " (the layer's dtype), got ", c10::toString(t.scalar_type()));
  factorllm_torch::check_layout_shape(t, fn, arg, shape, shape_names);
}

/// The layer's weight/activation dtype, from x: float32 or float64.
at::ScalarType layer_dtype(at::Tensor const& x, char const* fn) {
  TORCH_CHECK_VALUE(x.defined(), fn, ": argument 'x' is undefined (None)");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, fn,
                   ": argument 'x' must have dtype torch.float32 (cpu_simd kernels) or torch.float64 (scalar oracle), got ",
                   c10::toString(x.scalar_type()));
  return x.scalar_type();
}

template <class T>
fl::MatrixView<T const> mview(at::Tensor const& t) {
  return fl::matrix_view(t.data_ptr<T>(), t.size(0), t.size(1));
}
template <class T>
fl::MatrixView<T> mview_mut(at::Tensor& t) {
  return fl::matrix_view(t.data_ptr<T>(), t.size(0), t.size(1));
}
template <class T>
fl::TensorView<T const, 3> tview3(at::Tensor const& t) {
  return fl::TensorView<T const, 3>(t.data_ptr<T>(), {t.size(0), t.size(1), t.size(2)});
}
template <class T>
fl::TensorView<T, 3> tview3_mut(at::Tensor& t) {
  return fl::TensorView<T, 3>(t.data_ptr<T>(), {t.size(0), t.size(1), t.size(2)});
}
template <class T>
fl::VectorView<T const> vview(at::Tensor const& t) {
  return fl::vector_view(t.data_ptr<T>(), t.size(0));
}

using factorllm_torch::translate_errors;

/// One scratch arena per thread, grown only when a call needs more (so steady-state training never allocates).
fl::Workspace& thread_workspace() {
  thread_local fl::Workspace ws;
  return ws;
}

/// Identity of a tensor as a forward saw it: its storage (held weakly), data address, version counter, shape.
/// The data address alone is not an identity: once the forward's tensor is freed, the allocator may hand the same
/// address to a new tensor (version 0, same shape), which would then pass for it. A weak reference keeps the
/// StorageImpl object (not its data) allocated, so no other storage can take its address while the routing lives.
struct Fingerprint {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage{c10::intrusive_ptr<c10::StorageImpl>()};
  void const* data = nullptr;
  std::int64_t version = 0;
  std::vector<std::int64_t> sizes;
  static Fingerprint of(at::Tensor const& t) {
    return {t.storage().getWeakStorageImpl(), t.data_ptr(), t._version(), t.sizes().vec()};
  }
  /// True when `t` is (a view at the same offset of) the tensor this fingerprint was taken of, unmodified since.
  bool matches(at::Tensor const& t) const {
    return !storage.expired() && storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() &&
           data == t.data_ptr() && version == t._version() && sizes == t.sizes().vec();
  }
};

}  // namespace

/// The routing one moe_forward call decided (library RoutingRecord), its gating, optionally the experts'
/// pre-activations, and fingerprints of the tensors it used, so that moe_backward can refuse a routing that
/// belongs to another forward (another x, other or since-modified parameters).
struct MoeRouting : torch::CustomClassHolder {
  std::int64_t forward_id = 0;
  bool is_double = false;
  bool has_saved = false;
  fl::moe::Gating gating;
  fl::moe::RoutingRecord<float> rec_f;
  fl::moe::RoutingRecord<double> rec_d;
  fl::train::MoeActivations<float> saved_f;
  fl::train::MoeActivations<double> saved_d;
  Fingerprint x, router_weight, router_bias, gate, up, down;

  std::int64_t n_tokens() const { return is_double ? rec_d.logits.extent(0) : rec_f.logits.extent(0); }
  std::int64_t id() const { return forward_id; }
  std::string mode() const { return fl::moe::to_string(gating.mode); }
  std::int64_t top_k() const { return gating.top_k; }
  /// Chosen experts [n_tokens, top_k] (int32 copy).
  at::Tensor ids() const {
    auto const& ids = is_double ? rec_d.ids : rec_f.ids;
    return torch::from_blob(const_cast<std::int32_t*>(ids.data()), {ids.extent(0), ids.extent(1)}, torch::kInt32).clone();
  }
  /// Combine weights [n_tokens, top_k] (copy, the layer's dtype).
  at::Tensor weights() const {
    if (is_double)
      return torch::from_blob(const_cast<double*>(rec_d.weights.data()), {rec_d.weights.extent(0), rec_d.weights.extent(1)},
                              torch::kFloat64).clone();
    return torch::from_blob(const_cast<float*>(rec_f.weights.data()), {rec_f.weights.extent(0), rec_f.weights.extent(1)},
                            torch::kFloat32).clone();
  }
  /// Tokens per expert [n_experts] (int64).
  at::Tensor load() const {
    auto const& off = is_double ? rec_d.offsets : rec_f.offsets;
    auto out = torch::empty({off.extent(0) - 1}, torch::kInt64);
    for (std::int64_t e = 0; e + 1 < off.extent(0); ++e) out[e] = off[e + 1] - off[e];
    return out;
  }
};

namespace {

std::atomic<std::int64_t> g_forward_counter{0};

fl::moe::Gating make_gating(std::string const& mode, std::int64_t top_k, double output_scale, bool sigmoid_renormalize,
                            c10::optional<at::Tensor> const& selection_bias, std::int64_t n_experts, char const* fn) {
  fl::moe::Gating g;
  translate_errors([&] {
    g.mode = fl::moe::combine_mode_from_string(mode);
    return 0;
  });
  g.top_k = top_k;
  g.output_scale = static_cast<float>(output_scale);
  g.sigmoid_renormalize = sigmoid_renormalize;
  if (selection_bias.has_value() && selection_bias->defined()) {
    at::Tensor const& b = *selection_bias;
    TORCH_CHECK_VALUE(b.device().is_cpu() && b.dim() == 1 && b.size(0) == n_experts, fn,
                      ": argument 'selection_bias' must be a CPU tensor of shape [", n_experts, "] (n_experts), got ",
                      shape_str(b.sizes()), " on ", b.device());
    auto const bd = b.to(torch::kFloat64);  // n_experts values: a copy is negligible
    for (std::int64_t e = 0; e < n_experts; ++e) g.selection_bias.push_back(static_cast<float>(bd[e].item<double>()));
  }
  translate_errors([&] {
    g.validate(n_experts, fn);
    return 0;
  });
  return g;
}

template <class T>
fl::train::MoeParamsView<T> params_of(at::Tensor const& rw, at::Tensor const& rb, at::Tensor const& gate,
                                      at::Tensor const& up, at::Tensor const& down) {
  return {tview3<T>(gate), tview3<T>(up), tview3<T>(down), mview<T>(rw), vview<T>(rb)};
}

/// Validates the five parameter tensors of a MoE layer against x [n_tokens, d_model].
void check_params(char const* fn, at::Tensor const& x, at::Tensor const& rw, at::Tensor const& rb, at::Tensor const& gate,
                  at::Tensor const& up, at::Tensor const& down, at::ScalarType dt) {
  check_tensor(x, fn, "x", dt, {-1, -1}, "(n_tokens, d_model)");
  std::int64_t const d = x.size(1);
  check_tensor(gate, fn, "gate", dt, {-1, -1, d}, "(n_experts, d_expert, d_model)");
  std::int64_t const n = gate.size(0), m = gate.size(1);
  TORCH_CHECK_VALUE(n >= 1 && m >= 1, fn, ": argument 'gate' must have n_experts >= 1 and d_expert >= 1, got ",
                    shape_str(gate.sizes()));
  check_tensor(up, fn, "up", dt, {n, m, d}, "(n_experts, d_expert, d_model)");
  check_tensor(down, fn, "down", dt, {n, d, m}, "(n_experts, d_model, d_expert)");
  check_tensor(rw, fn, "router_weight", dt, {n, d}, "(n_experts, d_model)");
  check_tensor(rb, fn, "router_bias", dt, {n}, "(n_experts)");
}

template <class T, class Backend>
void forward_impl(MoeRouting& r, at::Tensor const& x, at::Tensor& y, fl::train::MoeParamsView<T> const& p,
                  fl::moe::RoutingRecord<T>& rec, fl::train::MoeActivations<T>* saved) {
  auto& ws = thread_workspace();
  ws.reserve(fl::train::moe_forward_workspace_bytes(p, r.gating.top_k, x.size(0), Backend{}));
  fl::train::moe_forward(p, r.gating, mview<T>(x), mview_mut<T>(y), rec, ws, saved, Backend{});
}

std::tuple<at::Tensor, c10::intrusive_ptr<MoeRouting>> moe_forward(
    at::Tensor x, at::Tensor router_weight, at::Tensor router_bias, at::Tensor gate, at::Tensor up, at::Tensor down,
    std::string mode, std::int64_t top_k, double output_scale, bool sigmoid_renormalize,
    c10::optional<at::Tensor> selection_bias, bool save_activations) {
  char const* fn = "moe_forward";
  auto const dt = layer_dtype(x, fn);
  check_params(fn, x, router_weight, router_bias, gate, up, down, dt);
  auto r = c10::make_intrusive<MoeRouting>();
  r->gating = make_gating(mode, top_k, output_scale, sigmoid_renormalize, selection_bias, gate.size(0), fn);
  r->forward_id = ++g_forward_counter;
  r->is_double = dt == at::kDouble;
  r->has_saved = save_activations;
  auto y = torch::empty_like(x);
  translate_errors([&] {
    if (r->is_double)
      forward_impl<double, fl::CpuScalar>(*r, x, y, params_of<double>(router_weight, router_bias, gate, up, down), r->rec_d,
                                          save_activations ? &r->saved_d : nullptr);
    else
      forward_impl<float, fl::CpuSimd<>>(*r, x, y, params_of<float>(router_weight, router_bias, gate, up, down), r->rec_f,
                                         save_activations ? &r->saved_f : nullptr);
    return 0;
  });
  r->x = Fingerprint::of(x);
  r->router_weight = Fingerprint::of(router_weight);
  r->router_bias = Fingerprint::of(router_bias);
  r->gate = Fingerprint::of(gate);
  r->up = Fingerprint::of(up);
  r->down = Fingerprint::of(down);
  return {y, r};
}

/// y = MoE(x) for inference (no routing record kept, no autograd): the CPU kernel of moe_infer, whose CUDA kernel is
/// in torch_ops_cuda.cpp.
at::Tensor moe_infer(at::Tensor x, at::Tensor router_weight, at::Tensor router_bias, at::Tensor gate, at::Tensor up,
                     at::Tensor down, std::string mode, std::int64_t top_k, double output_scale, bool sigmoid_renormalize,
                     c10::optional<at::Tensor> selection_bias) {
  return std::get<0>(moe_forward(std::move(x), std::move(router_weight), std::move(router_bias), std::move(gate),
                                 std::move(up), std::move(down), std::move(mode), top_k, output_scale,
                                 sigmoid_renormalize, std::move(selection_bias), false));
}

/// True when this library was built with the CUDA kernels of the ops (FLLM_TORCH_WITH_CUDA, python/torch_ops.cmake).
bool cuda_compiled() {
#ifdef FLLM_TORCH_WITH_CUDA
  return true;
#else
  return false;
#endif
}

template <class T, class Backend>
void backward_impl(MoeRouting const& r, at::Tensor const& x, at::Tensor const& dy, fl::train::MoeParamsView<T> const& p,
                   fl::moe::RoutingRecord<T> const& rec, fl::train::MoeActivations<T> const* saved,
                   std::vector<at::Tensor>& g) {
  auto& ws = thread_workspace();
  ws.reserve(fl::train::moe_backward_workspace_bytes(p, r.gating.top_k, x.size(0), Backend{}));
  fl::train::MoeGradsView<T> grads{mview_mut<T>(g[0]), tview3_mut<T>(g[3]), tview3_mut<T>(g[4]), tview3_mut<T>(g[5]),
                                   mview_mut<T>(g[1]), fl::vector_view(g[2].data_ptr<T>(), g[2].size(0)), {}};
  fl::train::moe_backward(p, r.gating, rec, mview<T>(x), mview<T>(dy), grads, ws, saved, Backend{});
}

/// Returns (dx, d router_weight, d router_bias, d gate, d up, d down).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_backward(
    c10::intrusive_ptr<MoeRouting> routing, at::Tensor x, at::Tensor dy, at::Tensor router_weight, at::Tensor router_bias,
    at::Tensor gate, at::Tensor up, at::Tensor down) {
  char const* fn = "moe_backward";
  TORCH_CHECK_VALUE(routing, fn, ": argument 'routing' is None");
  auto const dt = layer_dtype(x, fn);
  check_params(fn, x, router_weight, router_bias, gate, up, down, dt);
  check_tensor(dy, fn, "dy", dt, {x.size(0), x.size(1)}, "(n_tokens, d_model) like x");
  MoeRouting const& r = *routing;
  TORCH_CHECK_VALUE(r.is_double == (dt == at::kDouble), fn, ": argument 'routing' was recorded by another forward (",
                    r.is_double ? "float64" : "float32", " layer, these tensors are ", c10::toString(dt), ")");
  auto const mismatch = [&](Fingerprint const& saw, at::Tensor const& t, char const* arg) {
    TORCH_CHECK_VALUE(saw.matches(t), fn, ": argument 'routing' was recorded by another forward (#", r.forward_id,
                      "): argument '", arg, "' is not the tensor that forward used (or that tensor was freed), ",
                      "or was modified in place since (forward saw ", shape_str(saw.sizes), " at ", saw.data, " version ",
                      saw.version, "; got ", shape_str(t.sizes()), " at ", t.data_ptr(), " version ", t._version(), ")");
  };
  mismatch(r.x, x, "x");
  mismatch(r.router_weight, router_weight, "router_weight");
  mismatch(r.router_bias, router_bias, "router_bias");
  mismatch(r.gate, gate, "gate");
  mismatch(r.up, up, "up");
  mismatch(r.down, down, "down");
  std::vector<at::Tensor> g{torch::empty_like(x),    torch::empty_like(router_weight), torch::empty_like(router_bias),
                            torch::empty_like(gate), torch::empty_like(up),            torch::empty_like(down)};
  translate_errors([&] {
    if (r.is_double)
      backward_impl<double, fl::CpuScalar>(r, x, dy, params_of<double>(router_weight, router_bias, gate, up, down), r.rec_d,
                                           r.has_saved ? &r.saved_d : nullptr, g);
    else
      backward_impl<float, fl::CpuSimd<>>(r, x, dy, params_of<float>(router_weight, router_bias, gate, up, down), r.rec_f,
                                          r.has_saved ? &r.saved_f : nullptr, g);
    return 0;
  });
  return {g[0], g[1], g[2], g[3], g[4], g[5]};
}

template <class T>
std::vector<at::Tensor> par_impl(at::Tensor const& x, at::Tensor const& dg, at::Tensor const& du, at::Tensor const& dd,
                                 at::Tensor const& gate, at::Tensor const& up, at::Tensor const& down, at::Tensor const& rw,
                                 at::Tensor const& rb, std::int64_t top_k, double clip) {
  std::int64_t const n = gate.size(0), m = gate.size(1), d = gate.size(2);
  fl::ffn::DenseFfnView<T> dense{mview<T>(dg), mview<T>(du), mview<T>(dd)};
  // The library's PAR takes owning experts and router (ExpertWeights, Router): one copy of the experts per call,
  // O(weights), small next to the O(n_tokens x weights) teacher + experts evaluation it runs.
  fl::Tensor<T, 3> eg(tview3<T>(gate)), eu(tview3<T>(up)), ed(tview3<T>(down));
  fl::ffn::ExpertWeights<T> experts(std::move(eg), std::move(eu), std::move(ed), fl::ffn::ExpertPartition::contiguous(n * m, n));
  fl::moe::Router<T> router(fl::Matrix<T>(mview<T>(rw)), fl::Vector<T>(vview<T>(rb)));
  fl::train::ParLossConfig cfg;
  cfg.clip = clip;
  auto const res = fl::train::par_loss(mview<T>(x), dense, experts, router, top_k, cfg);
  auto opts = torch::TensorOptions().dtype(x.scalar_type());
  auto copy2 = [&](fl::Matrix<T> const& mtx) {
    return torch::from_blob(const_cast<T*>(mtx.data()), {mtx.extent(0), mtx.extent(1)}, opts).clone();
  };
  auto copy1 = [&](fl::Vector<T> const& v) { return torch::from_blob(const_cast<T*>(v.data()), {v.extent(0)}, opts).clone(); };
  auto labels = torch::from_blob(const_cast<std::int32_t*>(res.pseudo_label.data()),
                                 {res.pseudo_label.extent(0), res.pseudo_label.extent(1)}, torch::kInt32).clone();
  (void)d;
  return {torch::tensor(res.par_loss, opts), torch::tensor(res.balance_loss, opts), torch::tensor(res.label_accuracy, opts),
          copy2(res.grad_weight_par), copy1(res.grad_bias_par), copy2(res.grad_weight_balance), copy1(res.grad_bias_balance),
          labels};
}

/// PAR and balance losses of one layer (docs/math.md §3.2) with their router gradients. Returns (par_loss, balance_loss,
/// label_accuracy, d par / d W_r, d par / d b_r, d balance / d W_r, d balance / d b_r, pseudo_labels [T, K]).
std::vector<at::Tensor> par_loss(at::Tensor x, at::Tensor dense_gate, at::Tensor dense_up, at::Tensor dense_down,
                                 at::Tensor gate, at::Tensor up, at::Tensor down, at::Tensor router_weight,
                                 at::Tensor router_bias, std::int64_t top_k, double clip) {
  char const* fn = "par_loss";
  auto const dt = layer_dtype(x, fn);
  check_params(fn, x, router_weight, router_bias, gate, up, down, dt);
  std::int64_t const n = gate.size(0), m = gate.size(1), d = x.size(1);
  TORCH_CHECK_VALUE(x.size(0) >= 1, fn, ": argument 'x' has no tokens; the loss is a mean over tokens");
  check_tensor(dense_gate, fn, "dense_gate", dt, {n * m, d}, "(d_ff = n_experts * d_expert, d_model)");
  check_tensor(dense_up, fn, "dense_up", dt, {n * m, d}, "(d_ff, d_model)");
  check_tensor(dense_down, fn, "dense_down", dt, {d, n * m}, "(d_model, d_ff)");
  return translate_errors([&] {
    return dt == at::kDouble ? par_impl<double>(x, dense_gate, dense_up, dense_down, gate, up, down, router_weight, router_bias, top_k, clip)
                             : par_impl<float>(x, dense_gate, dense_up, dense_down, gate, up, down, router_weight, router_bias, top_k, clip);
  });
}

template <class T>
std::vector<at::Tensor> balance_impl(at::Tensor const& logits, std::int64_t k) {
  std::int64_t const t = logits.size(0), n = logits.size(1);
  auto grad = torch::empty_like(logits);
  T const* z = logits.data_ptr<T>();
  T* dz = grad.data_ptr<T>();
  std::vector<std::int32_t> ids(static_cast<std::size_t>(k));
  std::vector<double> p(static_cast<std::size_t>(n));
  double const inv_nt = 1.0 / static_cast<double>(n * t);
  double total = 0;
  for (std::int64_t r = 0; r < t; ++r) {
    T const* zr = z + r * n;
    // TopK of p = TopK of z, the library's ranking: larger first, lower index on ties, NaN last.
    fl::kernel::topk_indices([&](std::ptrdiff_t i) { return static_cast<double>(zr[i]); }, n, k, ids.data());
    double mx = -INFINITY, sum = 0, mass = 0;
    for (std::int64_t i = 0; i < n; ++i) mx = std::fmax(mx, static_cast<double>(zr[i]));
    for (std::int64_t i = 0; i < n; ++i) sum += (p[static_cast<std::size_t>(i)] = std::exp(static_cast<double>(zr[i]) - mx));
    for (auto& v : p) v /= sum;
    for (auto id : ids) mass += p[static_cast<std::size_t>(id)];
    total += mass;
    // Spec 3.2 "Balance": dL/dz_j = p_j (1[j in TopK] - sum_{i in TopK} p_i) / (N T).
    for (std::int64_t i = 0; i < n; ++i) {
      bool const in = std::find(ids.begin(), ids.end(), static_cast<std::int32_t>(i)) != ids.end();
      dz[r * n + i] = static_cast<T>(p[static_cast<std::size_t>(i)] * ((in ? 1.0 : 0.0) - mass) * inv_nt);
    }
  }
  return {torch::tensor(total * inv_nt, torch::TensorOptions().dtype(logits.scalar_type())), grad};
}

/// The paper code's balance term L_bal = mean_{t,n} 1[n in TopK(p_t)] p_tn (docs/math.md §3.2) on router logits
/// [n_tokens, n_experts], and its gradient w.r.t. the logits. Returns (loss, d loss / d logits).
std::vector<at::Tensor> balance_loss(at::Tensor logits, std::int64_t top_k) {
  char const* fn = "balance_loss";
  auto const dt = layer_dtype(logits, fn);
  check_tensor(logits, fn, "logits", dt, {-1, -1}, "(n_tokens, n_experts)");
  TORCH_CHECK_VALUE(logits.size(0) >= 1 && logits.size(1) >= 1, fn,
                    ": argument 'logits' must have at least one token and one expert, got ", shape_str(logits.sizes()));
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= logits.size(1), fn, ": top_k = ", top_k, " must be in [1, n_experts = ",
                    logits.size(1), "]");
  return dt == at::kDouble ? balance_impl<double>(logits, top_k) : balance_impl<float>(logits, top_k);
}

}  // namespace

TORCH_LIBRARY(factorllm, m) {
  m.class_<MoeRouting>("MoeRouting")
      .def("n_tokens", &MoeRouting::n_tokens)
      .def("id", &MoeRouting::id)
      .def("mode", &MoeRouting::mode)
      .def("top_k", &MoeRouting::top_k)
      .def("ids", &MoeRouting::ids)
      .def("weights", &MoeRouting::weights)
      .def("load", &MoeRouting::load);
  m.def("moe_forward(Tensor x, Tensor router_weight, Tensor router_bias, Tensor gate, Tensor up, Tensor down, str mode, "
        "int top_k, float output_scale, bool sigmoid_renormalize, Tensor? selection_bias, bool save_activations) -> "
        "(Tensor y, __torch__.torch.classes.factorllm.MoeRouting routing)",
        &moe_forward);
  m.def("moe_backward(__torch__.torch.classes.factorllm.MoeRouting routing, Tensor x, Tensor dy, Tensor router_weight, "
        "Tensor router_bias, Tensor gate, Tensor up, Tensor down) -> (Tensor dx, Tensor d_router_weight, "
        "Tensor d_router_bias, Tensor d_gate, Tensor d_up, Tensor d_down)",
        &moe_backward);
  m.def("par_loss(Tensor x, Tensor dense_gate, Tensor dense_up, Tensor dense_down, Tensor gate, Tensor up, Tensor down, "
        "Tensor router_weight, Tensor router_bias, int top_k, float clip) -> Tensor[]",
        &par_loss);
  m.def("balance_loss(Tensor logits, int top_k) -> Tensor[]", &balance_loss);
  m.def("moe_infer(Tensor x, Tensor router_weight, Tensor router_bias, Tensor gate, Tensor up, Tensor down, str mode, "
        "int top_k, float output_scale, bool sigmoid_renormalize, Tensor? selection_bias) -> Tensor y",
        &moe_infer);
  m.def("cuda_compiled() -> bool", &cuda_compiled);
}
