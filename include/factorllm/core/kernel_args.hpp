// SPDX-License-Identifier: Apache-2.0
// Kernel-argument views: what every backend op takes (non-owning views and plain values, never owning objects).
//
// The owning types of the fronts (ffn::ExpertWeights, moe::Router, moe::Gating, moe::RoutingRecord,
// train::ParLossResult, train::MoeActivations) hand these out through view()/params(). A view may point at host
// or device memory: a kernel of a device backend receives the same structs (docs/design.md §3).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "dtype.hpp"
#include "executor.hpp"
#include "error.hpp"
#include "quant.hpp"
#include "tensor_view.hpp"

namespace factorllm {

// ---- Gating (docs/math.md §2.3) ----

/// How the selected experts are weighted (the table in moe/gating.hpp and docs/math.md §2.3).
enum class CombineMode { code_ref, softmax_topk, softmax_topk_renorm, topk_softmax, sigmoid_topk };

/// Returns the mode's name as written in the table ("code_ref", ...).
inline char const* to_string(CombineMode mode) noexcept {
  switch (mode) {
    case CombineMode::code_ref: return "code_ref";
    case CombineMode::softmax_topk: return "softmax_topk";
    case CombineMode::softmax_topk_renorm: return "softmax_topk_renorm";
    case CombineMode::topk_softmax: return "topk_softmax";
    case CombineMode::sigmoid_topk: return "sigmoid_topk";
  }
  return "unknown";
}

/// Parses a mode name; \throws value_error for an unknown name (listing the valid ones).
inline CombineMode combine_mode_from_string(std::string const& name) {
  for (auto m : {CombineMode::code_ref, CombineMode::softmax_topk, CombineMode::softmax_topk_renorm,
                 CombineMode::topk_softmax, CombineMode::sigmoid_topk})
    if (name == to_string(m)) return m;
  throw value_error("unknown combine mode '" + name +
                    "'; expected code_ref, softmax_topk, softmax_topk_renorm, topk_softmax or sigmoid_topk");
}

/// The gating of one layer as plain values: what select_experts kernels read. moe::Gating::params() makes one
/// (validated there); `selection_bias` points at `bias_len` floats (0 = no bias) that outlive the call.
struct GatingParams {
  CombineMode mode = CombineMode::code_ref;
  std::ptrdiff_t top_k = 1;
  bool sigmoid_renormalize = false;
  float const* selection_bias = nullptr;  // [n_experts] or null
  std::ptrdiff_t bias_len = 0;
  float output_scale = 1.0f;

  bool has_selection_bias() const noexcept { return bias_len != 0; }
  /// The code_ref scale floor(N / K) (docs/math.md §2.3, quirk Q6).
  static double code_ref_scale(std::ptrdiff_t n_experts, std::ptrdiff_t top_k) noexcept {
    return static_cast<double>(n_experts / top_k);
  }
};

// ---- Weights ----

/// Stacked weights of n_experts SwiGLU experts in the llama.cpp ffn_*_exps layout, in weight format W:
///   gate [n_experts, d_expert, d_model / block], up [same], down [n_experts, d_model, d_expert / block]
/// where block = dtype_traits<W>::block_weights (1 for f32, f64, bf16, f16; 32 for q8_0 and q4_0, whose rows are
/// ggml's consecutive blocks, so d_model and d_expert are multiples of 32 there). Strides in elements of W.
template <class W>
struct ExpertWeightsView {
  static_assert(is_weight_format_v<W>, "ExpertWeightsView: W must be a weight format (core/dtype.hpp)");
  using weight_type = W;
  static constexpr std::ptrdiff_t kBlock = dtype_traits<W>::block_weights;

  TensorView<W const, 3> gate;
  TensorView<W const, 3> up;
  TensorView<W const, 3> down;

