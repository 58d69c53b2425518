// SPDX-License-Identifier: Apache-2.0
// CUDA training forward and MoE backward (backend/cuda/moe_backward.hpp), f32. The math is MoeBackward<CpuScalar>'s
// (backend/scalar/moe_backward.hpp): per grouped row r of expert e (slot s = slots[r], token t = s / top_k):
//   g = W_d^T dy_t, h = SiLU(a) b, dL/dw_s = <g, h>, dh = w_s g, da = dh b SiLU'(a), db = dh SiLU(a)
//   dW_g,e = DA_e^T X_e, dW_u,e = DB_e^T X_e, dW_d,e = (w dY)_e^T H_e, dX_e = DA_e W_g,e + DB_e W_u,e   (GEMMs)
// then per token dz = VJP of the combine weights, dW_r = sum_t dz_t x_t^T, db_r = sum_t dz_t, dx_t = sum_j dX_slot +
// W_r^T dz_t (a thread per output, tokens and j in order).
#include <factorllm/backend/cuda/combine.hpp>
#include <factorllm/backend/cuda/moe_backward.hpp>
#include <factorllm/backend/cuda/router.hpp>
#include <factorllm/backend/cuda/topk.hpp>

#include <factorllm/backend/cuda/detail/device_logic.hpp>

#include "common.cuh"

namespace factorllm {
namespace cuda {

using detail::check_cublas;
using detail::check_cuda;
using detail::check_launch;
using detail::silu_f;
using detail::to_dim3;

namespace {

/// rows[slots[r]] = r (the grouped row of each slot).
__global__ void inverse_rows_kernel(std::int32_t const* slots, std::int64_t n_slots, std::int32_t* rows) {
  std::int64_t const r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < n_slots) rows[slots[r]] = static_cast<std::int32_t>(r);
}

/// For grouped row r (slot s): xg[r] = x[t], and when dy is given dyg[r] = dy[t], wdyg[r] = w_s dy[t].
__global__ void gather_rows_kernel(float const* x, float const* dy, float const* weights, std::int32_t const* slots,
                                   std::int64_t n_slots, std::int64_t d_model, int top_k, float* xg, float* dyg,
                                   float* wdyg) {
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_slots * d_model) return;
  std::int64_t const r = i / d_model, c = i % d_model;
  std::int64_t const s = slots[r], t = s / top_k;
  xg[i] = x[t * d_model + c];
  if (dy != nullptr) {
    float const v = dy[t * d_model + c];
    dyg[i] = v;
    wdyg[i] = weights[s] * v;
  }
}

/// h = SiLU(a) b (float) for the forward.
__global__ void hidden_kernel(float const* a, float const* b, float* h, std::int64_t n) {
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) h[i] = silu_f(a[i]) * b[i];
}

/// A block per grouped row: h, da, db (logic::slot_backward_element) and dL/dw_s = <g, h> summed by a fixed tree.
__global__ void slot_backward_kernel(float const* a, float const* b, float const* g, float const* weights,
                                     std::int32_t const* slots, std::int64_t d_expert, float* h, float* da, float* db,
                                     double* dw) {
  __shared__ double partial[kThreads];
  std::int64_t const r = blockIdx.x;
  std::int64_t const s = slots[r];
  double const w = weights[s];
  double acc = 0;
  for (std::int64_t i = threadIdx.x; i < d_expert; i += blockDim.x) {
    std::int64_t const o = r * d_expert + i;
    acc += logic::slot_backward_element(a[o], b[o], g[o], w, h + o, da + o, db + o);
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.x) < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) dw[s] = partial[0];
}

/// dz[t, :] = the combine weights' VJP (cuda::logic::combine_weights_vjp), a thread per token, double.
__global__ void router_vjp_kernel(float const* logits, std::int32_t const* ids, double const* dw, std::int64_t n_tokens,
                                  logic::VjpArgs a, double* dz, float* dz_out) {
  std::int64_t const t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n_tokens) return;
  int const n = a.n_experts, k = a.top_k;
  logic::combine_weights_vjp(logits + t * n, ids + t * k, dw + t * k, a, dz + t * n);
  if (dz_out != nullptr)
    for (int i = 0; i < n; ++i) dz_out[t * n + i] = static_cast<float>(dz[t * n + i]);
}

