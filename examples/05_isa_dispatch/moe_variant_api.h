// SPDX-License-Identifier: Apache-2.0
// The C ABI between a host program and its per-ISA MoE modules (lib<name>_<isa>.so built from moe_variant.cpp).
//
// Only C types cross the boundary: no C++ object, exception or template instantiation is shared between the
// baseline host and a module compiled for another ISA (README.md in this folder says why).
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Bumped whenever a struct below changes; the host checks it before calling anything.
#define FLLM_MOE_VARIANT_ABI_VERSION 1u

/// Weight storage types.
enum { FLLM_MOE_WEIGHTS_F32 = 0, FLLM_MOE_WEIGHTS_BF16 = 1 };

/// A factorized SwiGLU MoE layer in llama.cpp's stacked layout, as views of the caller's memory (the module
/// copies what it needs in create: the caller may free it afterwards).
typedef struct FllmMoeDesc {
  int64_t d_model;
  int64_t d_expert;
  int64_t n_experts;
  int64_t top_k;
  int32_t combine_mode;  ///< factorllm::moe::CombineMode as an int (code_ref = 0, ..., sigmoid_topk = 4)
  int32_t weight_type;   ///< FLLM_MOE_WEIGHTS_F32 or FLLM_MOE_WEIGHTS_BF16 (bf16 = 16-bit bit patterns)
  void const* gate;      ///< [n_experts, d_expert, d_model]
  void const* up;        ///< [n_experts, d_expert, d_model]
  void const* down;      ///< [n_experts, d_model, d_expert]
  float const* router_weight;  ///< [n_experts, d_model]
  float const* router_bias;    ///< [n_experts], or NULL for zeros
} FllmMoeDesc;

/// The function table a module exports through fllm_moe_variant_api(). Functions report errors by returning
/// NULL / nonzero and writing a NUL-terminated message into err (err_size bytes; may be NULL / 0).
typedef struct FllmMoeVariantApi {
  uint32_t abi_version;    ///< FLLM_MOE_VARIANT_ABI_VERSION of the module
  char const* isa;         ///< the ISA it was built for ("avx512", "avx2", ...: FLLM_ISA_NAME)
  char const* xsimd_arch;  ///< xsimd::default_arch::name() inside the module ("avx512bw", "fma3+avx2", ...)
  /// Builds a layer (MoeFfn<T, CpuSimd<>>) from desc; returns an opaque handle, NULL on error.
  void* (*create)(FllmMoeDesc const* desc, char* err, size_t err_size);
  /// y = layer(x) for x, y [n_tokens, d_model] row-major float. Thread safe: layers are immutable and each
  /// calling thread gets its own scratch (grown on first use, then reused). Returns 0, or -1 on error.
  int (*forward)(void const* layer, float const* x, float* y, int64_t n_tokens, char* err, size_t err_size);
  /// Frees a layer from create (NULL is a no-op).
  void (*destroy)(void* layer);
} FllmMoeVariantApi;

/// The one symbol a module exports.
typedef FllmMoeVariantApi const* FllmMoeVariantApiFn(void);
#define FLLM_MOE_VARIANT_API_SYMBOL "fllm_moe_variant_api"

#ifdef __cplusplus
}  // extern "C"
#endif
