// SPDX-License-Identifier: Apache-2.0
// The backend trait: what host code asks a backend tag (name, availability, memory space).
//
// Contract (docs/design.md §4): a backend is an empty tag type B with `static char const* name()`,
// `static bool available()`, `static constexpr MemorySpace memory_space` and a fallback (backend/tags.hpp); its
// kernels are specializations of the op templates of backend/ops.hpp. Every backend agrees with CpuScalar within
// each op's written tolerance (backend/README.md), bit for bit on the exact ops, for any thread count.
#pragma once

#include "../core/workspace.hpp"
#include "tags.hpp"

namespace factorllm {

/// Compile-time facts about a backend tag B, read by the fronts (e.g. to check a workspace's memory space).
template <class B>
struct backend_traits {
  static_assert(is_backend_v<B>, "backend_traits: not a factorllm backend tag");
  static constexpr char const* name() noexcept { return B::name(); }
  static bool available() noexcept { return B::available(); }
  static constexpr MemorySpace memory_space = B::memory_space;
  static constexpr bool is_device = memory_space == MemorySpace::device;
};

namespace detail {

/// Throws backend_error unless `ws` lives in B's memory space (a host workspace handed to a device backend, or
/// the reverse, would be dereferenced in the wrong place).
template <class B>
void require_workspace_space(Workspace const& ws, char const* function) {
  if (ws.space() != backend_traits<B>::memory_space)
    throw backend_error(concat(function, ": argument 'ws' is ", to_string(ws.space()), " memory; backend ", B::name(),
                               " needs ", to_string(backend_traits<B>::memory_space), " memory"));
}

}  // namespace detail
}  // namespace factorllm
