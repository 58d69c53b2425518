// SPDX-License-Identifier: Apache-2.0
// Scalar oracle of the PAR loss, the balance term and their router gradients (docs/math.md §3.2), in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../../core/kernel_args.hpp"
#include "../../core/type_traits.hpp"
#include "../../core/workspace.hpp"
#include "../ops.hpp"
#include "swiglu.hpp"
#include "topk.hpp"

namespace factorllm {
namespace detail {

/// The router half of the PAR and balance losses (docs/math.md §3.2 step 1, steps 6-7 and "Balance"), in double: per token,
/// p = softmax(W_r x + b_r), the router's TopK, KL(clip(p) || clip(q)) for given pseudo-labels, the balance mass,
/// and both losses' gradients w.r.t. W_r and b_r accumulated over tokens. Shared by the scalar oracle
/// (kernel::par_loss, which finds the labels from the experts' MSEs) and train::par_loss_from_labels (labels given).
/// The gradient is exact for the clipped loss: d/dp_n of p_hat log(p_hat / q_hat) is (log p_hat - log q_hat + 1)
/// where the clip passes (torch.clamp's rule: min <= p <= max) and 0 where it saturates; then dz = p * (g - <p, g>).
class ParRouterAccumulator {
 public:
  /// Adds this accumulator's scratch to a layout (must match the order of the constructor's takes).
  static WorkspaceLayout& add_scratch(WorkspaceLayout& layout, std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                      std::ptrdiff_t top_k) {
    auto const n = static_cast<std::size_t>(n_experts), d = static_cast<std::size_t>(d_model);
    return layout.add(sizeof(double), 4 * n)              // z, p, dz_par, dz_bal
        .add(sizeof(double), 2 * n * (d + 1))             // dW, db accumulators: par and balance
        .add(sizeof(std::int32_t), static_cast<std::size_t>(top_k));  // router TopK ids
  }

  ParRouterAccumulator(WorkspaceCursor& cursor, std::ptrdiff_t n_tokens, std::ptrdiff_t d_model,
                       std::ptrdiff_t n_experts, std::ptrdiff_t top_k, double clip)
      : n_(n_experts), d_(d_model), k_(top_k), q_(par_target_q(n_experts, top_k)), lo_(clip), hi_(1.0 - clip),
        inv_t_(1.0 / static_cast<double>(n_tokens)), inv_nt_(inv_t_ / static_cast<double>(n_experts)) {
    z_ = cursor.take<double>(static_cast<std::size_t>(4 * n_));
    p_ = z_ + n_;
    dz_par_ = p_ + n_;
    dz_bal_ = dz_par_ + n_;
    double* acc = cursor.take<double>(static_cast<std::size_t>(2 * n_ * (d_ + 1)));
    dw_par_ = acc;
    db_par_ = dw_par_ + n_ * d_;
    dw_bal_ = db_par_ + n_;
    db_bal_ = dw_bal_ + n_ * d_;
    router_ids_ = cursor.take<std::int32_t>(static_cast<std::size_t>(k_));
    std::fill(acc, acc + 2 * n_ * (d_ + 1), 0.0);
  }

  /// z = W_r x + b_r and p = softmax(z) for one token (docs/math.md §3.2 step 1); returns p [n_experts].
  template <class A>
  double const* route(type_identity_t<RouterView<A>> router, A const* xr) {
    double zmax = -INFINITY;
    for (std::ptrdiff_t e = 0; e < n_; ++e) {
      double acc_z = to_double(router.bias(e));
      A const* wr = router.weight.row(e);
      for (std::ptrdiff_t c = 0; c < d_; ++c) acc_z += to_double(wr[c]) * to_double(xr[c]);
      z_[e] = acc_z;
      zmax = std::fmax(zmax, acc_z);
    }
    double zsum = 0;
    for (std::ptrdiff_t e = 0; e < n_; ++e) zsum += std::exp(z_[e] - zmax);
    for (std::ptrdiff_t e = 0; e < n_; ++e) p_[e] = std::exp(z_[e] - zmax) / zsum;
    return p_;
  }

