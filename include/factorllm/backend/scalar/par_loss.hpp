// SPDX-License-Identifier: Apache-2.0
// Scalar oracle of the PAR loss, the balance term and their router gradients (spec 3.2), in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../../core/workspace.hpp"
#include "../../ffn/factorize.hpp"
#include "../../moe/router.hpp"
#include "../../train/par_types.hpp"
#include "../tags.hpp"
#include "swiglu.hpp"
#include "topk.hpp"

namespace factorllm {
namespace kernel {

/// Scratch of the scalar PAR loss: teacher/expert rows, per-token router vectors, gradient accumulators.
inline detail::WorkspaceLayout par_loss_workspace(std::ptrdiff_t d_model, std::ptrdiff_t d_ff, std::ptrdiff_t n_experts,
                                                  std::ptrdiff_t top_k, CpuScalar const&) {
  auto const d = static_cast<std::size_t>(d_model), n = static_cast<std::size_t>(n_experts),
             k = static_cast<std::size_t>(top_k);
  return detail::WorkspaceLayout()
      .add(sizeof(double), static_cast<std::size_t>(d_ff))  // hidden row (dense teacher, the largest)
      .add(sizeof(double), d)                               // teacher f
      .add(sizeof(double), d)                               // expert output e_n
      .add(sizeof(double), 5 * n)                           // z, p, dz_par, dz_bal, mse
      .add(sizeof(double), 2 * n * (d + 1))                 // dW, db accumulators: par and balance
      .add(sizeof(std::int32_t), 2 * k);                    // pseudo-label ids, router TopK ids
}

/// PAR + balance losses over all rows of x and their gradients w.r.t. W_r and b_r (spec 3.2):
///   p = softmax(z), f = F(x), e_n = E_n(x), delta_n = mean_d (e_n - f / s)^2 with s = floor(N/K),
///   y = multi-hot(K smallest delta), q = softmax(y), L_PA = mean_t KL(clip(p) || clip(q)),
///   L_bal = mean_{t,n} 1[n in TopK(p)] p_n.
/// The gradient is exact for the clipped loss: d/dp_n of p_hat log(p_hat / q_hat) is
/// (log p_hat - log q_hat + 1) where the clip passes (torch.clamp's rule: min <= p <= max) and 0 where it
/// saturates; then dz = p * (g - <p, g>) (softmax Jacobian).
template <class W, class A>
void par_loss(MatrixView<A const> x, ffn::DenseFfnView<W> const& dense, ffn::ExpertWeights<W> const& experts,
              moe::Router<A> const& router, std::ptrdiff_t top_k, train::ParLossConfig const& config,
              train::ParLossResult<A>& out, Workspace& ws, CpuScalar const&) {
  std::ptrdiff_t const n_tokens = x.rows(), n = experts.n_experts(), d = experts.d_model(), k = top_k;
  detail::WorkspaceCursor cursor(ws, "par_loss");
  double* hidden = cursor.take<double>(static_cast<std::size_t>(dense.d_ff()));
  double* f = cursor.take<double>(static_cast<std::size_t>(d));
  double* e_out = cursor.take<double>(static_cast<std::size_t>(d));
  double* z = cursor.take<double>(static_cast<std::size_t>(5 * n));
  double* p = z + n;
  double* dz_par = p + n;
  double* dz_bal = dz_par + n;
  double* mse = dz_bal + n;
  double* acc = cursor.take<double>(static_cast<std::size_t>(2 * n * (d + 1)));
  double* dw_par = acc;
  double* db_par = dw_par + n * d;
  double* dw_bal = db_par + n;
  double* db_bal = dw_bal + n * d;
  std::int32_t* label_ids = cursor.take<std::int32_t>(static_cast<std::size_t>(2 * k));
  std::int32_t* router_ids = label_ids + k;
  std::fill(acc, acc + 2 * n * (d + 1), 0.0);

  double const s = moe::Gating::code_ref_scale(n, k);  // MSE target f / floor(N/K): spec 3.2 step 4, quirk Q5
  train::ParTarget const q = train::par_target_q(n, k);  // spec 3.2 step 6 (q table)
  double const lo = config.clip, hi = 1.0 - config.clip;
  auto clip = [&](double v) { return std::min(std::max(v, lo), hi); };
  double const inv_t = 1.0 / static_cast<double>(n_tokens), inv_nt = inv_t / static_cast<double>(n);
  double par_sum = 0, bal_sum = 0;
  std::int64_t matches = 0;

  for (std::ptrdiff_t t = 0; t < n_tokens; ++t) {
    A const* xr = x.row(t);
    // Router distribution p = softmax(W_r x + b_r) (spec 3.2 step 1).
    double zmax = -INFINITY;
    for (std::ptrdiff_t e = 0; e < n; ++e) {
      double acc_z = to_double(router.bias()(e));
      for (std::ptrdiff_t c = 0; c < d; ++c) acc_z += to_double(router.weight()(e, c)) * to_double(xr[c]);
      z[e] = acc_z;
      zmax = std::fmax(zmax, acc_z);
    }
    double zsum = 0;
    for (std::ptrdiff_t e = 0; e < n; ++e) zsum += std::exp(z[e] - zmax);
    for (std::ptrdiff_t e = 0; e < n; ++e) p[e] = std::exp(z[e] - zmax) / zsum;

    // Teacher f = F(x) and per-expert MSE to f / s (steps 2-4).
    swiglu_row(dense.gate, dense.up, dense.down, xr, hidden, f);
    for (std::ptrdiff_t e = 0; e < n; ++e) {
      swiglu_row(experts.gate(e), experts.up(e), experts.down(e), xr, hidden, e_out);
      double se = 0;
      for (std::ptrdiff_t c = 0; c < d; ++c) {
        double const diff = e_out[c] - f[c] / s;
        se += diff * diff;
      }
      mse[e] = se / static_cast<double>(d);
      out.mse_to_target(t, e) = static_cast<A>(mse[e]);
    }
    // Pseudo-label: the K experts with the smallest MSE, lower index first on ties (step 5).
    topk_indices([&](std::ptrdiff_t e) { return -mse[e]; }, n, k, label_ids);
    topk_indices([&](std::ptrdiff_t e) { return z[e]; }, n, k, router_ids);
    bool same_set = true;
    for (std::ptrdiff_t j = 0; j < k; ++j) {
      out.pseudo_label(t, j) = label_ids[j];
      out.router_topk(t, j) = router_ids[j];
      same_set &= std::find(router_ids, router_ids + k, label_ids[j]) != router_ids + k;
    }
    matches += same_set ? 1 : 0;

    // KL(clip(p) || clip(q)) and its gradient (steps 6-7).
    double kl = 0, pg = 0;
    for (std::ptrdiff_t e = 0; e < n; ++e) {
      bool const selected = std::find(label_ids, label_ids + k, e) != label_ids + k;
      double const qh = clip(selected ? q.selected : q.unselected), ph = clip(p[e]);
      kl += ph * std::log(ph / qh);
      double const g = (p[e] >= lo && p[e] <= hi) ? (std::log(ph) - std::log(qh) + 1.0) : 0.0;
      dz_par[e] = g;
      pg += p[e] * g;
    }
    par_sum += kl;
    for (std::ptrdiff_t e = 0; e < n; ++e) dz_par[e] = p[e] * (dz_par[e] - pg) * inv_t;

    // Balance term: mean_{t,n} of mask * p with mask = TopK(p) = TopK(z) (spec 3.2 "Balance").
    double sel_mass = 0;
    for (std::ptrdiff_t j = 0; j < k; ++j) sel_mass += p[router_ids[j]];
    bal_sum += sel_mass;
    for (std::ptrdiff_t e = 0; e < n; ++e) {
      bool const in_topk = std::find(router_ids, router_ids + k, e) != router_ids + k;
      dz_bal[e] = p[e] * ((in_topk ? 1.0 : 0.0) - sel_mass) * inv_nt;
    }
    for (std::ptrdiff_t e = 0; e < n; ++e) {
      db_par[e] += dz_par[e];
      db_bal[e] += dz_bal[e];
      for (std::ptrdiff_t c = 0; c < d; ++c) {
        double const xc = to_double(xr[c]);
        dw_par[e * d + c] += dz_par[e] * xc;
        dw_bal[e * d + c] += dz_bal[e] * xc;
      }
    }
  }
  out.par_loss = par_sum * inv_t;
  out.balance_loss = bal_sum * inv_nt;
  out.total_loss = config.par_weight * out.par_loss + config.balance_weight * out.balance_loss;
  out.label_accuracy = static_cast<double>(matches) * inv_t;
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    out.grad_bias_par(e) = static_cast<A>(db_par[e]);
    out.grad_bias_balance(e) = static_cast<A>(db_bal[e]);
    out.grad_bias(e) = static_cast<A>(config.par_weight * db_par[e] + config.balance_weight * db_bal[e]);
    for (std::ptrdiff_t c = 0; c < d; ++c) {
      double const gp = dw_par[e * d + c], gb = dw_bal[e * d + c];
      out.grad_weight_par(e, c) = static_cast<A>(gp);
      out.grad_weight_balance(e, c) = static_cast<A>(gb);
      out.grad_weight(e, c) = static_cast<A>(config.par_weight * gp + config.balance_weight * gb);
    }
  }
}

}  // namespace kernel
}  // namespace factorllm
