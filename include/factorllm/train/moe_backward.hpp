// SPDX-License-Identifier: Apache-2.0
// Training the MoE layer: a forward on parameter views that records its routing, and the backward that turns
// dL/dy into dL/dx, every expert's dL/dW (only from the tokens routed to it) and the router's dL/dW_r, dL/db_r.
//
// Gradient semantics (docs/math.md §2.3): TopK selection is piecewise constant, so gradients flow through the expert
// outputs and through the combine weights only. In the softmax-weighted modes (softmax_topk,
// softmax_topk_renorm, topk_softmax) and sigmoid_topk the weights depend on the logits, so the router learns from
// the task loss. In `code_ref` the weights are the constant floor(N/K): the router gets exactly zero gradient from
// the task loss, as in the paper's code (its router learns only from the PAR/balance losses, train/par_loss.hpp).
// There is no straight-through estimator (the paper's `hard=False` path is unused there as well).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../backend/ops.hpp"
#include "../backend/scalar/moe_backward.hpp"
#include "../backend/simd/moe_backward.hpp"
#include "../backend/traits.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/kernel_args.hpp"
#include "../core/tensor.hpp"
#include "../core/type_traits.hpp"
#include "../core/tensor_view.hpp"
#include "../core/workspace.hpp"
#include "../ffn/factorize.hpp"
#include "../moe/gating.hpp"
#include "../moe/moe_ffn.hpp"
#include "../moe/router.hpp"
#include "../moe/routing.hpp"

namespace factorllm {
namespace train {

// The parameter and gradient views are kernel arguments (core/kernel_args.hpp) and part of this API.
using factorllm::MoeGradsView;
using factorllm::MoeParamsView;

/// Expert pre-activations of one training forward, kept so the backward does not recompute them:
/// row r is slot record.slots[r] (the grouped order of moe::RoutingRecord), column i is neuron i of that
/// slot's expert. Costs 2 * n_tokens * top_k * d_expert values; saves two of the backward's eight GEMMs.
template <class A>
struct MoeActivations {
  Matrix<A> gate_pre;  // [n_tokens * top_k, d_expert]  x W_gate,e^T
  Matrix<A> up_pre;    // [n_tokens * top_k, d_expert]  x W_up,e^T