  /// After route(): records token t's labels and router TopK in `out`, and adds its KL, balance mass and
  /// gradients (x row xr) to the sums.
  template <class A>
  void add_token(std::ptrdiff_t t, A const* xr, std::int32_t const* label_ids, type_identity_t<ParLossOutView<A>> const& out) {
    kernel::topk_indices([&](std::ptrdiff_t e) { return z_[e]; }, n_, k_, router_ids_);
    bool same_set = true;
    for (std::ptrdiff_t j = 0; j < k_; ++j) {
      out.pseudo_label(t, j) = label_ids[j];
      out.router_topk(t, j) = router_ids_[j];
      same_set &= std::find(router_ids_, router_ids_ + k_, label_ids[j]) != router_ids_ + k_;
    }
    matches_ += same_set ? 1 : 0;
    // KL(clip(p) || clip(q)) and d/dz through the softmax Jacobian (steps 6-7).
    double kl = 0, pg = 0;
    for (std::ptrdiff_t e = 0; e < n_; ++e) {
      bool const selected = std::find(label_ids, label_ids + k_, static_cast<std::int32_t>(e)) != label_ids + k_;
      double const qh = clip(selected ? q_.selected : q_.unselected), ph = clip(p_[e]);
      kl += ph * std::log(ph / qh);
      double const g = (p_[e] >= lo_ && p_[e] <= hi_) ? (std::log(ph) - std::log(qh) + 1.0) : 0.0;
      dz_par_[e] = g;
      pg += p_[e] * g;
    }
    par_sum_ += kl;
    for (std::ptrdiff_t e = 0; e < n_; ++e) dz_par_[e] = p_[e] * (dz_par_[e] - pg) * inv_t_;
    // Balance term: mean_{t,n} of mask * p with mask = TopK(p) = TopK(z) (docs/math.md §3.2 "Balance").
    double sel_mass = 0;
    for (std::ptrdiff_t j = 0; j < k_; ++j) sel_mass += p_[router_ids_[j]];
    bal_sum_ += sel_mass;
    for (std::ptrdiff_t e = 0; e < n_; ++e) {
      bool const in_topk = std::find(router_ids_, router_ids_ + k_, static_cast<std::int32_t>(e)) != router_ids_ + k_;
      dz_bal_[e] = p_[e] * ((in_topk ? 1.0 : 0.0) - sel_mass) * inv_nt_;
    }
    for (std::ptrdiff_t e = 0; e < n_; ++e) {
      db_par_[e] += dz_par_[e];
      db_bal_[e] += dz_bal_[e];
      for (std::ptrdiff_t c = 0; c < d_; ++c) {
        double const xc = to_double(xr[c]);
        dw_par_[e * d_ + c] += dz_par_[e] * xc;
        dw_bal_[e * d_ + c] += dz_bal_[e] * xc;
      }
    }
  }

  /// Writes the losses (means over tokens), the label accuracy and the gradients into `out`.
  template <class A>
  ParLossValues finish(ParLossConfig const& config, type_identity_t<ParLossOutView<A>> const& out) const {
    ParLossValues values;
    values.par_loss = par_sum_ * inv_t_;
    values.balance_loss = bal_sum_ * inv_nt_;
    values.total_loss = config.par_weight * values.par_loss + config.balance_weight * values.balance_loss;
    values.label_accuracy = static_cast<double>(matches_) * inv_t_;
    for (std::ptrdiff_t e = 0; e < n_; ++e) {
      out.grad_bias_par(e) = static_cast<A>(db_par_[e]);
      out.grad_bias_balance(e) = static_cast<A>(db_bal_[e]);
      out.grad_bias(e) = static_cast<A>(config.par_weight * db_par_[e] + config.balance_weight * db_bal_[e]);
      for (std::ptrdiff_t c = 0; c < d_; ++c) {
        double const gp = dw_par_[e * d_ + c], gb = dw_bal_[e * d_ + c];
        out.grad_weight_par(e, c) = static_cast<A>(gp);
        out.grad_weight_balance(e, c) = static_cast<A>(gb);
        out.grad_weight(e, c) = static_cast<A>(config.par_weight * gp + config.balance_weight * gb);
      }
    }
    return values;
  }

 private:
  double clip(double v) const noexcept { return std::min(std::max(v, lo_), hi_); }

