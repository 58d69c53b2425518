// SPDX-License-Identifier: Apache-2.0
// The Prior-Approximate Router (PAR) loss, the balance term and their analytic router gradients (docs/math.md §3.2).
//
// The teacher f and the router both see the layer's real FFN input x. The paper's code feeds each layer's
// dense-teacher OUTPUT forward as the next layer's router/teacher input (docs/math.md §6, quirk Q1); that is a bug
// and is deliberately not reproduced here. Reductions follow the batch-size-1 semantics of the code
// (mean over all tokens; quirk Q4 is not reproduced).
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../backend/ops.hpp"
#include "../backend/scalar/par_loss.hpp"
#include "../backend/traits.hpp"
#include "../core/error.hpp"
#include "../core/kernel_args.hpp"
#include "../core/tensor.hpp"
#include "../core/type_traits.hpp"
#include "../core/workspace.hpp"
#include "../ffn/factorize.hpp"
#include "../moe/router.hpp"

namespace factorllm {
namespace train {

// The PAR configuration and its target are kernel arguments (core/kernel_args.hpp) and part of this API.
using factorllm::par_target_q;
using factorllm::ParLossConfig;
using factorllm::ParLossValues;
using factorllm::ParTarget;

/// Everything one PAR evaluation reports: the losses (ParLossValues) and these tensors. Reused across calls of
/// the same shape without reallocating.
template <class A>
struct ParLossResult : ParLossValues {
  Matrix<A> grad_weight;           // [n_experts, d_model] d total / d W_r
  Vector<A> grad_bias;             // [n_experts]          d total / d b_r
  Matrix<A> grad_weight_par;       // [n_experts, d_model] d par_loss / d W_r
  Vector<A> grad_bias_par;         // [n_experts]
  Matrix<A> grad_weight_balance;   // [n_experts, d_model] d balance_loss / d W_r
  Vector<A> grad_bias_balance;     // [n_experts]
  Matrix<A> mse_to_target;         // [n_tokens, n_experts] delta_n = mean_d (e_n - f / floor(N/K))^2
  Matrix<std::int32_t> pseudo_label;  // [n_tokens, top_k] the oracle's experts, smallest MSE first
  Matrix<std::int32_t> router_topk;   // [n_tokens, top_k] the router's experts, largest logit first

  /// Makes every tensor have the given sizes (allocating only on change).
  void resize(std::ptrdiff_t n_tokens, std::ptrdiff_t d_model, std::ptrdiff_t n_experts, std::ptrdiff_t top_k) {
    auto fit2 = [](auto& m, std::ptrdiff_t r, std::ptrdiff_t c) {
      if (m.extents() != std::array<std::ptrdiff_t, 2>{r, c}) m = std::decay_t<decltype(m)>({r, c});
    };
    auto fit1 = [](auto& v, std::ptrdiff_t r) {
      if (v.extent(0) != r) v = std::decay_t<decltype(v)>({r});
    };
    fit2(grad_weight, n_experts, d_model);
    fit2(grad_weight_par, n_experts, d_model);
    fit2(grad_weight_balance, n_experts, d_model);
    fit1(grad_bias, n_experts);
    fit1(grad_bias_par, n_experts);
    fit1(grad_bias_balance, n_experts);
    fit2(mse_to_target, n_tokens, n_experts);
    fit2(pseudo_label, n_tokens, top_k);
    fit2(router_topk, n_tokens, top_k);
  }

