// SPDX-License-Identifier: Apache-2.0
// MoeFfn: the MoE layer an engine calls (experts + router + gating), forward through a chosen backend.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "../backend/ops.hpp"
#include "../backend/scalar/combine.hpp"
#include "../backend/scalar/grouping.hpp"
#include "../backend/scalar/router.hpp"
#include "../backend/scalar/swiglu.hpp"
#include "../backend/scalar/topk.hpp"
#include "../backend/simd/combine.hpp"
#include "../backend/simd/router.hpp"
#include "../backend/simd/swiglu.hpp"
#include "../backend/traits.hpp"
#include "../core/dtype.hpp"
#include "../core/kernel_args.hpp"
#include "../core/error.hpp"
#include "../core/quant.hpp"
#include "../core/tensor_view.hpp"
#include "../core/workspace.hpp"
#include "../detail/threads.hpp"
#include "../ffn/factorize.hpp"
#include "gating.hpp"
#include "router.hpp"
#include "routing.hpp"

namespace factorllm {
namespace moe {

/// A K-of-N mixture-of-experts SwiGLU layer (docs/design.md §2, steps 1-5):
///   z = x W_r^T + b_r; S = TopK(z + selection_bias); y = output_scale * sum_{n in S} w_n E_n(x).
/// Only the selected experts run on each token. Immutable after construction and safe to share across
/// threads; each concurrent caller brings its own Workspace.
/// \tparam T        weight format of the experts (f32, f64, bf16, f16: core/dtype.hpp; q8_0, q4_0: core/quant.hpp)
/// \tparam Backend  backend tag selecting the kernels: by default DefaultCpu, the SIMD backend for the best ISA this
///                  translation unit is compiled for; CpuScalar is the double-accumulating oracle (to_backend moves
///                  a layer between them)
template <class T, class Backend = DefaultCpu>
class MoeFfn {
  static_assert(is_backend_v<Backend>, "MoeFfn: unknown backend tag");

 public:
  using weight_type = T;
  using activation_type = activation_t<T>;
  using A = activation_type;

  /// \throws shape_error if experts are empty or router and experts disagree on d_model or n_experts;
  ///         value_error if the gating is invalid for n_experts.
  MoeFfn(ffn::ExpertWeights<T> experts, Router<A> router, Gating gating)
      : experts_(std::move(experts)), router_(std::move(router)), gating_(std::move(gating)) {
    if (experts_.n_experts() < 1 || experts_.d_model() < 1)
      throw shape_error("MoeFfn: argument 'experts' is empty (a default-constructed ExpertWeights); expected "
                        "n_experts >= 1 experts with d_model >= 1");
    if (router_.n_experts() != experts_.n_experts() || router_.d_model() != experts_.d_model())
      throw shape_error(detail::concat("MoeFfn: argument 'router' has shape ",
                                       detail::shape_string({router_.n_experts(), router_.d_model()}), ", expected ",
                                       detail::shape_string({experts_.n_experts(), experts_.d_model()}),
                                       " [n_experts, d_model] of the experts"));
    gating_.validate(experts_.n_experts(), "MoeFfn");
  }

  std::ptrdiff_t d_model() const noexcept { return experts_.d_model(); }
  std::ptrdiff_t n_experts() const noexcept { return experts_.n_experts(); }
  std::ptrdiff_t d_expert() const noexcept { return experts_.d_expert(); }
  std::ptrdiff_t top_k() const noexcept { return gating_.top_k; }
  ffn::ExpertWeights<T> const& experts() const noexcept { return experts_; }
  Router<A> const& router() const noexcept { return router_; }
  Gating const& gating() const noexcept { return gating_; }
  /// Replaces the router (e.g. after train::train_router on a copy of router()): no other rebuild. Not thread safe
  /// while another thread runs forward on this layer.
  /// \throws shape_error unless the router is [n_experts, d_model] of the experts; the layer is unchanged then.
  void set_router(Router<A> router) {
    if (router.n_experts() != n_experts() || router.d_model() != d_model())
      throw shape_error(detail::concat("MoeFfn::set_router: argument 'router' has shape ",
                                       detail::shape_string({router.n_experts(), router.d_model()}), ", expected ",
                                       detail::shape_string({n_experts(), d_model()}), " [n_experts, d_model] of the experts"));
    router_ = std::move(router);
  }

  /// Fraction of the dense FFN's FLOPs one token costs in the experts: top_k / n_experts.
  double ffn_flops_fraction() const noexcept { return static_cast<double>(top_k()) / static_cast<double>(n_experts()); }

  /// The same layer on backend Other (e.g. the CpuScalar oracle to check a DefaultCpu layer, or back). Called on an
  /// rvalue it moves the weights: nothing is copied or re-validated beyond the constructor's cheap shape checks;
  /// on an lvalue it copies them. Both backends must keep weights in the same memory space (a device backend needs
  /// a device copy, which this function does not make: it fails to compile).
  template <class Other>
  MoeFfn<T, Other> to_backend() && {
    static_assert_same_memory_space<Other>();
    return MoeFfn<T, Other>(std::move(experts_), std::move(router_), std::move(gating_));
  }
  template <class Other>
  MoeFfn<T, Other> to_backend() const& {
    static_assert_same_memory_space<Other>();
    return MoeFfn<T, Other>(experts_, router_, gating_);
  }

