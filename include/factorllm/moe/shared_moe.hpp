// SPDX-License-Identifier: Apache-2.0
// SharedExpertMoe: S always-on (shared) experts plus a K-of-N routed MoE layer, the DeepSeekMoE layout; and builders
// that split one factorized partition of S + N experts into the two parts.
//
// y = sum_{s < S} E_s^shared(x) + MoeFfn(x): the shared experts run on every token with weight 1 and no routing, the
// routed part is an ordinary moe::MoeFfn (router, gating, any combine mode). With experts of equal size
// d_expert = d_ff / (S + N), one token costs (S + K) / (S + N) of the dense FFN's FLOPs (router excluded, as
// MoeFfn::ffn_flops_fraction). With K = N and code_ref gating (weight floor(N/N) = 1) the layer computes
// sum of all S + N experts = the dense FFN (docs/math.md §1.2), up to float summation order.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>

#include "../backend/tags.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "../core/workspace.hpp"
#include "../ffn/factorize.hpp"
#include "../ffn/permutation.hpp"
#include "../ffn/swiglu.hpp"
#include "gating.hpp"
#include "moe_ffn.hpp"
#include "router.hpp"
#include "routing.hpp"

namespace factorllm {
namespace moe {

/// A mixture-of-experts SwiGLU layer with S always-on shared experts and N routed experts (file comment).
/// Immutable after construction and safe to share across threads; each concurrent caller brings its own Workspace.
/// \tparam T        weight type (float, double, bf16)
/// \tparam Backend  backend of both the routed layer and the shared experts' SwiGLU
template <class T, class Backend = DefaultCpu>
class SharedExpertMoe {
  static_assert(is_backend_v<Backend>, "SharedExpertMoe: unknown backend tag");

 public:
  using weight_type = T;
  using activation_type = activation_t<T>;
  using A = activation_type;

  /// \param shared  S >= 1 shared experts (their partition is not used by the forward)
  /// \param routed  the routed K-of-N layer
  /// \throws shape_error unless shared and routed experts have the same d_model and d_expert.
  SharedExpertMoe(ffn::ExpertWeights<T> shared, MoeFfn<T, Backend> routed)
      : shared_(std::move(shared)), routed_(std::move(routed)) {
    if (shared_.gate_tensor().empty())
      throw value_error("SharedExpertMoe: argument 'shared' holds no experts (default-constructed)");
    if (shared_.d_model() != routed_.d_model() || shared_.d_expert() != routed_.d_expert())
      throw shape_error(detail::concat("SharedExpertMoe: argument 'shared' has [d_expert, d_model] ",
                                       detail::shape_string({shared_.d_expert(), shared_.d_model()}), ", expected ",
                                       detail::shape_string({routed_.d_expert(), routed_.d_model()}),
                                       " (the routed experts' sizes)"));
  }

  std::ptrdiff_t d_model() const noexcept { return routed_.d_model(); }
  std::ptrdiff_t d_expert() const noexcept { return routed_.d_expert(); }
  std::ptrdiff_t n_shared() const noexcept { return shared_.n_experts(); }
  std::ptrdiff_t n_routed() const noexcept { return routed_.n_experts(); }
  std::ptrdiff_t top_k() const noexcept { return routed_.top_k(); }
  ffn::ExpertWeights<T> const& shared() const noexcept { return shared_; }
  MoeFfn<T, Backend> const& routed() const noexcept { return routed_; }

  /// Fraction of the dense FFN's FLOPs one token costs in the experts: (S + K) / (S + N).
  double ffn_flops_fraction() const noexcept {
    return static_cast<double>(n_shared() + top_k()) / static_cast<double>(n_shared() + n_routed());
  }

  /// Bytes of scratch `forward` needs for calls of up to max_tokens tokens: the routed layer's workspace or one
  /// shared expert's SwiGLU workspace (they run one after the other), then one [max_tokens, d_model] buffer.
  /// \throws value_error if max_tokens < 0 or so large that the size would overflow.
  std::size_t workspace_bytes(std::ptrdiff_t max_tokens) const { return workspace_bytes(max_tokens, Executor::openmp()); }

