// SPDX-License-Identifier: Apache-2.0
// One ISA variant of an application's MoE FFN: compiled once per ISA into lib<name>_<isa>.so by
// factorllm_add_isa_variants (cmake/FactorllmIsaVariants.cmake), it runs moe::MoeFfn<T, CpuSimd<>> where
// CpuSimd<> is the ISA of this build (xsimd::default_arch). Exports one extern "C" symbol: the function table
// of moe_variant_api.h. Everything else (Eigen, xsimd, factorllm, std:: instantiations) stays inside.
#include <factorllm/factorllm.hpp>

#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>

#include "moe_variant_api.h"

#ifndef FLLM_ISA_NAME
#error "moe_variant.cpp is built by factorllm_add_isa_variants, which defines FLLM_ISA_NAME"
#endif

namespace {

using namespace factorllm;

/// The layer behind an opaque handle: one weight type, chosen at create.
struct Layer {
  virtual ~Layer() = default;
  virtual void forward(MatrixView<float const> x, MatrixView<float> y, Workspace& ws) const = 0;
  virtual std::size_t workspace_bytes(std::ptrdiff_t n_tokens) const = 0;
  virtual std::ptrdiff_t d_model() const = 0;
};

template <class T>
struct LayerOf final : Layer {
  moe::MoeFfn<T, DefaultCpu> ffn;
  explicit LayerOf(moe::MoeFfn<T, DefaultCpu> f) : ffn(std::move(f)) {}
  void forward(MatrixView<float const> x, MatrixView<float> y, Workspace& ws) const override { ffn.forward(x, y, ws); }
  std::size_t workspace_bytes(std::ptrdiff_t n_tokens) const override { return ffn.workspace_bytes(n_tokens); }
  std::ptrdiff_t d_model() const override { return ffn.d_model(); }
};

void write_error(char* err, std::size_t err_size, char const* message) noexcept {
  if (err && err_size > 0) std::snprintf(err, err_size, "%s", message);
}

/// Copies the caller's stacked tensor [a, b, c] of type T (bf16 arrives as bit patterns, same layout).
template <class T>
Tensor<T, 3> copy_stacked(void const* data, std::ptrdiff_t a, std::ptrdiff_t b, std::ptrdiff_t c, char const* name) {
  if (!data) throw shape_error(detail::concat("fllm_moe_variant create: '", name, "' is NULL"));
  Tensor<T, 3> t({a, b, c});
  if (t.size() > 0) std::memcpy(t.data(), data, sizeof(T) * static_cast<std::size_t>(t.size()));
  return t;
}

template <class T>
std::unique_ptr<Layer> make_layer(FllmMoeDesc const& d) {
  if (d.d_model < 1 || d.d_expert < 1 || d.n_experts < 1)
    throw shape_error(detail::concat("fllm_moe_variant create: d_model, d_expert, n_experts must be >= 1, got ",
                                     d.d_model, ", ", d.d_expert, ", ", d.n_experts));
  if (d.combine_mode < 0 || d.combine_mode > static_cast<int>(moe::CombineMode::sigmoid_topk))
    throw value_error(detail::concat("fllm_moe_variant create: unknown combine_mode ", d.combine_mode));
  if (!d.router_weight) throw shape_error("fllm_moe_variant create: 'router_weight' is NULL");
  auto gate = copy_stacked<T>(d.gate, d.n_experts, d.d_expert, d.d_model, "gate");
  auto up = copy_stacked<T>(d.up, d.n_experts, d.d_expert, d.d_model, "up");
  auto down = copy_stacked<T>(d.down, d.n_experts, d.d_model, d.d_expert, "down");
  // The partition only records where the experts came from (for unfactorize); forward does not use it.
  ffn::ExpertWeights<T> experts(std::move(gate), std::move(up), std::move(down),
                                ffn::ExpertPartition::contiguous(d.n_experts * d.d_expert, d.n_experts));
  Matrix<float> w_r(matrix_view(d.router_weight, d.n_experts, d.d_model));
  Vector<float> b_r({d.n_experts});
  if (d.router_bias) b_r = Vector<float>(vector_view(d.router_bias, d.n_experts));
  moe::Gating gating;
  gating.mode = static_cast<moe::CombineMode>(d.combine_mode);
  gating.top_k = d.top_k;
  return std::make_unique<LayerOf<T>>(
      moe::MoeFfn<T, DefaultCpu>(std::move(experts), moe::Router<float>(std::move(w_r), std::move(b_r)), gating));
}

void* create(FllmMoeDesc const* desc, char* err, std::size_t err_size) {
  try {
    if (!desc) throw value_error("fllm_moe_variant create: desc is NULL");
    switch (desc->weight_type) {
      case FLLM_MOE_WEIGHTS_F32: return make_layer<float>(*desc).release();
      case FLLM_MOE_WEIGHTS_BF16: return make_layer<bf16>(*desc).release();
      default: throw value_error(detail::concat("fllm_moe_variant create: unknown weight_type ", desc->weight_type));
    }
  } catch (std::exception const& e) {  // no exception may cross the C ABI
    write_error(err, err_size, e.what());
  } catch (...) {
    write_error(err, err_size, "fllm_moe_variant create: unknown exception");
  }
  return nullptr;
}

int forward(void const* handle, float const* x, float* y, std::int64_t n_tokens, char* err, std::size_t err_size) {
  try {
    if (!handle) throw value_error("fllm_moe_variant forward: layer is NULL");
    auto const& layer = *static_cast<Layer const*>(handle);
    if (n_tokens < 0) throw value_error(detail::concat("fllm_moe_variant forward: n_tokens = ", n_tokens, " < 0"));
    // One scratch per calling thread, grown on first use and reused: forward is thread safe, allocation-free
    // in steady state.
    thread_local Workspace ws;
    ws.reserve(layer.workspace_bytes(n_tokens));
    layer.forward(matrix_view(x, n_tokens, layer.d_model()), matrix_view(y, n_tokens, layer.d_model()), ws);
    return 0;
  } catch (std::exception const& e) {
    write_error(err, err_size, e.what());
  } catch (...) {
    write_error(err, err_size, "fllm_moe_variant forward: unknown exception");
  }
  return -1;
}

void destroy(void* handle) { delete static_cast<Layer*>(handle); }

FllmMoeVariantApi const kApi = {FLLM_MOE_VARIANT_ABI_VERSION, FLLM_ISA_NAME, xsimd::default_arch::name(),
                                &create, &forward, &destroy};

}  // namespace

/// The module's only exported symbol (default visibility; the module is built with -fvisibility=hidden).
extern "C" __attribute__((visibility("default"))) FllmMoeVariantApi const* fllm_moe_variant_api(void) { return &kApi; }
