// SPDX-License-Identifier: Apache-2.0
// Scalar oracle of the MoE layer for training: a forward on parameter views that records what the backward
// needs, and the backward (dx, every expert's dW, router dW/db through the combine weights), in double.
//
// The parameter/gradient view types live here, next to the oracle, because both backends' kernels take them
// (the simd header includes this one); train/moe_backward.hpp is the public front and re-exports them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "../../core/dtype.hpp"
#include "../../core/error.hpp"
#include "../../core/tensor.hpp"
#include "../../core/tensor_view.hpp"
#include "../../core/workspace.hpp"
#include "../../detail/math.hpp"
#include "../../moe/gating.hpp"
#include "../../moe/routing.hpp"
#include "../tags.hpp"
#include "combine.hpp"
#include "dispatch.hpp"
#include "router.hpp"
#include "topk.hpp"

namespace factorllm {
namespace train {

/// Non-owning views of one MoE layer's trainable parameters, in the stacked layout of ffn::ExpertWeights
/// and the nn.Linear layout of moe::Router. Training changes the weights every step, so the training
/// forward/backward read them through views instead of owning copies. Every view must be dense row-major.
/// \tparam W  weight type of the experts (float, double, bf16); the router uses the activation type.
template <class W>
struct MoeParamsView {
  using A = activation_t<W>;
  TensorView<W const, 3> gate;        // [n_experts, d_expert, d_model]
  TensorView<W const, 3> up;          // [n_experts, d_expert, d_model]
  TensorView<W const, 3> down;        // [n_experts, d_model, d_expert]
  MatrixView<A const> router_weight;  // [n_experts, d_model]
  VectorView<A const> router_bias;    // [n_experts]

  std::ptrdiff_t n_experts() const noexcept { return gate.extent(0); }
  std::ptrdiff_t d_expert() const noexcept { return gate.extent(1); }
  std::ptrdiff_t d_model() const noexcept { return gate.extent(2); }
};

/// Views the backward writes its gradients into (overwritten, never accumulated). All dense row-major.
/// \tparam A  activation type (float, or double with double weights); gradients of bf16 weights are float.
template <class A>
struct MoeGradsView {
  MatrixView<A> x;                // [n_tokens, d_model]             dL/dx (experts + router paths)
  TensorView<A, 3> gate;          // [n_experts, d_expert, d_model]  dL/dW_gate (zero for an expert with no token)
  TensorView<A, 3> up;            // [n_experts, d_expert, d_model]  dL/dW_up
  TensorView<A, 3> down;          // [n_experts, d_model, d_expert]  dL/dW_down
  MatrixView<A> router_weight;    // [n_experts, d_model]            dL/dW_r
  VectorView<A> router_bias;      // [n_experts]                     dL/db_r
  MatrixView<A> logits;           // optional [n_tokens, n_experts]  dL/dz; leave default-constructed to skip

  /// True when the caller asked for dL/dz (a view with columns).
  bool wants_logits() const noexcept { return logits.extent(1) != 0; }
};

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
};

}  // namespace train

namespace detail {

/// d SiLU(a) / da = sigmoid(a) (1 + a (1 - sigmoid(a))), from the stable sigmoid.
inline double silu_grad(double a) noexcept {
  double const s = sigmoid(a);
  return s * (1.0 + a * (1.0 - s));
}

}  // namespace detail