  std::ptrdiff_t n_experts() const noexcept { return gate.extent(0); }
  std::ptrdiff_t d_expert() const noexcept { return gate.extent(1); }
  std::ptrdiff_t d_model() const noexcept { return gate.extent(2) * kBlock; }
  /// Expert e's gate rows [d_expert, d_model / block].
  MatrixView<W const> gate_of(std::ptrdiff_t e) const { return gate[e]; }
  /// Expert e's up rows [d_expert, d_model / block].
  MatrixView<W const> up_of(std::ptrdiff_t e) const { return up[e]; }
  /// Expert e's down rows [d_model, d_expert / block].
  MatrixView<W const> down_of(std::ptrdiff_t e) const { return down[e]; }
  /// True when all three tensors are dense row-major.
  bool is_contiguous() const noexcept { return gate.is_contiguous() && up.is_contiguous() && down.is_contiguous(); }
};

/// A linear router z = W_r x + b_r (docs/math.md §2.2): weight [n_experts, d_model], bias [n_experts].
template <class R>
struct RouterView {
  MatrixView<R const> weight;
  VectorView<R const> bias;

  std::ptrdiff_t n_experts() const noexcept { return weight.rows(); }
  std::ptrdiff_t d_model() const noexcept { return weight.cols(); }
};

// ---- Routing ----

/// The routing of n_tokens tokens (docs/design.md §2, steps 1-3). A is the activation type, const for a
/// read-only view (then every member is read-only).
///   logits  [n_tokens, n_experts]   router logits z
///   ids     [n_tokens, top_k]       chosen experts, best first
///   weights [n_tokens, top_k]       their combine weights
///   offsets [n_experts + 1]         expert e owns grouped rows offsets[e] .. offsets[e+1]
///   slots   [n_tokens * top_k]      grouped row r holds slot slots[r] = t * top_k + j
template <class A>
struct RoutingView {
  template <class I>
  using same_const = std::conditional_t<std::is_const_v<A>, I const, I>;

  MatrixView<A> logits;
  MatrixView<same_const<std::int32_t>> ids;
  MatrixView<A> weights;
  VectorView<same_const<std::int64_t>> offsets;
  VectorView<same_const<std::int32_t>> slots;

  std::ptrdiff_t n_tokens() const noexcept { return ids.rows(); }
  std::ptrdiff_t top_k() const noexcept { return ids.cols(); }
  std::ptrdiff_t n_experts() const noexcept { return offsets.extent(0) - 1; }

  /// Converts a writable view to a read-only one.
  template <class B = A, class = std::enable_if_t<!std::is_const_v<B>>>
  operator RoutingView<B const>() const noexcept {  // NOLINT: implicit like TensorView's const conversion
    return RoutingView<B const>{logits, ids, weights, offsets, slots};
  }
};

// ---- Training (docs/math.md §3.2, and the MoE backward in docs/math.md §2.5) ----

/// Non-owning views of one MoE layer's trainable parameters, in the stacked layout of ExpertWeightsView and the
/// nn.Linear layout of RouterView. Training changes the weights every step, so the training forward/backward
/// read them through views. Every view must be dense row-major.
/// \tparam W  weight format of the experts (a plain one: the training kernels have no block-quantized
///            weights, and instantiating this view with q8_0 or q4_0 stops the build); the router uses the
///            activation type.
template <class W>
struct MoeParamsView {
  static_assert(!is_block_format_v<W>,
                "MoeParamsView: the training forward and backward (train/moe_backward.hpp) take plain weight formats "
                "(f32, f64, bf16, f16), not block-quantized q8_0 / q4_0; train on float experts and quantize after "
                "(ffn::convert_format<q8_0>)");
  using A = activation_t<W>;
  TensorView<W const, 3> gate;        // [n_experts, d_expert, d_model]
  TensorView<W const, 3> up;          // [n_experts, d_expert, d_model]
  TensorView<W const, 3> down;        // [n_experts, d_model, d_expert]
  MatrixView<A const> router_weight;  // [n_experts, d_model]
  VectorView<A const> router_bias;    // [n_experts]

