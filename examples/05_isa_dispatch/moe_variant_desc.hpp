// SPDX-License-Identifier: Apache-2.0
// Host-side helper: the C descriptor (moe_variant_api.h) of a factorized layer held in factorllm types, so that a
// host program fills FllmMoeDesc in one call. Compiled in the baseline host only (never in a module).
#pragma once

#include <cstdint>
#include <type_traits>

#include <factorllm/core/dtype.hpp>
#include <factorllm/ffn/factorize.hpp>
#include <factorllm/moe/gating.hpp>
#include <factorllm/moe/router.hpp>

#include "moe_variant_api.h"

namespace factorllm_examples {

/// Views experts, router and gating as an FllmMoeDesc (pointers into them: they must outlive the module's create,
/// which copies what it needs). W is float or factorllm::bf16.
template <class W>
FllmMoeDesc moe_variant_desc(factorllm::ffn::ExpertWeights<W> const& experts, factorllm::moe::Router<float> const& router,
                             factorllm::moe::Gating const& gating) {
  static_assert(std::is_same_v<W, float> || std::is_same_v<W, factorllm::bf16>, "moe_variant_desc: float or bf16 weights");
  FllmMoeDesc desc{};
  desc.d_model = experts.d_model();
  desc.d_expert = experts.d_expert();
  desc.n_experts = experts.n_experts();
  desc.top_k = gating.top_k;
  desc.combine_mode = static_cast<std::int32_t>(gating.mode);
  desc.weight_type = std::is_same_v<W, factorllm::bf16> ? FLLM_MOE_WEIGHTS_BF16 : FLLM_MOE_WEIGHTS_F32;
  desc.gate = experts.gate_tensor().data();
  desc.up = experts.up_tensor().data();
  desc.down = experts.down_tensor().data();
  desc.router_weight = router.weight().data();
  desc.router_bias = router.bias().data();
  return desc;
}

}  // namespace factorllm_examples