/// dW_r[e, c] = sum_t dz[t, e] x[t, c], db_r[e] (c = d_model) = sum_t dz[t, e]: a thread per output, t in order.
__global__ void router_weight_grad_kernel(float const* x, double const* dz, std::int64_t n_tokens, int n_experts,
                                          std::int64_t d_model, float* gw, float* gb) {
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  std::int64_t const cols = d_model + 1;
  if (i >= n_experts * cols) return;
  int const e = static_cast<int>(i / cols);
  std::int64_t const c = i % cols;
  double s = 0;
  for (std::int64_t t = 0; t < n_tokens; ++t)
    s += dz[t * n_experts + e] * (c < d_model ? static_cast<double>(x[t * d_model + c]) : 1.0);
  if (c < d_model)
    gw[static_cast<std::int64_t>(e) * d_model + c] = static_cast<float>(s);
  else
    gb[e] = static_cast<float>(s);
}

/// dx[t, c] = sum_j dxg[rows[t k + j], c] (j in order) + sum_e dz[t, e] W_r[e, c].
__global__ void dx_kernel(float const* dxg, std::int32_t const* rows, double const* dz, float const* router_w,
                          std::int64_t n_tokens, int top_k, int n_experts, std::int64_t d_model, float* dx) {
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_tokens * d_model) return;
  std::int64_t const t = i / d_model, c = i % d_model;
  double s = 0;
  for (int j = 0; j < top_k; ++j) s += dxg[static_cast<std::int64_t>(rows[t * top_k + j]) * d_model + c];
  for (int e = 0; e < n_experts; ++e) s += dz[t * n_experts + e] * static_cast<double>(router_w[static_cast<std::int64_t>(e) * d_model + c]);
  dx[i] = static_cast<float>(s);
}

/// The base pointer of each BwdBuffer (cuda/launch.hpp) for one backward call.
struct BwdPointers {
  float const* weight[3];  // gate, up, down
  float* rows[10];         // x, dy, w dy, a, b, g, h, da, db, dx (grouped rows)
  float* grad[3];          // gate, up, down
  float* at(BwdBuffer which) const {
    auto const i = static_cast<int>(which);
    if (i < 3) return const_cast<float*>(weight[i]);  // read-only operand: cuBLAS takes A and B as const
    if (i < 13) return rows[i - 3];
    return grad[i - 13];
  }
};

/// Runs one BackwardGemm (f32, f32 accumulation).
void run_backward_gemm(cublasHandle_t h, BackwardGemm const& p, BwdPointers const& ptr, char const* op) {
  float const one = 1.f;
  check_cublas(cublasGemmEx(h, p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, p.m, p.n,
                            p.k, &one, ptr.at(p.a) + p.a_offset, CUDA_R_32F, p.lda, ptr.at(p.b) + p.b_offset, CUDA_R_32F,
                            p.ldb, &p.beta, ptr.at(p.c) + p.c_offset, CUDA_R_32F, p.ldc, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT),
               op);
}

void check_params(MoeParamsView<float> const& p, char const* op) {
  std::ptrdiff_t const n = p.n_experts(), d = p.d_model(), m = p.d_expert();
  if (p.up.extents() != p.gate.extents() || p.down.extent(0) != n || p.down.extent(1) != d || p.down.extent(2) != m ||
      p.router_weight.rows() != n || p.router_weight.cols() != d || p.router_bias.extent(0) != n)
    throw shape_error(factorllm::detail::concat(op, ": expected gate, up [n_experts, d_expert, d_model], down ",
                                                "[n_experts, d_model, d_expert], router [n_experts, d_model] and bias [n_experts]"));
  if (!p.gate.is_contiguous() || !p.up.is_contiguous() || !p.down.is_contiguous() || !p.router_weight.is_contiguous())
    throw shape_error(factorllm::detail::concat(op, ": the parameters must be dense row-major"));
  if (d > INT_MAX || m > INT_MAX) throw shape_error(factorllm::detail::concat(op, ": d_model or d_expert exceeds 2^31"));
}

