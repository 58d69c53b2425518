// SPDX-License-Identifier: Apache-2.0
// ExpertShard: one rank's part of an expert-parallel MoE layer (docs/expert_parallel.md §2), as steps between which
// an adapter exchanges buffers: route and pack own tokens -> [count and row exchange] -> run local experts ->
// [return exchange] -> combine; and the training backward the same way (dy rows out, dx shares and dL/dw back,
// expert gradients stay local). No communication library here: moe/mpi/expert_parallel_ffn.hpp drives it over MPI,
// tests/test_expert_parallel.cpp over in-memory buffers.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../backend/ops.hpp"
#include "../backend/scalar/combine.hpp"
#include "../backend/scalar/grouping.hpp"
#include "../backend/scalar/moe_backward.hpp"
#include "../backend/scalar/router.hpp"
#include "../backend/scalar/swiglu.hpp"
#include "../backend/scalar/topk.hpp"
#include "../backend/simd/combine.hpp"
#include "../backend/simd/router.hpp"
#include "../backend/simd/swiglu.hpp"
#include "../backend/traits.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/kernel_args.hpp"
#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "../core/workspace.hpp"
#include "../detail/threads.hpp"
#include "../ffn/factorize.hpp"
#include "all_to_all.hpp"
#include "expert_placement.hpp"
#include "gating.hpp"
#include "router.hpp"
#include "routing.hpp"

namespace factorllm {
namespace moe {

/// The buffers of one expert-parallel call on one rank, reused across calls (they grow, never shrink: no allocation
/// once they have reached the largest call's size). Row buffers are dense row-major and contiguous, so an adapter
/// passes them to a collective as they are. Widths: d = d_model; dy rows carry d_model + 1 values (dy_t, then the
/// slot's combine weight); backward rows d_model + 1 doubles (the slot's dx share, then dL/dw).
/// \tparam A    activation type; \tparam Out  the expert step's output type (ExpertShard::out_type)
template <class A, class Out>
struct ExpertParallelState {
  RoutingRecord<A> record;      // this rank's tokens: logits, ids, weights, groups by global expert
  SendLayout send;              // token side: what goes to which rank
  RecvLayout recv;              // expert side: what came from which rank
  std::vector<A> send_x;        // [send.n_rows(), d]   token rows in send order
  std::vector<A> recv_x;        // [recv.n_rows(), d]   received token rows (kept for the backward)
  std::vector<Out> expert_out;  // [recv.n_rows(), d]   local experts' outputs, grouped by local expert
  std::vector<Out> out_back;    // [recv.n_rows(), d]   the same rows in receive order, to send back
  std::vector<Out> out_home;    // [send.n_rows(), d]   returned outputs in send order
  std::vector<A> send_dy;       // [send.n_rows(), d + 1]
  std::vector<A> recv_dy;       // [recv.n_rows(), d + 1]
  std::vector<double> back;     // [recv.n_rows(), d + 1]  per received row: its dx share, dL/dw
  std::vector<double> back_home;  // [send.n_rows(), d + 1] the same, returned, in send order
  std::vector<double> dx, dz, dw, router_w, router_b, grad_acc, scratch;  // backward accumulators (double)
  Workspace ws;                 // the expert step's scratch
};

/// One rank's part of a K-of-N MoE layer whose experts are spread over ranks by an ExpertPlacement: the rank's own
/// experts' weights (gate, up [n_local, d_expert, d_model / block], down [n_local, d_model, d_expert / block], local
/// order = increasing expert id), the full router (every rank routes its own tokens) and the gating.
/// For the tokens of all ranks concatenated in rank order, the outputs are the bits a single-process MoeFfn<T, Backend>
/// gives when Backend's kernels compute each row independently of the others in its batch (CpuScalar, the oracle);
/// CpuSimd's expert step picks its GEMM path by batch size, so its rows agree to rounding only
/// (docs/expert_parallel.md §3). Immutable after construction; each concurrent caller brings its own state.
template <class T, class Backend = CpuScalar>
class ExpertShard {
  static_assert(is_backend_v<Backend>, "ExpertShard: unknown backend tag");
  static_assert(backend_traits<Backend>::memory_space == MemorySpace::host,
                "ExpertShard: host backends only (a device backend keeps its buffers in device memory: see "
                "docs/expert_parallel.md §4 for the NCCL path)");