  std::ptrdiff_t n_experts() const noexcept { return gate.extent(0); }
  std::ptrdiff_t d_expert() const noexcept { return gate.extent(1); }
  std::ptrdiff_t d_model() const noexcept { return gate.extent(2); }
  ExpertWeightsView<W> experts() const noexcept { return ExpertWeightsView<W>{gate, up, down}; }
  RouterView<A> router() const noexcept { return RouterView<A>{router_weight, router_bias}; }
};

/// Views the backward writes its gradients into (overwritten, never accumulated). All dense row-major.
/// \tparam A  activation type (float, or double with double weights); gradients of bf16 weights are float.
template <class A>
struct MoeGradsView {
  MatrixView<A> x;              // [n_tokens, d_model]             dL/dx (experts + router paths)
  TensorView<A, 3> gate;        // [n_experts, d_expert, d_model]  dL/dW_gate (zero for an expert with no token)
  TensorView<A, 3> up;          // [n_experts, d_expert, d_model]  dL/dW_up
  TensorView<A, 3> down;        // [n_experts, d_model, d_expert]  dL/dW_down
  MatrixView<A> router_weight;  // [n_experts, d_model]            dL/dW_r
  VectorView<A> router_bias;    // [n_experts]                     dL/db_r
  MatrixView<A> logits;         // optional [n_tokens, n_experts]  dL/dz; leave default-constructed to skip

  /// True when the caller asked for dL/dz (a view with columns).
  bool wants_logits() const noexcept { return logits.extent(1) != 0; }
};

/// Expert pre-activations of one training forward (row r is grouped row r of the routing, column i neuron i
/// of that slot's expert), so the backward need not recompute them. A const for the backward's read-only view.
template <class A>
struct MoeActivationsView {
  MatrixView<A> gate_pre;  // [n_tokens * top_k, d_expert]  x W_gate,e^T
  MatrixView<A> up_pre;    // [n_tokens * top_k, d_expert]  x W_up,e^T
};

/// Weights and clip of the router losses. Defaults are the paper code's constants (docs/math.md §3.2).
struct ParLossConfig {
  double par_weight = 0.05;      // route_weight in train.py
  double balance_weight = 0.01;  // balance_weight in train.py
  double clip = 1e-7;            // p and q are clipped to [clip, 1 - clip] before the KL
};

/// The PAR target q = softmax(multi-hot of K of N) (docs/math.md §3.2 step 6): its value for a selected and for
/// an unselected expert, e / (K e + N - K) and 1 / (K e + N - K).
struct ParTarget {
  double selected;
  double unselected;
};
inline ParTarget par_target_q(std::ptrdiff_t n_experts, std::ptrdiff_t top_k) noexcept {
  double const e = std::exp(1.0);
  double const denom = static_cast<double>(top_k) * e + static_cast<double>(n_experts - top_k);
  return ParTarget{e / denom, 1.0 / denom};
}

/// The scalar results of one PAR evaluation.
struct ParLossValues {
  double par_loss = 0;        // mean over tokens of KL(clip(p) || clip(q))
  double balance_loss = 0;    // mean over [tokens, experts] of TopK mask * p
  double total_loss = 0;      // par_weight * par_loss + balance_weight * balance_loss
  double label_accuracy = 0;  // fraction of tokens whose router TopK set equals the pseudo-label set
};

/// The tensors a PAR evaluation writes (shapes as in train::ParLossResult, which hands this out).
template <class A>
struct ParLossOutView {
  MatrixView<A> grad_weight;                // [n_experts, d_model] d total / d W_r
  VectorView<A> grad_bias;                  // [n_experts]          d total / d b_r
  MatrixView<A> grad_weight_par;            // [n_experts, d_model] d par_loss / d W_r
  VectorView<A> grad_bias_par;              // [n_experts]
  MatrixView<A> grad_weight_balance;        // [n_experts, d_model] d balance_loss / d W_r
  VectorView<A> grad_bias_balance;          // [n_experts]
  MatrixView<A> mse_to_target;              // [n_tokens, n_experts]
  MatrixView<std::int32_t> pseudo_label;    // [n_tokens, top_k]
  MatrixView<std::int32_t> router_topk;     // [n_tokens, top_k]
};

}  // namespace factorllm