namespace kernel {

/// Vector-Jacobian product of one token's combine weights (moe/gating.hpp table) w.r.t. its router logits:
/// given dw[j] = dL/dw_j for the K selected experts ids[j], writes dz[n] = dL/dz_n for all n_experts.
/// Computed in double from the logits (shared by every backend: O(n_experts) per token).
///   code_ref              w constant                          -> dz = 0 (the paper code's router gets no
///                                                                gradient from the LM loss: spec 2.3)
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
                         moe::Gating const& gating, double* dz) {
  using moe::CombineMode;
  double const s = gating.output_scale;
  for (std::ptrdiff_t i = 0; i < n; ++i) dz[i] = 0.0;
  switch (gating.mode) {
    case CombineMode::code_ref: return;
    case CombineMode::softmax_topk: {
      double mx = -std::numeric_limits<double>::infinity(), sum = 0, pg = 0;
      for (std::ptrdiff_t i = 0; i < n; ++i) mx = std::fmax(mx, static_cast<double>(z[i]));
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

/// Scratch of the scalar training forward: one double output row per slot, and hidden/pre-activation rows.
template <class W>
detail::WorkspaceLayout moe_train_forward_workspace(train::MoeParamsView<W> const& p, std::ptrdiff_t top_k,
                                                    std::ptrdiff_t max_tokens, CpuScalar const&) {
  auto const s = static_cast<std::size_t>(max_tokens * top_k), d = static_cast<std::size_t>(p.d_model()),
             m = static_cast<std::size_t>(p.d_expert());
  return detail::WorkspaceLayout()
      .add(sizeof(double), s * d)   // expert output per slot
      .add(sizeof(double), 3 * m);  // gate/up pre-activations and hidden of one slot
}

/// Scalar training forward (validated by train::moe_forward): routing into `record` (logits, ids, weights,
/// groups), each expert on its own tokens in double, combine in j order; pre-activations into `saved` if given.
template <class W, class A>
void moe_train_forward(train::MoeParamsView<W> const& p, moe::Gating const& gating, MatrixView<A const> x,
                       MatrixView<A> y, moe::RoutingRecord<A>& record, train::MoeActivations<A>* saved, Workspace& ws,
                       CpuScalar const& b) {
  std::ptrdiff_t const n_tokens = x.rows(), n = p.n_experts(), k = gating.top_k, d = p.d_model(), m = p.d_expert();
  detail::WorkspaceCursor cursor(ws, "moe_forward (train, cpu_scalar)");
  MatrixView<double> slot_out = matrix_view(cursor.take<double>(static_cast<std::size_t>(n_tokens * k * d)), n_tokens * k, d);
  double* pre_g = cursor.take<double>(static_cast<std::size_t>(3 * m));
  double* pre_u = pre_g + m;
  double* hidden = pre_u + m;

  record.resize(n_tokens, n, k);
  router_logits(x, p.router_weight, p.router_bias, record.logits.view(), b);                       // step 1
  select_experts(record.logits.cview(), gating, record.ids.view(), record.weights.view(), b);      // step 2
  group_by_expert(record.ids.cview(), n, record.offsets.view(), record.slots.view(), b);           // step 3
  if (saved != nullptr) saved->resize(n_tokens * k, m);
  for (std::ptrdiff_t e = 0; e < n; ++e) {                                                           // step 4
    for (std::int64_t r = record.offsets[e]; r < record.offsets[e + 1]; ++r) {
      std::ptrdiff_t const s = record.slots[r], t = s / k;
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
  combine(record.weights.cview(), MatrixView<double const>(slot_out), y, b);                     // step 5
}

/// Scratch of the scalar backward: double accumulators for dx, one expert's three gradients, per-slot
/// dL/dw, per-token dL/dz, and one slot's hidden rows.
template <class W>
detail::WorkspaceLayout moe_backward_workspace(train::MoeParamsView<W> const& p, std::ptrdiff_t top_k,
                                               std::ptrdiff_t max_tokens, CpuScalar const&) {
  auto const t = static_cast<std::size_t>(max_tokens), k = static_cast<std::size_t>(top_k),
             n = static_cast<std::size_t>(p.n_experts()), d = static_cast<std::size_t>(p.d_model()),
             m = static_cast<std::size_t>(p.d_expert());
  return detail::WorkspaceLayout()
      .add(sizeof(double), t * d)      // dx accumulator
      .add(sizeof(double), 3 * m * d)  // one expert's d gate, d up, d down
      .add(sizeof(double), t * k)      // dL/dw per slot
      .add(sizeof(double), t * n)      // dL/dz per token
      .add(sizeof(double), n * (d + 1))  // router gradient accumulators
      .add(sizeof(double), 6 * m);     // a, b, g, da, db, h of one slot
}

/// Scalar MoE backward, the oracle (validated by train::moe_backward). With o_{t,j} = E_{id_j}(x_t) and
/// y_t = sum_j w_tj o_{t,j} (spec 2.3), for each slot (t, j) routed to expert e:
///   a = W_g x, b = W_u x, h = SiLU(a) b, g = W_d^T dy_t        (g = dL/dh before the combine weight)
///   dL/dw_tj = <g, h>;  dh = w_tj g;  da = dh b SiLU'(a);  db = dh SiLU(a)
///   dW_g += da x^T;  dW_u += db x^T;  dW_d += w_tj dy_t h^T;  dx_t += W_g^T da + W_u^T db
/// then dz_t = VJP of the combine weights (combine_weights_vjp), dW_r = sum_t dz_t x_t^T, db_r = sum_t dz_t,
/// dx_t += W_r^T dz_t. Everything accumulates in double in a fixed order (experts, then slots in group order).
template <class W, class A>
void moe_backward(train::MoeParamsView<W> const& p, moe::Gating const& gating, moe::RoutingRecord<A> const& record,
                  MatrixView<A const> x, MatrixView<A const> dy, train::MoeActivations<A> const* saved,
                  train::MoeGradsView<A> const& grads, Workspace& ws, CpuScalar const&) {
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
  double* a = cursor.take<double>(static_cast<std::size_t>(6 * m));
  double* bu = a + m;
  double* g = bu + m;
  double* da = g + m;
  double* db = da + m;
  double* h = db + m;
  std::fill(dx, dx + n_tokens * d, 0.0);

  for (std::ptrdiff_t e = 0; e < n; ++e) {
    std::fill(dwg, dwg + 3 * m * d, 0.0);
    for (std::int64_t r = record.offsets[e]; r < record.offsets[e + 1]; ++r) {
      std::ptrdiff_t const s = record.slots[r], t = s / k, j = s % k;
      A const* xr = x.row(t);
      A const* dyr = dy.row(t);
      double const w = to_double(record.weights(t, j));
      double dwj = 0;
      for (std::ptrdiff_t i = 0; i < m; ++i) {
        if (saved != nullptr) {
          a[i] = to_double(saved->gate_pre(r, i));
          bu[i] = to_double(saved->up_pre(r, i));
        } else {
          double sg = 0, su = 0;
          for (std::ptrdiff_t c = 0; c < d; ++c) {
            sg += to_double(p.gate(e, i, c)) * to_double(xr[c]);
            su += to_double(p.up(e, i, c)) * to_double(xr[c]);
          }
          a[i] = sg;
          bu[i] = su;
        }
        double gi = 0;
        for (std::ptrdiff_t o = 0; o < d; ++o) gi += to_double(p.down(e, o, i)) * to_double(dyr[o]);
        g[i] = gi;
        h[i] = detail::silu(a[i]) * bu[i];
        dwj += gi * h[i];
        double const dh = w * gi;
        da[i] = dh * bu[i] * detail::silu_grad(a[i]);
        db[i] = dh * detail::silu(a[i]);
      }
      dw[s] = dwj;
      for (std::ptrdiff_t i = 0; i < m; ++i) {
        for (std::ptrdiff_t c = 0; c < d; ++c) {
          double const xc = to_double(xr[c]);
          dwg[i * d + c] += da[i] * xc;
          dwu[i * d + c] += db[i] * xc;
          dx[t * d + c] += da[i] * to_double(p.gate(e, i, c)) + db[i] * to_double(p.up(e, i, c));
        }
      }
      for (std::ptrdiff_t o = 0; o < d; ++o) {
        double const wdy = w * to_double(dyr[o]);
        for (std::ptrdiff_t i = 0; i < m; ++i) dwd[o * m + i] += wdy * h[i];
      }
    }
    for (std::ptrdiff_t i = 0; i < m; ++i)
      for (std::ptrdiff_t c = 0; c < d; ++c) {
        grads.gate(e, i, c) = static_cast<A>(dwg[i * d + c]);
        grads.up(e, i, c) = static_cast<A>(dwu[i * d + c]);
      }
    for (std::ptrdiff_t o = 0; o < d; ++o)
      for (std::ptrdiff_t i = 0; i < m; ++i) grads.down(e, o, i) = static_cast<A>(dwd[o * m + i]);
  }

  // Router: through the combine weights (spec 2.3 modes), then the linear router z = W_r x + b_r (spec 2.2).
  std::fill(dwr, dwr + n * (d + 1), 0.0);
  for (std::ptrdiff_t t = 0; t < n_tokens; ++t) {
    double* dzt = dz + t * n;
    combine_weights_vjp(record.logits.cview().row(t), n, record.ids.cview().row(t), k, dw + t * k, gating, dzt);
    A const* xr = x.row(t);
    for (std::ptrdiff_t e = 0; e < n; ++e) {
      if (grads.wants_logits()) grads.logits(t, e) = static_cast<A>(dzt[e]);
      dbr[e] += dzt[e];
      for (std::ptrdiff_t c = 0; c < d; ++c) {
        dwr[e * d + c] += dzt[e] * to_double(xr[c]);
        dx[t * d + c] += dzt[e] * to_double(p.router_weight(e, c));
      }
    }
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
