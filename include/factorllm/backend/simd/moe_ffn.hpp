// SPDX-License-Identifier: Apache-2.0
// CpuSimd MoE forward: Eigen router GEMM, scalar TopK and counting-sort grouping (tiny), then every expert's
// SwiGLU on its own gathered rows only (backend/simd/swiglu.hpp: streaming kernel for decode, Eigen GEMMs
// for prefill), then a weighted combine in slot order. No allocation; bitwise identical for any thread count.
//
// Memory: weights + workspace of O(max_tokens * (n_experts + top_k * (2 d_model + 2 d_expert))) floats plus
// one panel of max(2 * 128 * d_model, 128 * d_expert) floats per thread.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../../core/workspace.hpp"
#include "../../ffn/factorize.hpp"
#include "../../moe/gating.hpp"
#include "../../moe/router.hpp"
#include "../../moe/routing.hpp"
#include "../scalar/dispatch.hpp"
#include "../scalar/topk.hpp"
#include "cpu_simd.hpp"
#include "router.hpp"
#include "swiglu.hpp"

namespace factorllm {
namespace kernel {

/// Scratch of the CpuSimd MoE forward for up to max_tokens tokens.
template <class A, class Arch, std::enable_if_t<std::is_same_v<A, float>, int> = 0>
detail::WorkspaceLayout moe_workspace(std::ptrdiff_t max_tokens, std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                      std::ptrdiff_t d_expert, std::ptrdiff_t top_k, CpuSimd<Arch> const&) {
  auto const t = static_cast<std::size_t>(max_tokens), n = static_cast<std::size_t>(n_experts),
             k = static_cast<std::size_t>(top_k), d = static_cast<std::size_t>(d_model),
             m = static_cast<std::size_t>(d_expert);
  return detail::WorkspaceLayout()
      .add(sizeof(float), t * n)                 // logits
      .add(sizeof(std::int32_t), t * k)          // ids
      .add(sizeof(float), t * k)                 // weights
      .add(sizeof(std::int64_t), n + 1)          // offsets
      .add(sizeof(std::int32_t), t * k)          // slots (grouped order -> slot)
      .add(sizeof(std::int32_t), t * k)          // row of each slot
      .add(sizeof(float), t * k * d)             // gathered inputs
      .add(sizeof(float), t * k * m)             // h_gate
      .add(sizeof(float), t * k * m)             // h_up
      .add(sizeof(float), t * k * d)             // expert outputs (grouped order)
      .add(sizeof(detail::SwigluJob<float>), n)  // jobs (same size for every weight type)
      .add(sizeof(std::ptrdiff_t), n + 1)        // task starts
      .add(sizeof(float), static_cast<std::size_t>(detail::max_threads()) *
                              static_cast<std::size_t>(detail::swiglu_panel_floats(d_model, d_expert)));
}

/// CpuSimd MoE forward (float activations; float or bf16 expert weights). Validated by moe::MoeFfn.
template <class W, class Arch>
void moe_forward(ffn::ExpertWeights<W> const& experts, moe::Router<float> const& router, moe::Gating const& gating,
                 MatrixView<float const> x, MatrixView<float> y, Workspace& ws, moe::RoutingRecord<float>* record,
                 CpuSimd<Arch> const& b) {
  std::ptrdiff_t const n_tokens = x.rows(), n = experts.n_experts(), k = gating.top_k, d = experts.d_model(),
                       m = experts.d_expert(), n_slots = n_tokens * k;
  detail::WorkspaceCursor cursor(ws, "MoeFfn::forward (cpu_simd)");
  auto take = [&](auto* type_tag, std::ptrdiff_t count) {
    return cursor.take<std::remove_pointer_t<decltype(type_tag)>>(static_cast<std::size_t>(count));
  };
  MatrixView<float> logits = matrix_view(take((float*)nullptr, n_tokens * n), n_tokens, n);
  MatrixView<std::int32_t> ids = matrix_view(take((std::int32_t*)nullptr, n_slots), n_tokens, k);
  MatrixView<float> weights = matrix_view(take((float*)nullptr, n_slots), n_tokens, k);
  VectorView<std::int64_t> offsets = vector_view(take((std::int64_t*)nullptr, n + 1), n + 1);
  VectorView<std::int32_t> slots = vector_view(take((std::int32_t*)nullptr, n_slots), n_slots);
  std::int32_t* row_of_slot = take((std::int32_t*)nullptr, n_slots);
  float* xg = take((float*)nullptr, n_slots * d);
  float* hg = take((float*)nullptr, n_slots * m);
  float* hu = take((float*)nullptr, n_slots * m);
  float* out = take((float*)nullptr, n_slots * d);
  auto* jobs = reinterpret_cast<detail::SwigluJob<W>*>(take((detail::SwigluJob<float>*)nullptr, n));
  std::ptrdiff_t* starts = take((std::ptrdiff_t*)nullptr, n + 1);
  std::ptrdiff_t const panel_floats = detail::swiglu_panel_floats(d, m);
  float* panels = take((float*)nullptr, detail::max_threads() * panel_floats);

  router_logits(x, router.weight(), router.bias(), logits, b);                                // step 1
  select_experts(MatrixView<float const>(logits), gating, ids, weights, CpuScalar{});         // step 2
  group_by_expert(MatrixView<std::int32_t const>(ids), n, offsets, slots, CpuScalar{});       // step 3
  for (std::ptrdiff_t r = 0; r < n_slots; ++r) {                                               // gather
    std::int32_t const s = slots(r);
    row_of_slot[s] = static_cast<std::int32_t>(r);
    float const* src = x.row(s / k);
    std::copy(src, src + d, xg + r * d);
  }
  for (std::ptrdiff_t e = 0; e < n; ++e) {                                                     // step 4
    std::ptrdiff_t const r0 = offsets(e), c = offsets(e + 1) - r0;
    jobs[e] = detail::SwigluJob<W>{experts.gate_tensor().data() + e * m * d, experts.up_tensor().data() + e * m * d,
                                   experts.down_tensor().data() + e * d * m, m, xg + r0 * d, c, hg + r0 * m,
                                   hu + r0 * m, out + r0 * d};
  }
  detail::run_swiglu_jobs<Arch>(jobs, n, d, panels, panel_floats, starts);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (n_tokens * d >= 65536)
#endif
  for (std::ptrdiff_t t = 0; t < n_tokens; ++t) {                                              // step 5
    float* yr = y.row(t);
    float const w0 = weights(t, 0);
    float const* o0 = out + static_cast<std::ptrdiff_t>(row_of_slot[t * k]) * d;
    for (std::ptrdiff_t c = 0; c < d; ++c) yr[c] = w0 * o0[c];
    for (std::ptrdiff_t j = 1; j < k; ++j) {
      float const wj = weights(t, j);
      float const* oj = out + static_cast<std::ptrdiff_t>(row_of_slot[t * k + j]) * d;
      for (std::ptrdiff_t c = 0; c < d; ++c) yr[c] += wj * oj[c];
    }
  }
  if (record != nullptr) {
    record->assign(logits, ids, weights, offsets, slots);
  }
}

}  // namespace kernel
}  // namespace factorllm
