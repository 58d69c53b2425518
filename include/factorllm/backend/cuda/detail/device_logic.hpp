// SPDX-License-Identifier: Apache-2.0
// Per-thread logic of the CUDA kernels that can be written once for both sides: each function is what one thread of
// a kernel computes (src/cuda/*.cu call them), and a plain C++ build calls the same functions in loops that stand
// for the grid (tests/cuda/test_cuda_launch.cpp), so the kernels' arithmetic and index logic are tested against
// CpuScalar on a machine without a GPU. Plain C++ when not compiled by nvcc (FLLM_HOST_DEVICE is then empty).
#pragma once

#include <cmath>
#include <cstdint>

#include "../../../core/kernel_args.hpp"

#if defined(__CUDACC__)
#define FLLM_HOST_DEVICE __host__ __device__
#else
#define FLLM_HOST_DEVICE
#endif

namespace factorllm {
namespace cuda {
namespace logic {

/// Largest top_k of the per-thread TopK (ids live in a fixed array): cuda::kMaxTopK.
inline constexpr int kMaxTopK = 32;

/// NaN test without <cmath>'s overload sets (the same on host and device).
FLLM_HOST_DEVICE inline bool is_nan(double v) { return v != v; }

/// detail::sigmoid, detail::log_sigmoid and detail::silu of detail/math.hpp.
FLLM_HOST_DEVICE inline double sigmoid(double a) {
  if (a >= 0) return 1.0 / (1.0 + exp(-a));
  double const e = exp(a);
  return e / (1.0 + e);
}
FLLM_HOST_DEVICE inline double log_sigmoid(double a) {
  if (a >= 0) return -log1p(exp(-a));
  return a - log1p(exp(a));
}

/// detail::ranks_before: larger first, lower index on ties, NaN last (NaNs in index order).
FLLM_HOST_DEVICE inline bool ranks_before(double va, int a, double vb, int b) {
  bool const na = is_nan(va), nb = is_nan(vb);
  if (na || nb) return na == nb ? a < b : nb;
  if (va != vb) return va > vb;
  return a < b;
}

/// Indices of the k best of score(0..n), best first (kernel::topk_indices).
template <class Score>
FLLM_HOST_DEVICE void topk(Score const& score, int n, int k, int* ids) {
  for (int j = 0; j < k; ++j) {
    int best = -1;
    double best_score = 0;
    for (int i = 0; i < n; ++i) {
      bool taken = false;
      for (int q = 0; q < j; ++q) taken |= ids[q] == i;
      if (taken) continue;
      double const s = score(i);
      if (best < 0 || ranks_before(s, i, best_score, best)) {
        best = i;
        best_score = s;
      }
    }
    ids[j] = best;
  }
}

/// The select kernel's arguments (GatingParams with the bias as a pointer the kernel can read).
struct SelectArgs {
  int n_experts;
  int top_k;
  int mode;  // CombineMode
  bool sigmoid_renormalize;
  float const* bias;  // n_experts selection biases, or null
  float output_scale;
  double code_ref_scale;
};

/// One token of SelectExperts (a thread of the select kernel): TopK of z + bias into ids[0..k), the combine weights
/// of the mode into w[0..k), in double as SelectExperts<CpuScalar>.
FLLM_HOST_DEVICE inline void select_token(float const* z, SelectArgs const& a, std::int32_t* ids_out, float* w_out) {
  int const n = a.n_experts, k = a.top_k;
  int id[kMaxTopK];
  topk([&](int i) { return static_cast<double>(z[i]) + (a.bias != nullptr ? static_cast<double>(a.bias[i]) : 0.0); },
       n, k, id);
  bool any_nan = false;
  double max_all = -INFINITY, max_sel = -INFINITY;
  for (int i = 0; i < n; ++i) {
    double const zi = z[i];
    any_nan |= is_nan(zi);
    max_all = fmax(max_all, zi);
  }
  for (int j = 0; j < k; ++j) max_sel = fmax(max_sel, static_cast<double>(z[id[j]]));
  double all_sum = 0;
  for (int i = 0; i < n; ++i) all_sum += exp(static_cast<double>(z[i]) - max_all);
  auto const mode = static_cast<CombineMode>(a.mode);
  auto raw_weight = [&](int j) -> double {
    double const zj = z[id[j]];
    switch (mode) {
      case CombineMode::code_ref: return a.code_ref_scale;
      case CombineMode::softmax_topk:
      case CombineMode::softmax_topk_renorm: return exp(zj - max_all) / all_sum;
      case CombineMode::topk_softmax: return exp(zj - max_sel);
      case CombineMode::sigmoid_topk: return sigmoid(zj);
    }
    return 0.0;
  };
  bool const renormalize = mode == CombineMode::softmax_topk_renorm || mode == CombineMode::topk_softmax ||
                           (mode == CombineMode::sigmoid_topk && a.sigmoid_renormalize);
  double sel_sum = 0;
  for (int j = 0; j < k; ++j) sel_sum += raw_weight(j);
  // Underflow of sum_S (smallest normal double): the oracle's equal-in-exact-arithmetic softmax over the selected
  // (log-)scores.
  bool const underflow = renormalize && !(sel_sum >= 2.2250738585072014e-308);
  auto stable_score = [&](int j) {
    double const zj = z[id[j]];
    return mode == CombineMode::sigmoid_topk ? log_sigmoid(zj) : zj;
  };
  double stable_max = -INFINITY, stable_sum = 0;
  if (underflow) {
    for (int j = 0; j < k; ++j) stable_max = fmax(stable_max, stable_score(j));
    for (int j = 0; j < k; ++j) stable_sum += exp(stable_score(j) - stable_max);
  }
  for (int j = 0; j < k; ++j) {
    double const wj = underflow     ? exp(stable_score(j) - stable_max) / stable_sum
                      : renormalize ? raw_weight(j) / sel_sum
                                    : raw_weight(j);
    ids_out[j] = id[j];
    w_out[j] = any_nan ? static_cast<float>(NAN) : static_cast<float>(static_cast<double>(a.output_scale) * wj);
  }
}

// ---- Grouping (the three kernels of group_by_expert, per thread) ----

/// Scan kernel, thread of expert e: bases[c, e] = the chunk-relative start of chunk c's run of expert e; returns
/// the expert's total.
FLLM_HOST_DEVICE inline std::int64_t group_scan_expert(std::int32_t const* counts, std::int64_t n_chunks, int n_experts,
                                                       int e, std::int64_t* bases) {
  std::int64_t running = 0;
  for (std::int64_t c = 0; c < n_chunks; ++c) {
    bases[c * n_experts + e] = running;
    running += counts[c * n_experts + e];
  }
  return running;
}

/// Scatter kernel, thread `lane` of a chunk whose ids are chunk_ids[0..]: the slot's rank among the chunk's
/// earlier slots of the same expert (stability inside the chunk).
FLLM_HOST_DEVICE inline int group_rank_in_chunk(std::int32_t const* chunk_ids, int lane) {
  int const e = chunk_ids[lane];
  int rank = 0;
  for (int i = 0; i < lane; ++i) rank += chunk_ids[i] == e ? 1 : 0;
  return rank;
}

// ---- Router VJP of the backward (kernel::combine_weights_vjp), a thread per token ----

/// The VJP kernel's gating arguments.
struct VjpArgs {
  int n_experts, top_k, mode;
  bool sigmoid_renormalize;
  double scale;
};

/// dz[0..n) = d L / d z for one token from dw[0..k) = d L / d w (kernel::combine_weights_vjp on float logits).
FLLM_HOST_DEVICE inline void combine_weights_vjp(float const* z, std::int32_t const* id, double const* dw,
                                                 VjpArgs const& a, double* dz) {
  int const n = a.n_experts, k = a.top_k;
  double const s = a.scale;
  for (int i = 0; i < n; ++i) dz[i] = 0.0;
  auto const mode = static_cast<CombineMode>(a.mode);
  if (mode == CombineMode::softmax_topk) {
    float zmax = -INFINITY;
    for (int i = 0; i < n; ++i) zmax = fmaxf(zmax, z[i]);
    double const mx = zmax;
    double sum = 0, pg = 0;
    for (int i = 0; i < n; ++i) sum += exp(static_cast<double>(z[i]) - mx);
    for (int j = 0; j < k; ++j) pg += exp(static_cast<double>(z[id[j]]) - mx) / sum * s * dw[j];
    for (int i = 0; i < n; ++i) dz[i] = -exp(static_cast<double>(z[i]) - mx) / sum * pg;
    for (int j = 0; j < k; ++j) dz[id[j]] += exp(static_cast<double>(z[id[j]]) - mx) / sum * s * dw[j];
  } else if (mode == CombineMode::softmax_topk_renorm || mode == CombineMode::topk_softmax) {
    double mx = -INFINITY, sum = 0, rdw = 0;
    for (int j = 0; j < k; ++j) mx = fmax(mx, static_cast<double>(z[id[j]]));
    for (int j = 0; j < k; ++j) sum += exp(static_cast<double>(z[id[j]]) - mx);
    for (int j = 0; j < k; ++j) rdw += exp(static_cast<double>(z[id[j]]) - mx) / sum * dw[j];
    for (int j = 0; j < k; ++j) dz[id[j]] = s * exp(static_cast<double>(z[id[j]]) - mx) / sum * (dw[j] - rdw);
  } else if (mode == CombineMode::sigmoid_topk && !a.sigmoid_renormalize) {
    for (int j = 0; j < k; ++j) {
      double const zj = z[id[j]];
      dz[id[j]] = s * dw[j] * sigmoid(zj) * sigmoid(-zj);
    }
  } else if (mode == CombineMode::sigmoid_topk) {
    double mx = -INFINITY, sum = 0, rdw = 0;
    for (int j = 0; j < k; ++j) mx = fmax(mx, log_sigmoid(static_cast<double>(z[id[j]])));
    for (int j = 0; j < k; ++j) sum += exp(log_sigmoid(static_cast<double>(z[id[j]])) - mx);
    for (int j = 0; j < k; ++j) rdw += exp(log_sigmoid(static_cast<double>(z[id[j]])) - mx) / sum * dw[j];
    for (int j = 0; j < k; ++j) {
      double const zj = z[id[j]];
      dz[id[j]] = s * exp(log_sigmoid(zj) - mx) / sum * (dw[j] - rdw) * sigmoid(-zj);
    }
  }  // code_ref: the weights are constants, dz = 0
}

// ---- MoE backward, per element of a grouped row (kernel::MoeBackward<CpuScalar>'s formulas) ----

/// From the pre-activations a, b, g = (W_d^T dy)_i and the row's combine weight w: h = SiLU(a) b, dh = w g,
/// da = dh b SiLU'(a), db = dh SiLU(a) (stored f32); returns g h, this element's share of dL/dw.
FLLM_HOST_DEVICE inline double slot_backward_element(double a, double b, double g, double w, float* h, float* da,
                                                     float* db) {
  double const sig = sigmoid(a);
  double const si = a >= 0 ? a / (1.0 + exp(-a)) : a * exp(a) / (1.0 + exp(a));  // detail::silu
  double const hi = si * b;
  double const dh = w * g;
  *h = static_cast<float>(hi);
  *da = static_cast<float>(dh * b * sig * (1.0 + a * (1.0 - sig)));
  *db = static_cast<float>(dh * si);
  return g * hi;
}

// ---- PAR loss (the token kernel's thread 0 and the router gradient kernel) ----

/// Per-token constants of the PAR loss (docs/math.md §3.2): target q, clip bounds, 1 / T and 1 / (T N).
struct ParTokenArgs {
  int n_experts, top_k;
  double q_selected, q_unselected, lo, hi, inv_t, inv_nt;
};

/// One token of the PAR loss from its router logits z[0..n) (double) and MSEs mse[0..n): p = softmax(z) into
/// p[0..n), the pseudo-labels (K smallest MSE) and the router TopK, dL_PA/dz and dL_bal/dz (already divided by T
/// and T N), and sums[0..3) = KL(clip(p) || clip(q)), the selected mass, 1 when the two sets are equal.
/// detail::ParRouterAccumulator::add_token's arithmetic.
FLLM_HOST_DEVICE inline void par_token(double const* z, double* p, double const* mse, ParTokenArgs const& a,
                                       double* dz_par, double* dz_bal, std::int32_t* pseudo_label,
                                       std::int32_t* router_topk, double* sums) {
  int const n = a.n_experts, k = a.top_k;
  double zmax = -INFINITY;
  for (int e = 0; e < n; ++e) zmax = fmax(zmax, z[e]);
  double zsum = 0;
  for (int e = 0; e < n; ++e) zsum += exp(z[e] - zmax);
  for (int e = 0; e < n; ++e) p[e] = exp(z[e] - zmax) / zsum;
  int router_ids[kMaxTopK], labels[kMaxTopK];
  topk([&](int e) { return z[e]; }, n, k, router_ids);
  topk([&](int e) { return -mse[e]; }, n, k, labels);
  bool same_set = true;
  for (int j = 0; j < k; ++j) {
    pseudo_label[j] = labels[j];
    router_topk[j] = router_ids[j];
    bool found = false;
    for (int q = 0; q < k; ++q) found |= router_ids[q] == labels[j];
    same_set &= found;
  }
  auto clip = [&](double v) { return fmin(fmax(v, a.lo), a.hi); };
  double kl = 0, pg = 0;
  for (int e = 0; e < n; ++e) {
    bool selected = false;
    for (int q = 0; q < k; ++q) selected |= labels[q] == e;
    double const qh = clip(selected ? a.q_selected : a.q_unselected), ph = clip(p[e]);
    kl += ph * log(ph / qh);
    double const g = (p[e] >= a.lo && p[e] <= a.hi) ? (log(ph) - log(qh) + 1.0) : 0.0;
    dz_par[e] = g;
    pg += p[e] * g;
  }
  for (int e = 0; e < n; ++e) dz_par[e] = p[e] * (dz_par[e] - pg) * a.inv_t;
  double sel_mass = 0;
  for (int j = 0; j < k; ++j) sel_mass += p[router_ids[j]];
  for (int e = 0; e < n; ++e) {
    bool in_topk = false;
    for (int q = 0; q < k; ++q) in_topk |= router_ids[q] == e;
    dz_bal[e] = p[e] * ((in_topk ? 1.0 : 0.0) - sel_mass) * a.inv_nt;
  }
  sums[0] = kl;
  sums[1] = sel_mass;
  sums[2] = same_set ? 1.0 : 0.0;
}

/// One output of the router gradient kernel: out[0] = sum_t dz_par[t, e] x[t, c], out[1] the same with dz_bal,
/// tokens in order; c = d_model is the bias (x = 1).
FLLM_HOST_DEVICE inline void router_grad_output(float const* x, double const* dz_par, double const* dz_bal,
                                                std::int64_t n_tokens, int n_experts, std::int64_t d_model, int e,
                                                std::int64_t c, double* out) {
  double sp = 0, sb = 0;
  for (std::int64_t t = 0; t < n_tokens; ++t) {
    double const xc = c < d_model ? static_cast<double>(x[t * d_model + c]) : 1.0;
    sp += dz_par[t * n_experts + e] * xc;
    sb += dz_bal[t * n_experts + e] * xc;
  }
  out[0] = sp;
  out[1] = sb;
}

}  // namespace logic
}  // namespace cuda
}  // namespace factorllm
