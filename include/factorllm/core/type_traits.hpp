// SPDX-License-Identifier: Apache-2.0
// Small type utilities the C++17 standard library lacks.
#pragma once

namespace factorllm {

/// std::type_identity (C++20): keeps a parameter out of template argument deduction, so an argument that
/// converts to it (an owning object to its view, nullptr to a pointer) is accepted.
template <class T>
struct type_identity {
  using type = T;
};
template <class T>
using type_identity_t = typename type_identity<T>::type;

}  // namespace factorllm
