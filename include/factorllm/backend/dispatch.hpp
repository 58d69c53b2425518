// SPDX-License-Identifier: Apache-2.0
// Runtime backend choice: walk a list of backend tags and call a functor with the first available one.
#pragma once

#include <utility>

#include "../core/error.hpp"
#include "tags.hpp"

namespace factorllm {

/// A compile-time list of backend tags, best first (e.g. BackendList<CpuSimd<xsimd::avx512bw>, CpuScalar>).
template <class... Backends>
struct BackendList {};

/// Calls f(B{}) with the first B in the list whose B::available() is true, and returns its result.
/// \throws backend_error if none is available (put CpuScalar last to always have one).
template <class First, class... Rest, class F>
decltype(auto) dispatch(BackendList<First, Rest...>, F&& f) {
  static_assert(is_backend_v<First>, "dispatch: not a backend tag");
  if (First::available()) return std::forward<F>(f)(First{});
  if constexpr (sizeof...(Rest) == 0) {
    throw backend_error(detail::concat("dispatch: no backend in the list is available (last tried ", First::name(), ")"));
  } else {
    return dispatch(BackendList<Rest...>{}, std::forward<F>(f));
  }
}

}  // namespace factorllm