  std::ptrdiff_t n_, d_, k_;
  ParTarget q_;  // docs/math.md §3.2 step 6 (q table)
  double lo_, hi_, inv_t_, inv_nt_;
  double *z_ = nullptr, *p_ = nullptr, *dz_par_ = nullptr, *dz_bal_ = nullptr;
  double *dw_par_ = nullptr, *db_par_ = nullptr, *dw_bal_ = nullptr, *db_bal_ = nullptr;
  std::int32_t* router_ids_ = nullptr;
  double par_sum_ = 0, bal_sum_ = 0;
  std::int64_t matches_ = 0;
};

}  // namespace detail

namespace kernel {

/// PAR + balance losses over all rows of x and their gradients w.r.t. W_r and b_r (docs/math.md §3.2):
///   p = softmax(z), f = F(x), e_n = E_n(x), delta_n = mean_d (e_n - f / s)^2 with s = floor(N/K),
///   y = multi-hot(K smallest delta), q = softmax(y), L_PA = mean_t KL(clip(p) || clip(q)),
///   L_bal = mean_{t,n} 1[n in TopK(p)] p_n.
/// The gradient is exact for the clipped loss: d/dp_n of p_hat log(p_hat / q_hat) is
/// (log p_hat - log q_hat + 1) where the clip passes (torch.clamp's rule: min <= p <= max) and 0 where it
/// saturates; then dz = p * (g - <p, g>) (softmax Jacobian).
template <>
struct ParLoss<CpuScalar> {
  static constexpr bool implemented = true;

  /// Teacher/expert rows, per-token router vectors, gradient accumulators (independent of n_tokens).
  template <class W, class A>
  static detail::WorkspaceLayout workspace(std::ptrdiff_t d_model, std::ptrdiff_t d_ff, std::ptrdiff_t n_experts,
                                           std::ptrdiff_t top_k) {
    auto const d = static_cast<std::size_t>(d_model), n = static_cast<std::size_t>(n_experts),
               k = static_cast<std::size_t>(top_k);
    detail::WorkspaceLayout layout;
    layout.add(sizeof(double), static_cast<std::size_t>(d_ff))  // hidden row (dense teacher, the largest)
        .add(sizeof(double), d)                                   // teacher f
        .add(sizeof(double), d)                                   // expert output e_n
        .add(sizeof(double), n)                                   // mse
        .add(sizeof(std::int32_t), k);                            // pseudo-label ids
    return detail::ParRouterAccumulator::add_scratch(layout, d_model, n_experts, top_k);
  }

  /// \param dense_gate, dense_up, dense_down  the teacher [d_ff, d_model], [d_ff, d_model], [d_model, d_ff]
  template <class W, class A>
  static ParLossValues run(MatrixView<A const> x, MatrixView<W const> dense_gate, MatrixView<W const> dense_up,
                           MatrixView<W const> dense_down, ExpertWeightsView<W> const& experts, RouterView<A> router,
                           std::ptrdiff_t top_k, ParLossConfig const& config, ParLossOutView<A> const& out,
                           WorkspaceSpan ws) {
    std::ptrdiff_t const n_tokens = x.rows(), n = experts.n_experts(), d = experts.d_model(), k = top_k;
    detail::WorkspaceCursor cursor(ws, "par_loss");
    double* hidden = cursor.take<double>(static_cast<std::size_t>(dense_gate.rows()));
    double* f = cursor.take<double>(static_cast<std::size_t>(d));
    double* e_out = cursor.take<double>(static_cast<std::size_t>(d));
    double* mse = cursor.take<double>(static_cast<std::size_t>(n));
    std::int32_t* label_ids = cursor.take<std::int32_t>(static_cast<std::size_t>(k));
    detail::ParRouterAccumulator router_terms(cursor, n_tokens, d, n, k, config.clip);
    double const s = GatingParams::code_ref_scale(n, k);  // MSE target f / floor(N/K): docs/math.md §3.2 step 4, quirk Q5

    for (std::ptrdiff_t t = 0; t < n_tokens; ++t) {
      A const* xr = x.row(t);
      router_terms.route<A>(router, xr);  // step 1
      // Teacher f = F(x) and per-expert MSE to f / s (steps 2-4).
      swiglu_row(dense_gate, dense_up, dense_down, xr, hidden, f);
      for (std::ptrdiff_t e = 0; e < n; ++e) {
        swiglu_row(experts.gate_of(e), experts.up_of(e), experts.down_of(e), xr, hidden, e_out);
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
      router_terms.add_token<A>(t, xr, label_ids, out);  // steps 6-7 and the balance term
    }
    return router_terms.finish<A>(config, out);
  }
};

}  // namespace kernel
}  // namespace factorllm
