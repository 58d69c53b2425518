// SPDX-License-Identifier: Apache-2.0
// Layer-local recovery of the experts with the router fixed (stage B of docs/math.md §3.2, done per layer instead of
// with the LM loss): a closed-form ridge refit of every expert's down projection, and distillation of the selected
// experts' gate, up and down weights toward the dense FFN's output.
//
// Both minimize the layer's output error on calibration inputs x_t with the routing held fixed:
//   MoE(x_t) = sum_j w_tj E_{e_tj}(x_t),  E_e(x) = W_d,e (SiLU(W_g,e x) * (W_u,e x)),
// where e_tj and w_tj are the experts and combine weights that router + gating give token t (every gating mode;
// the weights do not depend on the expert parameters, so they are constants here). The routing is data
// (FixedRouting, computed once per call by fixed_routing from the fixed router), which also covers layers with
// always-on shared experts (moe::SharedExpertMoe): they are slots with weight 1 that every token uses.
// Computation: double Eigen products for the refit; Eigen products in the activation type for distillation (double
// for double weights, which the gradient tests use). Eigen runs single-threaded, so results do not depend on the
// OpenMP thread count.
//
// This header composes them: the fixed routing (train/fixed_routing.hpp), the refit (train/refit.hpp) and
// distillation (train/distillation.hpp).
#pragma once

#include "distillation.hpp"
#include "fixed_routing.hpp"
#include "refit.hpp"
