// SPDX-License-Identifier: Apache-2.0
// CUDA experts (backend/cuda/swiglu.hpp): the streaming decode kernels, the gather and SiLU * up kernels, the
// expert GEMMs through cuBLAS (grouped or per expert), and the fused forward of backend/cuda/moe_forward.hpp.
#include <type_traits>

#include <factorllm/backend/cuda/combine.hpp>
#include <factorllm/backend/cuda/grouping.hpp>
#include <factorllm/backend/cuda/moe_forward.hpp>
#include <factorllm/backend/cuda/router.hpp>
#include <factorllm/backend/cuda/swiglu.hpp>
#include <factorllm/backend/cuda/topk.hpp>

#include "common.cuh"

namespace factorllm {
namespace cuda {

using detail::check_cublas;
using detail::check_cuda;
using detail::check_launch;
using detail::device_t;
using detail::from_f;
using detail::to_dim3;
using detail::to_f;

namespace {

constexpr int kRowsPerPass = static_cast<int>(kDecodeMaxTokens);

// ---- Decode: one warp per weight row, against every row of its expert (at most kRowsPerPass per pass) ----

/// Dot products of one weight row w[0..n) with up to kRowsPerPass activation rows, per lane (summed later).
/// The lanes stride through the row; 16-byte loads when the row allows (n a multiple of the vector width and
/// aligned pointers), else one element per load.
template <class T, class Act>
__device__ void row_dots(T const* w, std::int64_t n, Act const* const* act, int n_rows, float* acc, bool vector) {
  int const lane = threadIdx.x & 31;
  constexpr int kV = 16 / sizeof(T);
  if (vector) {
    for (std::int64_t c = static_cast<std::int64_t>(lane) * kV; c < n; c += 32 * kV) {
      uint4 const raw = *reinterpret_cast<uint4 const*>(w + c);
      T const* wv = reinterpret_cast<T const*>(&raw);
      for (int v = 0; v < kV; ++v) {
        float const wf = to_f(wv[v]);
        for (int r = 0; r < kRowsPerPass; ++r)
          if (r < n_rows) acc[r] = fmaf(wf, to_f(act[r][c + v]), acc[r]);
      }
    }
  } else {
    for (std::int64_t c = lane; c < n; c += 32) {
      float const wf = to_f(w[c]);
      for (int r = 0; r < kRowsPerPass; ++r)
        if (r < n_rows) acc[r] = fmaf(wf, to_f(act[r][c]), acc[r]);
    }
  }
}

/// hidden[r, i] = SiLU(x_r . gate_e[i]) * (x_r . up_e[i]) for every grouped row r of expert e (grid.y) and
/// weight row i (one warp each); x_r = x[slots[r] / top_k]. Experts without rows exit at once, so only the active
/// experts' weights are read.
template <class T>
__global__ void decode_gate_up_kernel(T const* gate, T const* up, std::int64_t expert_stride, std::int64_t d_expert,
                                      std::int64_t d_model, float const* x, std::int64_t n_tokens, int top_k,
                                      std::int64_t const* offsets, std::int32_t const* slots, float* hidden,
                                      bool vector) {
  int const e = blockIdx.y;
  std::int64_t const r0 = offsets[e], r1 = offsets[e + 1];
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * kDecodeWarps + (threadIdx.x >> 5);
  if (r1 <= r0 || i >= d_expert) return;
  T const* g = gate + e * expert_stride + i * d_model;
  T const* u = up + e * expert_stride + i * d_model;
  for (std::int64_t base = r0; base < r1; base += kRowsPerPass) {
    int const n_rows = static_cast<int>(r1 - base < kRowsPerPass ? r1 - base : kRowsPerPass);
    float const* act[kRowsPerPass];
    for (int r = 0; r < kRowsPerPass; ++r) {
      std::int64_t const tok = r < n_rows ? slots[base + r] / top_k : 0;
      act[r] = x + (tok < n_tokens ? tok : 0) * d_model;
    }
    float acc_g[kRowsPerPass] = {}, acc_u[kRowsPerPass] = {};
    row_dots(g, d_model, act, n_rows, acc_g, vector);
    row_dots(u, d_model, act, n_rows, acc_u, vector);
    for (int r = 0; r < kRowsPerPass; ++r) {
      float const sg = detail::warp_sum(acc_g[r]), su = detail::warp_sum(acc_u[r]);
      if (r < n_rows && (threadIdx.x & 31) == 0) hidden[(base + r) * d_expert + i] = detail::silu_f(sg) * su;
    }
  }
}

/// out[r, o] = hidden[r] . down_e[o] for every grouped row r of expert e (grid.y) and output o (one warp each).
template <class T, class E>
__global__ void decode_down_kernel(T const* down, std::int64_t expert_stride, std::int64_t d_model,
                                   std::int64_t d_expert, std::int64_t const* offsets, float const* hidden, E* out,
                                   bool vector) {
  int const e = blockIdx.y;
  std::int64_t const r0 = offsets[e], r1 = offsets[e + 1];
  std::int64_t const o = static_cast<std::int64_t>(blockIdx.x) * kDecodeWarps + (threadIdx.x >> 5);
  if (r1 <= r0 || o >= d_model) return;
  T const* w = down + e * expert_stride + o * d_expert;
  for (std::int64_t base = r0; base < r1; base += kRowsPerPass) {
    int const n_rows = static_cast<int>(r1 - base < kRowsPerPass ? r1 - base : kRowsPerPass);
    float const* act[kRowsPerPass];
    for (int r = 0; r < kRowsPerPass; ++r) act[r] = hidden + (base + (r < n_rows ? r : 0)) * d_expert;
    float acc[kRowsPerPass] = {};
    row_dots(w, d_expert, act, n_rows, acc, vector);
    for (int r = 0; r < kRowsPerPass; ++r) {
      float const s = detail::warp_sum(acc[r]);
      if (r < n_rows && (threadIdx.x & 31) == 0) out[(base + r) * d_model + o] = from_f<E>(s);
    }
  }
}

// ---- Prefill helpers ----

/// gathered[r, :] = x[slots[r] / top_k, :] converted to the weight format (the GEMMs' B operand).
template <class T>
__global__ void gather_kernel(float const* x, std::int64_t n_tokens, std::int64_t d_model, int top_k,
                              std::int32_t const* slots, std::int64_t n_slots, T* gathered) {
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_slots * d_model) return;
  std::int64_t const r = i / d_model, c = i % d_model;
  std::int64_t const tok = slots[r] / top_k;
  gathered[i] = from_f<T>(tok < n_tokens ? x[tok * d_model + c] : 0.f);
}


std::size_t element_bytes(GemmType t) noexcept { return t == GemmType::f32 ? 4 : 2; }

bool aligned16(void const* p) noexcept { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <class W>
void expert_swiglu_impl(ExpertWeightsView<W> const& experts, MatrixView<float const> x, std::ptrdiff_t top_k,
                        VectorView<std::int64_t const> offsets, VectorView<std::int32_t const> slots,
                        MatrixView<expert_out_t<W>> expert_out, WorkspaceSpan ws, CudaContext const& ctx,
                        ExpertPath requested) {
  using T = device_t<W>;
  using E = device_t<expert_out_t<W>>;
  char const* op = "expert_swiglu (cuda)";
  std::ptrdiff_t const n_tokens = x.rows(), d_model = experts.d_model(), n_experts = experts.n_experts(),
                       d_expert = experts.d_expert(), n_slots = n_tokens * top_k;
  if (top_k < 1 || top_k > n_experts)
    throw value_error(factorllm::detail::concat(op, ": top_k = ", top_k, " must be in [1, n_experts = ", n_experts, "]"));
  if (experts.up.extents() != experts.gate.extents() || experts.down.extent(0) != n_experts ||
      experts.down.extent(1) != d_model || experts.down.extent(2) != d_expert)
    throw shape_error(factorllm::detail::concat(op, ": expected gate, up [n_experts, d_expert, d_model] and down ",
                                                "[n_experts, d_model, d_expert]"));
  if (x.cols() != d_model || offsets.extent(0) != n_experts + 1 || slots.extent(0) != n_slots ||
      expert_out.rows() != n_slots || expert_out.cols() != d_model)
    throw shape_error(factorllm::detail::concat(op, ": expected x [n_tokens, d_model = ", d_model, "], offsets [",
                                                n_experts + 1, "], slots [", n_slots, "], expert_out [", n_slots, ", ",
                                                d_model, "]; got x [", x.rows(), ", ", x.cols(), "], offsets [",
                                                offsets.extent(0), "], slots [", slots.extent(0), "], expert_out [",
                                                expert_out.rows(), ", ", expert_out.cols(), "]"));
  if (!experts.is_contiguous() || !x.is_contiguous() || !expert_out.is_contiguous())
    throw shape_error(factorllm::detail::concat(op, ": experts, x and expert_out must be dense row-major"));
  if (n_slots > INT_MAX) throw shape_error(factorllm::detail::concat(op, ": n_tokens * top_k exceeds 2^31"));
  ExpertPath const path = resolve_expert_path(requested, n_tokens);
  RegionPlan const layout = expert_swiglu_workspace<W>(n_tokens, d_model, n_experts, d_expert, top_k);
  layout.check(ws, op);
  if (n_tokens == 0) return;
  auto const* gate = reinterpret_cast<T const*>(experts.gate.data());
  auto const* up = reinterpret_cast<T const*>(experts.up.data());
  auto const* down = reinterpret_cast<T const*>(experts.down.data());
  auto* out = reinterpret_cast<E*>(expert_out.data());

  if (path == ExpertPath::decode) {
    auto* hidden = layout.at<float>(ws, kDecodeHidden, op);
    constexpr std::int64_t kV = 16 / sizeof(T);
    bool const vec_in = d_model % kV == 0 && d_model % 4 == 0 && aligned16(gate) && aligned16(up) && aligned16(x.data());
    bool const vec_down = d_expert % kV == 0 && d_expert % 4 == 0 && aligned16(down) && aligned16(hidden);
    LaunchConfig const c1 = decode_launch(d_expert, n_experts);
    decode_gate_up_kernel<T><<<to_dim3(c1.grid), to_dim3(c1.block), 0, ctx.stream>>>(
        gate, up, d_expert * d_model, d_expert, d_model, x.data(), n_tokens, static_cast<int>(top_k), offsets.data(),
        slots.data(), hidden, vec_in);
    check_launch(op);
    LaunchConfig const c2 = decode_launch(d_model, n_experts);
    decode_down_kernel<T, E><<<to_dim3(c2.grid), to_dim3(c2.block), 0, ctx.stream>>>(
        down, d_model * d_expert, d_model, d_expert, offsets.data(), hidden, out, vec_down);
    check_launch(op);
    return;
  }

  // GEMM paths: the expert offsets on the host (one copy and one synchronization, see backend/cuda/swiglu.hpp).
  RegionPlan const host_layout = expert_swiglu_host_workspace(n_experts);
  auto* host_offsets = host_layout.at<std::int64_t>(ctx.host_scratch, 0, op);
  auto* problems = host_layout.at<GemmProblem>(ctx.host_scratch, 1, op);
  auto* ints = host_layout.at<int>(ctx.host_scratch, 2, op);
  auto* scalars = host_layout.at<float>(ctx.host_scratch, 3, op);
  auto* pointers = host_layout.at<void const*>(ctx.host_scratch, 4, op);
  check_cuda(cudaMemcpyAsync(host_offsets, offsets.data(), sizeof(std::int64_t) * (n_experts + 1),
                             cudaMemcpyDeviceToHost, ctx.stream), op);
  check_cuda(cudaStreamSynchronize(ctx.stream), op);
  if (host_offsets[n_experts] != n_slots)
    throw value_error(factorllm::detail::concat(op, ": offsets[n_experts] = ", host_offsets[n_experts],
                                                " but n_tokens * top_k = ", n_slots));
  GemmProblem* up_problems = problems;                    // gate and up share their problems
  GemmProblem* down_problems = problems + n_experts;
  int const count = expert_gemm_problems(host_offsets, n_experts, d_model, d_expert, d_expert * d_model,
                                         Projection::gate, up_problems);
  expert_gemm_problems(host_offsets, n_experts, d_model, d_expert, d_model * d_expert, Projection::down, down_problems);

  auto* gathered = layout.at<T>(ws, kGathered, op);
  auto* gate_out = layout.at<E>(ws, kGateOut, op);
  auto* up_out = layout.at<E>(ws, kUpOut, op);
  auto* hidden = layout.at<T>(ws, kHidden, op);
  auto** dev_ptrs = layout.at<void*>(ws, kGemmPointers, op);
  LaunchConfig const cg = linear_launch(n_slots * d_model, op);
  gather_kernel<T><<<to_dim3(cg.grid), to_dim3(cg.block), 0, ctx.stream>>>(
      x.data(), n_tokens, d_model, static_cast<int>(top_k), slots.data(), n_slots, gathered);
  check_launch(op);

  GemmType const type = detail::gemm_type<W>();
  auto const n = static_cast<std::size_t>(n_experts);
  auto run_gemm = [&](int which, GemmProblem const* probs, void const* w, void const* in, void* result) {
    if (path == ExpertPath::grouped) {
      GroupedGemmHostArrays host{ints + which * 9 * n, scalars + which * 2 * n, pointers + which * 3 * n,
                                 static_cast<int>(n_experts)};
      grouped_gemm(type, probs, count, w, in, result, dev_ptrs + which * 3 * n, host, ctx);
    } else {
      per_problem_gemm(type, probs, count, w, in, result, ctx);
    }
  };
  run_gemm(0, up_problems, gate, gathered, gate_out);
  run_gemm(1, up_problems, up, gathered, up_out);
  LaunchConfig const cs = linear_launch(n_slots * d_expert, op);
  detail::silu_mul_kernel<E, T><<<to_dim3(cs.grid), to_dim3(cs.block), 0, ctx.stream>>>(gate_out, up_out, hidden,
                                                                                n_slots * d_expert);
  check_launch(op);
  run_gemm(2, down_problems, down, hidden, out);
}

template <class W>
void moe_forward_impl(ExpertWeightsView<W> const& experts, RouterView<float> router, GatingParams const& gating,
                      MatrixView<float const> x, MatrixView<float> y, WorkspaceSpan ws, CudaContext const& ctx,
                      ExpertPath path) {
  char const* op = "moe_forward (cuda)";
  std::ptrdiff_t const n_tokens = x.rows(), d_model = experts.d_model(), n_experts = experts.n_experts(),
                       d_expert = experts.d_expert(), k = gating.top_k;
  if (router.n_experts() != n_experts)
    throw shape_error(factorllm::detail::concat(op, ": router has ", router.n_experts(), " experts, the layer ", n_experts));
  if (y.rows() != n_tokens || y.cols() != d_model)
    throw shape_error(factorllm::detail::concat(op, ": y must be [n_tokens = ", n_tokens, ", d_model = ", d_model,
                                                "], got [", y.rows(), ", ", y.cols(), "]"));
  if (k < 1 || k > n_experts)
    throw value_error(factorllm::detail::concat(op, ": top_k = ", k, " must be in [1, n_experts = ", n_experts, "]"));
  RegionPlan const layout = moe_forward_workspace<W>(n_tokens, d_model, n_experts, d_expert, k);
  layout.check(ws, op);
  if (n_tokens == 0) return;
  auto* logits = layout.at<float>(ws, kFwdLogits, op);
  auto* ids = layout.at<std::int32_t>(ws, kFwdIds, op);
  auto* weights = layout.at<float>(ws, kFwdWeights, op);
  auto* offsets = layout.at<std::int64_t>(ws, kFwdOffsets, op);
  auto* slots = layout.at<std::int32_t>(ws, kFwdSlots, op);
  auto* rows = layout.at<std::int32_t>(ws, kFwdRows, op);
  auto* expert_out = layout.at<expert_out_t<W>>(ws, kFwdExpertOut, op);
  WorkspaceSpan const grouping_ws{ws.data + layout[kFwdGrouping].offset, layout[kFwdGrouping].bytes, ws.space};
  WorkspaceSpan const experts_ws{ws.data + layout[kFwdExperts].offset, layout[kFwdExperts].bytes, ws.space};
  std::ptrdiff_t const n_slots = n_tokens * k;

  MatrixView<float> logits_v(logits, {n_tokens, n_experts});
  MatrixView<std::int32_t> ids_v(ids, {n_tokens, k});
  MatrixView<float> weights_v(weights, {n_tokens, k});
  VectorView<std::int64_t> offsets_v(offsets, {n_experts + 1});
  VectorView<std::int32_t> slots_v(slots, {n_slots});
  VectorView<std::int32_t> rows_v(rows, {n_slots});
  MatrixView<expert_out_t<W>> out_v(expert_out, {n_slots, d_model});
  router_logits(x, router, logits_v, ctx);
  select_experts(logits_v, gating, ids_v, weights_v, ctx);
  group_by_expert(ids_v, n_experts, offsets_v, slots_v, rows_v, grouping_ws, ctx);
  expert_swiglu(experts, x, k, offsets_v, slots_v, out_v, experts_ws, ctx, path);
  combine(weights_v, MatrixView<expert_out_t<W> const>(out_v), VectorView<std::int32_t const>(rows_v), y, ctx);
}

/// out[i] = float(in[i]) (the dense SwiGLU's output back to f32 activations).
template <class T>
__global__ void to_float_kernel(T const* in, float* out, std::int64_t n) {
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = to_f(in[i]);
}

template <class W>
void swiglu_impl(MatrixView<W const> gate, MatrixView<W const> up, MatrixView<W const> down, MatrixView<float const> x,
                 MatrixView<float> y, WorkspaceSpan ws, CudaContext const& ctx) {
  using T = device_t<W>;
  char const* op = "swiglu (cuda)";
  std::ptrdiff_t const n_tokens = x.rows(), d = gate.cols(), f = gate.rows();
  if (up.extents() != gate.extents() || down.rows() != d || down.cols() != f || x.cols() != d || y.rows() != n_tokens ||
      y.cols() != d)
    throw shape_error(factorllm::detail::concat(op, ": expected gate, up [d_ff, d_model], down [d_model, d_ff], x, y ",
                                                "[n_tokens, d_model]; got gate [", f, ", ", d, "], down [", down.rows(),
                                                ", ", down.cols(), "], x [", x.rows(), ", ", x.cols(), "], y [", y.rows(),
                                                ", ", y.cols(), "]"));
  if (!gate.is_contiguous() || !up.is_contiguous() || !down.is_contiguous() || !x.is_contiguous() || !y.is_contiguous())
    throw shape_error(factorllm::detail::concat(op, ": every view must be dense row-major"));
  RegionPlan const layout = swiglu_workspace<W>(n_tokens, d, f);
  layout.check(ws, op);
  if (n_tokens == 0) return;
  auto* xw = layout.at<T>(ws, 0, op);
  auto* g = layout.at<T>(ws, 1, op);
  auto* u = layout.at<T>(ws, 2, op);
  auto* h = layout.at<T>(ws, 3, op);
  auto* o = layout.at<T>(ws, 4, op);
  GemmType const type = detail::gemm_type<W>();
  LaunchConfig const cx = linear_launch(n_tokens * d, op);
  detail::convert_kernel<T><<<to_dim3(cx.grid), to_dim3(cx.block), 0, ctx.stream>>>(x.data(), xw, n_tokens * d);
  check_launch(op);
  detail::swiglu_rows<T>(type, xw, gate.data(), up.data(), down.data(), g, u, h, o, n_tokens, f, d, ctx, op);
  to_float_kernel<T><<<to_dim3(cx.grid), to_dim3(cx.block), 0, ctx.stream>>>(o, y.data(), n_tokens * d);
  check_launch(op);
}

}  // namespace

void swiglu(MatrixView<float const> gate, MatrixView<float const> up, MatrixView<float const> down,
            MatrixView<float const> x, MatrixView<float> y, WorkspaceSpan ws, CudaContext const& ctx) {
  swiglu_impl(gate, up, down, x, y, ws, ctx);
}
void swiglu(MatrixView<bf16 const> gate, MatrixView<bf16 const> up, MatrixView<bf16 const> down,
            MatrixView<float const> x, MatrixView<float> y, WorkspaceSpan ws, CudaContext const& ctx) {
  swiglu_impl(gate, up, down, x, y, ws, ctx);
}
void swiglu(MatrixView<f16 const> gate, MatrixView<f16 const> up, MatrixView<f16 const> down,
            MatrixView<float const> x, MatrixView<float> y, WorkspaceSpan ws, CudaContext const& ctx) {
  swiglu_impl(gate, up, down, x, y, ws, ctx);
}

void gemm_xwt(GemmType type, void const* x, void const* w, void* y, std::ptrdiff_t rows, std::ptrdiff_t out,
              std::ptrdiff_t in, CudaContext const& ctx) {
  char const* op = "gemm_xwt (cuda)";
  if (rows < 0 || out < 0 || in < 0 || rows > INT_MAX || out > INT_MAX || in > INT_MAX)
    throw shape_error(factorllm::detail::concat(op, ": sizes must be in [0, 2^31)"));
  if (rows == 0 || out == 0) return;
  cublasHandle_t h = detail::bind_cublas(ctx, op);
  float const one = 1.f, zero = 0.f;
  cudaDataType_t const t = detail::cuda_type(type);
  check_cublas(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(rows),
                            static_cast<int>(in), &one, w, t, static_cast<int>(in), x, t, static_cast<int>(in), &zero,
                            y, t, static_cast<int>(out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               op);
}

void grouped_gemm(GemmType type, GemmProblem const* problems, int count, void const* w_base, void const* x_base,
                  void* y_base, void** device_pointers, GroupedGemmHostArrays const& host, CudaContext const& ctx) {
  char const* op = "grouped_gemm (cuda)";
  static_assert(sizeof(cublasOperation_t) == sizeof(int), "cublasOperation_t arrays are carved from int scratch");
  if (count > host.capacity)
    throw value_error(factorllm::detail::concat(op, ": ", count, " problems exceed the host arrays' capacity ",
                                                host.capacity));
  if (count == 0) return;
  cublasHandle_t h = detail::bind_cublas(ctx, op);
  std::size_t const eb = element_bytes(type);
  int const cap = host.capacity;
  auto* transa = reinterpret_cast<cublasOperation_t*>(host.ints);
  auto* transb = reinterpret_cast<cublasOperation_t*>(host.ints + cap);
  int* m = host.ints + 2 * cap;
  int* n = host.ints + 3 * cap;
  int* k = host.ints + 4 * cap;
  int* lda = host.ints + 5 * cap;
  int* ldb = host.ints + 6 * cap;
  int* ldc = host.ints + 7 * cap;
  int* group_size = host.ints + 8 * cap;
  float* alpha = host.scalars;
  float* beta = host.scalars + cap;
  void const** a_ptr = host.pointers;
  void const** b_ptr = host.pointers + count;
  void const** c_ptr = host.pointers + 2 * count;
  for (int i = 0; i < count; ++i) {
    GemmProblem const& p = problems[i];
    transa[i] = CUBLAS_OP_T;
    transb[i] = CUBLAS_OP_N;
    m[i] = p.m;
    n[i] = p.n;
    k[i] = p.k;
    lda[i] = p.lda;
    ldb[i] = p.ldb;
    ldc[i] = p.ldc;
    group_size[i] = 1;
    alpha[i] = 1.f;
    beta[i] = 0.f;
    a_ptr[i] = static_cast<std::byte const*>(w_base) + p.a_offset * eb;
    b_ptr[i] = static_cast<std::byte const*>(x_base) + p.b_offset * eb;
    c_ptr[i] = static_cast<std::byte*>(y_base) + p.c_offset * eb;
  }
  check_cuda(cudaMemcpyAsync(device_pointers, host.pointers, sizeof(void*) * 3 * count, cudaMemcpyHostToDevice,
                             ctx.stream), op);
  cudaDataType_t const t = detail::cuda_type(type);
  check_cublas(cublasGemmGroupedBatchedEx(h, transa, transb, m, n, k, alpha, const_cast<void const* const*>(device_pointers),
                                          t, lda, const_cast<void const* const*>(device_pointers + count), t, ldb, beta,
                                          device_pointers + 2 * count, t, ldc, count, group_size, CUBLAS_COMPUTE_32F),
               op);
}

void per_problem_gemm(GemmType type, GemmProblem const* problems, int count, void const* w_base, void const* x_base,
                      void* y_base, CudaContext const& ctx) {
  char const* op = "per_problem_gemm (cuda)";
  if (count == 0) return;
  cublasHandle_t h = detail::bind_cublas(ctx, op);
  std::size_t const eb = element_bytes(type);
  cudaDataType_t const t = detail::cuda_type(type);
  float const one = 1.f, zero = 0.f;
  for (int i = 0; i < count; ++i) {
    GemmProblem const& p = problems[i];
    check_cublas(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, p.m, p.n, p.k, &one,
                              static_cast<std::byte const*>(w_base) + p.a_offset * eb, t, p.lda,
                              static_cast<std::byte const*>(x_base) + p.b_offset * eb, t, p.ldb, &zero,
                              static_cast<std::byte*>(y_base) + p.c_offset * eb, t, p.ldc, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT),
                 op);
  }
}

void expert_swiglu(ExpertWeightsView<float> const& experts, MatrixView<float const> x, std::ptrdiff_t top_k,
                   VectorView<std::int64_t const> offsets, VectorView<std::int32_t const> slots,
                   MatrixView<float> expert_out, WorkspaceSpan ws, CudaContext const& ctx, ExpertPath path) {
  expert_swiglu_impl(experts, x, top_k, offsets, slots, expert_out, ws, ctx, path);
}
void expert_swiglu(ExpertWeightsView<bf16> const& experts, MatrixView<float const> x, std::ptrdiff_t top_k,
                   VectorView<std::int64_t const> offsets, VectorView<std::int32_t const> slots,
                   MatrixView<bf16> expert_out, WorkspaceSpan ws, CudaContext const& ctx, ExpertPath path) {
  expert_swiglu_impl(experts, x, top_k, offsets, slots, expert_out, ws, ctx, path);
}
void expert_swiglu(ExpertWeightsView<f16> const& experts, MatrixView<float const> x, std::ptrdiff_t top_k,
                   VectorView<std::int64_t const> offsets, VectorView<std::int32_t const> slots,
                   MatrixView<f16> expert_out, WorkspaceSpan ws, CudaContext const& ctx, ExpertPath path) {
  expert_swiglu_impl(experts, x, top_k, offsets, slots, expert_out, ws, ctx, path);
}

void moe_forward(ExpertWeightsView<float> const& experts, RouterView<float> router, GatingParams const& gating,
                 MatrixView<float const> x, MatrixView<float> y, WorkspaceSpan ws, CudaContext const& ctx,
                 ExpertPath path) {
  moe_forward_impl(experts, router, gating, x, y, ws, ctx, path);
}
void moe_forward(ExpertWeightsView<bf16> const& experts, RouterView<float> router, GatingParams const& gating,
                 MatrixView<float const> x, MatrixView<float> y, WorkspaceSpan ws, CudaContext const& ctx,
                 ExpertPath path) {
  moe_forward_impl(experts, router, gating, x, y, ws, ctx, path);
}
void moe_forward(ExpertWeightsView<f16> const& experts, RouterView<float> router, GatingParams const& gating,
                 MatrixView<float const> x, MatrixView<float> y, WorkspaceSpan ws, CudaContext const& ctx,
                 ExpertPath path) {
  moe_forward_impl(experts, router, gating, x, y, ws, ctx, path);
}

}  // namespace cuda
}  // namespace factorllm
