// SPDX-License-Identifier: Apache-2.0
// CUDA router logits z = x W_r^T + b_r (docs/math.md §2.2): one cuBLAS SGEMM (f32 accumulation, no TF32) and a
// bias kernel. Host-callable from plain C++; the kernels live in src/cuda/routing.cu (factorllm::cuda).
#pragma once

#include "../../core/kernel_args.hpp"
#include "../../core/tensor_view.hpp"
#include "../ops.hpp"
#include "context.hpp"

namespace factorllm {
namespace cuda {

/// logits[t, e] = sum_c x[t, c] W_r[e, c] + b_r[e], on device memory, enqueued on ctx.stream.
/// Shapes: x [n_tokens, d_model], router weight [n_experts, d_model], bias [n_experts], logits [n_tokens,
/// n_experts]; every view dense row-major device memory. No host synchronization.
/// \throws shape_error for mismatched or non-dense views; backend_error for a CUDA or cuBLAS failure.
void router_logits(MatrixView<float const> x, RouterView<float> router, MatrixView<float> logits,
                   CudaContext const& ctx);

}  // namespace cuda

namespace kernel {

/// RouterLogits on CUDA (f32 router and activations). Tolerance vs CpuScalar: relative L2 <= 2e-5.
template <int kSm>
struct RouterLogits<Cuda<kSm>> {
  static constexpr bool implemented = true;
  static void run(MatrixView<float const> x, RouterView<float> router, MatrixView<float> logits,
                  cuda::CudaContext const& ctx) {
    cuda::router_logits(x, router, logits, ctx);
  }
};

}  // namespace kernel
}  // namespace factorllm
