// SPDX-License-Identifier: Apache-2.0
// Independent double-precision references for the tests: plain loops over std::vector<double>, written from
// the spec's equations without using any library kernel. Also seeded data generators and tolerance helpers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace ref {

using Vec = std::vector<double>;

/// A dense SwiGLU FFN in double, row-major nn.Linear layout.
struct Ffn {
  int d_model = 0, d_ff = 0;
  Vec gate, up, down;  // [d_ff, d], [d_ff, d], [d, d_ff]
};

inline double silu(double a) { return a / (1.0 + std::exp(-a)); }

/// F(x) restricted to the neurons in `neurons` (all of them for the dense FFN): docs/math.md §1.1 / 1.2.
inline Vec ffn_on_neurons(Ffn const& f, double const* x, std::vector<int> const& neurons) {
  Vec y(static_cast<std::size_t>(f.d_model), 0.0);
  for (int i : neurons) {
    double g = 0, u = 0;
    for (int k = 0; k < f.d_model; ++k) {
      g += f.gate[static_cast<std::size_t>(i * f.d_model + k)] * x[k];
      u += f.up[static_cast<std::size_t>(i * f.d_model + k)] * x[k];
    }
    double const h = silu(g) * u;
    for (int o = 0; o < f.d_model; ++o) y[static_cast<std::size_t>(o)] += f.down[static_cast<std::size_t>(o * f.d_ff + i)] * h;
  }
  return y;
}

inline Vec dense(Ffn const& f, double const* x) {
  std::vector<int> all(static_cast<std::size_t>(f.d_ff));
  std::iota(all.begin(), all.end(), 0);
  return ffn_on_neurons(f, x, all);
}

/// Expert e of the partition `perm` (expert e owns perm[e*m .. (e+1)*m)).
inline Vec expert(Ffn const& f, std::vector<std::int32_t> const& perm, int n_experts, int e, double const* x) {
  int const m = f.d_ff / n_experts;
  std::vector<int> neurons(perm.begin() + e * m, perm.begin() + (e + 1) * m);
  return ffn_on_neurons(f, x, neurons);
}

inline Vec logits(Vec const& w, Vec const& b, double const* x, int n, int d) {
  Vec z(static_cast<std::size_t>(n));
  for (int e = 0; e < n; ++e) {
    double s = b[static_cast<std::size_t>(e)];
    for (int k = 0; k < d; ++k) s += w[static_cast<std::size_t>(e * d + k)] * x[k];
    z[static_cast<std::size_t>(e)] = s;
  }
  return z;
}

inline Vec softmax(Vec const& z) {
  double const mx = *std::max_element(z.begin(), z.end());
  Vec p(z.size());
  double s = 0;
  for (std::size_t i = 0; i < z.size(); ++i) s += (p[i] = std::exp(z[i] - mx));
  for (auto& v : p) v /= s;
  return p;
}

/// Indices of the k largest values, larger first, lower index first on ties (by a stable sort).
inline std::vector<int> topk(Vec const& v, int k) {
  std::vector<int> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return v[static_cast<std::size_t>(a)] > v[static_cast<std::size_t>(b)]; });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

/// Combine weights of the selected experts for a mode name (moe/gating.hpp table), before output_scale.
inline Vec combine_weights(std::string const& mode, Vec const& z, std::vector<int> const& sel, bool sigmoid_renorm = false) {
  int const n = static_cast<int>(z.size()), k = static_cast<int>(sel.size());
  Vec w(sel.size());
  Vec const p = softmax(z);
  double sum_sel = 0;
  for (int j = 0; j < k; ++j) {
    double const zj = z[static_cast<std::size_t>(sel[static_cast<std::size_t>(j)])];
    double v = 0;
    if (mode == "code_ref") v = static_cast<double>(n / k);
    else if (mode == "softmax_topk" || mode == "softmax_topk_renorm") v = p[static_cast<std::size_t>(sel[static_cast<std::size_t>(j)])];
    else if (mode == "topk_softmax") v = std::exp(zj);
    else if (mode == "sigmoid_topk") v = 1.0 / (1.0 + std::exp(-zj));
    w[static_cast<std::size_t>(j)] = v;
    sum_sel += v;
  }
  bool const renorm = mode == "softmax_topk_renorm" || mode == "topk_softmax" || (mode == "sigmoid_topk" && sigmoid_renorm);
  if (renorm)
    for (auto& v : w) v /= sum_sel;
  return w;
}

/// Router losses of docs/math.md §3.2 over T tokens, computed directly from the definitions.
struct ParReference {
  double par = 0, balance = 0;
  Vec grad_w_par, grad_b_par, grad_w_bal, grad_b_bal;  // analytic, docs/math.md §3.2 formulas (unclipped regime)
  std::vector<std::vector<int>> labels, router_sel;
  double accuracy = 0;
};

