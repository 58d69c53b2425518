// SPDX-License-Identifier: Apache-2.0
// CpuSimd SwiGLU blocks: the engine behind the dense FFN and every expert of the MoE forward.
//
// A "job" is one SwiGLU block (a dense FFN, or one expert) applied to c contiguous input rows. Work is cut
// into tasks of fixed size that do not depend on the thread count, and every output element is produced by
// exactly one task with a fixed reduction order, so results are bitwise identical for any number of threads.
//   phase 1 (rows [i0, i1) of gate/up): h[:, i] = SiLU(x W_g[i]^T) * (x W_u[i]^T)
//   phase 2 (rows [o0, o1) of down):    out[:, o] = h W_d[o]^T
// Few rows (decode, c <= kGemvMaxRows): a streaming multi-dot that reads each weight row once for all rows
// (memory-bound; threads split the weight rows). More rows (prefill): Eigen GEMMs per block (compute-bound);
// bf16 and f16 weights are widened per block into a per-thread panel first; q8_0 and q4_0 weights are
// dequantized into it for the GEMMs, and their decode path is an int8 dot against activations quantized per
// block of 32 (quant_dot.hpp; the inputs before phase 1 and h before phase 2, on the calling thread).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include <Eigen/Core>

#include "../../core/kernel_args.hpp"
#include "../../core/tensor_view.hpp"
#include "../../core/workspace.hpp"
#include "../ops.hpp"
#include "../scalar/swiglu.hpp"
#include "cpu_simd.hpp"
#include "quant_dot.hpp"