  /// Bytes of scratch `forward` needs for calls of up to max_tokens tokens on this backend, from threads whose
  /// OpenMP team has at most as many threads as the calling thread's now (per-thread scratch is part of it). A
  /// workspace used from threads with larger teams (another std::thread, after omp_set_num_threads) needs
  /// workspace_bytes(max_tokens, max_threads); one used with a custom executor, workspace_bytes(max_tokens, exec).
  /// \throws value_error if max_tokens < 0 or so large that the size would overflow.
  std::size_t workspace_bytes(std::ptrdiff_t max_tokens) const { return workspace_bytes(max_tokens, detail::max_threads()); }

  /// Bytes of scratch `forward` needs for calls of up to max_tokens tokens through executors of up to max_threads
  /// workers (an OpenMP team of max_threads threads, or Executor::custom(..., max_threads)).
  /// \throws value_error if max_tokens < 0, max_threads < 1, or the size would overflow.
  std::size_t workspace_bytes(std::ptrdiff_t max_tokens, Executor const& exec) const {
    return workspace_bytes(max_tokens, exec.n_workers());
  }

  /// As workspace_bytes(max_tokens, exec) for an executor of max_threads workers.
  std::size_t workspace_bytes(std::ptrdiff_t max_tokens, int max_threads) const {
    if (max_tokens < 0) throw value_error(detail::concat("MoeFfn::workspace_bytes: max_tokens must be >= 0, got ", max_tokens));
    if (max_threads < 1 || max_threads > kMaxThreads)
      throw value_error(detail::concat("MoeFfn::workspace_bytes: max_threads must be in [1, ", kMaxThreads, "], got ",
                                       max_threads));
    // Every region holds at most max_tokens * top_k * max(d_model, d_expert, n_experts) elements of at most 8 bytes,
    // and there are fewer than 32 regions: this bound keeps every size computation of every backend in range.
    std::ptrdiff_t const widest = top_k() * std::max({d_model(), d_expert(), n_experts()});
    if (max_tokens > std::numeric_limits<std::ptrdiff_t>::max() / 256 / widest)
      throw value_error(detail::concat("MoeFfn::workspace_bytes: max_tokens = ", max_tokens,
                                       " is too large: the workspace size would overflow"));
    if constexpr (kFused) {
      return kernel::MoeForward<Backend>::template workspace<T, A>(max_tokens, d_model(), n_experts(), d_expert(), top_k(),
                                                                   max_threads)
          .bytes();
    } else {
      detail::WorkspaceLayout layout = step_layout(max_tokens);
      return layout.bytes() + ExpertStep::template workspace<T, A>(max_tokens * top_k(), d_model(), n_experts(),
                                                                   d_expert(), max_threads)
                                  .bytes();
    }
  }

  /// Computes y = MoE(x) for every row of x: the backend's fused forward when it has one, else the five steps
  /// router_logits, select_experts, group_by_expert, expert_swiglu, combine (docs/design.md §2).
  /// \param x       [n_tokens, d_model] (n_tokens may be 0)
  /// \param y       [n_tokens, d_model] out; must not alias x
  /// \param ws      scratch of at least workspace_bytes(n_tokens) bytes in the backend's memory space
  ///                (backend_error otherwise)
  /// \param record  optional: receives the routing decisions of this call
  /// The kernels' tasks run on OpenMP with the calling thread's team (Executor::openmp()).
  void forward(MatrixView<A const> x, MatrixView<A> y, Workspace& ws, RoutingRecord<A>* record = nullptr) const {
    forward(x, y, ws, Executor::openmp(), record);
  }