 public:
  using A = activation_t<T>;
  /// What the backend's expert step writes (double for CpuScalar, float for CpuSimd).
  using out_type = typename kernel::ExpertSwiglu<Backend>::template output_t<T, A>;
  using State = ExpertParallelState<A, out_type>;

  /// Takes this rank's experts. \throws value_error if rank is outside the placement or the gating is invalid;
  /// shape_error if the tensors are not [n_local(rank), d_expert, d_model / block] / [n_local, d_model, d_expert / block]
  /// or the router is not [n_experts, d_model].
  ExpertShard(ExpertPlacement placement, std::ptrdiff_t rank, Tensor<T, 3> gate, Tensor<T, 3> up, Tensor<T, 3> down,
              Router<A> router, Gating gating)
      : placement_(std::move(placement)), rank_(rank), gate_(std::move(gate)), up_(std::move(up)), down_(std::move(down)),
        router_(std::move(router)), gating_(std::move(gating)) {
    char const* fn = "ExpertShard";
    if (rank_ < 0 || rank_ >= placement_.n_ranks())
      throw value_error(detail::concat(fn, ": rank ", rank_, " is outside [0, n_ranks = ", placement_.n_ranks(), ")"));
    std::ptrdiff_t const nl = placement_.n_local(rank_), cols = gate_.extent(2), m = gate_.extent(1);
    if (cols < 1 || m < 1)
      throw shape_error(detail::concat(fn, ": argument 'gate' has shape ", detail::shape_string({gate_.extent(0), m, cols}),
                                       ", expected [n_local, d_expert >= 1, d_model >= 1]"));
    detail::require_shape(gate_.cview(), {nl, m, cols}, fn, "gate");
    detail::require_shape(up_.cview(), {nl, m, cols}, fn, "up");
    detail::require_shape(down_.cview(), {nl, cols * kBlock, m / kBlock}, fn, "down");
    if (router_.n_experts() != placement_.n_experts() || router_.d_model() != cols * kBlock)
      throw shape_error(detail::concat(fn, ": argument 'router' has shape ",
                                       detail::shape_string({router_.n_experts(), router_.d_model()}), ", expected ",
                                       detail::shape_string({placement_.n_experts(), cols * kBlock}),
                                       " [n_experts of the placement, d_model of the experts]"));
    gating_.validate(placement_.n_experts(), fn);
    m_ = m;
  }

  /// Rank `rank`'s shard of a whole layer's experts (copies that rank's experts; e.g. every rank loads the full
  /// checkpoint and keeps its part, or a test compares with the single-process layer).
  /// \throws as the constructor, and value_error if the placement does not place experts.n_experts() experts.
  static ExpertShard from_experts(ffn::ExpertWeights<T> const& experts, Router<A> router, Gating gating,
                                  ExpertPlacement placement, std::ptrdiff_t rank) {
    placement.require_fits(placement.n_ranks(), experts.n_experts(), "ExpertShard::from_experts");
    if (rank < 0 || rank >= placement.n_ranks())
      throw value_error(detail::concat("ExpertShard::from_experts: rank ", rank, " is outside [0, n_ranks = ",
                                       placement.n_ranks(), ")"));
    std::vector<std::int32_t> const mine = placement.experts_of(rank);
    auto const nl = static_cast<std::ptrdiff_t>(mine.size());
    auto slice = [&](Tensor<T, 3> const& all) {
      Tensor<T, 3> out({nl, all.extent(1), all.extent(2)});
      std::ptrdiff_t const per = all.extent(1) * all.extent(2);
      for (std::ptrdiff_t i = 0; i < nl; ++i)
        std::copy_n(all.data() + mine[static_cast<std::size_t>(i)] * per, per, out.data() + i * per);
      return out;
    };
    return ExpertShard(std::move(placement), rank, slice(experts.gate_tensor()), slice(experts.up_tensor()),
                       slice(experts.down_tensor()), std::move(router), std::move(gating));
  }

