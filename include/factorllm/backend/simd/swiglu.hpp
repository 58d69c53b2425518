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
// dequantized into it for the GEMMs.
// Decode of q8_0 and q4_0 is an int8 dot against activations quantized per block of 32 (quant_dot.hpp), and decode
// of bf16 on a CPU with AVX512-BF16 a native bf16 dot against activations rounded to bf16; both run on the
// target Highway chooses at run time (target_dispatch.hpp). Those activations are prepared on the calling thread:
// the inputs before phase 1, h before phase 2.
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
static_assert(kGemvMaxRows <= kQDotMaxVectors, "the dispatched decode kernels take at most kQDotMaxVectors rows");
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
  std::int8_t* xq = nullptr;     // [c, d] codes
  float* xs = nullptr;           // [c, d / 32] scales
  std::int32_t* xsum = nullptr;  // [c, d / 32] code sums
  std::int8_t* hq = nullptr;     // [c, m] codes
  float* hs = nullptr;           // [c, m / 32] scales
  std::int32_t* hsum = nullptr;  // [c, m / 32] code sums
  // bf16 weights, decode path on a CPU with native bf16 dot products: the inputs and h rounded to bf16.
  bf16* xb = nullptr;  // [c, d]
  bf16* hb = nullptr;  // [c, m]
  bool bf16_native = false;
};

/// Workspace regions a job's decode activations need: int8 codes, scales and code sums for the block formats,
/// bf16 copies for bf16 weights (`rows` activation rows of d_model and of d_hidden each).
template <class W>
inline void add_decode_activation_regions(WorkspaceLayout& layout, std::size_t rows, std::size_t d, std::size_t m) {
  if constexpr (is_q8_dot_format_v<W>) {
    layout.add(sizeof(std::int8_t), rows * d).add(sizeof(float), rows * (d / 32)).add(sizeof(std::int32_t), rows * (d / 32));
    layout.add(sizeof(std::int8_t), rows * m).add(sizeof(float), rows * (m / 32)).add(sizeof(std::int32_t), rows * (m / 32));
  } else if constexpr (std::is_same_v<W, bf16>) {
    layout.add(sizeof(bf16), rows * d).add(sizeof(bf16), rows * m);
  }
}

/// Takes the regions of add_decode_activation_regions for a job of `rows` activation rows; job.xq etc. point at
/// their starts (ExpertSwiglu offsets them per expert).
template <class W>
inline void take_decode_activation_regions(WorkspaceCursor& cursor, SwigluJob<W>& job, std::size_t rows,
                                           std::size_t d, std::size_t m) {
  if constexpr (is_q8_dot_format_v<W>) {
    job.xq = cursor.take<std::int8_t>(rows * d);
    job.xs = cursor.take<float>(rows * (d / 32));
    job.xsum = cursor.take<std::int32_t>(rows * (d / 32));
    job.hq = cursor.take<std::int8_t>(rows * m);
    job.hs = cursor.take<float>(rows * (m / 32));
    job.hsum = cursor.take<std::int32_t>(rows * (m / 32));
  } else if constexpr (std::is_same_v<W, bf16>) {
    job.xb = cursor.take<bf16>(rows * d);
    job.hb = cursor.take<bf16>(rows * m);
  }
}

/// Rows [r0, r1) of a [rows, n] weight matrix against job activations (codes or bf16 copies), on the dispatched
/// target: out[(r - r0) * c + t]. Only for the block formats, and for bf16 when job.bf16_native.
template <class W>
inline void dispatched_rows(W const* w, std::ptrdiff_t n, std::ptrdiff_t r0, std::ptrdiff_t r1, std::ptrdiff_t c,
                            std::int8_t const* xq, float const* xs, std::int32_t const* xsum, bf16 const* xb,
                            float* out) {
  if constexpr (is_q8_dot_format_v<W>) {
    (void)xb;
    q8_dot_rows(w + r0 * (n / 32), n, r1 - r0, xq, xs, xsum, c, out, c);
  } else {
    static_assert(std::is_same_v<W, bf16>, "dispatched_rows: block formats and bf16 only");
    (void)xq, (void)xs, (void)xsum;
    Bf16DotArgs args;
    args.w = w + r0 * n;
    args.n = n;
    args.rows = r1 - r0;
    args.xb = xb;
    args.n_vec = c;
    args.out = out;
    args.out_stride = c;
    bf16_dot_rows_dispatch(args);
  }
}

/// True for the weight formats whose decode may run on the dispatched kernels.
template <class W>
inline constexpr bool decode_may_dispatch_v = is_q8_dot_format_v<W> || std::is_same_v<W, bf16>;

