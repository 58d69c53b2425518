// SPDX-License-Identifier: Apache-2.0
// Internal: the two row layouts of RoPE's rotated pairs in q/k projections (and their biases), and the exact
// reorderings between them (docs/formats.md, "Hugging Face Llama-family checkpoints").
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include "../../core/tensor_view.hpp"

namespace factorllm {
namespace io {
namespace detail {

// Per head of head_dim rows, RoPE rotates head_dim / 2 pairs of rows:
//   adjacent   (llama2.c, Meta, llama.cpp's "llama" GGUF, model::LlamaModel): pair j = rows (2j, 2j + 1)
//   half-split (Hugging Face transformers, rotate_half):                     pair j = rows (j, j + head_dim / 2)
// Hugging Face's convert_llama_weights_to_hf.py applies adjacent -> half-split, llama.cpp's convert_hf_to_gguf.py
// ("permute") half-split -> adjacent. Both only move whole rows, so they are exact.

/// Reorders the rows of a [rows, cols] row-major block holding `n_heads` heads of rows / n_heads rows each, from
/// the adjacent-pairs layout to the half-split one (`to_half_split`) or back. `cols` is 1 for a bias vector.
/// Preconditions: rows is a multiple of n_heads and the head size is even (callers validate).
inline std::vector<float> reorder_rope_rows(float const* src, std::ptrdiff_t rows, std::ptrdiff_t cols,
                                            std::ptrdiff_t n_heads, bool to_half_split) {
  std::ptrdiff_t const hs = rows / n_heads;
  std::vector<float> out(static_cast<std::size_t>(rows * cols));
  for (std::ptrdiff_t h = 0; h < n_heads; ++h)
    for (std::ptrdiff_t half = 0; half < 2; ++half)
      for (std::ptrdiff_t j = 0; j < hs / 2; ++j) {
        std::ptrdiff_t const split = h * hs + half * (hs / 2) + j, adjacent = h * hs + 2 * j + half;
        std::ptrdiff_t const dst = to_half_split ? split : adjacent, from = to_half_split ? adjacent : split;
        std::copy(src + from * cols, src + (from + 1) * cols, out.data() + dst * cols);
      }
  return out;
}

/// Returns a q or k projection [rows, cols] reordered from the adjacent-pairs layout to Hugging Face's half-split
/// one (the inverse of the "permute" that llama.cpp's convert_hf_to_gguf.py applies to HF q/k weights).
inline std::vector<float> interleaved_to_half_split(MatrixView<float const> w, std::ptrdiff_t n_heads) {
  std::vector<float> dense(static_cast<std::size_t>(w.rows() * w.cols()));
  for (std::ptrdiff_t r = 0; r < w.rows(); ++r) std::copy(w.row(r), w.row(r) + w.cols(), dense.data() + r * w.cols());
  return reorder_rope_rows(dense.data(), w.rows(), w.cols(), n_heads, /*to_half_split=*/true);
}

/// Returns a q or k projection (or bias, cols = 1) reordered from Hugging Face's half-split layout to the
/// adjacent-pairs one: the inverse of interleaved_to_half_split.
inline std::vector<float> half_split_to_interleaved(float const* src, std::ptrdiff_t rows, std::ptrdiff_t cols,
                                                    std::ptrdiff_t n_heads) {
  return reorder_rope_rows(src, rows, cols, n_heads, /*to_half_split=*/false);
}

}  // namespace detail
}  // namespace io
}  // namespace factorllm