  ExpertPlacement const& placement() const noexcept { return placement_; }
  std::ptrdiff_t rank() const noexcept { return rank_; }
  std::ptrdiff_t n_local() const { return placement_.n_local(rank_); }
  std::ptrdiff_t d_model() const noexcept { return router_.d_model(); }
  std::ptrdiff_t d_expert() const noexcept { return m_; }
  std::ptrdiff_t n_experts() const noexcept { return placement_.n_experts(); }
  std::ptrdiff_t top_k() const noexcept { return gating_.top_k; }
  Router<A> const& router() const noexcept { return router_; }
  Gating const& gating() const noexcept { return gating_; }
  /// This rank's experts, local order (increasing expert id).
  ExpertWeightsView<T> local_experts() const noexcept { return ExpertWeightsView<T>{gate_.cview(), up_.cview(), down_.cview()}; }

  // ---- Forward ----------------------------------------------------------------------------------------------------

  /// Step 1: routes this rank's tokens x [n_tokens, d_model] (router logits, top-k, weights into st.record), builds
  /// the send layout (st.send; st.send.expert_counts is the count exchange's send buffer) and packs the token rows
  /// into st.send_x. \throws shape_error for a mis-shaped x.
  void dispatch(MatrixView<A const> x, State& st, Executor const& exec = Executor::openmp()) const {
    detail::require_shape(x, {x.rows(), d_model()}, "ExpertShard::dispatch", "x");
    std::ptrdiff_t const n_tokens = x.rows(), n = n_experts(), k = top_k(), d = d_model();
    st.record.resize(n_tokens, n, k);
    kernel::RouterLogits<Backend>::run(x, router_.view(), st.record.logits.view(), exec);
    kernel::SelectExperts<Backend>::run(MatrixView<A const>(st.record.logits.cview()), gating_.params(),
                                        st.record.ids.view(), st.record.weights.view());
    kernel::GroupByExpert<CpuScalar>::run(st.record.ids.cview(), n, st.record.offsets.view(), st.record.slots.view(),
                                          VectorView<std::int32_t>());
    build_send_layout(st.record.ids.cview(), placement_, st.send);
    std::ptrdiff_t const rows = static_cast<std::ptrdiff_t>(st.send.n_rows());
    st.send_x.resize(static_cast<std::size_t>(rows * d));
    for (std::ptrdiff_t q = 0; q < rows; ++q)
      std::copy_n(x.row(st.send.slots[static_cast<std::size_t>(q)] / k), d, st.send_x.data() + q * d);
  }

  /// Step 2, after the count exchange filled st.recv.expert_counts (n_ranks * max_local entries, block r from rank
  /// r): builds the receive layout and sizes st.recv_x for the row exchange.
  /// \throws value_error for counts that do not fit this rank's experts.
  void prepare_receive(State& st) const {
    build_recv_layout(placement_, rank_, st.recv);
    st.recv_x.resize(static_cast<std::size_t>(st.recv.n_rows() * d_model()));
  }

