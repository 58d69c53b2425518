// SPDX-License-Identifier: Apache-2.0
// Shared by the CUDA sources of factorllm::cuda (nvcc only): error checks, the device types of the weight
// formats, conversions, warp sums in a fixed order, and the numerics of detail/math.hpp as device functions.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include <factorllm/backend/cuda/context.hpp>
#include <factorllm/backend/cuda/launch.hpp>
#include <factorllm/backend/cuda/swiglu.hpp>
#include <factorllm/core/dtype.hpp>
#include <factorllm/core/error.hpp>

namespace factorllm {
namespace cuda {
namespace detail {

/// Throws backend_error naming `what` and the CUDA error when `err` is not cudaSuccess.
inline void check_cuda(cudaError_t err, char const* what) {
  if (err != cudaSuccess)
    throw backend_error(factorllm::detail::concat(what, ": CUDA error ", cudaGetErrorName(err), " (",
                                                  cudaGetErrorString(err), ")"));
}

/// Throws backend_error naming `what` and the cuBLAS status when it is not CUBLAS_STATUS_SUCCESS.
inline void check_cublas(cublasStatus_t status, char const* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw backend_error(factorllm::detail::concat(what, ": cuBLAS error ", cublasGetStatusName(status), " (",
                                                  cublasGetStatusString(status), ")"));
}

/// Checks the launch that was just enqueued (bad configuration, no device).
inline void check_launch(char const* what) { check_cuda(cudaGetLastError(), what); }

/// Binds the caller's handle to the caller's stream, and refuses a handle allowed to use TF32 (the tolerances
/// of backend/README.md assume f32 products).
inline cublasHandle_t bind_cublas(CudaContext const& ctx, char const* what) {
  if (ctx.cublas == nullptr)
    throw value_error(factorllm::detail::concat(what, ": CudaContext::cublas is null (create one with cublasCreate)"));
  check_cublas(cublasSetStream(ctx.cublas, ctx.stream), what);
  cublasMath_t mode{};
  check_cublas(cublasGetMathMode(ctx.cublas, &mode), what);
  if ((static_cast<int>(mode) & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH)
    throw value_error(factorllm::detail::concat(what, ": the cuBLAS handle allows TF32 (CUBLAS_TF32_TENSOR_OP_MATH); "
                                                      "set CUBLAS_DEFAULT_MATH"));
  return ctx.cublas;
}

/// The CUDA element type of a weight format (same size and bits).
template <class W>
struct device_type;
template <>
struct device_type<float> {
  using type = float;
  static constexpr cudaDataType_t kCuda = CUDA_R_32F;
};
template <>
struct device_type<bf16> {
  using type = __nv_bfloat16;
  static constexpr cudaDataType_t kCuda = CUDA_R_16BF;
};
template <>
struct device_type<f16> {
  using type = __half;
  static constexpr cudaDataType_t kCuda = CUDA_R_16F;
};
template <class W>
using device_t = typename device_type<W>::type;

inline cudaDataType_t cuda_type(GemmType t) noexcept {
  return t == GemmType::f32 ? CUDA_R_32F : t == GemmType::bf16 ? CUDA_R_16BF : CUDA_R_16F;
}
template <class W>
constexpr GemmType gemm_type() noexcept {
  return std::is_same_v<W, float> ? GemmType::f32 : std::is_same_v<W, bf16> ? GemmType::bf16 : GemmType::f16;
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <class T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

/// Sum over the 32 lanes by a butterfly of shuffles: the same tree on every run, so the same bits.
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

/// detail::silu in float, without overflow for large |a|.
__device__ __forceinline__ float silu_f(float a) {
  if (a >= 0.f) return a / (1.f + expf(-a));
  float const e = expf(a);
  return a * e / (1.f + e);
}

/// hidden = SiLU(gate_out) * up_out, element-wise, rounded to the weight format (the down GEMM's B operand).
template <class E, class T>
__global__ void silu_mul_kernel(E const* gate_out, E const* up_out, T* hidden, std::int64_t n) {
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) hidden[i] = from_f<T>(silu_f(to_f(gate_out[i])) * to_f(up_out[i]));
}

/// out[i] = in[i] converted (float activations to the weight format of the GEMMs).
template <class T>
__global__ void convert_kernel(float const* in, T* out, std::int64_t n) {
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = from_f<T>(in[i]);
}

/// dim3 of a launch configuration of cuda/launch.hpp.
inline dim3 to_dim3(Dim3 d) noexcept { return dim3(d.x, d.y, d.z); }

/// One SwiGLU on rows already in the GEMM type T: g = xw W_g^T, u = xw W_u^T (both [n_tokens, d_hidden]),
/// h = SiLU(g) u, out = h W_d^T ([n_tokens, d_model]); gate, up [d_hidden, d_model] and down [d_model, d_hidden] are
/// dense device weights of `type`. Enqueued on ctx.stream, no host synchronization. The dense SwiGLU op, the PAR
/// loss's teacher and its every-expert pass all run this sequence (docs/design.md §10).
template <class T>
void swiglu_rows(GemmType type, T const* xw, void const* gate, void const* up, void const* down, T* g, T* u, T* h,
                 T* out, std::ptrdiff_t n_tokens, std::ptrdiff_t d_hidden, std::ptrdiff_t d_model,
                 CudaContext const& ctx, char const* op) {
  gemm_xwt(type, xw, gate, g, n_tokens, d_hidden, d_model, ctx);
  gemm_xwt(type, xw, up, u, n_tokens, d_hidden, d_model, ctx);
  LaunchConfig const ch = linear_launch(n_tokens * d_hidden, op);
  silu_mul_kernel<T, T><<<to_dim3(ch.grid), to_dim3(ch.block), 0, ctx.stream>>>(g, u, h, n_tokens * d_hidden);
  check_launch(op);
  gemm_xwt(type, h, down, out, n_tokens, d_model, d_hidden, ctx);
}

}  // namespace detail
}  // namespace cuda
}  // namespace factorllm
