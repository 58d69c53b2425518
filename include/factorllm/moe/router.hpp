// SPDX-License-Identifier: Apache-2.0
// The linear router of one layer, z = W_r x + b_r with n_experts outputs (docs/math.md §2.2).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "../backend/ops.hpp"
#include "../backend/scalar/router.hpp"
#include "../backend/simd/router.hpp"
#include "../core/error.hpp"
#include "../core/kernel_args.hpp"
#include "../core/tensor.hpp"
#include "../detail/random.hpp"

namespace factorllm {
namespace moe {

/// Router weights W_r [n_experts, d_model] and bias b_r [n_experts] (PyTorch nn.Linear layout).
/// Immutable after construction except through the explicitly mutable accessors used by training.
template <class T>
class Router {
 public:
  Router() = default;

  /// Takes given weights. \throws shape_error unless bias has weight.rows() entries and both are non-empty.
  Router(Matrix<T> weight, Vector<T> bias) : w_(std::move(weight)), b_(std::move(bias)) {
    if (w_.extent(0) < 1 || w_.extent(1) < 1)
      throw shape_error(detail::concat("Router: argument 'weight' has shape ",
                                       detail::shape_string({w_.extent(0), w_.extent(1)}),
                                       ", expected [n_experts >= 1, d_model >= 1]"));
    detail::require_shape(b_.cview(), {w_.extent(0)}, "Router", "bias");
  }

  /// Copies weights from views (e.g. a host engine's buffers).
  static Router from_views(MatrixView<T const> weight, VectorView<T const> bias) {
    return Router(Matrix<T>(weight), Vector<T>(bias));
  }

  /// The paper's random init (docs/math.md §2.2): W_r ~ N(0, stddev^2) with stddev 0.02 by default, b_r = 0,
  /// drawn from a seeded generator (identical on every platform).
  /// \throws value_error if d_model < 1, n_experts < 1, or stddev is negative or not finite.
  static Router random(std::ptrdiff_t d_model, std::ptrdiff_t n_experts, std::uint64_t seed, double stddev = 0.02) {
    if (d_model < 1) throw value_error(detail::concat("Router::random: d_model must be >= 1, got ", d_model));
    if (n_experts < 1) throw value_error(detail::concat("Router::random: n_experts must be >= 1, got ", n_experts));
    if (!(stddev >= 0) || !std::isfinite(stddev)) throw value_error(detail::concat("Router::random: stddev must be >= 0, got ", stddev));
    Matrix<T> w({n_experts, d_model});
    std::mt19937_64 rng(seed);
    for (std::ptrdiff_t i = 0; i < w.size(); ++i) w[i] = from_double<T>(stddev * detail::standard_normal(rng));
    return Router(std::move(w), Vector<T>({n_experts}));
  }

  std::ptrdiff_t n_experts() const noexcept { return w_.extent(0); }
  std::ptrdiff_t d_model() const noexcept { return w_.extent(1); }
  MatrixView<T const> weight() const noexcept { return w_.cview(); }
  VectorView<T const> bias() const noexcept { return b_.cview(); }
  /// The kernel-argument view of this router.
  RouterView<T> view() const noexcept { return RouterView<T>{w_.cview(), b_.cview()}; }
  operator RouterView<T>() const noexcept { return view(); }  // NOLINT: implicit, like std::string -> string_view
  /// Writable parameters, for router training only (not thread safe while others read).
  Matrix<T>& mutable_weight() noexcept { return w_; }
  Vector<T>& mutable_bias() noexcept { return b_; }

 private:
  Matrix<T> w_;
  Vector<T> b_;
};

/// Computes logits [n_tokens, n_experts] = x W_r^T + b_r.
/// \throws shape_error if x is not [n_tokens, d_model] or logits not [n_tokens, n_experts].
template <class Backend = CpuScalar, class R, class A>
void router_logits(Router<R> const& router, MatrixView<A const> x, MatrixView<A> logits, Backend const& = {}) {
  static_assert(is_backend_v<Backend>, "router_logits: unknown backend tag");
  detail::require_shape(x, {x.rows(), router.d_model()}, "router_logits", "x");
  detail::require_shape(logits, {x.rows(), router.n_experts()}, "router_logits", "logits");
  kernel::RouterLogits<Backend>::run(x, router.view(), logits);
}

}  // namespace moe
}  // namespace factorllm