/// The expert offsets on the host (one copy and one synchronization), checked against n_slots.
std::int64_t const* offsets_to_host(VectorView<std::int64_t const> offsets, std::int64_t n_slots,
                                    CudaContext const& ctx, char const* op) {
  std::ptrdiff_t const n = offsets.extent(0) - 1;
  if (ctx.host_scratch.space != MemorySpace::host || ctx.host_scratch.bytes < training_host_bytes(n))
    throw backend_error(factorllm::detail::concat(op, ": CudaContext::host_scratch must be ", training_host_bytes(n),
                                                  " bytes or more of host memory (training_host_bytes)"));
  auto* host = reinterpret_cast<std::int64_t*>(ctx.host_scratch.data);
  check_cuda(cudaMemcpyAsync(host, offsets.data(), sizeof(std::int64_t) * static_cast<std::size_t>(n + 1),
                             cudaMemcpyDeviceToHost, ctx.stream), op);
  check_cuda(cudaStreamSynchronize(ctx.stream), op);
  if (host[0] != 0 || host[n] != n_slots)
    throw value_error(factorllm::detail::concat(op, ": offsets must run from 0 to n_tokens * top_k = ", n_slots));
  for (std::ptrdiff_t e = 0; e < n; ++e)
    if (host[e + 1] < host[e]) throw value_error(factorllm::detail::concat(op, ": offsets decrease at expert ", e));
  return host;
}

}  // namespace

RegionPlan train_forward_workspace(std::ptrdiff_t max_tokens, std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                   std::ptrdiff_t d_expert, std::ptrdiff_t top_k) {
  if (max_tokens < 0 || d_model < 1 || n_experts < 1 || d_expert < 1 || top_k < 1 || top_k > n_experts)
    throw shape_error("train_forward (cuda) workspace: bad sizes");
  auto const s = static_cast<std::size_t>(max_tokens * top_k), d = static_cast<std::size_t>(d_model),
             m = static_cast<std::size_t>(d_expert);
  RegionPlan ws;
  ws.add("rows", sizeof(std::int32_t), s);
  ws.add("gathered", sizeof(float), s * d);
  ws.add("gate_pre", sizeof(float), s * m);
  ws.add("up_pre", sizeof(float), s * m);
  ws.add("hidden", sizeof(float), s * m);
  ws.add("expert_out", sizeof(float), s * d);
  ws.add("grouping", 1, grouping_workspace(max_tokens * top_k, n_experts).bytes());
  return ws;
}

RegionPlan moe_backward_workspace(std::ptrdiff_t max_tokens, std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                  std::ptrdiff_t d_expert, std::ptrdiff_t top_k) {
  if (max_tokens < 0 || d_model < 1 || n_experts < 1 || d_expert < 1 || top_k < 1 || top_k > n_experts)
    throw shape_error("moe_backward (cuda) workspace: bad sizes");
  auto const t = static_cast<std::size_t>(max_tokens), s = static_cast<std::size_t>(max_tokens * top_k),
             d = static_cast<std::size_t>(d_model), m = static_cast<std::size_t>(d_expert),
             n = static_cast<std::size_t>(n_experts);
  RegionPlan ws;
  ws.add("rows", sizeof(std::int32_t), s);
  ws.add("x_rows", sizeof(float), s * d);
  ws.add("dy_rows", sizeof(float), s * d);
  ws.add("wdy_rows", sizeof(float), s * d);
  ws.add("a", sizeof(float), s * m);
  ws.add("b", sizeof(float), s * m);
  ws.add("g", sizeof(float), s * m);
  ws.add("h", sizeof(float), s * m);
  ws.add("da", sizeof(float), s * m);
  ws.add("db", sizeof(float), s * m);
  ws.add("dx_rows", sizeof(float), s * d);
  ws.add("dw", sizeof(double), s);
  ws.add("dz", sizeof(double), t * n);
  return ws;
}

