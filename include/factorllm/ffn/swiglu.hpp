// SPDX-License-Identifier: Apache-2.0
// Dense SwiGLU FFN: F(x) = W_down (SiLU(W_gate x) * (W_up x)) (docs/math.md §1.1), the layer being factorized.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "../backend/ops.hpp"
#include "../backend/scalar/swiglu.hpp"
#include "../backend/simd/swiglu.hpp"
#include "../backend/traits.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor_view.hpp"
#include "../core/type_traits.hpp"
#include "../core/workspace.hpp"

namespace factorllm {
namespace ffn {

/// Non-owning views of a host engine's dense SwiGLU weights in PyTorch nn.Linear layout. For a block-quantized
/// format (q8_0, q4_0: core/quant.hpp) each row is its consecutive 32-weight blocks, so the last extents count
/// blocks and d_model, d_ff are multiples of 32.
template <class T>
struct DenseFfnView {
  static constexpr std::ptrdiff_t kBlock = block_weights_v<T>;
  MatrixView<T const> gate;  // [d_ff, d_model / block]
  MatrixView<T const> up;    // [d_ff, d_model / block]
  MatrixView<T const> down;  // [d_model, d_ff / block]

  std::ptrdiff_t d_model() const noexcept { return gate.cols() * kBlock; }
  std::ptrdiff_t d_ff() const noexcept { return gate.rows(); }

  /// Throws shape_error unless up matches gate and down is [d_model, d_ff / block]; d_model, d_ff must be >= 1
  /// (and d_ff a multiple of the block for a block format).
  void validate(char const* function) const {
    if (gate.rows() < 1 || gate.cols() < 1)
      throw shape_error(detail::concat(function, ": argument 'gate' has shape ",
                                       detail::shape_string({gate.rows(), gate.cols()}),
                                       ", expected [d_ff >= 1, d_model >= 1]"));
    detail::require_shape(up, {d_ff(), gate.cols()}, function, "up");
    if (d_ff() % kBlock != 0)
      throw shape_error(detail::concat(function, ": argument 'gate' has d_ff = ", d_ff(), " rows, expected a multiple of ",
                                       kBlock, " (argument 'down' stores rows of d_ff weights in ",
                                       dtype_traits<T>::name(), " blocks)"));
    detail::require_shape(down, {d_model(), d_ff() / kBlock}, function, "down");
  }
};

/// Returns the workspace bytes `swiglu_forward` needs on Backend for these sizes, for calls through executors of
/// up to exec.n_workers() workers (per-worker scratch is part of it).
/// \throws value_error if n_tokens < 0, d_model < 1, d_ff < 1, or the size would overflow.
/// \tparam T  weight format (the scratch of some backends depends on it; f32 by default)
template <class Backend = CpuScalar, class T = float>
std::size_t swiglu_workspace_bytes(std::ptrdiff_t n_tokens, std::ptrdiff_t d_model, std::ptrdiff_t d_ff,
                                   Backend const& = {}, Executor const& exec = Executor::openmp()) {
  if (n_tokens < 0 || d_model < 1 || d_ff < 1)
    throw value_error(detail::concat("swiglu_workspace_bytes: need n_tokens >= 0, d_model >= 1, d_ff >= 1; got ",
                                     n_tokens, ", ", d_model, ", ", d_ff));
  // Regions hold at most max(n_tokens, 256 * threads) * max(d_model, d_ff) elements: bounding both factors keeps
  // every size computation in range (2^40 elements is far beyond any real layer).
  constexpr std::ptrdiff_t kMaxElements = std::ptrdiff_t{1} << 40;
  std::ptrdiff_t const widest = std::max(d_model, d_ff);
  if (widest > kMaxElements || n_tokens > kMaxElements / widest)
    throw value_error(detail::concat("swiglu_workspace_bytes: n_tokens ", n_tokens, " x d_model ", d_model, " x d_ff ",
                                     d_ff, " is too large: the workspace size would overflow"));
  return kernel::Swiglu<Backend>::template workspace<T, activation_t<T>>(n_tokens, d_model, d_ff, exec.n_workers()).bytes();
}

/// Computes y = F(x) for every row of x (docs/math.md §1.1).
/// \param ffn  dense weights (validated)
/// \param x    [n_tokens, d_model] inputs, any row stride (a writable view converts)
/// \param y    [n_tokens, d_model] outputs; must not alias x
/// \param ws   scratch of at least swiglu_workspace_bytes(n_tokens, d_model, d_ff, Backend{}, exec)
/// \param exec who runs the kernel's tasks (OpenMP by default; the result is the same bits for any executor)
/// NaN/Inf in a row of x propagate to that row of y only.
template <class Backend = CpuScalar, class T, class A>
void swiglu_forward(DenseFfnView<T> const& ffn, type_identity_t<MatrixView<A const>> x, MatrixView<A> y, Workspace& ws,
                    Backend const& = {}, Executor const& exec = Executor::openmp()) {
  static_assert(is_backend_v<Backend>, "swiglu_forward: unknown backend tag");
  static_assert(std::is_same_v<A, activation_t<T>>, "swiglu_forward: activations must be activation_t<T>");
  ffn.validate("swiglu_forward");
  detail::require_shape(x, {x.rows(), ffn.d_model()}, "swiglu_forward", "x");
  detail::require_shape(y, {x.rows(), ffn.d_model()}, "swiglu_forward", "y");
  detail::require_workspace_space<Backend>(ws, "swiglu_forward");
  std::size_t const need = swiglu_workspace_bytes<Backend, T>(x.rows(), ffn.d_model(), ffn.d_ff(), Backend{}, exec);
  if (ws.bytes() < need)
    throw backend_error(detail::concat("swiglu_forward: workspace of ", ws.bytes(), " bytes is too small for ", x.rows(),
                                       " tokens (needs ", need, "; use swiglu_workspace_bytes())"));
  kernel::Swiglu<Backend>::run(ffn.gate, ffn.up, ffn.down, x, y, ws.span(), exec);
}

/// Convenience overload that allocates its own workspace (one allocation per call; not for hot loops).
template <class Backend = CpuScalar, class T, class A>
void swiglu_forward(DenseFfnView<T> const& ffn, type_identity_t<MatrixView<A const>> x, MatrixView<A> y,
                    Backend const& b = {}) {
  ffn.validate("swiglu_forward");  // first, so that a bad FFN is a shape_error here too, not the size query's error
  Workspace ws(swiglu_workspace_bytes<Backend, T>(x.rows(), ffn.d_model(), ffn.d_ff()));
  swiglu_forward(ffn, x, y, ws, b);
}

}  // namespace ffn
}  // namespace factorllm
