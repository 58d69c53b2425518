// SPDX-License-Identifier: Apache-2.0
// The CUDA MoE forward (op moe_forward, docs/design.md §2 steps 1-5 on the device): router logits, TopK and
// combine weights, grouping, experts, combine, all enqueued on the caller's stream with the caller's device
// workspace. This is the host-callable entry point a binding (PyTorch extension, DLPack) calls with device
// tensors: plain C++, no CUDA header needed (backend/README.md "CUDA").
#pragma once

#include <cstdint>

#include "../../core/kernel_args.hpp"
#include "../../core/tensor_view.hpp"
#include "../../core/workspace.hpp"
#include "../ops.hpp"
#include "context.hpp"
#include "grouping.hpp"
#include "launch.hpp"
#include "swiglu.hpp"

namespace factorllm {
namespace cuda {

/// Device workspace of moe_forward for up to max_tokens tokens, regions in this order: logits [T, N] f32,
/// ids [T, K] int32, weights [T, K] f32, offsets [N + 1] int64, slots [T K] int32, rows [T K] int32,
/// expert_out [T K, d_model] expert_out_t<W>, grouping (grouping_workspace bytes), experts
/// (expert_swiglu_workspace bytes).
template <class W>
RegionPlan moe_forward_workspace(std::ptrdiff_t max_tokens, std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                 std::ptrdiff_t d_expert, std::ptrdiff_t top_k) {
  RegionPlan const experts = expert_swiglu_workspace<W>(max_tokens, d_model, n_experts, d_expert, top_k);
  RegionPlan const grouping = grouping_workspace(max_tokens * top_k, n_experts);
  auto const t = static_cast<std::size_t>(max_tokens), n = static_cast<std::size_t>(n_experts),
             k = static_cast<std::size_t>(top_k);
  RegionPlan ws;
  ws.add("logits", sizeof(float), t * n);
  ws.add("ids", sizeof(std::int32_t), t * k);
  ws.add("weights", sizeof(float), t * k);
  ws.add("offsets", sizeof(std::int64_t), n + 1);
  ws.add("slots", sizeof(std::int32_t), t * k);
  ws.add("rows", sizeof(std::int32_t), t * k);
  ws.add("expert_out", sizeof(expert_out_t<W>), t * k * static_cast<std::size_t>(d_model));
  ws.add("grouping", 1, grouping.bytes());
  ws.add("experts", 1, experts.bytes());
  return ws;
}

/// Region indices of moe_forward_workspace.
enum MoeForwardRegion : int {
  kFwdLogits = 0, kFwdIds, kFwdWeights, kFwdOffsets, kFwdSlots, kFwdRows, kFwdExpertOut, kFwdGrouping, kFwdExperts
};

/// y = MoE(x) on device memory (steps 1-5). x, y [n_tokens, d_model] f32; experts f32, bf16 or f16; router f32;
/// gating.selection_bias, when set, in device memory. ws: device, moe_forward_workspace<W>(n_tokens, ...) bytes
/// or more; ctx.host_scratch: expert_swiglu_host_workspace(n_experts) bytes (read only by the GEMM paths).
/// Host synchronization: none for n_tokens <= kDecodeMaxTokens (decode path); one per call otherwise (the
/// expert offsets are read back to size the GEMMs). y is ready when ctx.stream reaches this point.
/// \throws shape_error, value_error for bad arguments; backend_error for a workspace or CUDA / cuBLAS failure.
void moe_forward(ExpertWeightsView<float> const& experts, RouterView<float> router, GatingParams const& gating,
                 MatrixView<float const> x, MatrixView<float> y, WorkspaceSpan ws, CudaContext const& ctx,
                 ExpertPath path = ExpertPath::automatic);
void moe_forward(ExpertWeightsView<bf16> const& experts, RouterView<float> router, GatingParams const& gating,
                 MatrixView<float const> x, MatrixView<float> y, WorkspaceSpan ws, CudaContext const& ctx,
                 ExpertPath path = ExpertPath::automatic);
void moe_forward(ExpertWeightsView<f16> const& experts, RouterView<float> router, GatingParams const& gating,
                 MatrixView<float const> x, MatrixView<float> y, WorkspaceSpan ws, CudaContext const& ctx,
                 ExpertPath path = ExpertPath::automatic);

}  // namespace cuda

namespace kernel {

/// MoeForward on CUDA (the fused steps 1-5). Tolerance vs the CpuScalar composed forward: ids bitwise, y as
/// ExpertSwiglu's tolerance for the weight format.
template <int kSm>
struct MoeForward<Cuda<kSm>> {
  static constexpr bool implemented = true;
  template <class W, class A = float>
  static detail::WorkspaceLayout workspace(std::ptrdiff_t max_tokens, std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                           std::ptrdiff_t d_expert, std::ptrdiff_t top_k) {
    return cuda::moe_forward_workspace<W>(max_tokens, d_model, n_experts, d_expert, top_k).layout();
  }
  template <class W>
  static void run(ExpertWeightsView<W> const& experts, RouterView<float> router, GatingParams const& gating,
                  MatrixView<float const> x, MatrixView<float> y, WorkspaceSpan ws, cuda::CudaContext const& ctx,
                  cuda::ExpertPath path = cuda::ExpertPath::automatic) {
    cuda::moe_forward(experts, router, gating, x, y, ws, ctx, path);
  }
};

}  // namespace kernel
}  // namespace factorllm
