// SPDX-License-Identifier: Apache-2.0
// CUDA experts: every expert on its grouped rows (op expert_swiglu), weights f32, bf16 or f16, activations f32.
//   decode (n_tokens <= kDecodeMaxTokens): two streaming kernels that read only the rows of the experts with
//     tokens (SiLU(gate) * up fused into the first); no host synchronization.
//   prefill: gather the grouped rows (converted to the weight format), gate and up GEMMs, a SiLU * up kernel, the
//     down GEMM; the GEMMs through cublasGemmGroupedBatchedEx (one call per projection over the non-empty
//     experts) or per-expert cublasGemmEx. cuBLAS takes the GEMM sizes as host integers, so this path copies the
//     n_experts + 1 expert offsets to the host and synchronizes the stream once per call (documented in
//     backend/README.md "CUDA").
// GEMM inputs and outputs share the weight format (the types cublasGemmGroupedBatchedEx supports), accumulation
// is f32 (CUBLAS_COMPUTE_32F, no TF32).
#pragma once

#include <cstdint>
#include <type_traits>

#include "../../core/dtype.hpp"
#include "../../core/kernel_args.hpp"
#include "../../core/tensor_view.hpp"
#include "../../core/workspace.hpp"
#include "../ops.hpp"
#include "context.hpp"
#include "launch.hpp"