namespace factorllm {
namespace detail {

/// Rows of input at or below which a block runs the streaming (GEMV-like) kernel instead of GEMMs.
inline constexpr std::ptrdiff_t kGemvMaxRows = 8;
/// Rows the multi-dot kernel handles per pass over a weight row (4 accumulators per ISA register file fits).
inline constexpr std::ptrdiff_t kMultiDotRows = 4;
/// Weight rows per task in both phases (fixed: results must not depend on the thread count). GEMM tasks are
/// large enough to amortize packing; streaming tasks are small so that threads finish a phase together.
inline constexpr std::ptrdiff_t kBlockRows = 128;
inline constexpr std::ptrdiff_t kStreamBlockRows = 32;


template <class W>
struct SwigluJob {
  W const* gate = nullptr;  // [m, d] row-major, row stride d
  W const* up = nullptr;    // [m, d]
  W const* down = nullptr;  // [d, m]
  std::ptrdiff_t m = 0;     // hidden size of the block (d_ff or d_expert)
  float const* x = nullptr; // [c, d] inputs (row stride d)
  std::ptrdiff_t c = 0;     // rows
  float* h_gate = nullptr;  // [c, m] scratch (GEMM path: gate pre-activations, then h)
  float* h_up = nullptr;    // [c, m] scratch (GEMM path: up pre-activations)
  float* out = nullptr;     // [c, d] outputs (row stride d)
  // Block-quantized weights, decode path only: the inputs and h quantized to 8 bits per block of 32.
  std::int8_t* xq = nullptr;  // [c, d] codes
  float* xs = nullptr;        // [c, d / 32] scales
  std::int8_t* hq = nullptr;  // [c, m] codes
  float* hs = nullptr;        // [c, m / 32] scales
};

/// Weights one stored element of W holds (32 for the block formats).
template <class W>
inline constexpr std::ptrdiff_t kWeightsPerElement = block_weights_v<W>;

/// Rows of weights one task of this job covers.
template <class W>
std::ptrdiff_t task_rows(SwigluJob<W> const& job) noexcept {
  return job.c <= kGemvMaxRows ? kStreamBlockRows : kBlockRows;
}

using RowMajorF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMapF = Eigen::Map<RowMajorF const, 0, Eigen::OuterStride<>>;
using MapF = Eigen::Map<RowMajorF, 0, Eigen::OuterStride<>>;

/// Floats of per-thread panel one task may need: a gate and an up block widened from bf16 or f16, or one down block.
inline std::ptrdiff_t swiglu_panel_floats(std::ptrdiff_t d, std::ptrdiff_t m) noexcept {
  return std::max(2 * kBlockRows * d, kBlockRows * m);
}

/// Returns a float view of weight rows [r0, r1) of a [rows, n] matrix of n weights a row (widened into `panel`
/// when bf16 or f16, dequantized into it when block-quantized).
template <class W>
float const* weight_block(W const* base, std::ptrdiff_t r0, std::ptrdiff_t r1, std::ptrdiff_t n, float* panel) {
  if constexpr (is_q8_dot_format_v<W>) {
    dequantize_blocks(base + r0 * (n / 32), (r1 - r0) * n, panel);
    return panel;
  } else if constexpr (std::is_same_v<W, float>) {
    (void)r1;
    (void)panel;
    return base + r0 * n;
  } else if constexpr (std::is_same_v<W, f16>) {
    widen_f16(base + r0 * n, panel, (r1 - r0) * n);
    return panel;
  } else {
    widen_bf16(base + r0 * n, panel, (r1 - r0) * n);
    return panel;
  }
}

/// Phase 1 of a job on gate/up rows [i0, i1).
template <class Arch, class W>
void swiglu_phase1(SwigluJob<W> const& job, std::ptrdiff_t d, std::ptrdiff_t i0, std::ptrdiff_t i1, float* panel) {
  std::ptrdiff_t const m = job.m, c = job.c;
  if (c <= kGemvMaxRows) {
    (void)panel;
    // All of the task's gate rows, then all of its up rows: each is one contiguous block, read as a single linear
    // stream (alternating gate row / up row made two interleaved streams, which the profile showed waiting on DRAM).
    float g[kStreamBlockRows * kGemvMaxRows], u[kStreamBlockRows * kGemvMaxRows];
    for (int which = 0; which < 2; ++which) {
      W const* w = which == 0 ? job.gate : job.up;
      float* out = which == 0 ? g : u;
      for (std::ptrdiff_t i = i0; i < i1; ++i)
        for (std::ptrdiff_t t0 = 0; t0 < c; t0 += kMultiDotRows) {
          std::ptrdiff_t const nv = std::min(kMultiDotRows, c - t0);
          if constexpr (is_q8_dot_format_v<W>)
            q8_multi_dot(w + i * (d / 32), job.xq + t0 * d, job.xs + t0 * (d / 32), nv, d, out + (i - i0) * c + t0);
          else
            multi_dot<Arch>(w + i * d, job.x + t0 * d, d, nv, d, out + (i - i0) * c + t0);
        }
    }
    for (std::ptrdiff_t i = i0; i < i1; ++i)
      for (std::ptrdiff_t t = 0; t < c; ++t) job.h_gate[t * m + i] = silu_f(g[(i - i0) * c + t]) * u[(i - i0) * c + t];
    return;
  }
  std::ptrdiff_t const rows = i1 - i0;
  ConstMapF x(job.x, c, d, Eigen::OuterStride<>(d));
  ConstMapF wg(weight_block(job.gate, i0, i1, d, panel), rows, d, Eigen::OuterStride<>(d));
  ConstMapF wu(weight_block(job.up, i0, i1, d, panel + rows * d), rows, d, Eigen::OuterStride<>(d));
  MapF hg(job.h_gate + i0, c, rows, Eigen::OuterStride<>(m));
  MapF hu(job.h_up + i0, c, rows, Eigen::OuterStride<>(m));
  hg.noalias() = x * wg.transpose();
  hu.noalias() = x * wu.transpose();
  for (std::ptrdiff_t t = 0; t < c; ++t) {
    float* hgr = job.h_gate + t * m;
    float const* hur = job.h_up + t * m;
    for (std::ptrdiff_t i = i0; i < i1; ++i) hgr[i] = silu_f(hgr[i]) * hur[i];
  }
}

/// Phase 2 of a job on down rows [o0, o1) (output columns).
template <class Arch, class W>
void swiglu_phase2(SwigluJob<W> const& job, std::ptrdiff_t d, std::ptrdiff_t o0, std::ptrdiff_t o1, float* panel) {
  std::ptrdiff_t const m = job.m, c = job.c;
  if (c <= kGemvMaxRows) {
    float o[kGemvMaxRows];
    for (std::ptrdiff_t r = o0; r < o1; ++r) {
      W const* wd = job.down + r * (m / kWeightsPerElement<W>);
      for (std::ptrdiff_t t0 = 0; t0 < c; t0 += kMultiDotRows) {
        std::ptrdiff_t const nv = std::min(kMultiDotRows, c - t0);
        if constexpr (is_q8_dot_format_v<W>)
          q8_multi_dot(wd, job.hq + t0 * m, job.hs + t0 * (m / 32), nv, m, o + t0);
        else
          multi_dot<Arch>(wd, job.h_gate + t0 * m, m, nv, m, o + t0);
      }
      for (std::ptrdiff_t t = 0; t < c; ++t) job.out[t * d + r] = o[t];
    }
    return;
  }
  ConstMapF h(job.h_gate, c, m, Eigen::OuterStride<>(m));
  ConstMapF wd(weight_block(job.down, o0, o1, m, panel), o1 - o0, m, Eigen::OuterStride<>(m));
  MapF out(job.out + o0, c, o1 - o0, Eigen::OuterStride<>(d));
  out.noalias() = h * wd.transpose();
}

/// Runs all jobs: every phase-1 task, a barrier, every phase-2 task. Tasks are fixed blocks of task_rows()
/// weight rows; the executor's workers take them in any order (the block boundaries, not the schedule, fix the
/// results). The executor holds Eigen serial inside every task: a lone task with Eigen free started its own
/// nested parallel GEMM (on 2 cores, a 32-row dense stories260K FFN took 7 ms instead of 65 us).
/// `panels` holds exec.n_workers() panels of `panel_floats` each, one per worker.
template <class Arch, class W>
void run_swiglu_jobs(SwigluJob<W> const* jobs, std::ptrdiff_t n_jobs, std::ptrdiff_t d, float* panels,
                     std::ptrdiff_t panel_floats, std::ptrdiff_t* task_starts, Executor const& exec) {
  // task_starts[j] = first phase-1 task of job j; phase-2 tasks are counted the same way afterwards.
  auto count_tasks = [&](bool phase1) {
    std::ptrdiff_t n = 0;
    for (std::ptrdiff_t j = 0; j < n_jobs; ++j) {
      task_starts[j] = n;
      if (jobs[j].c == 0) continue;
      std::ptrdiff_t const rows = phase1 ? jobs[j].m : d;
      n += (rows + task_rows(jobs[j]) - 1) / task_rows(jobs[j]);
    }
    task_starts[n_jobs] = n;
    return n;
  };
  for (int phase = 1; phase <= 2; ++phase) {
    if constexpr (is_q8_dot_format_v<W>) {
      // The decode jobs' int8 operands: inputs before phase 1, h before phase 2 (c <= 8 rows each: cheap).
      for (std::ptrdiff_t j = 0; j < n_jobs; ++j) {
        SwigluJob<W> const& job = jobs[j];
        if (job.c == 0 || job.c > kGemvMaxRows) continue;
        if (phase == 1)
          for (std::ptrdiff_t t = 0; t < job.c; ++t) quantize_act_q8(job.x + t * d, d, job.xq + t * d, job.xs + t * (d / 32));
        else
          for (std::ptrdiff_t t = 0; t < job.c; ++t)
            quantize_act_q8(job.h_gate + t * job.m, job.m, job.hq + t * job.m, job.hs + t * (job.m / 32));
      }
    }
    std::ptrdiff_t const n_tasks = count_tasks(phase == 1);
    if (n_tasks == 0) continue;
    exec.run(n_tasks, [&](std::ptrdiff_t task, int worker) {
      std::ptrdiff_t const j = std::upper_bound(task_starts, task_starts + n_jobs + 1, task) - task_starts - 1;
      std::ptrdiff_t const b = task - task_starts[j];
      float* panel = panels + static_cast<std::ptrdiff_t>(worker) * panel_floats;
      if (phase == 1) {
        std::ptrdiff_t const i0 = b * task_rows(jobs[j]), i1 = std::min(jobs[j].m, i0 + task_rows(jobs[j]));
        swiglu_phase1<Arch>(jobs[j], d, i0, i1, panel);
      } else {
        std::ptrdiff_t const o0 = b * task_rows(jobs[j]), o1 = std::min(d, o0 + task_rows(jobs[j]));
        swiglu_phase2<Arch>(jobs[j], d, o0, o1, panel);
      }
    });
  }
}

}  // namespace detail

namespace kernel {

/// 1 when W is block-quantized (its decode path needs int8 activation buffers), else 0.
template <class W>
inline constexpr std::size_t kQuantRegions = detail::is_q8_dot_format_v<W> ? 1 : 0;

/// True for the weight formats and activations the CpuSimd SwiGLU kernels handle (others run the oracle).
template <class W, class A>
inline constexpr bool simd_swiglu_supports_v =
    std::is_same_v<A, float> && (std::is_same_v<W, float> || std::is_same_v<W, bf16> || std::is_same_v<W, f16> ||
                                 detail::is_q8_dot_format_v<W>);

/// CpuSimd dense SwiGLU (float activations; float, bf16 or f16 weights, dense row-major).
template <class Arch>
struct Swiglu<CpuSimd<Arch>> {
  static constexpr bool implemented = true;
  /// Gate/up activations for every row, packed input and output, one panel per worker.
  /// \param max_workers  the executor's n_workers() of the calls this workspace must serve (one panel each)
  template <class W, class A>
  static detail::WorkspaceLayout workspace(std::ptrdiff_t n_tokens, std::ptrdiff_t d_model, std::ptrdiff_t d_hidden,
                                           int max_workers) {
    if constexpr (!simd_swiglu_supports_v<W, A>) {
      return Swiglu<CpuScalar>::workspace<W, A>(n_tokens, d_model, d_hidden, max_workers);
    } else {
      auto const t = static_cast<std::size_t>(n_tokens), m = static_cast<std::size_t>(d_hidden),
                 d = static_cast<std::size_t>(d_model);
      return detail::WorkspaceLayout()
          .add(sizeof(float), t * m)  // h_gate
          .add(sizeof(float), t * m)  // h_up
          .add(sizeof(float), t * d)  // packed input (views may be strided)
          .add(sizeof(float), t * d)  // packed output
          .add(sizeof(float), static_cast<std::size_t>(max_workers) *
                                  static_cast<std::size_t>(detail::swiglu_panel_floats(d_model, d_hidden)))
          .add(sizeof(std::ptrdiff_t), 2)
          .add(sizeof(std::int8_t), kQuantRegions<W> * t * d)        // input codes (block formats)
          .add(sizeof(float), kQuantRegions<W> * t * (d / 32))       // input scales
          .add(sizeof(std::int8_t), kQuantRegions<W> * t * m)        // h codes
          .add(sizeof(float), kQuantRegions<W> * t * (m / 32));      // h scales
    }
  }