  /// Step 3, after the row exchange filled st.recv_x: runs each local expert on its received rows (the backend's
  /// expert step) and lays the outputs out in receive order in st.out_back (the return exchange's send buffer);
  /// sizes st.out_home for the rows coming back.
  void run_experts(State& st, Executor const& exec = Executor::openmp()) const {
    std::ptrdiff_t const rows = static_cast<std::ptrdiff_t>(st.recv.n_rows()), d = d_model(), nl = n_local();
    st.expert_out.resize(static_cast<std::size_t>(rows * d));
    st.out_back.resize(static_cast<std::size_t>(rows * d));
    st.out_home.resize(static_cast<std::size_t>(st.send.n_rows() * d));
    if (rows == 0) return;
    std::size_t const need = kernel::ExpertSwiglu<Backend>::template workspace<T, A>(rows, d, nl, m_, exec.n_workers()).bytes();
    st.ws.reserve(need);
    // The received rows are the expert step's tokens with top_k = 1: grouped row g reads token rows[g].
    kernel::ExpertSwiglu<Backend>::run(local_experts(), matrix_view(static_cast<A const*>(st.recv_x.data()), rows, d), 1,
                                       vector_view(static_cast<std::int64_t const*>(st.recv.expert_offsets.data()), nl + 1),
                                       vector_view(static_cast<std::int32_t const*>(st.recv.rows.data()), rows),
                                       matrix_view(st.expert_out.data(), rows, d), st.ws.span(), exec);
    for (std::ptrdiff_t g = 0; g < rows; ++g)
      std::copy_n(st.expert_out.data() + g * d, d, st.out_back.data() + st.recv.rows[static_cast<std::size_t>(g)] * d);
  }

  /// Step 4, after the return exchange filled st.out_home: y [n_tokens, d_model] = the weighted sum of each token's
  /// expert outputs in j order (the backend's combine, as MoeFfn). \throws shape_error for a mis-shaped y.
  void combine(State& st, MatrixView<A> y, Executor const& exec = Executor::openmp()) const {
    std::ptrdiff_t const n_tokens = st.record.ids.extent(0), d = d_model(), rows = static_cast<std::ptrdiff_t>(st.send.n_rows());
    detail::require_shape(y, {n_tokens, d}, "ExpertShard::combine", "y");
    kernel::Combine<Backend>::run(MatrixView<A const>(st.record.weights.cview()),
                                  matrix_view(static_cast<out_type const*>(st.out_home.data()), rows, d),
                                  vector_view(static_cast<std::int32_t const*>(st.send.row_of_slot.data()), rows), y, exec);
  }

  // ---- Backward (training; plain weight formats) -----------------------------------------------------------------

  /// Backward step 1: packs dy [n_tokens, d_model] (dL/dy of this rank's tokens) with each slot's combine weight
  /// into st.send_dy, in the forward's send layout; sizes st.recv_dy (the same counts come back).
  void dispatch_backward(MatrixView<A const> dy, State& st) const {
    static_assert(!is_block_format_v<T>, "ExpertShard: the backward takes plain weight formats (docs/math.md §2.3)");
    std::ptrdiff_t const n_tokens = st.record.ids.extent(0), d = d_model(), k = top_k(),
                         rows = static_cast<std::ptrdiff_t>(st.send.n_rows());
    detail::require_shape(dy, {n_tokens, d}, "ExpertShard::dispatch_backward", "dy");
    st.send_dy.resize(static_cast<std::size_t>(rows * (d + 1)));
    for (std::ptrdiff_t q = 0; q < rows; ++q) {
      std::int32_t const s = st.send.slots[static_cast<std::size_t>(q)];
      A* out = st.send_dy.data() + q * (d + 1);
      std::copy_n(dy.row(s / k), d, out);
      out[d] = st.record.weights(s / k, s % k);
    }
    st.recv_dy.resize(static_cast<std::size_t>(st.recv.n_rows() * (d + 1)));
  }