inline ParReference par(Ffn const& f, std::vector<std::int32_t> const& perm, int n, int k, Vec const& w, Vec const& b,
                        Vec const& x, int n_tokens, double clip = 1e-7) {
  int const d = f.d_model;
  ParReference r;
  r.grad_w_par.assign(static_cast<std::size_t>(n * d), 0.0);
  r.grad_b_par.assign(static_cast<std::size_t>(n), 0.0);
  r.grad_w_bal = r.grad_w_par;
  r.grad_b_bal = r.grad_b_par;
  double const s = static_cast<double>(n / k);
  int matches = 0;
  for (int t = 0; t < n_tokens; ++t) {
    double const* xt = x.data() + t * d;
    Vec const z = logits(w, b, xt, n, d), p = softmax(z);
    Vec const fx = dense(f, xt);
    Vec mse(static_cast<std::size_t>(n));
    for (int e = 0; e < n; ++e) {
      Vec const ex = expert(f, perm, n, e, xt);
      double acc = 0;
      for (int c = 0; c < d; ++c) acc += std::pow(ex[static_cast<std::size_t>(c)] - fx[static_cast<std::size_t>(c)] / s, 2);
      mse[static_cast<std::size_t>(e)] = acc / d;
    }
    Vec neg(mse.size());
    for (std::size_t i = 0; i < mse.size(); ++i) neg[i] = -mse[i];
    auto const label = topk(neg, k);
    Vec y(static_cast<std::size_t>(n), 0.0);
    for (int e : label) y[static_cast<std::size_t>(e)] = 1.0;
    Vec const q = softmax(y);
    double kl = 0;
    for (int e = 0; e < n; ++e) {
      double const ph = std::clamp(p[static_cast<std::size_t>(e)], clip, 1 - clip), qh = std::clamp(q[static_cast<std::size_t>(e)], clip, 1 - clip);
      kl += ph * std::log(ph / qh);
    }
    r.par += kl / n_tokens;
    auto const sel = topk(z, k);
    double mass = 0;
    for (int e : sel) mass += p[static_cast<std::size_t>(e)];
    r.balance += mass / (n * n_tokens);
    // Spec 3.2 analytic gradients (valid when no clip saturates).
    double plq = 0;
    for (int i = 0; i < n; ++i) plq += p[static_cast<std::size_t>(i)] * (std::log(p[static_cast<std::size_t>(i)]) - std::log(q[static_cast<std::size_t>(i)]));
    for (int j = 0; j < n; ++j) {
      double const pj = p[static_cast<std::size_t>(j)];
      double const gp = pj * (std::log(pj) - std::log(q[static_cast<std::size_t>(j)]) - plq) / n_tokens;
      bool const in = std::find(sel.begin(), sel.end(), j) != sel.end();
      double const gb = pj * ((in ? 1.0 : 0.0) - mass) / (n * n_tokens);
      r.grad_b_par[static_cast<std::size_t>(j)] += gp;
      r.grad_b_bal[static_cast<std::size_t>(j)] += gb;
      for (int c = 0; c < d; ++c) {
        r.grad_w_par[static_cast<std::size_t>(j * d + c)] += gp * xt[c];
        r.grad_w_bal[static_cast<std::size_t>(j * d + c)] += gb * xt[c];
      }
    }
    auto ls = label, rs = sel;
    std::sort(ls.begin(), ls.end());
    std::sort(rs.begin(), rs.end());
    matches += ls == rs ? 1 : 0;
    r.labels.push_back(label);
    r.router_sel.push_back(sel);
  }
  r.accuracy = static_cast<double>(matches) / n_tokens;
  return r;
}

/// Seeded normal values scaled by `scale`.
inline Vec randn(std::size_t n, std::uint64_t seed, double scale) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist(0.0, scale);
  Vec v(n);
  for (auto& e : v) e = dist(rng);
  return v;
}

/// A random FFN with weights of the magnitude of a trained one (so SiLU sees both signs).
inline Ffn random_ffn(int d_model, int d_ff, std::uint64_t seed) {
  Ffn f;
  f.d_model = d_model;
  f.d_ff = d_ff;
  f.gate = randn(static_cast<std::size_t>(d_ff * d_model), seed, 1.0 / std::sqrt(d_model));
  f.up = randn(static_cast<std::size_t>(d_ff * d_model), seed + 1, 1.0 / std::sqrt(d_model));
  f.down = randn(static_cast<std::size_t>(d_model * d_ff), seed + 2, 1.0 / std::sqrt(d_ff));
  return f;
}

/// Relative L2 error ||a - b|| / max(||b||, tiny).
template <class A, class B>
double rel_l2(A const& a, B const& b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    double const diff = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    num += diff * diff;
    den += static_cast<double>(b[i]) * static_cast<double>(b[i]);
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

/// Max over i of |a_i - b_i| / max(|b_i|, floor): element-wise relative error with an absolute floor.
template <class A, class B>
double max_rel(A const& a, B const& b, std::size_t n, double floor = 1.0) {
  double m = 0;
  for (std::size_t i = 0; i < n; ++i) {
    double const bi = static_cast<double>(b[i]);
    m = std::max(m, std::fabs(static_cast<double>(a[i]) - bi) / std::max(std::fabs(bi), floor));
  }
  return m;
}

}  // namespace ref
