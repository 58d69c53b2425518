// SPDX-License-Identifier: Apache-2.0
// CpuSimd MoE training forward and backward (float weights and activations): Eigen GEMMs per expert on its
// routed rows only, OpenMP over (expert x block) tasks, no allocation, bitwise identical for any thread count.
//
// Determinism: the work is cut into tasks whose boundaries depend only on the shapes (kTrainBlock weight rows
// or output columns); every output element is written by exactly one task, and sums across tasks (the
// combine-weight gradient, the per-token sums over the K slots) are reduced afterwards in a fixed order.
// Eigen's own GEMM threading is kept off inside our regions (its blocking depends on its thread count):
// the Executor holds it serial inside every task (core/executor.hpp).
//
// Backward cost per routed slot, in units of one d_model x d_expert multiply-add pass: 2 (recompute W_g x, W_u x;
// 0 when the forward saved them) + 1 (g = W_d^T dy) + 3 (dW_g, dW_u, dW_d) + 2 (dx) = 8 (6 with saved).
// Eigen may take its GEMM packing buffers from the heap for large blocks (as in the forward); the kernels
// themselves allocate nothing.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "../../core/kernel_args.hpp"
#include "../../core/workspace.hpp"
#include "../ops.hpp"
#include "../scalar/grouping.hpp"
#include "../scalar/moe_backward.hpp"
#include "../scalar/topk.hpp"
#include "cpu_simd.hpp"
#include "swiglu.hpp"