  template <class W, class A>
  static void run(MatrixView<W const> gate, MatrixView<W const> up, MatrixView<W const> down, MatrixView<A const> x,
                  MatrixView<A> y, WorkspaceSpan ws, Executor const& exec = Executor::openmp()) {
    if constexpr (!simd_swiglu_supports_v<W, A>) {
      Swiglu<CpuScalar>::run(gate, up, down, x, y, ws, exec);
    } else {
      std::ptrdiff_t const n_tokens = x.rows(), d = gate.cols() * detail::kWeightsPerElement<W>, m = gate.rows();
      if (!gate.is_contiguous() || !up.is_contiguous() || !down.is_contiguous())
        throw backend_error("swiglu (cpu_simd): weight views must be dense row-major (use Tensor copies or CpuScalar)");
      detail::WorkspaceCursor cursor(ws, "swiglu (cpu_simd)");
      float* hg = cursor.take<float>(static_cast<std::size_t>(n_tokens * m));
      float* hu = cursor.take<float>(static_cast<std::size_t>(n_tokens * m));
      float* xin = cursor.take<float>(static_cast<std::size_t>(n_tokens * d));
      float* out = cursor.take<float>(static_cast<std::size_t>(n_tokens * d));
      std::ptrdiff_t const panel_floats = detail::swiglu_panel_floats(d, m);
      float* panels = cursor.take<float>(static_cast<std::size_t>(exec.n_workers() * panel_floats));
      auto* starts = cursor.take<std::ptrdiff_t>(2);
      for (std::ptrdiff_t t = 0; t < n_tokens; ++t) std::copy(x.row(t), x.row(t) + d, xin + t * d);
      detail::SwigluJob<W> job{gate.data(), up.data(), down.data(), m, xin, n_tokens, hg, hu, out};
      if constexpr (detail::is_q8_dot_format_v<W>) {
        job.xq = cursor.take<std::int8_t>(static_cast<std::size_t>(n_tokens * d));
        job.xs = cursor.take<float>(static_cast<std::size_t>(n_tokens * (d / 32)));
        job.hq = cursor.take<std::int8_t>(static_cast<std::size_t>(n_tokens * m));
        job.hs = cursor.take<float>(static_cast<std::size_t>(n_tokens * (m / 32)));
      }
      detail::run_swiglu_jobs<Arch>(&job, 1, d, panels, panel_floats, starts, exec);
      for (std::ptrdiff_t t = 0; t < n_tokens; ++t) std::copy(out + t * d, out + (t + 1) * d, y.row(t));
    }
  }
};

/// CpuSimd experts on their grouped rows (float activations; float, bf16 or f16 weights, dense row-major): the
/// token rows are gathered in grouped order, then one SwiGLU job per expert runs on its rows only (streaming
/// kernel for few rows, Eigen GEMMs for many), writing expert_out in grouped order. No allocation; bitwise
/// identical for any thread count.
template <class Arch>
struct ExpertSwiglu<CpuSimd<Arch>> {
  static constexpr bool implemented = true;
  template <class W, class A>
  using output_t = std::conditional_t<simd_swiglu_supports_v<W, A>, float,
                                      typename ExpertSwiglu<CpuScalar>::template output_t<W, A>>;