  /// Backward step 2, after the dy exchange filled st.recv_dy: the local experts' gradients (written, not
  /// accumulated: [n_local, d_expert, d_model] gate and up, [n_local, d_model, d_expert] down, zero for an expert
  /// no token chose) and, per received row, its dx share and dL/dw into st.back (the return exchange's send buffer;
  /// d_model + 1 doubles a row). Slots are visited per expert in global slot order, through the oracle's per-slot
  /// step (kernel::slot_backward), so the gradients are the bits of train::moe_backward<CpuScalar> on all tokens.
  /// \throws shape_error for mis-shaped gradient views.
  void run_experts_backward(State& st, TensorView<A, 3> d_gate, TensorView<A, 3> d_up, TensorView<A, 3> d_down) const {
    static_assert(!is_block_format_v<T>, "ExpertShard: the backward takes plain weight formats (docs/math.md §2.3)");
    char const* fn = "ExpertShard::run_experts_backward";
    std::ptrdiff_t const nl = n_local(), m = m_, d = d_model(), rows = static_cast<std::ptrdiff_t>(st.recv.n_rows());
    detail::require_shape(d_gate, {nl, m, d}, fn, "d_gate");
    detail::require_shape(d_up, {nl, m, d}, fn, "d_up");
    detail::require_shape(d_down, {nl, d, m}, fn, "d_down");
    st.back.resize(static_cast<std::size_t>(rows * (d + 1)));
    st.grad_acc.resize(static_cast<std::size_t>(3 * m * d));
    st.scratch.resize(static_cast<std::size_t>(6 * m));
    double* dwg = st.grad_acc.data();
    double* dwu = dwg + m * d;
    double* dwd = dwu + m * d;
    for (std::ptrdiff_t i = 0; i < nl; ++i) {
      std::fill(st.grad_acc.begin(), st.grad_acc.end(), 0.0);
      for (std::int64_t g = st.recv.expert_offsets[static_cast<std::size_t>(i)];
           g < st.recv.expert_offsets[static_cast<std::size_t>(i) + 1]; ++g) {
        std::int32_t const row = st.recv.rows[static_cast<std::size_t>(g)];
        A const* dyr = st.recv_dy.data() + static_cast<std::ptrdiff_t>(row) * (d + 1);
        double* out = st.back.data() + static_cast<std::ptrdiff_t>(row) * (d + 1);
        out[d] = kernel::slot_backward(gate_.cview(), up_.cview(), down_.cview(), i,
                                       static_cast<A const*>(st.recv_x.data() + static_cast<std::ptrdiff_t>(row) * d), dyr,
                                       to_double(dyr[d]), static_cast<A const*>(nullptr), static_cast<A const*>(nullptr),
                                       st.scratch.data(), dwg, dwu, dwd, out);
      }
      for (std::ptrdiff_t a = 0; a < m; ++a)
        for (std::ptrdiff_t c = 0; c < d; ++c) {
          d_gate(i, a, c) = static_cast<A>(dwg[a * d + c]);
          d_up(i, a, c) = static_cast<A>(dwu[a * d + c]);
        }
      for (std::ptrdiff_t o = 0; o < d; ++o)
        for (std::ptrdiff_t a = 0; a < m; ++a) d_down(i, o, a) = static_cast<A>(dwd[o * m + a]);
    }
    st.back_home.resize(static_cast<std::size_t>(st.send.n_rows() * (d + 1)));
  }

