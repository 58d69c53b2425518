// SPDX-License-Identifier: Apache-2.0
// CUDA TopK selection and combine weights (docs/math.md §2.3): one fused kernel, one thread per token, scoring
// (logits + selection-only bias), TopK with CpuScalar's ranking (larger first, lower index on ties, NaN last),
// the weights of all five combine modes and the output scale, in double like the oracle.
#pragma once

#include <cstdint>

#include "../../core/kernel_args.hpp"
#include "../../core/tensor_view.hpp"
#include "../ops.hpp"
#include "context.hpp"

namespace factorllm {
namespace cuda {

/// ids[t, :] = TopK of logits[t, :] + bias, weights[t, :] = the combine weights of `gating`, on device memory.
/// gating.selection_bias, when set, must point at DEVICE memory (n_experts floats). top_k <= kMaxTopK
/// (cuda/launch.hpp). Shapes: logits [n_tokens, n_experts]; ids, weights [n_tokens, top_k], dense.
/// No host synchronization.
/// \throws shape_error / value_error for bad shapes or gating; backend_error for a CUDA failure.
void select_experts(MatrixView<float const> logits, GatingParams const& gating, MatrixView<std::int32_t> ids,
                    MatrixView<float> weights, CudaContext const& ctx);

}  // namespace cuda

namespace kernel {

/// SelectExperts on CUDA. Tolerance vs CpuScalar: ids bitwise; weights relative <= 1e-6 per element (the same
/// double arithmetic; the device's exp may differ from libm's in the last bit of a double).
template <int kSm>
struct SelectExperts<Cuda<kSm>> {
  static constexpr bool implemented = true;
  static void run(MatrixView<float const> logits, GatingParams const& gating, MatrixView<std::int32_t> ids,
                  MatrixView<float> weights, cuda::CudaContext const& ctx) {
    cuda::select_experts(logits, gating, ids, weights, ctx);
  }
};

}  // namespace kernel
}  // namespace factorllm
