// SPDX-License-Identifier: Apache-2.0
// CUDA training forward and MoE backward (f32 weights and activations), same contracts as the CpuScalar oracle
// (backend/scalar/moe_backward.hpp): the forward records the routing and the experts' pre-activations; the backward
// computes dx, every expert's gradients on its routed tokens and the router gradients through the combine weights
// (docs/math.md §2.3, §2.5). The expert GEMMs run per expert through cublasGemmEx, so both read the expert offsets
// back to the host once per call (one synchronization each); the router terms are per token in double, and every
// sum over tokens runs in token order (no atomics).
#pragma once

#include <cstdint>

#include "../../core/kernel_args.hpp"
#include "../../core/tensor_view.hpp"
#include "../../core/workspace.hpp"
#include "../ops.hpp"
#include "context.hpp"
#include "grouping.hpp"
#include "launch.hpp"

namespace factorllm {
namespace cuda {

/// Device workspace of train_forward for up to max_tokens tokens (regions in this order): rows [S] int32,
/// gathered x [S, d_model], gate and up pre-activations [S, d_expert] (used when `saved` is null), hidden
/// [S, d_expert], expert outputs [S, d_model] (f32), grouping scratch; S = max_tokens * top_k.
RegionPlan train_forward_workspace(std::ptrdiff_t max_tokens, std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                   std::ptrdiff_t d_expert, std::ptrdiff_t top_k);

/// Device workspace of moe_backward (regions in this order): rows [S] int32, gathered x, dy and w * dy [S, d_model],
/// pre-activations a, b (recomputed when `saved` is null), g, h, da, db [S, d_expert], dx per slot [S, d_model]
/// (f32), dL/dw per slot [S] and dL/dz [n_tokens, n_experts] (double).
RegionPlan moe_backward_workspace(std::ptrdiff_t max_tokens, std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                  std::ptrdiff_t d_expert, std::ptrdiff_t top_k);

/// Host scratch of train_forward and moe_backward: the expert offsets and the GEMM problems.
inline std::size_t training_host_bytes(std::ptrdiff_t n_experts) {
  RegionPlan p(MemorySpace::host);
  p.add("offsets", sizeof(std::int64_t), static_cast<std::size_t>(n_experts + 1));
  p.add("problems", sizeof(GemmProblem), 3 * static_cast<std::size_t>(n_experts));
  return p.bytes();
}

/// Training forward on device memory: y = MoE(x) and the routing in `record` (logits, ids, weights, offsets,
/// slots, all device views sized as RoutingView documents); pre-activations into `saved` when not null
/// ([n_tokens * top_k, d_expert] each, grouped row order). One host synchronization (expert offsets).
/// \throws shape_error, value_error for bad arguments; backend_error for a workspace or CUDA / cuBLAS failure.
void train_forward(MoeParamsView<float> const& p, GatingParams const& gating, MatrixView<float const> x,
                   MatrixView<float> y, RoutingView<float> record, MoeActivationsView<float> const* saved,
                   WorkspaceSpan ws, CudaContext const& ctx);

/// MoE backward on device memory (same contract as MoeBackward<CpuScalar>): gradients overwritten, an expert with
/// no token gets zero gradients. One host synchronization (expert offsets).
/// \throws shape_error, value_error for bad arguments; backend_error for a workspace or CUDA / cuBLAS failure.
void moe_backward(MoeParamsView<float> const& p, GatingParams const& gating, RoutingView<float const> record,
                  MatrixView<float const> x, MatrixView<float const> dy, MoeActivationsView<float const> const* saved,
                  MoeGradsView<float> const& grads, WorkspaceSpan ws, CudaContext const& ctx);

}  // namespace cuda

namespace kernel {

/// MoeTrainForward on CUDA (f32). Tolerance vs CpuScalar: ids bitwise, y and pre-activations relative L2 <= 5e-5.
template <int kSm>
struct MoeTrainForward<Cuda<kSm>> {
  static constexpr bool implemented = true;
  static detail::WorkspaceLayout workspace(MoeParamsView<float> const& p, std::ptrdiff_t top_k, std::ptrdiff_t max_tokens) {
    return cuda::train_forward_workspace(max_tokens, p.d_model(), p.n_experts(), p.d_expert(), top_k).layout();
  }
  static void run(MoeParamsView<float> const& p, GatingParams const& gating, MatrixView<float const> x,
                  MatrixView<float> y, RoutingView<float> record, MoeActivationsView<float> const* saved,
                  WorkspaceSpan ws, cuda::CudaContext const& ctx) {
    cuda::train_forward(p, gating, x, y, record, saved, ws, ctx);
  }
};

/// MoeBackward on CUDA (f32). Tolerance vs CpuScalar: relative L2 <= 5e-5 per gradient tensor.
template <int kSm>
struct MoeBackward<Cuda<kSm>> {
  static constexpr bool implemented = true;
  static detail::WorkspaceLayout workspace(MoeParamsView<float> const& p, std::ptrdiff_t top_k, std::ptrdiff_t max_tokens) {
    return cuda::moe_backward_workspace(max_tokens, p.d_model(), p.n_experts(), p.d_expert(), top_k).layout();
  }
  static void run(MoeParamsView<float> const& p, GatingParams const& gating, RoutingView<float const> record,
                  MatrixView<float const> x, MatrixView<float const> dy, MoeActivationsView<float const> const* saved,
                  MoeGradsView<float> const& grads, WorkspaceSpan ws, cuda::CudaContext const& ctx) {
    cuda::moe_backward(p, gating, record, x, dy, saved, grads, ws, ctx);
  }
};

}  // namespace kernel
}  // namespace factorllm