  /// Makes both matrices [n_slots, d_expert] (allocating only on change).
  void resize(std::ptrdiff_t n_slots, std::ptrdiff_t d_expert) {
    if (gate_pre.extents() != std::array<std::ptrdiff_t, 2>{n_slots, d_expert}) gate_pre = Matrix<A>({n_slots, d_expert});
    if (up_pre.extents() != std::array<std::ptrdiff_t, 2>{n_slots, d_expert}) up_pre = Matrix<A>({n_slots, d_expert});
  }
  /// The kernel-argument views (writable, for the forward; read-only, for the backward).
  MoeActivationsView<A> view() noexcept { return MoeActivationsView<A>{gate_pre.view(), up_pre.view()}; }
  MoeActivationsView<A const> cview() const noexcept { return MoeActivationsView<A const>{gate_pre.cview(), up_pre.cview()}; }
};

/// Views the parameters of owning experts and router (e.g. those of a moe::MoeFfn) for training calls.
template <class W>
MoeParamsView<W> params_view(ffn::ExpertWeights<W> const& experts, moe::Router<activation_t<W>> const& router) {
  return MoeParamsView<W>{experts.gate_tensor().cview(), experts.up_tensor().cview(), experts.down_tensor().cview(),
                          router.weight(), router.bias()};
}

}  // namespace train

namespace detail {

template <class V>
void require_dense(V const& v, char const* fn, char const* arg) {
  if (!v.is_contiguous())
    throw shape_error(concat(fn, ": argument '", arg, "' must be dense row-major (contiguous); it has padded strides"));
}

template <class W>
void validate_moe_params(MoeParamsView<W> const& p, char const* fn) {
  std::ptrdiff_t const n = p.n_experts(), m = p.d_expert(), d = p.d_model();
  if (n < 1 || m < 1 || d < 1)
    throw shape_error(concat(fn, ": argument 'gate' has shape ", shape_string({n, m, d}),
                             ", expected [n_experts >= 1, d_expert >= 1, d_model >= 1]"));
  require_shape(p.up, {n, m, d}, fn, "up");
  require_shape(p.down, {n, d, m}, fn, "down");
  require_shape(p.router_weight, {n, d}, fn, "router_weight");
  require_shape(p.router_bias, {n}, fn, "router_bias");
  require_dense(p.gate, fn, "gate");
  require_dense(p.up, fn, "up");
  require_dense(p.down, fn, "down");
  require_dense(p.router_weight, fn, "router_weight");
}

/// Checks that `record` has the shapes of a forward over n_tokens tokens with these n_experts and top_k, and
/// that its groups are internally consistent (so that no index it holds can leave its arrays).
template <class A>
void validate_routing_record(moe::RoutingRecord<A> const& record, std::ptrdiff_t n_tokens, std::ptrdiff_t n,
                     std::ptrdiff_t k, char const* fn) {
  require_shape(record.logits.cview(), {n_tokens, n}, fn, "record.logits");
  require_shape(record.ids.cview(), {n_tokens, k}, fn, "record.ids");
  require_shape(record.weights.cview(), {n_tokens, k}, fn, "record.weights");
  require_shape(record.offsets.cview(), {n + 1}, fn, "record.offsets");
  require_shape(record.slots.cview(), {n_tokens * k}, fn, "record.slots");
  for (std::ptrdiff_t t = 0; t < n_tokens; ++t)
    for (std::ptrdiff_t j = 0; j < k; ++j) {
      std::int32_t const e = record.ids(t, j);
      if (e < 0 || e >= n)
        throw value_error(concat(fn, ": argument 'record' is not from a forward of this layer: ids(", t, ", ", j, ") = ", e,
                                 " is outside [0, n_experts = ", n, ")"));
      for (std::ptrdiff_t q = 0; q < j; ++q)
        if (record.ids(t, q) == e)
          throw value_error(concat(fn, ": argument 'record' is corrupt: token ", t, " selects expert ", e, " twice"));
    }
  if (record.offsets[0] != 0 || record.offsets[n] != n_tokens * k)
    throw value_error(concat(fn, ": argument 'record' is corrupt: offsets must run from 0 to n_tokens * top_k = ",
                             n_tokens * k, ", got ", record.offsets[0], " .. ", record.offsets[n]));
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    if (record.offsets[e + 1] < record.offsets[e])
      throw value_error(concat(fn, ": argument 'record' is corrupt: offsets decrease at expert ", e));
    for (std::int64_t r = record.offsets[e]; r < record.offsets[e + 1]; ++r) {
      std::int32_t const s = record.slots[r];
      // Grouping is a stable counting sort: slots of one expert are strictly increasing (so none repeats).
      if (s < 0 || s >= n_tokens * k || record.ids[s] != e || (r > record.offsets[e] && s <= record.slots[r - 1]))
        throw value_error(concat(fn, ": argument 'record' is corrupt: slots[", r, "] = ", s,
                                 " does not belong to expert ", e, " in increasing order"));
    }
  }
}

}  // namespace detail