  /// As above, for calls through executors of up to exec.n_workers() workers.
  std::size_t workspace_bytes(std::ptrdiff_t max_tokens, Executor const& exec) const {
    std::size_t const head = scratch_offset(max_tokens, exec);
    std::size_t const buffer = detail::WorkspaceLayout()
                                   .add(sizeof(A), static_cast<std::size_t>(max_tokens) * static_cast<std::size_t>(d_model()))
                                   .bytes();
    if (head > std::numeric_limits<std::size_t>::max() - buffer)
      throw value_error("SharedExpertMoe::workspace_bytes: the workspace size would overflow");
    return head + buffer;
  }

  /// Computes y = sum_s E_s^shared(x) + routed(x) for every row of x; the shared sum is added after the routed
  /// output, expert by expert in index order (deterministic).
  /// \param x       [n_tokens, d_model] (n_tokens may be 0)
  /// \param y       [n_tokens, d_model] out; must not alias x
  /// \param ws      scratch of at least workspace_bytes(n_tokens) bytes (backend_error otherwise)
  /// \param record  optional: receives the routed layer's routing of this call (routed expert ids 0 .. N-1)
  void forward(MatrixView<A const> x, MatrixView<A> y, Workspace& ws, RoutingRecord<A>* record = nullptr) const {
    forward(x, y, ws, Executor::openmp(), record);
  }

  /// forward on the caller's executor (bitwise the same output for any executor); ws must hold
  /// workspace_bytes(n_tokens, exec).
  void forward(MatrixView<A const> x, MatrixView<A> y, Workspace& ws, Executor const& exec,
               RoutingRecord<A>* record = nullptr) const {
    detail::require_shape(x, {x.rows(), d_model()}, "SharedExpertMoe::forward", "x");
    detail::require_shape(y, {x.rows(), d_model()}, "SharedExpertMoe::forward", "y");
    std::ptrdiff_t const n_tokens = x.rows(), d = d_model();
    if (ws.bytes() < workspace_bytes(n_tokens, exec))
      throw backend_error(detail::concat("SharedExpertMoe::forward: workspace of ", ws.bytes(), " bytes is too small for ",
                                         n_tokens, " tokens on ", exec.n_workers(), " worker(s) (needs ",
                                         workspace_bytes(n_tokens, exec), "; use workspace_bytes(max_tokens, exec))"));
    routed_.forward(x, y, ws, exec, record);
    if (n_tokens == 0) return;
    // The buffer lies past the region the routed layer and the SwiGLU kernel use (their cursors start at the
    // workspace's beginning and take exactly their reported layout), so it survives both calls.
    MatrixView<A> tmp = matrix_view(reinterpret_cast<A*>(ws.data() + scratch_offset(n_tokens, exec)), n_tokens, d);
    for (std::ptrdiff_t s = 0; s < n_shared(); ++s) {
      ffn::swiglu_forward(shared_.expert(s), x, tmp, ws, Backend{}, exec);
      for (std::ptrdiff_t t = 0; t < n_tokens; ++t) {
        A* yr = y.row(t);
        A const* tr = tmp.row(t);
        for (std::ptrdiff_t o = 0; o < d; ++o) yr[o] += tr[o];
      }
    }
  }

  /// Convenience overload that allocates a workspace per call (not for hot loops).
  void forward(MatrixView<A const> x, MatrixView<A> y) const {
    Workspace ws(workspace_bytes(x.rows()));
    forward(x, y, ws);
  }

 private:
  std::size_t scratch_offset(std::ptrdiff_t max_tokens, Executor const& exec) const {
    if (max_tokens < 0)
      throw value_error(detail::concat("SharedExpertMoe::workspace_bytes: max_tokens must be >= 0, got ", max_tokens));
    std::size_t const routed = routed_.workspace_bytes(max_tokens, exec);
    std::size_t const swiglu = ffn::swiglu_workspace_bytes<Backend, T>(max_tokens, d_model(), d_expert(), Backend{}, exec);
    return detail::align_up(std::max(routed, swiglu));
  }