  /// Gathered inputs, gate/up activations, jobs and task starts, one panel per worker.
  /// \param max_threads  the executor's n_workers() of the calls this workspace must serve (one panel each)
  template <class W, class A>
  static detail::WorkspaceLayout workspace(std::ptrdiff_t n_slots, std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                           std::ptrdiff_t d_expert, int max_threads) {
    if constexpr (!simd_swiglu_supports_v<W, A>) {
      return ExpertSwiglu<CpuScalar>::workspace<W, A>(n_slots, d_model, n_experts, d_expert, max_threads);
    } else {
      auto const s = static_cast<std::size_t>(n_slots), n = static_cast<std::size_t>(n_experts),
                 d = static_cast<std::size_t>(d_model), m = static_cast<std::size_t>(d_expert);
      return detail::WorkspaceLayout()
          .add(sizeof(float), s * d)                 // gathered inputs
          .add(sizeof(float), s * m)                 // h_gate
          .add(sizeof(float), s * m)                 // h_up
          .add(sizeof(detail::SwigluJob<W>), n)      // jobs
          .add(sizeof(std::ptrdiff_t), n + 1)        // task starts
          .add(sizeof(float), static_cast<std::size_t>(max_threads) *
                                  static_cast<std::size_t>(detail::swiglu_panel_floats(d_model, d_expert)))
          .add(sizeof(std::int8_t), kQuantRegions<W> * s * d)        // input codes (block formats)
          .add(sizeof(float), kQuantRegions<W> * s * (d / 32))       // input scales
          .add(sizeof(std::int8_t), kQuantRegions<W> * s * m)        // h codes
          .add(sizeof(float), kQuantRegions<W> * s * (m / 32));      // h scales
    }
  }

