// SPDX-License-Identifier: Apache-2.0
// Internal helper of the file writers (safetensors, GGUF): the elements of a tensor view of any strides, as floats
// in row-major order, ready to be encoded.
#pragma once

#include <cstddef>
#include <vector>

#include "../../core/dtype.hpp"
#include "../../core/tensor_view.hpp"

namespace factorllm {
namespace io {
namespace detail {

template <class T, int Rank>
void append_row_major_floats(TensorView<T, Rank> const& v, int dim, std::ptrdiff_t off, std::vector<float>& out) {
  for (std::ptrdiff_t i = 0; i < v.extent(dim); ++i) {
    if (dim == Rank - 1) out.push_back(static_cast<float>(to_double(v.data()[off + i])));
    else append_row_major_floats(v, dim + 1, off + i * v.stride(dim), out);
  }
}

/// Returns the elements of a view of float, double or bf16 (any strides) as floats, last dimension fastest.
template <class T, int Rank>
std::vector<float> row_major_floats(TensorView<T, Rank> const& view) {
  std::vector<float> values;
  values.reserve(static_cast<std::size_t>(view.size()));
  append_row_major_floats(view, 0, 0, values);
  return values;
}

}  // namespace detail
}  // namespace io
}  // namespace factorllm
