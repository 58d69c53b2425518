// SPDX-License-Identifier: Apache-2.0
// CUDA combine: y[t, :] = sum_j w[t, j] expert_out[row(t * top_k + j), :], one thread per output element, j in
// order, f32 fused multiply-adds: no atomics, so the result is the same bits on every run.
#pragma once

#include <cstdint>

#include "../../core/dtype.hpp"
#include "../../core/tensor_view.hpp"
#include "../ops.hpp"
#include "context.hpp"

namespace factorllm {
namespace cuda {

/// Same contract as Combine<CpuScalar> (backend/scalar/combine.hpp) on device memory; expert_out in f32, bf16 or
/// f16 (what ExpertSwiglu<Cuda> writes for each weight format). No host synchronization.
/// \throws shape_error for bad shapes; backend_error for a CUDA failure.
void combine(MatrixView<float const> weights, MatrixView<float const> expert_out, VectorView<std::int32_t const> rows,
             MatrixView<float> y, CudaContext const& ctx);
void combine(MatrixView<float const> weights, MatrixView<bf16 const> expert_out, VectorView<std::int32_t const> rows,
             MatrixView<float> y, CudaContext const& ctx);
void combine(MatrixView<float const> weights, MatrixView<f16 const> expert_out, VectorView<std::int32_t const> rows,
             MatrixView<float> y, CudaContext const& ctx);

}  // namespace cuda

namespace kernel {

/// Combine on CUDA. Tolerance vs CpuScalar: relative L2 <= 2e-5 (f32 sums in j order).
template <int kSm>
struct Combine<Cuda<kSm>> {
  static constexpr bool implemented = true;
  template <class E>
  static void run(MatrixView<float const> weights, MatrixView<E const> expert_out, VectorView<std::int32_t const> rows,
                  MatrixView<float> y, cuda::CudaContext const& ctx) {
    cuda::combine(weights, expert_out, rows, y, ctx);
  }
};

}  // namespace kernel
}  // namespace factorllm
