// SPDX-License-Identifier: Apache-2.0
// Argument checks shared by the CPU ops (torch_ops.cpp) and the CUDA ops (torch_ops_cuda.cpp) of factorllm.torch:
// one message format, so a tensor of the wrong shape or layout, or a library error, reads the same on either device.
#pragma once

#include <torch/torch.h>

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include <factorllm/core/error.hpp>

namespace factorllm_torch {

/// "[a, b, c]" for a shape or strides.
inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ']';
  return os.str();
}

/// Checks the strided layout, the shape (-1 = any extent) and contiguity of `t`, naming `arg` of `fn` in the error
/// (ValueError in Python). Device and dtype are the caller's checks (they differ between the CPU and CUDA ops).
inline void check_layout_shape(at::Tensor const& t, char const* fn, char const* arg,
                               std::vector<std::int64_t> const& shape, char const* shape_names) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, fn, ": argument '", arg, "' must have the strided (dense) layout, got ",
                    t.layout());
  bool ok = t.dim() == static_cast<std::int64_t>(shape.size());
  for (std::size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || t.size(static_cast<std::int64_t>(i)) == shape[i];
  if (!ok) {
    std::ostringstream want;
    want << '[';
    for (std::size_t i = 0; i < shape.size(); ++i) {
      want << (i ? ", " : "");
      if (shape[i] < 0) want << '*'; else want << shape[i];
    }
    want << ']';
    TORCH_CHECK_VALUE(false, fn, ": argument '", arg, "' must have shape ", want.str(), " ", shape_names, ", got ",
                      shape_str(t.sizes()));
  }
  TORCH_CHECK_VALUE(t.is_contiguous(), fn, ": argument '", arg, "' must be contiguous (got strides ",
                    shape_str(t.strides()), "); the op does not copy: call .contiguous() if you mean to");
}

/// Runs f, re-raising a library error as the matching Python exception: shape_error and value_error as ValueError,
/// any other factorllm::error as RuntimeError, each with the library's message.
template <class F>
auto translate_errors(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (factorllm::shape_error const& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (factorllm::value_error const& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (factorllm::error const& e) {
    TORCH_CHECK(false, e.what());
  }
}

}  // namespace factorllm_torch