  /// Backward step 3, after the return exchange filled st.back_home: dL/dx of this rank's tokens [n_tokens, d_model]
  /// (each token's dx shares added in increasing expert order, then the router path: the oracle's order) and this
  /// rank's share of the router gradient, in double in st.router_w [n_experts * d_model] and st.router_b [n_experts]
  /// (the sum over ranks is the layer's router gradient: write_router_grads casts it). dlogits: optional
  /// [n_tokens, n_experts] dL/dz (pass an empty view to skip). x: the forward's x.
  void combine_backward(MatrixView<A const> x, State& st, MatrixView<A> dx, MatrixView<A> dlogits = {}) const {
    char const* fn = "ExpertShard::combine_backward";
    std::ptrdiff_t const n_tokens = st.record.ids.extent(0), d = d_model(), k = top_k(), n = n_experts();
    detail::require_shape(x, {n_tokens, d}, fn, "x");
    detail::require_shape(dx, {n_tokens, d}, fn, "dx");
    bool const want_logits = dlogits.extent(1) != 0;
    if (want_logits) detail::require_shape(dlogits, {n_tokens, n}, fn, "dlogits");
    st.dx.resize(static_cast<std::size_t>(d));
    st.dz.resize(static_cast<std::size_t>(n));
    st.dw.resize(static_cast<std::size_t>(k));
    st.router_w.assign(static_cast<std::size_t>(n * d), 0.0);
    st.router_b.assign(static_cast<std::size_t>(n), 0.0);
    for (std::ptrdiff_t t = 0; t < n_tokens; ++t) {
      std::fill(st.dx.begin(), st.dx.end(), 0.0);
      // The token's experts in increasing id: the oracle adds slot shares expert by expert (a token picks an expert
      // at most once, so this order is total). k is small: a selection scan, no sort buffer.
      std::int32_t last = -1;
      for (std::ptrdiff_t pass = 0; pass < k; ++pass) {
        std::ptrdiff_t best = -1;
        for (std::ptrdiff_t j = 0; j < k; ++j)
          if (st.record.ids(t, j) > last && (best < 0 || st.record.ids(t, j) < st.record.ids(t, best))) best = j;
        last = st.record.ids(t, best);
        std::int32_t const row = st.send.row_of_slot[static_cast<std::size_t>(t * k + best)];
        double const* share = st.back_home.data() + static_cast<std::ptrdiff_t>(row) * (d + 1);
        for (std::ptrdiff_t c = 0; c < d; ++c) st.dx[static_cast<std::size_t>(c)] += share[c];
        st.dw[static_cast<std::size_t>(best)] = share[d];
      }
      kernel::router_backward_row(st.record.logits.cview().row(t), st.record.ids.cview().row(t), st.dw.data(), gating_.params(), x.row(t),
                                  router_.weight(), k, st.dz.data(), st.router_w.data(), st.router_b.data(), st.dx.data());
      if (want_logits)
        for (std::ptrdiff_t e = 0; e < n; ++e) dlogits(t, e) = static_cast<A>(st.dz[static_cast<std::size_t>(e)]);
      A* dxr = dx.row(t);
      for (std::ptrdiff_t c = 0; c < d; ++c) dxr[c] = static_cast<A>(st.dx[static_cast<std::size_t>(c)]);
    }
  }

  /// Casts the router gradient accumulators (this rank's share, or their sum over ranks after an all-reduce) into
  /// d_router_weight [n_experts, d_model] and d_router_bias [n_experts].
  void write_router_grads(State const& st, MatrixView<A> d_router_weight, VectorView<A> d_router_bias) const {
    std::ptrdiff_t const n = n_experts(), d = d_model();
    detail::require_shape(d_router_weight, {n, d}, "ExpertShard::write_router_grads", "d_router_weight");
    detail::require_shape(d_router_bias, {n}, "ExpertShard::write_router_grads", "d_router_bias");
    if (static_cast<std::ptrdiff_t>(st.router_w.size()) != n * d)
      throw value_error("ExpertShard::write_router_grads: the state holds no backward (call combine_backward first)");
    for (std::ptrdiff_t e = 0; e < n; ++e) {
      d_router_bias(e) = static_cast<A>(st.router_b[static_cast<std::size_t>(e)]);
      for (std::ptrdiff_t c = 0; c < d; ++c) d_router_weight(e, c) = static_cast<A>(st.router_w[static_cast<std::size_t>(e * d + c)]);
    }
  }

 private:
  static constexpr std::ptrdiff_t kBlock = dtype_traits<T>::block_weights;

  ExpertPlacement placement_;
  std::ptrdiff_t rank_;
  Tensor<T, 3> gate_, up_, down_;
  Router<A> router_;
  Gating gating_;
  std::ptrdiff_t m_ = 0;
};

}  // namespace moe
}  // namespace factorllm
