// SPDX-License-Identifier: Apache-2.0
// Scalar oracle of the MoE layer for training: a forward on parameter views that records what the backward
// needs, and the backward (dx, every expert's dW, router dW/db through the combine weights), in double.
// The parameter, gradient and activation views are kernel arguments (core/kernel_args.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "../../core/dtype.hpp"
#include "../../core/kernel_args.hpp"
#include "../../core/tensor_view.hpp"
#include "../../core/workspace.hpp"
#include "../../detail/math.hpp"
#include "../ops.hpp"
#include "combine.hpp"
#include "grouping.hpp"
#include "router.hpp"
#include "topk.hpp"

namespace factorllm {

namespace kernel {

/// Vector-Jacobian product of one token's combine weights (moe/gating.hpp table) w.r.t. its router logits:
/// given dw[j] = dL/dw_j for the K selected experts ids[j], writes dz[n] = dL/dz_n for all n_experts.
/// Computed in double from the logits (shared by every backend: O(n_experts) per token).
///   code_ref              w constant                          -> dz = 0 (the paper code's router gets no
///                                                                gradient from the LM loss: docs/math.md §2.3)
///   softmax_topk          w_j = s p_{id_j}, p = softmax(z)    -> dz = p (g - <p, g>), g_{id_j} = s dw_j
///   softmax_topk_renorm,  w_j = s r_j, r = softmax(z_S)       -> dz_{id_j} = s r_j (dw_j - <r, dw>), 0 off S
///   topk_softmax          (equal in exact arithmetic)
///   sigmoid_topk          w_j = s sig(z_{id_j})               -> dz_{id_j} = s dw_j sig(z) sig(-z)
///   sigmoid_topk, renormalized: w_j = s r_j, r = softmax_S(log sig(z))   (= sig / sum_S sig)
///                         -> dz_{id_j} = s r_j (dw_j - <r, dw>) sig(-z_{id_j}); finite when the sigmoids underflow
/// The renormalizing modes' r is always a softmax over S shifted by its maximum (sum >= 1), so no 0/0.
/// The selection bias only moves the (piecewise constant) choice of S, so it has no gradient.
template <class Z>
void combine_weights_vjp(Z const* z, std::ptrdiff_t n, std::int32_t const* ids, std::ptrdiff_t k, double const* dw,
                         GatingParams const& gating, double* dz) {

  double const s = gating.output_scale;
  for (std::ptrdiff_t i = 0; i < n; ++i) dz[i] = 0.0;
  switch (gating.mode) {
    case CombineMode::code_ref: return;
    case CombineMode::softmax_topk: {
      // The maximum is taken in Z and widened once (exact, so the same value): GCC 12.2 for aarch64 crashes at -O3
      // (internal compiler error in vect_transform_reduction) vectorizing an fmax reduction over widened floats.
      Z zmax = -std::numeric_limits<Z>::infinity();
      for (std::ptrdiff_t i = 0; i < n; ++i) zmax = std::fmax(zmax, z[i]);
      double const mx = static_cast<double>(zmax);
      double sum = 0, pg = 0;
      for (std::ptrdiff_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(z[i]) - mx);
      // g is s * dw on the selected experts and 0 elsewhere, so <p, g> only sums over S.
      for (std::ptrdiff_t j = 0; j < k; ++j) pg += std::exp(static_cast<double>(z[ids[j]]) - mx) / sum * s * dw[j];
      for (std::ptrdiff_t i = 0; i < n; ++i) dz[i] = -std::exp(static_cast<double>(z[i]) - mx) / sum * pg;
      for (std::ptrdiff_t j = 0; j < k; ++j) dz[ids[j]] += std::exp(static_cast<double>(z[ids[j]]) - mx) / sum * s * dw[j];
      return;
    }
    case CombineMode::softmax_topk_renorm:
    case CombineMode::topk_softmax: {
      double mx = -std::numeric_limits<double>::infinity(), sum = 0, rdw = 0;
      for (std::ptrdiff_t j = 0; j < k; ++j) mx = std::fmax(mx, static_cast<double>(z[ids[j]]));
      for (std::ptrdiff_t j = 0; j < k; ++j) sum += std::exp(static_cast<double>(z[ids[j]]) - mx);
      for (std::ptrdiff_t j = 0; j < k; ++j) rdw += std::exp(static_cast<double>(z[ids[j]]) - mx) / sum * dw[j];
      for (std::ptrdiff_t j = 0; j < k; ++j)
        dz[ids[j]] = s * std::exp(static_cast<double>(z[ids[j]]) - mx) / sum * (dw[j] - rdw);
      return;
    }
    case CombineMode::sigmoid_topk: {
      // sig'(z) = sig(z) (1 - sig(z)) = sig(z) sig(-z): no cancellation in 1 - sig for large z.
      if (!gating.sigmoid_renormalize) {
        for (std::ptrdiff_t j = 0; j < k; ++j) {
          double const zj = static_cast<double>(z[ids[j]]);
          dz[ids[j]] = s * dw[j] * detail::sigmoid(zj) * detail::sigmoid(-zj);
        }
        return;
      }
      // w_j = s sig(z_j) / sum_S sig = s softmax_S(ls)_j with ls = log sig(z): the forward's underflow fallback,
      // equal in exact arithmetic to its usual form, so both have the same derivative
      //   dz_{id_j} = s r_j (dw_j - <r, dw>) dls_j/dz_j,  r = softmax_S(ls),  dls/dz = 1 - sig(z) = sig(-z).
      // r is taken from the log-sigmoids, never as sig / sum_S sig: when every selected sigmoid underflows
      // (logits ~ -800) that would be 0 / 0 = NaN while the forward's weights are finite.
      double mx = -std::numeric_limits<double>::infinity(), sum = 0, rdw = 0;
      for (std::ptrdiff_t j = 0; j < k; ++j) mx = std::fmax(mx, detail::log_sigmoid(static_cast<double>(z[ids[j]])));
      for (std::ptrdiff_t j = 0; j < k; ++j) sum += std::exp(detail::log_sigmoid(static_cast<double>(z[ids[j]])) - mx);
      for (std::ptrdiff_t j = 0; j < k; ++j)
        rdw += std::exp(detail::log_sigmoid(static_cast<double>(z[ids[j]])) - mx) / sum * dw[j];
      for (std::ptrdiff_t j = 0; j < k; ++j) {
        double const zj = static_cast<double>(z[ids[j]]);
        dz[ids[j]] = s * std::exp(detail::log_sigmoid(zj) - mx) / sum * (dw[j] - rdw) * detail::sigmoid(-zj);
      }
      return;
    }
  }
}

/// One slot's share of the scalar MoE backward (docs/math.md §2.3), for slot (t, j) routed to expert e with combine
/// weight w, token row x_t and its dL/dy row dy_t:
///   a = W_g x, b = W_u x, h = SiLU(a) b, g = W_d^T dy_t;  dL/dw_tj = <g, h>;  dh = w g;
///   da = dh b SiLU'(a);  db = dh SiLU(a);  dW_g += da x^T;  dW_u += db x^T;  dW_d += w dy_t h^T;
///   dx_slot = W_g^T da + W_u^T db  (written, starting from zero).
/// Returns dL/dw_tj. The oracle (MoeBackward<CpuScalar>) and the expert-parallel backward (moe/expert_shard.hpp) both
/// call it, so a slot's numbers are the same bits whichever process computes them (docs/expert_parallel.md §3).
/// gate, up [*, d_expert, d_model], down [*, d_model, d_expert]; saved_gate/saved_up: the slot's pre-activations or
/// null (recomputed); scratch: 6 * d_expert doubles; dwg, dwu [d_expert * d_model], dwd [d_model * d_expert]
/// accumulators; dx_slot [d_model] out.
template <class W, class A>
double slot_backward(TensorView<W const, 3> gate, TensorView<W const, 3> up, TensorView<W const, 3> down, std::ptrdiff_t e,
                     A const* xr, A const* dyr, double w, A const* saved_gate, A const* saved_up, double* scratch,
                     double* dwg, double* dwu, double* dwd, double* dx_slot) {
  std::ptrdiff_t const m = gate.extent(1), d = gate.extent(2);
  double* a = scratch;
  double* bu = a + m;
  double* g = bu + m;
  double* da = g + m;
  double* db = da + m;
  double* h = db + m;
  double dwj = 0;
  for (std::ptrdiff_t i = 0; i < m; ++i) {
    if (saved_gate != nullptr) {
      a[i] = to_double(saved_gate[i]);
      bu[i] = to_double(saved_up[i]);
    } else {
      double sg = 0, su = 0;
      for (std::ptrdiff_t c = 0; c < d; ++c) {
        sg += to_double(gate(e, i, c)) * to_double(xr[c]);
        su += to_double(up(e, i, c)) * to_double(xr[c]);
      }
      a[i] = sg;
      bu[i] = su;
    }
    double gi = 0;
    for (std::ptrdiff_t o = 0; o < d; ++o) gi += to_double(down(e, o, i)) * to_double(dyr[o]);
    g[i] = gi;
    h[i] = detail::silu(a[i]) * bu[i];
    dwj += gi * h[i];
    double const dh = w * gi;
    da[i] = dh * bu[i] * detail::silu_grad(a[i]);
    db[i] = dh * detail::silu(a[i]);
  }
  for (std::ptrdiff_t c = 0; c < d; ++c) dx_slot[c] = 0.0;
  for (std::ptrdiff_t i = 0; i < m; ++i) {
    for (std::ptrdiff_t c = 0; c < d; ++c) {
      double const xc = to_double(xr[c]);
      dwg[i * d + c] += da[i] * xc;
      dwu[i * d + c] += db[i] * xc;
      dx_slot[c] += da[i] * to_double(gate(e, i, c)) + db[i] * to_double(up(e, i, c));
    }
  }
  for (std::ptrdiff_t o = 0; o < d; ++o) {
    double const wdy = w * to_double(dyr[o]);
    for (std::ptrdiff_t i = 0; i < m; ++i) dwd[o * m + i] += wdy * h[i];
  }
  return dwj;
}

/// One token's router share of the scalar MoE backward: dz_t = VJP of the combine weights (combine_weights_vjp) from
/// dw_t (dL/dw of its top_k slots); then dbr += dz_t, dwr += dz_t x_t^T and dx_t += W_r^T dz_t, in that order.
/// Shared by the oracle and the expert-parallel backward (same bits). dz [n_experts] out; dwr [n_experts * d_model],
/// dbr [n_experts], dx [d_model] accumulators.
template <class A>
void router_backward_row(A const* logits, std::int32_t const* ids, double const* dw, GatingParams const& gating,
                         A const* xr, MatrixView<A const> router_weight, std::ptrdiff_t k, double* dz, double* dwr,
                         double* dbr, double* dx) {
  std::ptrdiff_t const n = router_weight.rows(), d = router_weight.cols();
  combine_weights_vjp(logits, n, ids, k, dw, gating, dz);
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    dbr[e] += dz[e];
    for (std::ptrdiff_t c = 0; c < d; ++c) {
      dwr[e * d + c] += dz[e] * to_double(xr[c]);
      dx[c] += dz[e] * to_double(router_weight(e, c));
    }
  }
}

/// Scratch of the scalar training forward: one double output row per slot, and hidden/pre-activation rows.
template <>
struct MoeTrainForward<CpuScalar> {
  static constexpr bool implemented = true;
  template <class W>
  static detail::WorkspaceLayout workspace(MoeParamsView<W> const& p, std::ptrdiff_t top_k, std::ptrdiff_t max_tokens);
  template <class W, class A>
  static void run(MoeParamsView<W> const& p, GatingParams const& gating, MatrixView<A const> x, MatrixView<A> y,
                  RoutingView<A> record, MoeActivationsView<A> const* saved, WorkspaceSpan ws, Executor const& = Executor::openmp());
};

template <class W>
detail::WorkspaceLayout MoeTrainForward<CpuScalar>::workspace(MoeParamsView<W> const& p, std::ptrdiff_t top_k,
                                                              std::ptrdiff_t max_tokens) {
  auto const s = static_cast<std::size_t>(max_tokens * top_k), d = static_cast<std::size_t>(p.d_model()),
             m = static_cast<std::size_t>(p.d_expert());
  return detail::WorkspaceLayout()
      .add(sizeof(double), s * d)   // expert output per slot
      .add(sizeof(double), 3 * m);  // gate/up pre-activations and hidden of one slot
}

/// Scalar training forward (validated by train::moe_forward, which sizes `record` and `saved`): routing into
/// `record` (logits, ids, weights, groups), each expert on its own tokens in double, combine in j order;
/// pre-activations into `saved` if given.
template <class W, class A>
void MoeTrainForward<CpuScalar>::run(MoeParamsView<W> const& p, GatingParams const& gating, MatrixView<A const> x,
                                     MatrixView<A> y, RoutingView<A> record, MoeActivationsView<A> const* saved,
                                     WorkspaceSpan ws, Executor const&) {
  std::ptrdiff_t const n_tokens = x.rows(), n = p.n_experts(), k = gating.top_k, d = p.d_model(), m = p.d_expert();
  detail::WorkspaceCursor cursor(ws, "moe_forward (train, cpu_scalar)");
  MatrixView<double> slot_out = matrix_view(cursor.take<double>(static_cast<std::size_t>(n_tokens * k * d)), n_tokens * k, d);
  double* pre_g = cursor.take<double>(static_cast<std::size_t>(3 * m));
  double* pre_u = pre_g + m;
  double* hidden = pre_u + m;

  RouterLogits<CpuScalar>::run(x, p.router(), record.logits);                                                 // 1
  SelectExperts<CpuScalar>::run(MatrixView<A const>(record.logits), gating, record.ids, record.weights);       // 2
  GroupByExpert<CpuScalar>::run(MatrixView<std::int32_t const>(record.ids), n, record.offsets, record.slots,
                                VectorView<std::int32_t>());                                                  // 3
  for (std::ptrdiff_t e = 0; e < n; ++e) {                                                           // step 4
    for (std::int64_t r = record.offsets(e); r < record.offsets(e + 1); ++r) {
      std::ptrdiff_t const s = record.slots(r), t = s / k;
      A const* xr = x.row(t);
      for (std::ptrdiff_t i = 0; i < m; ++i) {
        double sg = 0, su = 0;
        for (std::ptrdiff_t c = 0; c < d; ++c) {
          sg += to_double(p.gate(e, i, c)) * to_double(xr[c]);
          su += to_double(p.up(e, i, c)) * to_double(xr[c]);
        }
        pre_g[i] = sg;
        pre_u[i] = su;
        hidden[i] = detail::silu(sg) * su;
        if (saved != nullptr) {
          saved->gate_pre(r, i) = static_cast<A>(sg);
          saved->up_pre(r, i) = static_cast<A>(su);
        }
      }
      double* out = slot_out.row(s);
      for (std::ptrdiff_t o = 0; o < d; ++o) {
        double acc = 0;
        for (std::ptrdiff_t i = 0; i < m; ++i) acc += to_double(p.down(e, o, i)) * hidden[i];
        out[o] = acc;
      }
    }
  }
  Combine<CpuScalar>::run(MatrixView<A const>(record.weights), MatrixView<double const>(slot_out),
                          VectorView<std::int32_t const>(), y);                                                // 5
}

/// Scratch of the scalar backward: double accumulators for dx, one expert's three gradients, per-slot
/// dL/dw, per-token dL/dz, and one slot's hidden rows.
template <>
struct MoeBackward<CpuScalar> {
  static constexpr bool implemented = true;
  template <class W>
  static detail::WorkspaceLayout workspace(MoeParamsView<W> const& p, std::ptrdiff_t top_k, std::ptrdiff_t max_tokens);
  template <class W, class A>
  static void run(MoeParamsView<W> const& p, GatingParams const& gating, RoutingView<A const> record,
                  MatrixView<A const> x, MatrixView<A const> dy, MoeActivationsView<A const> const* saved,
                  MoeGradsView<A> const& grads, WorkspaceSpan ws, Executor const& = Executor::openmp());
};

template <class W>
detail::WorkspaceLayout MoeBackward<CpuScalar>::workspace(MoeParamsView<W> const& p, std::ptrdiff_t top_k,
                                                          std::ptrdiff_t max_tokens) {
  auto const t = static_cast<std::size_t>(max_tokens), k = static_cast<std::size_t>(top_k),
             n = static_cast<std::size_t>(p.n_experts()), d = static_cast<std::size_t>(p.d_model()),
             m = static_cast<std::size_t>(p.d_expert());
  return detail::WorkspaceLayout()
      .add(sizeof(double), t * d)      // dx accumulator
      .add(sizeof(double), 3 * m * d)  // one expert's d gate, d up, d down
      .add(sizeof(double), t * k)      // dL/dw per slot
      .add(sizeof(double), t * n)      // dL/dz per token
      .add(sizeof(double), n * (d + 1))  // router gradient accumulators
      .add(sizeof(double), 6 * m + d);  // a, b, g, da, db, h and the dx share of one slot
}

/// Scalar MoE backward, the oracle (validated by train::moe_backward). With o_{t,j} = E_{id_j}(x_t) and
/// y_t = sum_j w_tj o_{t,j} (docs/math.md §2.3), for each slot (t, j) routed to expert e:
///   a = W_g x, b = W_u x, h = SiLU(a) b, g = W_d^T dy_t        (g = dL/dh before the combine weight)
///   dL/dw_tj = <g, h>;  dh = w_tj g;  da = dh b SiLU'(a);  db = dh SiLU(a)
///   dW_g += da x^T;  dW_u += db x^T;  dW_d += w_tj dy_t h^T;  dx_t += (W_g^T da + W_u^T db) (summed per slot first)
/// then dz_t = VJP of the combine weights (combine_weights_vjp), dW_r = sum_t dz_t x_t^T, db_r = sum_t dz_t,
/// dx_t += W_r^T dz_t. Everything accumulates in double in a fixed order (experts, then slots in group order).
template <class W, class A>
void MoeBackward<CpuScalar>::run(MoeParamsView<W> const& p, GatingParams const& gating, RoutingView<A const> record,
                                 MatrixView<A const> x, MatrixView<A const> dy, MoeActivationsView<A const> const* saved,
                                 MoeGradsView<A> const& grads, WorkspaceSpan ws, Executor const&) {
  std::ptrdiff_t const n_tokens = x.rows(), n = p.n_experts(), k = gating.top_k, d = p.d_model(), m = p.d_expert();
  detail::WorkspaceCursor cursor(ws, "moe_backward (cpu_scalar)");
  double* dx = cursor.take<double>(static_cast<std::size_t>(n_tokens * d));
  double* dwg = cursor.take<double>(static_cast<std::size_t>(3 * m * d));
  double* dwu = dwg + m * d;
  double* dwd = dwu + m * d;
  double* dw = cursor.take<double>(static_cast<std::size_t>(n_tokens * k));
  double* dz = cursor.take<double>(static_cast<std::size_t>(n_tokens * n));
  double* dwr = cursor.take<double>(static_cast<std::size_t>(n * (d + 1)));
  double* dbr = dwr + n * d;
  double* scratch = cursor.take<double>(static_cast<std::size_t>(6 * m + d));
  double* dx_slot = scratch + 6 * m;
  std::fill(dx, dx + n_tokens * d, 0.0);

  for (std::ptrdiff_t e = 0; e < n; ++e) {
    std::fill(dwg, dwg + 3 * m * d, 0.0);
    for (std::int64_t r = record.offsets(e); r < record.offsets(e + 1); ++r) {
      std::ptrdiff_t const s = record.slots(r), t = s / k, j = s % k;
      // Each slot's dx share is summed on its own, then added to the token's row (in expert order): the order the
      // expert-parallel backward can reproduce when the slot runs on another process.
      dw[s] = slot_backward(p.gate, p.up, p.down, e, x.row(t), dy.row(t), to_double(record.weights(t, j)),
                            saved != nullptr ? &saved->gate_pre(r, 0) : static_cast<A const*>(nullptr),
                            saved != nullptr ? &saved->up_pre(r, 0) : static_cast<A const*>(nullptr), scratch, dwg, dwu,
                            dwd, dx_slot);
      for (std::ptrdiff_t c = 0; c < d; ++c) dx[t * d + c] += dx_slot[c];
    }
    for (std::ptrdiff_t i = 0; i < m; ++i)
      for (std::ptrdiff_t c = 0; c < d; ++c) {
        grads.gate(e, i, c) = static_cast<A>(dwg[i * d + c]);
        grads.up(e, i, c) = static_cast<A>(dwu[i * d + c]);
      }
    for (std::ptrdiff_t o = 0; o < d; ++o)
      for (std::ptrdiff_t i = 0; i < m; ++i) grads.down(e, o, i) = static_cast<A>(dwd[o * m + i]);
  }

  // Router: through the combine weights (docs/math.md §2.3 modes), then the linear router z = W_r x + b_r (docs/math.md §2.2).
  std::fill(dwr, dwr + n * (d + 1), 0.0);
  for (std::ptrdiff_t t = 0; t < n_tokens; ++t) {
    double* dzt = dz + t * n;
    router_backward_row(record.logits.row(t), record.ids.row(t), dw + t * k, gating, x.row(t), p.router_weight, k, dzt,
                        dwr, dbr, dx + t * d);
    if (grads.wants_logits())
      for (std::ptrdiff_t e = 0; e < n; ++e) grads.logits(t, e) = static_cast<A>(dzt[e]);
    A* dxr = grads.x.row(t);
    for (std::ptrdiff_t c = 0; c < d; ++c) dxr[c] = static_cast<A>(dx[t * d + c]);
  }
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    grads.router_bias(e) = static_cast<A>(dbr[e]);
    for (std::ptrdiff_t c = 0; c < d; ++c) grads.router_weight(e, c) = static_cast<A>(dwr[e * d + c]);
  }
}

}  // namespace kernel
}  // namespace factorllm
