// SPDX-License-Identifier: Apache-2.0
// The op table: one class template per backend op, resolved along the backend's fallback chain.
//
// An op is `kernel::Op<Backend>`. A backend implements it by specializing Op for its tag (with a static `run`,
// and a static `workspace` where the op needs scratch) and `static constexpr bool implemented = true`. An
// unspecialized Op<B> inherits Op<fallback_t<B>>, so CpuSimd runs the CpuScalar kernel for an op it does not
// implement; at the end of the chain (NoBackend) calling the op fails to compile with a static_assert naming
// the op (the backend is in the instantiation trace). backend/README.md lists every op, who must implement it
// and its tolerance against CpuScalar; tests/test_op_table.cpp checks the table at compile time.
#pragma once

#include <type_traits>

#include "tags.hpp"

namespace factorllm {
namespace kernel {

/// False for every type; delays a static_assert until its template is instantiated.
template <class...>
inline constexpr bool dependent_false = false;

// Declares the primary template of op `Op` (inherits the fallback's kernel) and its no-kernel end.
#define FLLM_DECLARE_OP(Op, op_name)                                                                              \
  template <class Backend, class Enable = void>                                                                    \
  struct Op : Op<fallback_t<Backend>> {};                                                                          \
  template <>                                                                                                      \
  struct Op<NoBackend, void> {                                                                                     \
    static constexpr bool implemented = false;                                                                     \
    static constexpr char const* name() noexcept { return op_name; }                                               \
    template <class... Args>                                                                                       \
    static void run(Args&&...) {                                                                                   \
      static_assert(dependent_false<Args...>, "factorllm: this backend has no kernel for op '" op_name             \
                                              "' (the backend tag is in the instantiation trace below; "           \
                                              "backend/README.md lists the ops each backend must implement)");     \
    }                                                                                                              \
    template <class... Args>                                                                                       \
    static void workspace(Args&&...) {                                                                             \
      static_assert(dependent_false<Args...>, "factorllm: this backend has no kernel for op '" op_name "'");       \
    }                                                                                                              \
  }

// Inference forward (docs/design.md §2): the front composes steps 1-5, or runs MoeForward when implemented.
FLLM_DECLARE_OP(RouterLogits, "router_logits");      // 1: z = x W_r^T + b_r
FLLM_DECLARE_OP(SelectExperts, "select_experts");    // 2: TopK ids and combine weights
FLLM_DECLARE_OP(GroupByExpert, "group_by_expert");   // 3: stable counting sort of slots by expert
FLLM_DECLARE_OP(ExpertSwiglu, "expert_swiglu");      // 4: every expert on its grouped rows
FLLM_DECLARE_OP(Combine, "combine");                 // 5: weighted sum of each token's expert rows
FLLM_DECLARE_OP(MoeForward, "moe_forward");          // optional fused 1-5
// Dense FFN, PAR loss, training.
FLLM_DECLARE_OP(Swiglu, "swiglu");                   // dense SwiGLU FFN
FLLM_DECLARE_OP(ParLoss, "par_loss");                // PAR + balance losses and router gradients
FLLM_DECLARE_OP(MoeTrainForward, "moe_train_forward");  // forward that records routing and pre-activations
FLLM_DECLARE_OP(MoeBackward, "moe_backward");        // dx, expert and router gradients

#undef FLLM_DECLARE_OP

/// True when backend B has a kernel for Op (its own or one inherited along its fallback chain).
template <template <class, class> class Op, class B>
inline constexpr bool has_op_v = Op<B, void>::implemented;

/// True when B itself implements Op (not through a fallback): what backend/README.md's table records.
template <template <class, class> class Op, class B>
inline constexpr bool implements_op_v =
    Op<B, void>::implemented && (std::is_same_v<fallback_t<B>, NoBackend> || !std::is_base_of_v<Op<fallback_t<B>, void>, Op<B, void>>);

}  // namespace kernel
}  // namespace factorllm
