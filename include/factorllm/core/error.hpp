// SPDX-License-Identifier: Apache-2.0
// The library's exception hierarchy: every error it throws derives from factorllm::error.
#pragma once

#include <cstddef>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>

namespace factorllm {

/// Base of every exception the library throws.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A tensor argument has the wrong shape, stride or is null where data is required.
class shape_error : public error {
 public:
  using error::error;
};

/// A scalar argument is out of range (top_k, n_experts, seed...) or a permutation is not one.
class value_error : public error {
 public:
  using error::error;
};

/// A file or byte buffer is malformed: bad header, truncated, sizes that do not add up.
class format_error : public error {
 public:
  using error::error;
};

/// The requested backend cannot run the call (unavailable ISA or device, unsupported dtype, workspace
/// too small for the call).
class backend_error : public error {
 public:
  using error::error;
};

namespace detail {

/// Formats a shape as "[a, b, c]" for error messages.
inline std::string shape_string(std::initializer_list<std::ptrdiff_t> extents) {
  std::ostringstream os;
  os << '[';
  bool first = true;
  for (auto e : extents) {
    if (!first) os << ", ";
    os << e;
    first = false;
  }
  os << ']';
  return os.str();
}

/// Concatenates its arguments with operator<< into one message.
template <class... Parts>
std::string concat(Parts const&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

}  // namespace detail
}  // namespace factorllm