  /// forward on the caller's executor (e.g. its own thread pool: Executor::custom). The output is bitwise the same
  /// for every executor and worker count (core/executor.hpp). ws must hold workspace_bytes(n_tokens, exec).
  void forward(MatrixView<A const> x, MatrixView<A> y, Workspace& ws, Executor const& exec,
               RoutingRecord<A>* record = nullptr) const {
    detail::require_shape(x, {x.rows(), d_model()}, "MoeFfn::forward", "x");
    detail::require_shape(y, {x.rows(), d_model()}, "MoeFfn::forward", "y");
    detail::require_workspace_space<Backend>(ws, "MoeFfn::forward");
    if (ws.bytes() < workspace_bytes(x.rows(), exec)) throw_workspace_too_small(ws.bytes(), x.rows(), exec);
    std::ptrdiff_t const n_tokens = x.rows(), n = n_experts(), k = top_k(), n_slots = n_tokens * k;
    if constexpr (kFused) {
      // A fused kernel writes the routing straight into the record's storage (views, so a device kernel can too).
      RoutingView<A> routing;
      if (record != nullptr) {
        record->resize(n_tokens, n, k);
        routing = record->view();
      }
      kernel::MoeForward<Backend>::run(experts_.view(), router_.view(), gating_.params(), x, y, ws.span(),
                                       record != nullptr ? &routing : nullptr, exec);
    } else {
      detail::WorkspaceCursor cursor(ws, "MoeFfn::forward");
      RoutingView<A> routing{matrix_view(cursor.take<A>(static_cast<std::size_t>(n_tokens * n)), n_tokens, n),
                             matrix_view(cursor.take<std::int32_t>(static_cast<std::size_t>(n_slots)), n_tokens, k),
                             matrix_view(cursor.take<A>(static_cast<std::size_t>(n_slots)), n_tokens, k),
                             vector_view(cursor.take<std::int64_t>(static_cast<std::size_t>(n + 1)), n + 1),
                             vector_view(cursor.take<std::int32_t>(static_cast<std::size_t>(n_slots)), n_slots)};
      VectorView<std::int32_t> rows = vector_view(cursor.take<std::int32_t>(static_cast<std::size_t>(n_slots)), n_slots);
      MatrixView<Out> expert_out =
          matrix_view(cursor.take<Out>(static_cast<std::size_t>(n_slots * d_model())), n_slots, d_model());
      kernel::RouterLogits<Backend>::run(x, router_.view(), routing.logits, exec);                            // 1
      kernel::SelectExperts<Backend>::run(MatrixView<A const>(routing.logits), gating_.params(), routing.ids,
                                          routing.weights);                                                   // 2
      kernel::GroupByExpert<Backend>::run(MatrixView<std::int32_t const>(routing.ids), n, routing.offsets,
                                          routing.slots, rows);                                               // 3
      ExpertStep::run(experts_.view(), x, k, VectorView<std::int64_t const>(routing.offsets),
                      VectorView<std::int32_t const>(routing.slots), expert_out, cursor.rest(), exec);        // 4
      kernel::Combine<Backend>::run(MatrixView<A const>(routing.weights), MatrixView<Out const>(expert_out),
                                    VectorView<std::int32_t const>(rows), y, exec);                           // 5
      if (record != nullptr)
        record->assign(routing.logits, routing.ids, routing.weights, routing.offsets, routing.slots);
    }
  }

  /// Convenience overload that allocates a workspace per call (not for hot loops).
  void forward(MatrixView<A const> x, MatrixView<A> y) const {
    Workspace ws(workspace_bytes(x.rows()));
    forward(x, y, ws);
  }

 private:
  template <class Other>
  static constexpr void static_assert_same_memory_space() {
    static_assert(is_backend_v<Other>, "MoeFfn::to_backend: unknown backend tag");
    static_assert(backend_traits<Other>::memory_space == backend_traits<Backend>::memory_space,
                  "MoeFfn::to_backend: the backends keep weights in different memory spaces; copy the weights to "
                  "the other space and construct the layer there");
  }
  static constexpr bool kFused = kernel::has_op_v<kernel::MoeForward, Backend>;
  static constexpr int kMaxThreads = Executor::max_workers;

  /// Names the call's thread count and the largest one the workspace would have served.
  [[noreturn]] void throw_workspace_too_small(std::size_t bytes, std::ptrdiff_t n_tokens, Executor const& exec) const {
    int const threads = exec.n_workers();
    char const* unit = exec.is_openmp() ? " OpenMP thread(s)" : " executor worker(s)";
    int fits = 0;
    for (int t = threads - 1; t >= 1 && fits == 0; --t)
      if (workspace_bytes(n_tokens, t) <= bytes) fits = t;
    throw backend_error(detail::concat(
        "MoeFfn::forward: workspace of ", bytes, " bytes is too small for ", n_tokens, " tokens on ", threads,
        unit, " (needs ", workspace_bytes(n_tokens, threads), "; ",
        fits > 0 ? detail::concat("it fits ", fits, " thread(s): it was sized on a thread with a smaller team") : std::string(
                                                                                "it fits no thread count"),
        "); size it with workspace_bytes(max_tokens, max_threads)"));
  }
  using ExpertStep = kernel::ExpertSwiglu<Backend>;
  /// What the backend's expert step writes (double for the oracle, float for CpuSimd).
  using Out = typename ExpertStep::template output_t<T, A>;

  /// The regions forward() carves before the expert step's own scratch (same order).
  detail::WorkspaceLayout step_layout(std::ptrdiff_t max_tokens) const {
    auto const t = static_cast<std::size_t>(max_tokens), n = static_cast<std::size_t>(n_experts()),
               s = static_cast<std::size_t>(max_tokens * top_k()), d = static_cast<std::size_t>(d_model());
    return detail::WorkspaceLayout()
        .add(sizeof(A), t * n)              // logits
        .add(sizeof(std::int32_t), s)       // ids
        .add(sizeof(A), s)                  // weights
        .add(sizeof(std::int64_t), n + 1)   // offsets
        .add(sizeof(std::int32_t), s)       // slots
        .add(sizeof(std::int32_t), s)       // grouped row of each slot
        .add(sizeof(Out), s * d);           // expert outputs, grouped order
  }

  ffn::ExpertWeights<T> experts_;
  Router<A> router_;
  Gating gating_;
};

}  // namespace moe
}  // namespace factorllm