/// True when a decode job of weight format W runs on the dispatched kernels.
template <class W>
inline bool decode_is_dispatched(SwigluJob<W> const& job) noexcept {
  if constexpr (is_q8_dot_format_v<W>) return true;
  else if constexpr (std::is_same_v<W, bf16>) return job.bf16_native;
  else return false;
}

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
      if constexpr (decode_may_dispatch_v<W>) {
        if (decode_is_dispatched(job)) {
          dispatched_rows(w, d, i0, i1, c, job.xq, job.xs, job.xsum, job.xb, out);
          continue;
        }
      }
      if constexpr (!is_q8_dot_format_v<W>) {
        for (std::ptrdiff_t i = i0; i < i1; ++i)
          for (std::ptrdiff_t t0 = 0; t0 < c; t0 += kMultiDotRows) {
            std::ptrdiff_t const nv = std::min(kMultiDotRows, c - t0);
            multi_dot<Arch>(w + i * d, job.x + t0 * d, d, nv, d, out + (i - i0) * c + t0);
          }
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
    if constexpr (decode_may_dispatch_v<W>) {
      if (decode_is_dispatched(job)) {
        float o[kStreamBlockRows * kGemvMaxRows];
        dispatched_rows(job.down, m, o0, o1, c, job.hq, job.hs, job.hsum, job.hb, o);
        for (std::ptrdiff_t r = o0; r < o1; ++r)
          for (std::ptrdiff_t t = 0; t < c; ++t) job.out[t * d + r] = o[(r - o0) * c + t];
        return;
      }
    }
    if constexpr (!is_q8_dot_format_v<W>) {
      float o[kGemvMaxRows];
      for (std::ptrdiff_t r = o0; r < o1; ++r) {
        W const* wd = job.down + r * m;
        for (std::ptrdiff_t t0 = 0; t0 < c; t0 += kMultiDotRows) {
          std::ptrdiff_t const nv = std::min(kMultiDotRows, c - t0);
          multi_dot<Arch>(wd, job.h_gate + t0 * m, m, nv, m, o + t0);
        }
        for (std::ptrdiff_t t = 0; t < c; ++t) job.out[t * d + r] = o[t];
      }
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
    // The decode jobs' activations for the dispatched kernels: inputs before phase 1, h before phase 2 (c <= 8
    // rows each: cheap).
    for (std::ptrdiff_t j = 0; j < n_jobs; ++j) {
      SwigluJob<W> const& job = jobs[j];
      if (job.c == 0 || job.c > kGemvMaxRows || !decode_is_dispatched(job)) continue;
      std::ptrdiff_t const n = phase == 1 ? d : job.m;
      float const* src = phase == 1 ? job.x : job.h_gate;
      for (std::ptrdiff_t t = 0; t < job.c; ++t) {
        if constexpr (is_q8_dot_format_v<W>) {
          if (phase == 1)
            quantize_act_q8(src + t * n, n, job.xq + t * n, job.xs + t * (n / 32), job.xsum + t * (n / 32));
          else
            quantize_act_q8(src + t * n, n, job.hq + t * n, job.hs + t * (n / 32), job.hsum + t * (n / 32));
        } else if constexpr (std::is_same_v<W, bf16>) {
          bf16* dst = (phase == 1 ? job.xb : job.hb) + t * n;
          for (std::ptrdiff_t i = 0; i < n; ++i) dst[i] = bf16(src[t * n + i]);
        }
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
      detail::WorkspaceLayout layout;
      layout.add(sizeof(float), t * m)  // h_gate
          .add(sizeof(float), t * m)  // h_up
          .add(sizeof(float), t * d)  // packed input (views may be strided)
          .add(sizeof(float), t * d)  // packed output
          .add(sizeof(float), static_cast<std::size_t>(max_workers) *
                                  static_cast<std::size_t>(detail::swiglu_panel_floats(d_model, d_hidden)))
          .add(sizeof(std::ptrdiff_t), 2);
      detail::add_decode_activation_regions<W>(layout, t, d, m);
      return layout;
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
      detail::take_decode_activation_regions(cursor, job, static_cast<std::size_t>(n_tokens), static_cast<std::size_t>(d),
                                             static_cast<std::size_t>(m));
      if constexpr (std::is_same_v<W, bf16>) job.bf16_native = detail::bf16_native_dot_dispatch();
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
      detail::WorkspaceLayout layout;
      layout.add(sizeof(float), s * d)                 // gathered inputs
          .add(sizeof(float), s * m)                 // h_gate
          .add(sizeof(float), s * m)                 // h_up
          .add(sizeof(detail::SwigluJob<W>), n)      // jobs
          .add(sizeof(std::ptrdiff_t), n + 1)        // task starts
          .add(sizeof(float), static_cast<std::size_t>(max_threads) *
                                  static_cast<std::size_t>(detail::swiglu_panel_floats(d_model, d_expert)));
      detail::add_decode_activation_regions<W>(layout, s, d, m);
      return layout;
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
      detail::SwigluJob<W> act;  // the activation regions of all slots; each job takes its rows of them
      detail::take_decode_activation_regions(cursor, act, static_cast<std::size_t>(n_slots), static_cast<std::size_t>(d),
                                             static_cast<std::size_t>(m));
      bool bf16_native = false;
      if constexpr (std::is_same_v<W, bf16>) bf16_native = detail::bf16_native_dot_dispatch();
      // Elements of W per expert matrix (a block format stores 32 weights an element).
      std::ptrdiff_t const per_expert = m * d / detail::kWeightsPerElement<W>;
      for (std::ptrdiff_t e = 0; e < n; ++e) {
        std::ptrdiff_t const r0 = offsets(e), c = offsets(e + 1) - r0;
        jobs[e] = detail::SwigluJob<W>{experts.gate.data() + e * per_expert, experts.up.data() + e * per_expert,
                                       experts.down.data() + e * per_expert, m, xg + r0 * d, c, hg + r0 * m, hu + r0 * m,
                                       out + r0 * d};
        if constexpr (detail::is_q8_dot_format_v<W>) {
          jobs[e].xq = act.xq + r0 * d;
          jobs[e].xs = act.xs + r0 * (d / 32);
          jobs[e].xsum = act.xsum + r0 * (d / 32);
          jobs[e].hq = act.hq + r0 * m;
          jobs[e].hs = act.hs + r0 * (m / 32);
          jobs[e].hsum = act.hsum + r0 * (m / 32);
        } else if constexpr (std::is_same_v<W, bf16>) {
          jobs[e].xb = act.xb + r0 * d;
          jobs[e].hb = act.hb + r0 * m;
          jobs[e].bf16_native = bf16_native;
        }
      }
      detail::run_swiglu_jobs<Arch>(jobs, n, d, panels, panel_floats, starts, exec);
    }
  }
};

}  // namespace kernel
}  // namespace factorllm