namespace train {

/// Returns the bytes of scratch `moe_forward` needs for calls of up to max_tokens tokens on Backend.
/// \throws value_error if max_tokens < 0 or top_k < 1; shape_error for inconsistent parameter views.
template <class Backend = CpuScalar, class W>
std::size_t moe_forward_workspace_bytes(MoeParamsView<W> const& params, std::ptrdiff_t top_k,
                                        std::ptrdiff_t max_tokens, Backend const& = {}) {
  static_assert(is_backend_v<Backend>, "moe_forward_workspace_bytes: unknown backend tag");
  detail::validate_moe_params(params, "moe_forward_workspace_bytes");
  if (max_tokens < 0 || top_k < 1)
    throw value_error(detail::concat("moe_forward_workspace_bytes: need max_tokens >= 0 and top_k >= 1, got ", max_tokens,
                                     " and ", top_k));
  return kernel::MoeTrainForward<Backend>::workspace(params, top_k, max_tokens).bytes();
}

/// Returns the bytes of scratch `moe_backward` needs for calls of up to max_tokens tokens on Backend.
/// \throws value_error if max_tokens < 0 or top_k < 1; shape_error for inconsistent parameter views.
template <class Backend = CpuScalar, class W>
std::size_t moe_backward_workspace_bytes(MoeParamsView<W> const& params, std::ptrdiff_t top_k,
                                         std::ptrdiff_t max_tokens, Backend const& = {}) {
  static_assert(is_backend_v<Backend>, "moe_backward_workspace_bytes: unknown backend tag");
  detail::validate_moe_params(params, "moe_backward_workspace_bytes");
  if (max_tokens < 0 || top_k < 1)
    throw value_error(detail::concat("moe_backward_workspace_bytes: need max_tokens >= 0 and top_k >= 1, got ", max_tokens,
                                     " and ", top_k));
  return kernel::MoeBackward<Backend>::workspace(params, top_k, max_tokens).bytes();
}

/// Computes y = MoE(x) like moe::MoeFfn::forward (same routing, same combine) but reads the parameters through
/// views, and always records the routing, which the backward needs. Optionally keeps the experts'
/// pre-activations so that the backward does not recompute them.
/// \param params  parameter views (dense row-major), \param gating  mode, top_k, bias, scale (validated)
/// \param x       [n_tokens, d_model] (any row stride; n_tokens may be 0)
/// \param y       [n_tokens, d_model] out (any row stride); must not alias x
/// \param record  out: this call's routing (resized only when the shapes change)
/// \param ws      scratch of at least moe_forward_workspace_bytes(params, top_k, n_tokens) bytes
/// \param saved   optional out: pre-activations [n_tokens * top_k, d_expert] in record.slots order
/// \param exec    who runs the kernel's tasks (OpenMP by default; the results are the same bits for any executor)
/// \throws shape_error / value_error for inconsistent arguments; backend_error if ws is too small.
template <class Backend = CpuScalar, class W, class A>
void moe_forward(MoeParamsView<W> const& params, moe::Gating const& gating, MatrixView<A const> x, MatrixView<A> y,
                 moe::RoutingRecord<A>& record, Workspace& ws,
                 type_identity_t<MoeActivations<A>>* saved = nullptr, Backend const& b = {},
                 Executor const& exec = Executor::openmp()) {
  static_assert(is_backend_v<Backend>, "moe_forward: unknown backend tag");
  static_assert(std::is_same_v<A, activation_t<W>>, "moe_forward: activations must be activation_t<W>");
  char const* fn = "moe_forward";
  detail::validate_moe_params(params, fn);
  gating.validate(params.n_experts(), fn);
  detail::require_shape(x, {x.rows(), params.d_model()}, fn, "x");
  detail::require_shape(y, {x.rows(), params.d_model()}, fn, "y");
  std::size_t const need = moe_forward_workspace_bytes(params, gating.top_k, x.rows(), b);
  if (ws.bytes() < need)
    throw backend_error(detail::concat(fn, ": workspace of ", ws.bytes(), " bytes is too small for ", x.rows(),
                                       " tokens (needs ", need, "; use moe_forward_workspace_bytes())"));
  detail::require_workspace_space<Backend>(ws, fn);
  record.resize(x.rows(), params.n_experts(), gating.top_k);
  MoeActivationsView<A> saved_view;
  if (saved != nullptr) {
    saved->resize(x.rows() * gating.top_k, params.d_expert());
    saved_view = saved->view();
  }
  kernel::MoeTrainForward<Backend>::run(params, gating.params(), x, y, record.view(), saved != nullptr ? &saved_view : nullptr,
                                        ws.span(), exec);
}

/// Computes the gradients of a loss L w.r.t. the inputs and parameters of the MoE layer, given dL/dy and the
/// routing that moe_forward (or moe::MoeFfn::forward) recorded for the same x and parameters. Gradients are
/// written, not accumulated. See the header comment for which modes give the router a gradient.
/// \param params  parameter views (dense row-major); must be the ones the forward used
/// \param gating  the forward's gating (validated)
/// \param record  the forward's routing: shapes [n_tokens, n_experts], [n_tokens, top_k], [n_experts + 1],
///                [n_tokens * top_k] and its groups are checked; that it comes from THIS x is the caller's
///                contract (the PyTorch ops check it by tensor identity)
/// \param x       [n_tokens, d_model] the forward's input; \param dy  [n_tokens, d_model] dL/dy (any row strides)
/// \param grads   outputs (see MoeGradsView): x [n_tokens, d_model] (any row stride), weights and router dense
/// \param ws      scratch of at least moe_backward_workspace_bytes(params, top_k, n_tokens) bytes
/// \param saved   optional: the forward's pre-activations (then two GEMMs per expert are skipped)
/// \param exec    who runs the kernel's tasks (OpenMP by default; the results are the same bits for any executor)
/// \throws shape_error for a mis-shaped argument (naming it, expected vs given), value_error for a record that
///         does not fit this call, backend_error if ws is too small.
template <class Backend = CpuScalar, class W, class A>
void moe_backward(MoeParamsView<W> const& params, moe::Gating const& gating, moe::RoutingRecord<A> const& record,
                  MatrixView<A const> x, MatrixView<A const> dy, MoeGradsView<A> const& grads, Workspace& ws,
                  type_identity_t<MoeActivations<A>> const* saved = nullptr, Backend const& b = {},
                  Executor const& exec = Executor::openmp()) {
  static_assert(is_backend_v<Backend>, "moe_backward: unknown backend tag");
  static_assert(std::is_same_v<A, activation_t<W>>, "moe_backward: activations must be activation_t<W>");
  char const* fn = "moe_backward";
  detail::validate_moe_params(params, fn);
  gating.validate(params.n_experts(), fn);
  std::ptrdiff_t const t = x.rows(), n = params.n_experts(), m = params.d_expert(), d = params.d_model(), k = gating.top_k;
  detail::require_shape(x, {t, d}, fn, "x");
  detail::require_shape(dy, {t, d}, fn, "dy");
  detail::validate_routing_record(record, t, n, k, fn);
  if (saved != nullptr) {
    detail::require_shape(saved->gate_pre.cview(), {t * k, m}, fn, "saved.gate_pre");
    detail::require_shape(saved->up_pre.cview(), {t * k, m}, fn, "saved.up_pre");
  }
  detail::require_shape(grads.x, {t, d}, fn, "grads.x");
  detail::require_shape(grads.gate, {n, m, d}, fn, "grads.gate");
  detail::require_shape(grads.up, {n, m, d}, fn, "grads.up");
  detail::require_shape(grads.down, {n, d, m}, fn, "grads.down");
  detail::require_shape(grads.router_weight, {n, d}, fn, "grads.router_weight");
  detail::require_shape(grads.router_bias, {n}, fn, "grads.router_bias");
  detail::require_dense(grads.gate, fn, "grads.gate");
  detail::require_dense(grads.up, fn, "grads.up");
  detail::require_dense(grads.down, fn, "grads.down");
  detail::require_dense(grads.router_weight, fn, "grads.router_weight");
  if (grads.wants_logits()) detail::require_shape(grads.logits, {t, n}, fn, "grads.logits");
  std::size_t const need = moe_backward_workspace_bytes(params, k, t, b);
  if (ws.bytes() < need)
    throw backend_error(detail::concat(fn, ": workspace of ", ws.bytes(), " bytes is too small for ", t, " tokens (needs ",
                                       need, "; use moe_backward_workspace_bytes())"));
  detail::require_workspace_space<Backend>(ws, fn);
  MoeActivationsView<A const> saved_view;
  if (saved != nullptr) saved_view = saved->cview();
  kernel::MoeBackward<Backend>::run(params, gating.params(), record.cview(), x, dy, saved != nullptr ? &saved_view : nullptr,
                                    grads, ws.span(), exec);
}

/// moe_backward for a moe::MoeFfn whose forward recorded `record` (views its experts and router).
template <class Backend = CpuScalar, class T, class LayerBackend, class A>
void moe_backward(moe::MoeFfn<T, LayerBackend> const& layer, moe::RoutingRecord<A> const& record, MatrixView<A const> x,
                  MatrixView<A const> dy, MoeGradsView<A> const& grads, Workspace& ws, Backend const& b = {},
                  Executor const& exec = Executor::openmp()) {
  moe_backward(params_view(layer.experts(), layer.router()), layer.gating(), record, x, dy, grads, ws, nullptr, b, exec);
}

}  // namespace train
}  // namespace factorllm
