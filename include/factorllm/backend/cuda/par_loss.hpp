// SPDX-License-Identifier: Apache-2.0
// CUDA PAR loss (docs/math.md §3.2): the dense teacher and every expert on every token (cuBLAS GEMMs, operands in the
// weight format, f32 accumulation), per-(token, expert) MSE to f / floor(N/K), then per token in double as the
// oracle: router logits and softmax, the router's TopK, the pseudo-labels (K smallest MSE), KL(clip(p) || clip(q)),
// the balance mass and d/dz; then dW_r, db_r summed over tokens in token order (a thread per output, no atomics).
#pragma once

#include <cstdint>

#include "../../core/kernel_args.hpp"
#include "../../core/tensor_view.hpp"
#include "../../core/workspace.hpp"
#include "../ops.hpp"
#include "context.hpp"
#include "launch.hpp"
#include "swiglu.hpp"

namespace factorllm {
namespace cuda {

/// Device workspace of par_loss for n_tokens tokens, regions in this order: x in the weight format [T, d_model],
/// teacher gate, up, hidden [T, d_ff], teacher output [T, d_model], expert gate, up, hidden [T, d_expert], expert
/// outputs [n_experts, T, d_model] (all W), mse, dz_par, dz_bal [T, n_experts] double, per-token sums [T, 3]
/// double, totals [4] double.
template <class W>
RegionPlan par_loss_workspace(std::ptrdiff_t n_tokens, std::ptrdiff_t d_model, std::ptrdiff_t d_ff,
                              std::ptrdiff_t n_experts, std::ptrdiff_t d_expert) {
  static_assert(is_cuda_weight_v<W>, "par_loss (cuda): weights must be float, bf16 or f16");
  if (n_tokens < 0 || d_model < 1 || d_ff < 1 || n_experts < 1 || d_expert < 1)
    throw shape_error(detail::concat("par_loss (cuda) workspace: bad sizes n_tokens ", n_tokens, ", d_model ", d_model,
                                     ", d_ff ", d_ff, ", n_experts ", n_experts, ", d_expert ", d_expert));
  auto const t = static_cast<std::size_t>(n_tokens), d = static_cast<std::size_t>(d_model),
             f = static_cast<std::size_t>(d_ff), n = static_cast<std::size_t>(n_experts),
             de = static_cast<std::size_t>(d_expert);
  RegionPlan ws;
  ws.add("x_w", sizeof(W), t * d);
  ws.add("teacher_gate", sizeof(W), t * f);
  ws.add("teacher_up", sizeof(W), t * f);
  ws.add("teacher_hidden", sizeof(W), t * f);
  ws.add("teacher_out", sizeof(W), t * d);
  ws.add("expert_gate", sizeof(W), t * de);
  ws.add("expert_up", sizeof(W), t * de);
  ws.add("expert_hidden", sizeof(W), t * de);
  ws.add("expert_out", sizeof(W), n * t * d);
  ws.add("mse", sizeof(double), t * n);
  ws.add("dz_par", sizeof(double), t * n);
  ws.add("dz_bal", sizeof(double), t * n);
  ws.add("token_sums", sizeof(double), 3 * t);
  ws.add("totals", sizeof(double), 4);
  return ws;
}

/// Host scratch of par_loss (CudaContext::host_scratch): the four totals read back.
inline std::size_t par_loss_host_bytes() noexcept { return 64; }

/// PAR + balance losses and their router gradients on device memory, same contract as ParLoss<CpuScalar>
/// (backend/scalar/par_loss.hpp): x [T, d_model] f32; dense teacher gate, up [d_ff, d_model], down [d_model, d_ff];
/// experts; router f32; every `out` view dense device memory (f32 and int32). Returns the scalar values, so the
/// call ends with one host synchronization (the four sums are copied back). n_experts <= 1024, top_k <= 32.
/// \throws shape_error, value_error for bad arguments; backend_error for a workspace or CUDA / cuBLAS failure.
ParLossValues par_loss(MatrixView<float const> x, MatrixView<float const> dense_gate, MatrixView<float const> dense_up,
                       MatrixView<float const> dense_down, ExpertWeightsView<float> const& experts,
                       RouterView<float> router, std::ptrdiff_t top_k, ParLossConfig const& config,
                       ParLossOutView<float> const& out, WorkspaceSpan ws, CudaContext const& ctx);
ParLossValues par_loss(MatrixView<float const> x, MatrixView<bf16 const> dense_gate, MatrixView<bf16 const> dense_up,
                       MatrixView<bf16 const> dense_down, ExpertWeightsView<bf16> const& experts,
                       RouterView<float> router, std::ptrdiff_t top_k, ParLossConfig const& config,
                       ParLossOutView<float> const& out, WorkspaceSpan ws, CudaContext const& ctx);
ParLossValues par_loss(MatrixView<float const> x, MatrixView<f16 const> dense_gate, MatrixView<f16 const> dense_up,
                       MatrixView<f16 const> dense_down, ExpertWeightsView<f16> const& experts,
                       RouterView<float> router, std::ptrdiff_t top_k, ParLossConfig const& config,
                       ParLossOutView<float> const& out, WorkspaceSpan ws, CudaContext const& ctx);

}  // namespace cuda

namespace kernel {

/// ParLoss on CUDA. Tolerance vs CpuScalar (f32 weights): pseudo-labels and router TopK bitwise, losses relative
/// <= 1e-5, gradients relative L2 <= 1e-4 (teacher and expert outputs in f32 instead of double). bf16 / f16 weights
/// round the GEMM operands, which can move near-tied pseudo-labels.
template <int kSm>
struct ParLoss<Cuda<kSm>> {
  static constexpr bool implemented = true;
  template <class W, class A = float>
  static detail::WorkspaceLayout workspace(std::ptrdiff_t n_tokens, std::ptrdiff_t d_model, std::ptrdiff_t d_ff,
                                           std::ptrdiff_t n_experts, std::ptrdiff_t d_expert) {
    return cuda::par_loss_workspace<W>(n_tokens, d_model, d_ff, n_experts, d_expert).layout();
  }
  template <class W>
  static ParLossValues run(MatrixView<float const> x, MatrixView<W const> dense_gate, MatrixView<W const> dense_up,
                           MatrixView<W const> dense_down, ExpertWeightsView<W> const& experts, RouterView<float> router,
                           std::ptrdiff_t top_k, ParLossConfig const& config, ParLossOutView<float> const& out,
                           WorkspaceSpan ws, cuda::CudaContext const& ctx) {
    return cuda::par_loss(x, dense_gate, dense_up, dense_down, experts, router, top_k, config, out, ws, ctx);
  }
};

}  // namespace kernel
}  // namespace factorllm