  ffn::ExpertWeights<T> shared_;
  MoeFfn<T, Backend> routed_;
};

/// Splits stacked experts into experts 0 .. n_shared-1 (first) and n_shared .. n_experts-1 (second), copying. Each
/// part gets a contiguous partition of its own neurons (the mapping back to the dense neurons stays in the
/// partition `experts` came from).
/// \throws value_error unless 1 <= n_shared < experts.n_experts().
template <class T>
std::pair<ffn::ExpertWeights<T>, ffn::ExpertWeights<T>> split_experts(ffn::ExpertWeights<T> const& experts,
                                                                      std::int64_t n_shared) {
  std::int64_t const n_all = experts.n_experts();
  if (experts.gate_tensor().empty()) throw value_error("split_experts: argument 'experts' holds no experts (default-constructed)");
  if (n_shared < 1 || n_shared >= n_all)
    throw value_error(detail::concat("split_experts: n_shared = ", n_shared, " must be in [1, n_experts - 1 = ", n_all - 1,
                                     "] (at least one shared and one routed expert)"));
  // Extents of the stored tensors: their last one counts blocks for a block-quantized format.
  std::ptrdiff_t const m = experts.d_expert(), d = experts.d_model(), gate_cols = experts.gate_tensor().extent(2),
                       down_cols = experts.down_tensor().extent(2);
  auto part = [&](std::int64_t e0, std::int64_t count) {
    Tensor<T, 3> gate({count, m, gate_cols}), up({count, m, gate_cols}), down({count, d, down_cols});
    std::ptrdiff_t const gu = m * gate_cols, dn = d * down_cols;
    std::copy(experts.gate_tensor().data() + e0 * gu, experts.gate_tensor().data() + (e0 + count) * gu, gate.data());
    std::copy(experts.up_tensor().data() + e0 * gu, experts.up_tensor().data() + (e0 + count) * gu, up.data());
    std::copy(experts.down_tensor().data() + e0 * dn, experts.down_tensor().data() + (e0 + count) * dn, down.data());
    return ffn::ExpertWeights<T>(std::move(gate), std::move(up), std::move(down),
                                 ffn::ExpertPartition::contiguous(count * m, count));
  };
  return {part(0, n_shared), part(n_shared, n_all - n_shared)};
}

/// Builds a shared-expert layer from S + N factorized experts: experts 0 .. n_shared-1 (the FIRST n_shared of the
/// partition the experts came from) become the always-on shared experts, experts n_shared .. S+N-1 the routed ones
/// (routed expert e = experts[n_shared + e]). ffn::cluster_activations_shared builds partitions in this layout.
/// \param experts  S + N experts (e.g. factorize(dense, partition), after recovery)
/// \param router   the router of the N routed experts [N, d_model]
/// \throws value_error unless 1 <= n_shared < S + N or for an invalid gating; shape_error if the router is not
///         [N, d_model].
template <class Backend = DefaultCpu, class T>
SharedExpertMoe<T, Backend> make_shared_moe(ffn::ExpertWeights<T> const& experts, std::int64_t n_shared,
                                            Router<activation_t<T>> router, Gating gating) {
  auto parts = split_experts(experts, n_shared);
  if (router.n_experts() != parts.second.n_experts() || router.d_model() != experts.d_model())
    throw shape_error(detail::concat("make_shared_moe: argument 'router' has shape ",
                                     detail::shape_string({router.n_experts(), router.d_model()}), ", expected ",
                                     detail::shape_string({parts.second.n_experts(), experts.d_model()}),
                                     " [routed experts = n_experts - n_shared, d_model]"));
  return SharedExpertMoe<T, Backend>(std::move(parts.first),
                                     MoeFfn<T, Backend>(std::move(parts.second), std::move(router), std::move(gating)));
}

/// Builds a shared-expert layer by factorizing a dense FFN with a partition of S + N experts (docs/math.md §1.2) and taking
/// its FIRST n_shared experts as the shared ones: make_shared_moe(factorize(dense, partition), n_shared, ...).
/// \throws as factorize and the overload above.
template <class Backend = DefaultCpu, class T>
SharedExpertMoe<T, Backend> make_shared_moe(ffn::DenseFfnView<T> const& dense, ffn::ExpertPartition const& partition,
                                            std::int64_t n_shared, Router<activation_t<T>> router, Gating gating) {
  return make_shared_moe<Backend>(ffn::factorize(dense, partition), n_shared, std::move(router), std::move(gating));
}

}  // namespace moe
}  // namespace factorllm