void train_forward(MoeParamsView<float> const& p, GatingParams const& gating, MatrixView<float const> x,
                   MatrixView<float> y, RoutingView<float> record, MoeActivationsView<float> const* saved,
                   WorkspaceSpan ws, CudaContext const& ctx) {
  char const* op = "train_forward (cuda)";
  check_params(p, op);
  std::ptrdiff_t const T = x.rows(), n = p.n_experts(), d = p.d_model(), m = p.d_expert(), k = gating.top_k, S = T * k;
  if (x.cols() != d || y.rows() != T || y.cols() != d || record.logits.rows() != T || record.logits.cols() != n ||
      record.ids.rows() != T || record.ids.cols() != k || record.weights.rows() != T || record.weights.cols() != k ||
      record.offsets.extent(0) != n + 1 || record.slots.extent(0) != S)
    throw shape_error(factorllm::detail::concat(op, ": x, y [n_tokens, d_model = ", d, "], record logits [", T, ", ", n,
                                                "], ids and weights [", T, ", ", k, "], offsets [", n + 1, "], slots [",
                                                S, "]"));
  if (saved != nullptr && (saved->gate_pre.rows() != S || saved->gate_pre.cols() != m ||
                           saved->up_pre.extents() != saved->gate_pre.extents() || !saved->gate_pre.is_contiguous() ||
                           !saved->up_pre.is_contiguous()))
    throw shape_error(factorllm::detail::concat(op, ": saved pre-activations must be dense [", S, ", ", m, "]"));
  if (S > INT_MAX) throw shape_error(factorllm::detail::concat(op, ": n_tokens * top_k exceeds 2^31"));
  RegionPlan const layout = train_forward_workspace(T, d, n, m, k);
  layout.check(ws, op);
  if (T == 0) return;
  auto* rows = layout.at<std::int32_t>(ws, 0, op);
  auto* xg = layout.at<float>(ws, 1, op);
  float* a = saved != nullptr ? saved->gate_pre.data() : layout.at<float>(ws, 2, op);
  float* b = saved != nullptr ? saved->up_pre.data() : layout.at<float>(ws, 3, op);
  auto* h = layout.at<float>(ws, 4, op);
  auto* eo = layout.at<float>(ws, 5, op);
  WorkspaceSpan const grouping_ws{ws.data + layout[6].offset, layout[6].bytes, ws.space};

  router_logits(x, p.router(), record.logits, ctx);                                                       // 1
  select_experts(MatrixView<float const>(record.logits), gating, record.ids, record.weights, ctx);         // 2
  group_by_expert(MatrixView<std::int32_t const>(record.ids), n, record.offsets, record.slots,
                  VectorView<std::int32_t>(rows, {S}), grouping_ws, ctx);                                 // 3
  std::int64_t const* host_offsets = offsets_to_host(VectorView<std::int64_t const>(record.offsets), S, ctx, op);
  auto* problems = reinterpret_cast<GemmProblem*>(ctx.host_scratch.data +
                                                  factorllm::detail::align_up(sizeof(std::int64_t) * (n + 1)));
  LaunchConfig const cg = linear_launch(S * d, op);
  gather_rows_kernel<<<to_dim3(cg.grid), to_dim3(cg.block), 0, ctx.stream>>>(
      x.data(), nullptr, nullptr, record.slots.data(), S, d, static_cast<int>(k), xg, nullptr, nullptr);
  check_launch(op);
  int const count = expert_gemm_problems(host_offsets, n, d, m, m * d, Projection::gate, problems);    // 4
  per_problem_gemm(GemmType::f32, problems, count, p.gate.data(), xg, a, ctx);
  per_problem_gemm(GemmType::f32, problems, count, p.up.data(), xg, b, ctx);
  LaunchConfig const ch = linear_launch(S * m, op);
  hidden_kernel<<<to_dim3(ch.grid), to_dim3(ch.block), 0, ctx.stream>>>(a, b, h, S * m);
  check_launch(op);
  int const count_down = expert_gemm_problems(host_offsets, n, d, m, d * m, Projection::down, problems + n);
  per_problem_gemm(GemmType::f32, problems + n, count_down, p.down.data(), h, eo, ctx);
  combine(MatrixView<float const>(record.weights), matrix_view<float const>(eo, S, d),
          VectorView<std::int32_t const>(rows, {S}), y, ctx);                                            // 5
}

