// SPDX-License-Identifier: Apache-2.0
// The PAR + balance losses and their router gradients for tokens whose pseudo-labels are already known (e.g. the
// oracle labels of a calibration set): what router training evaluates every step, without an expert forward.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../core/error.hpp"
#include "../core/tensor_view.hpp"
#include "../core/workspace.hpp"
#include "../moe/router.hpp"
#include "par_loss.hpp"
#include "par_loss.hpp"

namespace factorllm {
namespace train {

/// Bytes of scratch par_loss_from_labels needs (independent of n_tokens).
/// \throws value_error unless d_model, n_experts >= 1 and 1 <= top_k <= n_experts.
inline std::size_t par_loss_from_labels_workspace_bytes(std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                                        std::ptrdiff_t top_k) {
  if (d_model < 1 || n_experts < 1 || top_k < 1 || top_k > n_experts)
    throw value_error(detail::concat("par_loss_from_labels_workspace_bytes: need d_model, n_experts >= 1 and top_k in ",
                                     "[1, n_experts]; got ", d_model, ", ", n_experts, ", ", top_k));
  if (n_experts > (std::ptrdiff_t{1} << 40) / (d_model + 1))
    throw value_error("par_loss_from_labels_workspace_bytes: sizes too large: the workspace size would overflow");
  detail::WorkspaceLayout layout;
  return detail::ParRouterAccumulator::add_scratch(layout, d_model, n_experts, top_k).bytes();
}

/// Computes the PAR + balance losses and their router gradients (the same quantities as train::par_loss,
/// docs/math.md §3.2) for tokens whose pseudo-labels are already known, e.g. from par_oracle_labels. Fills every field
/// of `out` except mse_to_target, which is left as it was (the MSEs are not needed once the labels are known).
/// \param x       [n_tokens >= 1, d_model]; \param labels  [n_tokens, top_k] the tokens' pseudo-labels
/// \param ws      scratch of at least par_loss_from_labels_workspace_bytes(d_model, n_experts, top_k) bytes
/// \throws value_error for no tokens, a bad top_k or clip, or a label outside [0, n_experts); shape_error for
///         mismatched shapes; backend_error if ws is too small.
template <class A>
void par_loss_from_labels(MatrixView<A const> x, MatrixView<std::int32_t const> labels, moe::Router<A> const& router,
                          std::ptrdiff_t top_k, ParLossConfig const& config, ParLossResult<A>& out, Workspace& ws) {
  char const* fn = "par_loss_from_labels";
  std::ptrdiff_t const n_tokens = x.rows(), n = router.n_experts(), d = router.d_model(), k = top_k;
  if (n_tokens < 1) throw value_error("par_loss_from_labels: argument 'x' has no tokens; the loss is a mean over tokens");
  detail::require_shape(x, {n_tokens, d}, fn, "x");
  if (k < 1 || k > n) throw value_error(detail::concat(fn, ": top_k = ", k, " must be in [1, n_experts = ", n, "]"));
  detail::require_shape(labels, {n_tokens, k}, fn, "labels");
  if (!(config.clip > 0 && config.clip < 0.5))
    throw value_error(detail::concat(fn, ": config.clip = ", config.clip, " must be in (0, 0.5)"));
  for (std::ptrdiff_t t = 0; t < n_tokens; ++t)
    for (std::ptrdiff_t j = 0; j < k; ++j)
      if (labels(t, j) < 0 || labels(t, j) >= n)
        throw value_error(detail::concat(fn, ": argument 'labels' entry (", t, ", ", j, ") = ", labels(t, j),
                                         " is outside [0, ", n, ")"));
  out.resize(n_tokens, d, n, k);

  detail::WorkspaceCursor cursor(ws, fn);
  detail::ParRouterAccumulator router_terms(cursor, n_tokens, d, n, k, config.clip);
  for (std::ptrdiff_t t = 0; t < n_tokens; ++t) {
    A const* xr = x.row(t);
    router_terms.route<A>(router, xr);                  // docs/math.md §3.2 step 1
    router_terms.add_token<A>(t, xr, labels.row(t), out);  // steps 6-7 and the balance term
  }
  static_cast<ParLossValues&>(out) = router_terms.finish<A>(config, out);
}

}  // namespace train
}  // namespace factorllm