namespace factorllm {
namespace detail {

/// Weight rows (phase 1) or output columns (phase 2) per task of the training kernels. Fixed, so that the
/// results never depend on the thread count. Measured on the TinyLlama FFN shape (1 thread, AVX-512): 128 gives
/// 70 GFLOP/s, 256 gives 75 (Eigen's packing amortized over wider panels), 512 no more while halving the tasks.
inline constexpr std::ptrdiff_t kTrainBlock = 256;
/// Rows (tokens or slots) per task of the per-row passes (gather, combine, router gradients).
inline constexpr std::ptrdiff_t kRowsPerTask = 16;

/// Views rows x cols floats at p with row stride ld as a row-major Eigen matrix (read-only / writable).
inline ConstMapF cmap_f(float const* p, std::ptrdiff_t rows, std::ptrdiff_t cols, std::ptrdiff_t ld) {
  return ConstMapF(p, rows, cols, Eigen::OuterStride<>(ld));
}
inline MapF map_f(float* p, std::ptrdiff_t rows, std::ptrdiff_t cols, std::ptrdiff_t ld) {
  return MapF(p, rows, cols, Eigen::OuterStride<>(ld));
}
/// Stable sigmoid in float (exp of a non-positive argument only).
inline float sigmoid_f(float a) noexcept {
  float const e = std::exp(-std::fabs(a));
  return a >= 0 ? 1.f / (1.f + e) : e / (1.f + e);
}

/// Maps a global task index to (expert, block) given per-expert task starts [n_experts + 1].
inline void task_to_block(std::ptrdiff_t const* starts, std::ptrdiff_t n_experts, std::ptrdiff_t task,
                          std::ptrdiff_t& e, std::ptrdiff_t& block) noexcept {
  e = std::upper_bound(starts, starts + n_experts + 1, task) - starts - 1;
  block = task - starts[e];
}

/// Fills starts[0..n_experts] with the first task of each expert (blocks of kTrainBlock over `extent`);
/// experts with no token get tasks only when `include_empty`. Returns the task count.
inline std::ptrdiff_t plan_tasks(std::int64_t const* offsets, std::ptrdiff_t n_experts, std::ptrdiff_t extent,
                                 bool include_empty, std::ptrdiff_t* starts) noexcept {
  std::ptrdiff_t count = 0;
  std::ptrdiff_t const blocks = (extent + kTrainBlock - 1) / kTrainBlock;
  for (std::ptrdiff_t e = 0; e < n_experts; ++e) {
    starts[e] = count;
    if (include_empty || offsets[e + 1] > offsets[e]) count += blocks;
  }
  starts[n_experts] = count;
  return count;
}

}  // namespace detail

namespace kernel {

/// Scratch of the CpuSimd training forward for up to max_tokens tokens (S = max_tokens * top_k slots).
template <class Arch>
struct MoeTrainForward<CpuSimd<Arch>> {
  static constexpr bool implemented = true;
  /// Other weight formats (double, bf16) run the oracle.
  template <class W>
  static detail::WorkspaceLayout workspace(MoeParamsView<W> const& p, std::ptrdiff_t top_k, std::ptrdiff_t max_tokens) {
    return MoeTrainForward<CpuScalar>::workspace(p, top_k, max_tokens);
  }
  template <class W, class A>
  static void run(MoeParamsView<W> const& p, GatingParams const& gating, MatrixView<A const> x, MatrixView<A> y,
                  RoutingView<A> record, MoeActivationsView<A> const* saved, WorkspaceSpan ws, Executor const& exec = Executor::openmp()) {
    MoeTrainForward<CpuScalar>::run(p, gating, x, y, record, saved, ws, exec);
  }
  static detail::WorkspaceLayout workspace(MoeParamsView<float> const& p, std::ptrdiff_t top_k, std::ptrdiff_t max_tokens);
  static void run(MoeParamsView<float> const& p, GatingParams const& gating, MatrixView<float const> x,
                  MatrixView<float> y, RoutingView<float> record, MoeActivationsView<float> const* saved,
                  WorkspaceSpan ws, Executor const& exec = Executor::openmp());
};

template <class Arch>
detail::WorkspaceLayout MoeTrainForward<CpuSimd<Arch>>::workspace(MoeParamsView<float> const& p, std::ptrdiff_t top_k,
                                                                  std::ptrdiff_t max_tokens) {
  auto const s = static_cast<std::size_t>(max_tokens * top_k), n = static_cast<std::size_t>(p.n_experts()),
             d = static_cast<std::size_t>(p.d_model()), m = static_cast<std::size_t>(p.d_expert());
  return detail::WorkspaceLayout()
      .add(sizeof(std::int32_t), s)        // grouped row of each slot
      .add(sizeof(float), s * d)           // gathered inputs
      .add(sizeof(float), 2 * s * m)       // gate/up pre-activations (when not saved)
      .add(sizeof(float), s * m)           // hidden h = SiLU(a) b
      .add(sizeof(float), s * d)           // expert outputs (grouped order)
      .add(sizeof(std::ptrdiff_t), n + 1);  // task starts
}

/// CpuSimd training forward (float). Same routing as the scalar oracle (router GEMM, scalar TopK and stable
/// grouping), then per expert: phase 1 [a | b] = X_e [W_g | W_u]^T, h = SiLU(a) b; phase 2 O_e = h W_d^T; then
/// y_t = sum_j w_tj o_{t,j} in j order.
template <class Arch>
void MoeTrainForward<CpuSimd<Arch>>::run(MoeParamsView<float> const& p, GatingParams const& gating,
                                         MatrixView<float const> x, MatrixView<float> y, RoutingView<float> record,
                                         MoeActivationsView<float> const* saved, WorkspaceSpan ws,
                                         Executor const& exec) {
  std::ptrdiff_t const n_tokens = x.rows(), n = p.n_experts(), k = gating.top_k, d = p.d_model(), m = p.d_expert(),
                       n_slots = n_tokens * k;
  detail::WorkspaceCursor cursor(ws, "moe_forward (train, cpu_simd)");
  std::int32_t* row_of_slot = cursor.take<std::int32_t>(static_cast<std::size_t>(n_slots));
  float* xg = cursor.take<float>(static_cast<std::size_t>(n_slots * d));
  float* pre = cursor.take<float>(static_cast<std::size_t>(2 * n_slots * m));
  float* hid = cursor.take<float>(static_cast<std::size_t>(n_slots * m));
  float* out = cursor.take<float>(static_cast<std::size_t>(n_slots * d));
  std::ptrdiff_t* starts = cursor.take<std::ptrdiff_t>(static_cast<std::size_t>(n + 1));
  float* pre_g = saved != nullptr ? saved->gate_pre.data() : pre;
  float* pre_u = saved != nullptr ? saved->up_pre.data() : pre + n_slots * m;

  MatrixView<float> logits = record.logits;
  // Step 1, z = x W_r^T + b_r: one task (N is small); run inside a region so Eigen stays serial.
  exec.run(n_tokens > 0 ? 1 : 0, [&](std::ptrdiff_t, int) {
    detail::map_f(logits.data(), n_tokens, n, n).noalias() =
        detail::cmap_f(x.data(), n_tokens, d, x.row_stride()) * detail::cmap_f(p.router_weight.data(), n, d, d).transpose();
    for (std::ptrdiff_t t = 0; t < n_tokens; ++t)
      for (std::ptrdiff_t e = 0; e < n; ++e) logits(t, e) += p.router_bias(e);
  });
  SelectExperts<CpuScalar>::run(MatrixView<float const>(logits), gating, record.ids, record.weights);  // step 2
  GroupByExpert<CpuScalar>::run(MatrixView<std::int32_t const>(record.ids), n, record.offsets, record.slots,
                                VectorView<std::int32_t>());                                       // step 3
  std::int64_t const* offsets = record.offsets.data();
  for (std::ptrdiff_t r = 0; r < n_slots; ++r) {  // gather each expert's rows
    std::int32_t const s = record.slots(r);
    row_of_slot[s] = static_cast<std::int32_t>(r);
    std::copy(x.row(s / k), x.row(s / k) + d, xg + r * d);
  }
  // Step 4, phase 1: blocks of kTrainBlock neurons of one expert.
  std::ptrdiff_t n_tasks = detail::plan_tasks(offsets, n, m, false, starts);
  exec.run(n_tasks, [&](std::ptrdiff_t task, int) {
    std::ptrdiff_t e, blk;
    detail::task_to_block(starts, n, task, e, blk);
    std::ptrdiff_t const r0 = offsets[e], c = offsets[e + 1] - r0, i0 = blk * detail::kTrainBlock,
                         bw = std::min(m, i0 + detail::kTrainBlock) - i0;
    auto const xe = detail::cmap_f(xg + r0 * d, c, d, d);
    detail::map_f(pre_g + r0 * m + i0, c, bw, m).noalias() = xe * detail::cmap_f(p.gate.data() + (e * m + i0) * d, bw, d, d).transpose();
    detail::map_f(pre_u + r0 * m + i0, c, bw, m).noalias() = xe * detail::cmap_f(p.up.data() + (e * m + i0) * d, bw, d, d).transpose();
    for (std::ptrdiff_t rr = 0; rr < c; ++rr) {
      float const* ga = pre_g + (r0 + rr) * m;
      float const* ub = pre_u + (r0 + rr) * m;
      float* hr = hid + (r0 + rr) * m;
      for (std::ptrdiff_t i = i0; i < i0 + bw; ++i) hr[i] = detail::silu_f(ga[i]) * ub[i];
    }
  });
  // Step 4, phase 2: blocks of kTrainBlock output columns of one expert.
  n_tasks = detail::plan_tasks(offsets, n, d, false, starts);
  exec.run(n_tasks, [&](std::ptrdiff_t task, int) {
    std::ptrdiff_t e, blk;
    detail::task_to_block(starts, n, task, e, blk);
    std::ptrdiff_t const r0 = offsets[e], c = offsets[e + 1] - r0, o0 = blk * detail::kTrainBlock,
                         bw = std::min(d, o0 + detail::kTrainBlock) - o0;
    detail::map_f(out + r0 * d + o0, c, bw, d).noalias() =
        detail::cmap_f(hid + r0 * m, c, m, m) * detail::cmap_f(p.down.data() + (e * d + o0) * m, bw, m, m).transpose();
  });
  // Step 5: y_t = sum_j w_tj o_{t,j}, j in order (one writer per row).
  exec.run_blocked(n_tokens, detail::kRowsPerTask, [&](std::ptrdiff_t t) {
    float* yr = y.row(t);
    for (std::ptrdiff_t j = 0; j < k; ++j) {
      float const wj = record.weights(t, j);
      float const* oj = out + static_cast<std::ptrdiff_t>(row_of_slot[t * k + j]) * d;
      if (j == 0) {
        for (std::ptrdiff_t c = 0; c < d; ++c) yr[c] = wj * oj[c];
      } else {
        for (std::ptrdiff_t c = 0; c < d; ++c) yr[c] += wj * oj[c];
      }
    }
  });
}

/// Scratch of the CpuSimd backward for up to max_tokens tokens (S = max_tokens * top_k slots,
/// nb = ceil(d_expert / kTrainBlock)).
template <class Arch>
struct MoeBackward<CpuSimd<Arch>> {
  static constexpr bool implemented = true;
  /// Other weight formats (double, bf16) run the oracle.
  template <class W>
  static detail::WorkspaceLayout workspace(MoeParamsView<W> const& p, std::ptrdiff_t top_k, std::ptrdiff_t max_tokens) {
    return MoeBackward<CpuScalar>::workspace(p, top_k, max_tokens);
  }
  template <class W, class A>
  static void run(MoeParamsView<W> const& p, GatingParams const& gating, RoutingView<A const> record,
                  MatrixView<A const> x, MatrixView<A const> dy, MoeActivationsView<A const> const* saved,
                  MoeGradsView<A> const& grads, WorkspaceSpan ws, Executor const& exec = Executor::openmp()) {
    MoeBackward<CpuScalar>::run(p, gating, record, x, dy, saved, grads, ws, exec);
  }
  static detail::WorkspaceLayout workspace(MoeParamsView<float> const& p, std::ptrdiff_t top_k, std::ptrdiff_t max_tokens);
  static void run(MoeParamsView<float> const& p, GatingParams const& gating, RoutingView<float const> record,
                  MatrixView<float const> x, MatrixView<float const> dy, MoeActivationsView<float const> const* saved,
                  MoeGradsView<float> const& grads, WorkspaceSpan ws, Executor const& exec = Executor::openmp());
};

template <class Arch>
detail::WorkspaceLayout MoeBackward<CpuSimd<Arch>>::workspace(MoeParamsView<float> const& p, std::ptrdiff_t top_k,
                                                              std::ptrdiff_t max_tokens) {
  auto const t = static_cast<std::size_t>(max_tokens), s = static_cast<std::size_t>(max_tokens * top_k),
             n = static_cast<std::size_t>(p.n_experts()), d = static_cast<std::size_t>(p.d_model()),
             m = static_cast<std::size_t>(p.d_expert()),
             nb = static_cast<std::size_t>((p.d_expert() + detail::kTrainBlock - 1) / detail::kTrainBlock);
  return detail::WorkspaceLayout()
      .add(sizeof(std::int32_t), s)          // grouped row of each slot
      .add(sizeof(float), s * d)             // gathered x
      .add(sizeof(float), s * d)             // gathered dy, then dx per slot
      .add(sizeof(float), 3 * s * m)         // da (a), db (b), w h (g)
      .add(sizeof(float), s * nb)            // partial dL/dw per (slot, neuron block)
      .add(sizeof(double), s)                // dL/dw per slot
      .add(sizeof(double), t * n)            // dL/dz per token (double)
      .add(sizeof(float), t * n)             // dL/dz (float, for the router GEMM)
      .add(sizeof(std::ptrdiff_t), n + 1);    // task starts
}

/// CpuSimd MoE backward (float); the math is the scalar oracle's (backend/scalar/moe_backward.hpp), with
/// G = dY_e W_d (unweighted) so that dL/dw = rowsum(G * h) needs no extra GEMM:
///   phase 1, per (expert e, block of kTrainBlock neurons):  A, B (saved or X_e W_g^T, X_e W_u^T);  G = dY_e W_d[:, blk]
///            partial dL/dw;  dA = w G B SiLU'(A);  dB = w G SiLU(A);  H_w = w SiLU(A) B
///            dW_g[blk] = dA^T X_e;  dW_u[blk] = dB^T X_e;  dW_d[:, blk] = dY_e^T H_w   (zero for empty experts)
///   phase 2, per (expert e, block of kTrainBlock output columns):  dX_e[:, blk] = dA W_g[:, blk] + dB W_u[:, blk]
///   phase 3, per token:  dL/dw (block partials in order), dz (combine_weights_vjp, double), dx_t = sum_j dX + W_r^T dz
///   phase 4, per block of kTrainBlock input columns:  dW_r[:, blk] = dZ^T X[:, blk];  db_r = column sums of dZ (double).
template <class Arch>
void MoeBackward<CpuSimd<Arch>>::run(MoeParamsView<float> const& p, GatingParams const& gating,
                                     RoutingView<float const> record, MatrixView<float const> x,
                                     MatrixView<float const> dy, MoeActivationsView<float const> const* saved,
                                     MoeGradsView<float> const& grads, WorkspaceSpan ws, Executor const& exec) {
  std::ptrdiff_t const n_tokens = x.rows(), n = p.n_experts(), k = gating.top_k, d = p.d_model(), m = p.d_expert(),
                       n_slots = n_tokens * k, nb = (m + detail::kTrainBlock - 1) / detail::kTrainBlock;
  detail::WorkspaceCursor cursor(ws, "moe_backward (cpu_simd)");
  std::int32_t* row_of_slot = cursor.take<std::int32_t>(static_cast<std::size_t>(n_slots));
  float* xg = cursor.take<float>(static_cast<std::size_t>(n_slots * d));
  float* gy = cursor.take<float>(static_cast<std::size_t>(n_slots * d));
  float* bufa = cursor.take<float>(static_cast<std::size_t>(3 * n_slots * m));
  float* bufb = bufa + n_slots * m;
  float* bufg = bufb + n_slots * m;
  float* dw_part = cursor.take<float>(static_cast<std::size_t>(n_slots * nb));
  double* dw_slot = cursor.take<double>(static_cast<std::size_t>(n_slots));
  double* dz_d = cursor.take<double>(static_cast<std::size_t>(n_tokens * n));
  float* dz = cursor.take<float>(static_cast<std::size_t>(n_tokens * n));
  std::ptrdiff_t* starts = cursor.take<std::ptrdiff_t>(static_cast<std::size_t>(n + 1));
  std::int64_t const* offsets = record.offsets.data();

  exec.run_blocked(n_slots, detail::kRowsPerTask, [&](std::ptrdiff_t r) {  // gather x and dy rows in group order
    std::int32_t const s = record.slots(r);
    row_of_slot[s] = static_cast<std::int32_t>(r);
    std::copy(x.row(s / k), x.row(s / k) + d, xg + r * d);
    std::copy(dy.row(s / k), dy.row(s / k) + d, gy + r * d);
  });

  // Phase 1: every expert (empty ones only zero their gradients) x blocks of neurons.
  std::ptrdiff_t n_tasks = detail::plan_tasks(offsets, n, m, true, starts);
  exec.run(n_tasks, [&](std::ptrdiff_t task, int) {
    std::ptrdiff_t e, blk;
    detail::task_to_block(starts, n, task, e, blk);
    std::ptrdiff_t const r0 = offsets[e], c = offsets[e + 1] - r0, i0 = blk * detail::kTrainBlock,
                         bw = std::min(m, i0 + detail::kTrainBlock) - i0;
    auto dwg = detail::map_f(grads.gate.data() + (e * m + i0) * d, bw, d, d);
    auto dwu = detail::map_f(grads.up.data() + (e * m + i0) * d, bw, d, d);
    auto dwd = detail::map_f(grads.down.data() + e * d * m + i0, d, bw, m);
    if (c == 0) {  // an expert no token chose: its gradient is exactly zero
      dwg.setZero();
      dwu.setZero();
      dwd.setZero();
      return;
    }
    auto const xe = detail::cmap_f(xg + r0 * d, c, d, d);
    auto const ge = detail::cmap_f(gy + r0 * d, c, d, d);
    float const* src_a = bufa;
    float const* src_b = bufb;
    if (saved != nullptr) {
      src_a = saved->gate_pre.data();
      src_b = saved->up_pre.data();
    } else {
      detail::map_f(bufa + r0 * m + i0, c, bw, m).noalias() = xe * detail::cmap_f(p.gate.data() + (e * m + i0) * d, bw, d, d).transpose();
      detail::map_f(bufb + r0 * m + i0, c, bw, m).noalias() = xe * detail::cmap_f(p.up.data() + (e * m + i0) * d, bw, d, d).transpose();
    }
    detail::map_f(bufg + r0 * m + i0, c, bw, m).noalias() = ge * detail::cmap_f(p.down.data() + e * d * m + i0, d, bw, m);
    for (std::ptrdiff_t rr = 0; rr < c; ++rr) {
      std::ptrdiff_t const row = r0 + rr, s = record.slots(row);
      float const w = record.weights(s / k, s % k);
      float const* ar = src_a + row * m;
      float const* br = src_b + row * m;
      float* dar = bufa + row * m;
      float* dbr = bufb + row * m;
      float* gr = bufg + row * m;
      float partial = 0.f;  // dL/dw over this block, summed in neuron order
      for (std::ptrdiff_t i = i0; i < i0 + bw; ++i) {
        float const a = ar[i], b = br[i], g = gr[i];
        float const sg = detail::sigmoid_f(a);
        float const silu = a * sg;
        float const h = silu * b;
        partial += g * h;
        float const dh = w * g;
        dar[i] = dh * b * (sg * (1.f + a * (1.f - sg)));
        dbr[i] = dh * silu;
        gr[i] = w * h;
      }
      dw_part[row * nb + blk] = partial;
    }
    auto const da = detail::cmap_f(bufa + r0 * m + i0, c, bw, m);
    auto const db = detail::cmap_f(bufb + r0 * m + i0, c, bw, m);
    auto const hw = detail::cmap_f(bufg + r0 * m + i0, c, bw, m);
    dwg.noalias() = da.transpose() * xe;
    dwu.noalias() = db.transpose() * xe;
    dwd.noalias() = ge.transpose() * hw;
  });

  // Phase 2: dX_e = dA W_g + dB W_u per block of output columns, into the (now free) gathered-dy buffer.
  n_tasks = detail::plan_tasks(offsets, n, d, false, starts);
  exec.run(n_tasks, [&](std::ptrdiff_t task, int) {
    std::ptrdiff_t e, blk;
    detail::task_to_block(starts, n, task, e, blk);
    std::ptrdiff_t const r0 = offsets[e], c = offsets[e + 1] - r0, o0 = blk * detail::kTrainBlock,
                         bw = std::min(d, o0 + detail::kTrainBlock) - o0;
    auto dxe = detail::map_f(gy + r0 * d + o0, c, bw, d);
    dxe.noalias() = detail::cmap_f(bufa + r0 * m, c, m, m) * detail::cmap_f(p.gate.data() + e * m * d + o0, m, bw, d);
    dxe.noalias() += detail::cmap_f(bufb + r0 * m, c, m, m) * detail::cmap_f(p.up.data() + e * m * d + o0, m, bw, d);
  });

  // Phase 3: per token, dL/dw -> dz (router path), dx = sum_j dX_{t,j} + W_r^T dz. One writer per token.
  bool const router_grad = gating.mode != CombineMode::code_ref;
  exec.run_blocked(n_tokens, detail::kRowsPerTask, [&](std::ptrdiff_t t) {
    double* dwt = dw_slot + t * k;
    double* dzt = dz_d + t * n;
    float* dxr = grads.x.row(t);
    float* dzr = dz + t * n;
    if (router_grad) {
      for (std::ptrdiff_t j = 0; j < k; ++j) {
        std::ptrdiff_t const row = row_of_slot[t * k + j];
        double acc = 0;
        for (std::ptrdiff_t b = 0; b < nb; ++b) acc += static_cast<double>(dw_part[row * nb + b]);
        dwt[j] = acc;
      }
      combine_weights_vjp(record.logits.row(t), n, record.ids.row(t), k, dwt, gating, dzt);
      for (std::ptrdiff_t e = 0; e < n; ++e) dzr[e] = static_cast<float>(dzt[e]);
    } else {
      for (std::ptrdiff_t e = 0; e < n; ++e) dzr[e] = 0.f;
    }
    if (grads.wants_logits())
      for (std::ptrdiff_t e = 0; e < n; ++e) grads.logits(t, e) = dzr[e];
    float const* s0 = gy + static_cast<std::ptrdiff_t>(row_of_slot[t * k]) * d;
    for (std::ptrdiff_t c = 0; c < d; ++c) dxr[c] = s0[c];
    for (std::ptrdiff_t j = 1; j < k; ++j) {
      float const* sj = gy + static_cast<std::ptrdiff_t>(row_of_slot[t * k + j]) * d;
      for (std::ptrdiff_t c = 0; c < d; ++c) dxr[c] += sj[c];
    }
    for (std::ptrdiff_t e = 0; e < n; ++e) {
      float const dze = dzr[e];
      float const* wr = p.router_weight.data() + e * d;
      for (std::ptrdiff_t c = 0; c < d; ++c) dxr[c] += dze * wr[c];
    }
  });

  // Phase 4: dW_r = dZ^T X per block of input columns; db_r = column sums of dZ in token order (double).
  std::ptrdiff_t const n_col_tasks = (d + detail::kTrainBlock - 1) / detail::kTrainBlock;
  exec.run(n_col_tasks, [&](std::ptrdiff_t blk, int) {
    std::ptrdiff_t const c0 = blk * detail::kTrainBlock, bw = std::min(d, c0 + detail::kTrainBlock) - c0;
    auto dwr = detail::map_f(grads.router_weight.data() + c0, n, bw, d);
    if (n_tokens == 0) {
      dwr.setZero();
      return;
    }
    dwr.noalias() = detail::cmap_f(dz, n_tokens, n, n).transpose() * detail::cmap_f(x.data() + c0, n_tokens, bw, x.row_stride());
  });
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    double acc = 0;
    for (std::ptrdiff_t t = 0; t < n_tokens; ++t) acc += static_cast<double>(dz[t * n + e]);
    grads.router_bias(e) = static_cast<float>(acc);
  }
}

}  // namespace kernel
}  // namespace factorllm