void moe_backward(MoeParamsView<float> const& p, GatingParams const& gating, RoutingView<float const> record,
                  MatrixView<float const> x, MatrixView<float const> dy, MoeActivationsView<float const> const* saved,
                  MoeGradsView<float> const& grads, WorkspaceSpan ws, CudaContext const& ctx) {
  char const* op = "moe_backward (cuda)";
  check_params(p, op);
  std::ptrdiff_t const T = x.rows(), n = p.n_experts(), d = p.d_model(), m = p.d_expert(), k = gating.top_k, S = T * k;
  if (k < 1 || k > n) throw value_error(factorllm::detail::concat(op, ": top_k = ", k, " must be in [1, ", n, "]"));
  if (x.cols() != d || dy.rows() != T || dy.cols() != d || record.logits.rows() != T || record.logits.cols() != n ||
      record.ids.rows() != T || record.ids.cols() != k || record.weights.rows() != T || record.weights.cols() != k ||
      record.offsets.extent(0) != n + 1 || record.slots.extent(0) != S)
    throw shape_error(factorllm::detail::concat(op, ": x, dy [n_tokens, d_model = ", d, "], record logits [", T, ", ", n,
                                                "], ids and weights [", T, ", ", k, "], offsets [", n + 1, "], slots [",
                                                S, "]"));
  if (grads.x.rows() != T || grads.x.cols() != d || grads.gate.extents() != p.gate.extents() ||
      grads.up.extents() != p.up.extents() || grads.down.extents() != p.down.extents() ||
      grads.router_weight.rows() != n || grads.router_weight.cols() != d || grads.router_bias.extent(0) != n ||
      (grads.wants_logits() && (grads.logits.rows() != T || grads.logits.cols() != n)) || !grads.x.is_contiguous() ||
      !grads.gate.is_contiguous() || !grads.up.is_contiguous() || !grads.down.is_contiguous() ||
      !grads.router_weight.is_contiguous())
    throw shape_error(factorllm::detail::concat(op, ": gradient views must be dense and shaped like x and the parameters"));
  if (saved != nullptr && (saved->gate_pre.rows() != S || saved->gate_pre.cols() != m ||
                           saved->up_pre.extents() != saved->gate_pre.extents() || !saved->gate_pre.is_contiguous() ||
                           !saved->up_pre.is_contiguous()))
    throw shape_error(factorllm::detail::concat(op, ": saved pre-activations must be dense [", S, ", ", m, "]"));
  if (!x.is_contiguous() || !dy.is_contiguous() || !record.logits.is_contiguous() || !record.ids.is_contiguous() ||
      !record.weights.is_contiguous())
    throw shape_error(factorllm::detail::concat(op, ": x, dy and the record's logits, ids and weights must be dense"));
  if (S > INT_MAX) throw shape_error(factorllm::detail::concat(op, ": n_tokens * top_k exceeds 2^31"));
  RegionPlan const layout = moe_backward_workspace(T, d, n, m, k);
  layout.check(ws, op);
  cublasHandle_t handle = detail::bind_cublas(ctx, op);
  // Experts without tokens get zero gradients: clear the expert gradients first, the GEMMs overwrite the rest.
  check_cuda(cudaMemsetAsync(grads.gate.data(), 0, sizeof(float) * static_cast<std::size_t>(grads.gate.size()), ctx.stream), op);
  check_cuda(cudaMemsetAsync(grads.up.data(), 0, sizeof(float) * static_cast<std::size_t>(grads.up.size()), ctx.stream), op);
  check_cuda(cudaMemsetAsync(grads.down.data(), 0, sizeof(float) * static_cast<std::size_t>(grads.down.size()), ctx.stream), op);
  if (T == 0) {
    check_cuda(cudaMemsetAsync(grads.router_weight.data(), 0, sizeof(float) * static_cast<std::size_t>(n * d), ctx.stream), op);
    check_cuda(cudaMemsetAsync(grads.router_bias.data(), 0, sizeof(float) * static_cast<std::size_t>(n), ctx.stream), op);
    return;
  }
  auto* rows = layout.at<std::int32_t>(ws, 0, op);
  auto* xg = layout.at<float>(ws, 1, op);
  auto* dyg = layout.at<float>(ws, 2, op);
  auto* wdyg = layout.at<float>(ws, 3, op);
  float* a = layout.at<float>(ws, 4, op);
  float* b = layout.at<float>(ws, 5, op);
  auto* g = layout.at<float>(ws, 6, op);
  auto* h = layout.at<float>(ws, 7, op);
  auto* da = layout.at<float>(ws, 8, op);
  auto* db = layout.at<float>(ws, 9, op);
  auto* dxg = layout.at<float>(ws, 10, op);
  auto* dw = layout.at<double>(ws, 11, op);
  auto* dz = layout.at<double>(ws, 12, op);

  std::int64_t const* host_offsets = offsets_to_host(record.offsets, S, ctx, op);
  LaunchConfig const cs = linear_launch(S, op);
  inverse_rows_kernel<<<to_dim3(cs.grid), to_dim3(cs.block), 0, ctx.stream>>>(record.slots.data(), S, rows);
  check_launch(op);
  LaunchConfig const cg = linear_launch(S * d, op);
  gather_rows_kernel<<<to_dim3(cg.grid), to_dim3(cg.block), 0, ctx.stream>>>(
      x.data(), dy.data(), record.weights.data(), record.slots.data(), S, d, static_cast<int>(k), xg, dyg, wdyg);
  check_launch(op);
  float* a_in = a;
  float* b_in = b;
  if (saved != nullptr) {  // read only: the GEMMs that write a and b run only when recomputing
    a_in = const_cast<float*>(saved->gate_pre.data());
    b_in = const_cast<float*>(saved->up_pre.data());
  }
  BwdPointers const ptr{{p.gate.data(), p.up.data(), p.down.data()},
                        {xg, dyg, wdyg, a_in, b_in, g, h, da, db, dxg},
                        {grads.gate.data(), grads.up.data(), grads.down.data()}};
  BackwardGemm gemms[8];
  for (int stage = 0; stage < 2; ++stage) {
    if (stage == 1) {
      slot_backward_kernel<<<static_cast<unsigned>(S), kThreads, 0, ctx.stream>>>(
          a_in, b_in, g, record.weights.data(), record.slots.data(), m, h, da, db, dw);
      check_launch(op);
    }
    for (std::ptrdiff_t e = 0; e < n; ++e) {
      std::int64_t const r0 = host_offsets[e], ne = host_offsets[e + 1] - r0;
      if (ne == 0) continue;  // its gradients stay zero (cleared above)
      int const count = expert_backward_gemms(stage, e, r0, ne, d, m, saved == nullptr, gemms);
      for (int i = 0; i < count; ++i) run_backward_gemm(handle, gemms[i], ptr, op);
    }
  }
  logic::VjpArgs const va{static_cast<int>(n), static_cast<int>(k), static_cast<int>(gating.mode), gating.sigmoid_renormalize,
                   static_cast<double>(gating.output_scale)};
  LaunchConfig const ct = linear_launch(T, op);
  router_vjp_kernel<<<to_dim3(ct.grid), to_dim3(ct.block), 0, ctx.stream>>>(
      record.logits.data(), record.ids.data(), dw, T, va, dz, grads.wants_logits() ? grads.logits.data() : nullptr);
  check_launch(op);
  LaunchConfig const cr = linear_launch(n * (d + 1), op);
  router_weight_grad_kernel<<<to_dim3(cr.grid), to_dim3(cr.block), 0, ctx.stream>>>(
      x.data(), dz, T, static_cast<int>(n), d, grads.router_weight.data(), grads.router_bias.data());
  check_launch(op);
  LaunchConfig const cx = linear_launch(T * d, op);
  dx_kernel<<<to_dim3(cx.grid), to_dim3(cx.block), 0, ctx.stream>>>(dxg, rows, dz, p.router_weight.data(), T,
                                                                    static_cast<int>(k), static_cast<int>(n), d,
                                                                    grads.x.data());
  check_launch(op);
}

}  // namespace cuda
}  // namespace factorllm