  /// The kernel-argument view of the tensors (what a PAR kernel writes).
  ParLossOutView<A> view() noexcept {
    return ParLossOutView<A>{grad_weight.view(),         grad_bias.view(),     grad_weight_par.view(),
                             grad_bias_par.view(),       grad_weight_balance.view(), grad_bias_balance.view(),
                             mse_to_target.view(),       pseudo_label.view(),  router_topk.view()};
  }
  operator ParLossOutView<A>() noexcept { return view(); }  // NOLINT: implicit, like Router -> RouterView
};

/// Bytes of scratch `par_loss` needs on Backend (independent of n_tokens).
/// \throws value_error unless d_model, d_ff, n_experts >= 1 and 1 <= top_k <= n_experts, or if the size overflows.
/// \tparam T  weight format of the experts (f32 by default)
template <class Backend = CpuScalar, class T = float>
std::size_t par_loss_workspace_bytes(std::ptrdiff_t d_model, std::ptrdiff_t d_ff, std::ptrdiff_t n_experts,
                                     std::ptrdiff_t top_k, Backend const& = {}) {
  if (d_model < 1 || d_ff < 1 || n_experts < 1 || top_k < 1 || top_k > n_experts)
    throw value_error(detail::concat("par_loss_workspace_bytes: need d_model, d_ff, n_experts >= 1 and top_k in [1, ",
                                     "n_experts]; got ", d_model, ", ", d_ff, ", ", n_experts, ", ", top_k));
  // The largest region is 2 * n_experts * (d_model + 1) doubles: bound the factors so no size computation overflows.
  constexpr std::ptrdiff_t kMaxElements = std::ptrdiff_t{1} << 40;
  if (d_model >= kMaxElements || d_ff > kMaxElements || n_experts > kMaxElements / (d_model + 1))
    throw value_error("par_loss_workspace_bytes: sizes too large: the workspace size would overflow");
  return kernel::ParLoss<Backend>::template workspace<T, activation_t<T>>(d_model, d_ff, n_experts, top_k).bytes();
}

}  // namespace train

namespace detail {
/// Checks every argument of train::par_loss (naming the bad one).
template <class W, class A>
void validate_par_loss(MatrixView<A const> x, ffn::DenseFfnView<W> const& dense, ffn::ExpertWeights<W> const& experts,
              moe::Router<A> const& router, std::ptrdiff_t top_k, ParLossConfig const& config) {
  char const* fn = "par_loss";
  dense.validate(fn);
  if (x.rows() < 1) throw value_error("par_loss: argument 'x' has no tokens; the loss is a mean over tokens");
  detail::require_shape(x, {x.rows(), dense.d_model()}, fn, "x");
  if (experts.d_model() != dense.d_model() || experts.d_ff() != dense.d_ff())
    throw shape_error(detail::concat(fn, ": argument 'experts' has d_model ", experts.d_model(), ", d_ff ", experts.d_ff(),
                                     "; the dense FFN has d_model ", dense.d_model(), ", d_ff ", dense.d_ff()));
  if (router.n_experts() != experts.n_experts() || router.d_model() != experts.d_model())
    throw shape_error(detail::concat(fn, ": argument 'router' has shape ",
                                     factorllm::detail::shape_string({router.n_experts(), router.d_model()}), ", expected ",
                                     factorllm::detail::shape_string({experts.n_experts(), experts.d_model()})));
  if (top_k < 1 || top_k > experts.n_experts())
    throw value_error(detail::concat(fn, ": top_k = ", top_k, " must be in [1, n_experts = ", experts.n_experts(), "]"));
  if (!(config.clip > 0 && config.clip < 0.5))
    throw value_error(detail::concat(fn, ": config.clip = ", config.clip, " must be in (0, 0.5)"));
  if (!std::isfinite(config.par_weight) || !std::isfinite(config.balance_weight))
    throw value_error(detail::concat(fn, ": config weights must be finite"));
}
}  // namespace detail

namespace train {

/// Computes the PAR and balance losses of one layer over the tokens x and their gradients w.r.t. the
/// router weight and bias, into `out` (resized as needed), with caller-provided scratch.
/// \param x       [n_tokens >= 1, d_model] the layer's FFN input (post-attention RMSNorm output)
/// \param dense   the frozen dense FFN (teacher)
/// \param experts the current experts (factorized from `dense` or trained since)
/// \param router  the layer's router
/// \param top_k   K of the K-of-N gating; the MSE target is f / floor(N/K) (docs/math.md §3.2, quirk Q5)
/// \throws shape_error / value_error on inconsistent inputs; backend_error if ws is too small.
template <class Backend = CpuScalar, class W, class A>
void par_loss(type_identity_t<MatrixView<A const>> x, ffn::DenseFfnView<W> const& dense, ffn::ExpertWeights<W> const& experts,
              moe::Router<A> const& router, std::ptrdiff_t top_k, ParLossConfig const& config, ParLossResult<A>& out,
              Workspace& ws, Backend const& = {}) {
  static_assert(is_backend_v<Backend>, "par_loss: unknown backend tag");
  detail::validate_par_loss(x, dense, experts, router, top_k, config);
  detail::require_workspace_space<Backend>(ws, "par_loss");
  out.resize(x.rows(), experts.d_model(), experts.n_experts(), top_k);
  static_cast<ParLossValues&>(out) = kernel::ParLoss<Backend>::run(
      x, dense.gate, dense.up, dense.down, experts.view(), router.view(), top_k, config, out.view(), ws.span());
}

/// Convenience overload: allocates the result and the workspace.
template <class Backend = CpuScalar, class W, class A>
ParLossResult<A> par_loss(type_identity_t<MatrixView<A const>> x, ffn::DenseFfnView<W> const& dense, ffn::ExpertWeights<W> const& experts,
                          moe::Router<A> const& router, std::ptrdiff_t top_k, ParLossConfig const& config = {},
                          Backend const& b = {}) {
  detail::validate_par_loss(x, dense, experts, router, top_k, config);
  Workspace ws(par_loss_workspace_bytes<Backend, W>(dense.d_model(), dense.d_ff(), experts.n_experts(), top_k));
  ParLossResult<A> out;
  par_loss(x, dense, experts, router, top_k, config, out, ws, b);
  return out;
}

}  // namespace train
}  // namespace factorllm