namespace factorllm {
namespace cuda {

/// The element type ExpertSwiglu<Cuda> writes expert outputs in: float for f32 weights, else the weight format.
template <class W>
using expert_out_t = std::conditional_t<std::is_same_v<W, float>, float, W>;

/// True for the weight formats the CUDA expert kernels take.
template <class W>
inline constexpr bool is_cuda_weight_v = std::is_same_v<W, float> || std::is_same_v<W, bf16> || std::is_same_v<W, f16>;

/// The device workspace of expert_swiglu for up to max_tokens tokens (regions in this order):
///   gathered [n_slots, d_model] W, gate_out and up_out [n_slots, d_expert] E, hidden [n_slots, d_expert] W,
///   decode_hidden [min(n_slots, kDecodeMaxTokens * top_k), d_expert] f32, gemm_pointers [3 * 3 * n_experts] void*.
template <class W>
RegionPlan expert_swiglu_workspace(std::ptrdiff_t max_tokens, std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                   std::ptrdiff_t d_expert, std::ptrdiff_t top_k) {
  static_assert(is_cuda_weight_v<W>, "expert_swiglu (cuda): weights must be float, bf16 or f16");
  if (max_tokens < 0 || d_model < 1 || n_experts < 1 || d_expert < 1 || top_k < 1 || top_k > n_experts)
    throw shape_error(detail::concat("expert_swiglu (cuda) workspace: bad sizes max_tokens ", max_tokens, ", d_model ",
                                     d_model, ", n_experts ", n_experts, ", d_expert ", d_expert, ", top_k ", top_k));
  using E = expert_out_t<W>;
  auto const slots = static_cast<std::size_t>(max_tokens * top_k);
  auto const decode_slots = static_cast<std::size_t>((max_tokens < kDecodeMaxTokens ? max_tokens : kDecodeMaxTokens) * top_k);
  auto const dm = static_cast<std::size_t>(d_model), de = static_cast<std::size_t>(d_expert);
  RegionPlan ws;
  ws.add("gathered", sizeof(W), slots * dm);
  ws.add("gate_out", sizeof(E), slots * de);
  ws.add("up_out", sizeof(E), slots * de);
  ws.add("hidden", sizeof(W), slots * de);
  ws.add("decode_hidden", sizeof(float), decode_slots * de);
  ws.add("gemm_pointers", sizeof(void*), 9 * static_cast<std::size_t>(n_experts));
  return ws;
}

/// Region indices of expert_swiglu_workspace.
enum ExpertSwigluRegion : int { kGathered = 0, kGateOut, kUpOut, kHidden, kDecodeHidden, kGemmPointers };

/// The host scratch of expert_swiglu (CudaContext::host_scratch), regions in this order: offsets [n_experts + 1]
/// int64, problems [3 * n_experts] GemmProblem, the grouped GEMM's int arrays [3 projections * 9 * n_experts]
/// (transa, transb, m, n, k, lda, ldb, ldc, group_size), float arrays [3 * 2 * n_experts] (alpha, beta) and
/// pointer staging [3 * 3 * n_experts] void*.
inline RegionPlan expert_swiglu_host_workspace(std::ptrdiff_t n_experts) {
  if (n_experts < 1) throw shape_error("expert_swiglu (cuda) host scratch: n_experts must be >= 1");
  auto const n = static_cast<std::size_t>(n_experts);
  RegionPlan ws(MemorySpace::host);
  ws.add("offsets", sizeof(std::int64_t), n + 1);
  ws.add("problems", sizeof(GemmProblem), 3 * n);
  ws.add("int_arrays", sizeof(int), 27 * n);
  ws.add("scalars", sizeof(float), 6 * n);
  ws.add("pointers", sizeof(void*), 9 * n);
  return ws;
}

/// Every expert on its grouped rows on device memory: expert_out[r] = E_e(x[slots[r] / top_k]) for
/// offsets[e] <= r < offsets[e + 1] (same contract as ExpertSwiglu<CpuScalar>). offsets and slots are device
/// views; ws is a device workspace of expert_swiglu_workspace(n_tokens, ...) bytes or more; ctx.host_scratch holds
/// expert_swiglu_host_workspace(n_experts) bytes (used by the grouped and per_expert paths only).
/// \throws shape_error for bad shapes or non-dense views; value_error for a decode path with too many tokens;
///         backend_error for a too-small workspace or a CUDA / cuBLAS failure.
void expert_swiglu(ExpertWeightsView<float> const& experts, MatrixView<float const> x, std::ptrdiff_t top_k,
                   VectorView<std::int64_t const> offsets, VectorView<std::int32_t const> slots,
                   MatrixView<float> expert_out, WorkspaceSpan ws, CudaContext const& ctx,
                   ExpertPath path = ExpertPath::automatic);
void expert_swiglu(ExpertWeightsView<bf16> const& experts, MatrixView<float const> x, std::ptrdiff_t top_k,
                   VectorView<std::int64_t const> offsets, VectorView<std::int32_t const> slots,
                   MatrixView<bf16> expert_out, WorkspaceSpan ws, CudaContext const& ctx,
                   ExpertPath path = ExpertPath::automatic);
void expert_swiglu(ExpertWeightsView<f16> const& experts, MatrixView<float const> x, std::ptrdiff_t top_k,
                   VectorView<std::int64_t const> offsets, VectorView<std::int32_t const> slots,
                   MatrixView<f16> expert_out, WorkspaceSpan ws, CudaContext const& ctx,
                   ExpertPath path = ExpertPath::automatic);

/// Element type of a raw GEMM (the weight formats of the CUDA backend).
enum class GemmType { f32, bf16, f16 };

/// Row-major Y[rows, out] = X[rows, in] W[out, in]^T with one cublasGemmEx (inputs and output of `type`, f32
/// accumulation): the dense reference of the grouped GEMM benchmark. Device pointers, dense row-major.
/// \throws shape_error for sizes outside cuBLAS's int; backend_error for a cuBLAS failure.
void gemm_xwt(GemmType type, void const* x, void const* w, void* y, std::ptrdiff_t rows, std::ptrdiff_t out,
              std::ptrdiff_t in, CudaContext const& ctx);

/// Host arrays cublasGemmGroupedBatchedEx reads (caller-owned host memory, `capacity` problems each):
///   ints [9 * capacity] (transa, transb, m, n, k, lda, ldb, ldc, group_size), scalars [2 * capacity] (alpha,
///   beta), pointers [3 * capacity] (A, B, C staging, copied to the device).
/// The pointer staging must stay untouched until the stream has executed the copy (pinned memory is read
/// asynchronously); expert_swiglu gives each projection its own arrays and synchronizes before the next call
/// writes them.
struct GroupedGemmHostArrays {
  int* ints = nullptr;
  float* scalars = nullptr;
  void const** pointers = nullptr;
  int capacity = 0;
};

/// One cublasGemmGroupedBatchedEx over `problems` (host array, from expert_gemm_problems; one GEMM per group)
/// with A = w_base + a_offset, B = x_base + b_offset, C = y_base + c_offset (device pointers, elements of
/// `type`). device_pointers: device memory for 3 * count pointers, filled by a host-to-device copy on ctx.stream.
/// No host synchronization.
/// \throws value_error when count exceeds host.capacity; backend_error for a cuBLAS or CUDA failure.
void grouped_gemm(GemmType type, GemmProblem const* problems, int count, void const* w_base, void const* x_base,
                  void* y_base, void** device_pointers, GroupedGemmHostArrays const& host, CudaContext const& ctx);

/// The same problems as grouped_gemm, one cublasGemmEx each (the per_expert path). No host synchronization.
/// \throws backend_error for a cuBLAS failure.
void per_problem_gemm(GemmType type, GemmProblem const* problems, int count, void const* w_base, void const* x_base,
                      void* y_base, CudaContext const& ctx);

/// Device workspace of the dense SwiGLU for up to max_tokens tokens: x in the weight format [T, d_model], gate and up
/// outputs and hidden [T, d_ff], output [T, d_model] (all W).
template <class W>
RegionPlan swiglu_workspace(std::ptrdiff_t max_tokens, std::ptrdiff_t d_model, std::ptrdiff_t d_ff) {
  static_assert(is_cuda_weight_v<W>, "swiglu (cuda): weights must be float, bf16 or f16");
  if (max_tokens < 0 || d_model < 1 || d_ff < 1)
    throw shape_error(detail::concat("swiglu (cuda) workspace: bad sizes max_tokens ", max_tokens, ", d_model ", d_model,
                                     ", d_ff ", d_ff));
  auto const t = static_cast<std::size_t>(max_tokens), d = static_cast<std::size_t>(d_model),
             f = static_cast<std::size_t>(d_ff);
  RegionPlan ws;
  ws.add("x_w", sizeof(W), t * d);
  ws.add("gate_out", sizeof(W), t * f);
  ws.add("up_out", sizeof(W), t * f);
  ws.add("hidden", sizeof(W), t * f);
  ws.add("out", sizeof(W), t * d);
  return ws;
}

/// Dense SwiGLU y = W_down (SiLU(W_gate x) * (W_up x)) on device memory: gate, up [d_ff, d_model], down
/// [d_model, d_ff] in W; x, y [n_tokens, d_model] f32 (y must not alias x). Three cublasGemmEx and two element-wise
/// kernels; no host synchronization.
/// \throws shape_error for bad shapes; backend_error for a workspace or CUDA / cuBLAS failure.
void swiglu(MatrixView<float const> gate, MatrixView<float const> up, MatrixView<float const> down,
            MatrixView<float const> x, MatrixView<float> y, WorkspaceSpan ws, CudaContext const& ctx);
void swiglu(MatrixView<bf16 const> gate, MatrixView<bf16 const> up, MatrixView<bf16 const> down,
            MatrixView<float const> x, MatrixView<float> y, WorkspaceSpan ws, CudaContext const& ctx);
void swiglu(MatrixView<f16 const> gate, MatrixView<f16 const> up, MatrixView<f16 const> down,
            MatrixView<float const> x, MatrixView<float> y, WorkspaceSpan ws, CudaContext const& ctx);

}  // namespace cuda

namespace kernel {

/// Dense Swiglu on CUDA (weights f32, bf16, f16; activations f32). Tolerance vs CpuScalar as ExpertSwiglu's.
template <int kSm>
struct Swiglu<Cuda<kSm>> {
  static constexpr bool implemented = true;
  template <class W, class A = float>
  static detail::WorkspaceLayout workspace(std::ptrdiff_t max_tokens, std::ptrdiff_t d_model, std::ptrdiff_t d_ff) {
    return cuda::swiglu_workspace<W>(max_tokens, d_model, d_ff).layout();
  }
  template <class W>
  static void run(MatrixView<W const> gate, MatrixView<W const> up, MatrixView<W const> down, MatrixView<float const> x,
                  MatrixView<float> y, WorkspaceSpan ws, cuda::CudaContext const& ctx) {
    cuda::swiglu(gate, up, down, x, y, ws, ctx);
  }
};

/// ExpertSwiglu on CUDA (weights f32, bf16, f16; activations f32). Tolerance vs CpuScalar (relative L2 of
/// expert_out): f32 <= 2e-5; f16 <= 3e-3 and bf16 <= 2e-2 (the gathered activations, the pre-activations, the
/// hidden row and the outputs are rounded to the weight format).
template <int kSm>
struct ExpertSwiglu<Cuda<kSm>> {
  static constexpr bool implemented = true;
  template <class W, class A = float>
  using output_t = cuda::expert_out_t<W>;
  template <class W, class A = float>
  static detail::WorkspaceLayout workspace(std::ptrdiff_t max_tokens, std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                           std::ptrdiff_t d_expert, std::ptrdiff_t top_k) {
    return cuda::expert_swiglu_workspace<W>(max_tokens, d_model, n_experts, d_expert, top_k).layout();
  }
  template <class W>
  static void run(ExpertWeightsView<W> const& experts, MatrixView<float const> x, std::ptrdiff_t top_k,
                  VectorView<std::int64_t const> offsets, VectorView<std::int32_t const> slots,
                  MatrixView<cuda::expert_out_t<W>> expert_out, WorkspaceSpan ws, cuda::CudaContext const& ctx,
                  cuda::ExpertPath path = cuda::ExpertPath::automatic) {
    cuda::expert_swiglu(experts, x, top_k, offsets, slots, expert_out, ws, ctx, path);
  }
};

}  // namespace kernel
}  // namespace factorllm