  template <class W, class A, class O>
  static void run(ExpertWeightsView<W> const& experts, MatrixView<A const> x, std::ptrdiff_t top_k,
                  VectorView<std::int64_t const> offsets, VectorView<std::int32_t const> slots, MatrixView<O> expert_out,
                  WorkspaceSpan ws, Executor const& exec = Executor::openmp()) {
    if constexpr (!simd_swiglu_supports_v<W, A>) {
      ExpertSwiglu<CpuScalar>::run(experts, x, top_k, offsets, slots, expert_out, ws, exec);
    } else {
      static_assert(std::is_same_v<O, float>, "expert_swiglu (cpu_simd): expert_out must be float");
      if (!experts.is_contiguous())
        throw backend_error("expert_swiglu (cpu_simd): weight views must be dense row-major (use Tensor copies or CpuScalar)");
      std::ptrdiff_t const n = experts.n_experts(), d = experts.d_model(), m = experts.d_expert(),
                           n_slots = slots.extent(0);
      detail::WorkspaceCursor cursor(ws, "expert_swiglu (cpu_simd)");
      float* xg = cursor.take<float>(static_cast<std::size_t>(n_slots * d));
      float* hg = cursor.take<float>(static_cast<std::size_t>(n_slots * m));
      float* hu = cursor.take<float>(static_cast<std::size_t>(n_slots * m));
      auto* jobs = cursor.take<detail::SwigluJob<W>>(static_cast<std::size_t>(n));
      std::ptrdiff_t* starts = cursor.take<std::ptrdiff_t>(static_cast<std::size_t>(n + 1));
      std::ptrdiff_t const panel_floats = detail::swiglu_panel_floats(d, m);
      float* panels = cursor.take<float>(static_cast<std::size_t>(exec.n_workers() * panel_floats));
      for (std::ptrdiff_t r = 0; r < n_slots; ++r) {  // gather in grouped order
        float const* src = x.row(slots(r) / top_k);
        std::copy(src, src + d, xg + r * d);
      }
      float* out = expert_out.data();  // dense [n_slots, d_model] (the front's region)
      std::int8_t* xq = nullptr;
      float* xs = nullptr;
      std::int8_t* hq = nullptr;
      float* hs = nullptr;
      if constexpr (detail::is_q8_dot_format_v<W>) {
        xq = cursor.take<std::int8_t>(static_cast<std::size_t>(n_slots * d));
        xs = cursor.take<float>(static_cast<std::size_t>(n_slots * (d / 32)));
        hq = cursor.take<std::int8_t>(static_cast<std::size_t>(n_slots * m));
        hs = cursor.take<float>(static_cast<std::size_t>(n_slots * (m / 32)));
      }
      // Elements of W per expert matrix (a block format stores 32 weights an element).
      std::ptrdiff_t const per_expert = m * d / detail::kWeightsPerElement<W>;
      for (std::ptrdiff_t e = 0; e < n; ++e) {
        std::ptrdiff_t const r0 = offsets(e), c = offsets(e + 1) - r0;
        jobs[e] = detail::SwigluJob<W>{experts.gate.data() + e * per_expert, experts.up.data() + e * per_expert,
                                       experts.down.data() + e * per_expert, m, xg + r0 * d, c, hg + r0 * m, hu + r0 * m,
                                       out + r0 * d};
        if constexpr (detail::is_q8_dot_format_v<W>) {
          jobs[e].xq = xq + r0 * d;
          jobs[e].xs = xs + r0 * (d / 32);
          jobs[e].hq = hq + r0 * m;
          jobs[e].hs = hs + r0 * (m / 32);
        }
      }
      detail::run_swiglu_jobs<Arch>(jobs, n, d, panels, panel_floats, starts, exec);
    }
  }
};

}  // namespace kernel
}  // namespace factorllm
