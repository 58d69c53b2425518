// SPDX-License-Identifier: Apache-2.0
// CUDA PAR loss and its router gradients (backend/cuda/par_loss.hpp; docs/math.md §3.2). The per-token arithmetic
// mirrors detail::ParRouterAccumulator (backend/scalar/par_loss.hpp) in double; every sum over tokens runs in token
// order in one thread, so the result is the same bits on every run.
#include <factorllm/backend/cuda/par_loss.hpp>

#include <factorllm/backend/cuda/detail/device_logic.hpp>

#include "common.cuh"

namespace factorllm {
namespace cuda {

using detail::check_cuda;
using detail::check_launch;
using detail::device_t;
using detail::to_dim3;
using detail::to_f;

namespace {

constexpr int kMseThreads = 256;
constexpr int kTokenThreads = 128;
constexpr std::ptrdiff_t kMaxParExperts = 1024;

/// mse[t, e] = mean_c (expert_out[e, t, c] - teacher[t, c] / s)^2, a block per (t, e), a fixed reduction tree.
template <class T>
__global__ void mse_kernel(T const* expert_out, T const* teacher, std::int64_t n_tokens, int n_experts,
                           std::int64_t d_model, double scale, double* mse, float* mse_out) {
  __shared__ double partial[kMseThreads];
  std::int64_t const b = blockIdx.x;
  std::int64_t const t = b / n_experts;
  int const e = static_cast<int>(b % n_experts);
  T const* o = expert_out + (static_cast<std::int64_t>(e) * n_tokens + t) * d_model;
  T const* f = teacher + t * d_model;
  double s = 0;
  for (std::int64_t c = threadIdx.x; c < d_model; c += kMseThreads) {
    double const diff = static_cast<double>(to_f(o[c])) - static_cast<double>(to_f(f[c])) / scale;
    s += diff * diff;
  }
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int half = kMseThreads / 2; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.x) < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double const m = partial[0] / static_cast<double>(d_model);
    mse[t * n_experts + e] = m;
    mse_out[t * n_experts + e] = static_cast<float>(m);
  }
}

/// A block per token: z = W_r x + b_r (a warp per expert, double), then logic::par_token in thread 0.
__global__ void token_kernel(float const* x, float const* router_w, float const* router_b, double const* mse,
                             std::int64_t d_model, logic::ParTokenArgs a, double* dz_par, double* dz_bal,
                             double* token_sums, std::int32_t* pseudo_label, std::int32_t* router_topk) {
  extern __shared__ double shared[];
  double* z = shared;
  double* p = shared + a.n_experts;
  std::int64_t const t = blockIdx.x;
  int const warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
  float const* xr = x + t * d_model;
  for (int e = warp; e < a.n_experts; e += n_warps) {
    float const* wr = router_w + static_cast<std::int64_t>(e) * d_model;
    double s = 0;
    for (std::int64_t c = lane; c < d_model; c += 32) s += static_cast<double>(wr[c]) * static_cast<double>(xr[c]);
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
    if (lane == 0) z[e] = static_cast<double>(router_b[e]) + s;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  int const n = a.n_experts, k = a.top_k;
  logic::par_token(z, p, mse + t * n, a, dz_par + t * n, dz_bal + t * n, pseudo_label + t * k, router_topk + t * k,
                   token_sums + t * 3);
}

struct GradArgs {
  int n_experts;
  std::int64_t n_tokens, d_model;
  double par_weight, balance_weight;
  float *gw, *gb, *gw_par, *gb_par, *gw_bal, *gb_bal;
};

/// dW_r[e, c] (c = d_model: the bias), a thread per output (logic::router_grad_output: tokens in order).
__global__ void router_grad_kernel(float const* x, double const* dz_par, double const* dz_bal, GradArgs a) {
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  std::int64_t const cols = a.d_model + 1;
  if (i >= a.n_experts * cols) return;
  int const e = static_cast<int>(i / cols);
  std::int64_t const c = i % cols;
  double s[2];
  logic::router_grad_output(x, dz_par, dz_bal, a.n_tokens, a.n_experts, a.d_model, e, c, s);
  auto const total = static_cast<float>(a.par_weight * s[0] + a.balance_weight * s[1]);
  if (c < a.d_model) {
    std::int64_t const o = static_cast<std::int64_t>(e) * a.d_model + c;
    a.gw_par[o] = static_cast<float>(s[0]);
    a.gw_bal[o] = static_cast<float>(s[1]);
    a.gw[o] = total;
  } else {
    a.gb_par[e] = static_cast<float>(s[0]);
    a.gb_bal[e] = static_cast<float>(s[1]);
    a.gb[e] = total;
  }
}

/// totals = sums over tokens (in order) of KL, selected mass and matches.
__global__ void totals_kernel(double const* token_sums, std::int64_t n_tokens, double* totals) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double s[3] = {0, 0, 0};
  for (std::int64_t t = 0; t < n_tokens; ++t)
    for (int i = 0; i < 3; ++i) s[i] += token_sums[t * 3 + i];
  for (int i = 0; i < 3; ++i) totals[i] = s[i];
}

template <class T, int R>
void require_dense(TensorView<T, R> const& v, char const* op, char const* name) {
  if (!v.is_contiguous())
    throw shape_error(factorllm::detail::concat(op, ": argument '", name, "' must be dense row-major"));
}

template <class W>
ParLossValues par_loss_impl(MatrixView<float const> x, MatrixView<W const> dense_gate, MatrixView<W const> dense_up,
                            MatrixView<W const> dense_down, ExpertWeightsView<W> const& experts,
                            RouterView<float> router, std::ptrdiff_t top_k, ParLossConfig const& config,
                            ParLossOutView<float> const& out, WorkspaceSpan ws, CudaContext const& ctx) {
  using T = device_t<W>;
  char const* op = "par_loss (cuda)";
  std::ptrdiff_t const n_tokens = x.rows(), d = experts.d_model(), n = experts.n_experts(), de = experts.d_expert(),
                       d_ff = dense_gate.rows(), k = top_k;
  if (k < 1 || k > n || k > kMaxTopK || n > kMaxParExperts)
    throw value_error(factorllm::detail::concat(op, ": top_k = ", k, " must be in [1, min(n_experts, ", kMaxTopK,
                                                ")] and n_experts = ", n, " <= ", kMaxParExperts));
  if (x.cols() != d || dense_gate.cols() != d || dense_up.extents() != dense_gate.extents() ||
      dense_down.rows() != d || dense_down.cols() != d_ff || router.n_experts() != n || router.d_model() != d ||
      router.bias.extent(0) != n)
    throw shape_error(factorllm::detail::concat(op, ": expected x [n_tokens, d_model = ", d,
                                                "], dense gate, up [d_ff, d_model], down [d_model, d_ff], router [",
                                                n, ", ", d, "] and bias [", n, "]"));
  if (out.grad_weight.rows() != n || out.grad_weight.cols() != d || out.grad_weight_par.extents() != out.grad_weight.extents() ||
      out.grad_weight_balance.extents() != out.grad_weight.extents() || out.grad_bias.extent(0) != n ||
      out.grad_bias_par.extent(0) != n || out.grad_bias_balance.extent(0) != n || out.mse_to_target.rows() != n_tokens ||
      out.mse_to_target.cols() != n || out.pseudo_label.rows() != n_tokens || out.pseudo_label.cols() != k ||
      out.router_topk.rows() != n_tokens || out.router_topk.cols() != k)
    throw shape_error(factorllm::detail::concat(op, ": output views must be grad_weight* [", n, ", ", d,
                                                "], grad_bias* [", n, "], mse_to_target [", n_tokens, ", ", n,
                                                "], pseudo_label and router_topk [", n_tokens, ", ", k, "]"));
  require_dense(x, op, "x");
  require_dense(dense_gate, op, "dense_gate");
  require_dense(dense_up, op, "dense_up");
  require_dense(dense_down, op, "dense_down");
  require_dense(router.weight, op, "router.weight");
  if (!experts.is_contiguous()) throw shape_error(factorllm::detail::concat(op, ": experts must be dense row-major"));
  require_dense(out.grad_weight, op, "out.grad_weight");
  require_dense(out.grad_weight_par, op, "out.grad_weight_par");
  require_dense(out.grad_weight_balance, op, "out.grad_weight_balance");
  require_dense(out.mse_to_target, op, "out.mse_to_target");
  require_dense(out.pseudo_label, op, "out.pseudo_label");
  require_dense(out.router_topk, op, "out.router_topk");
  if (n_tokens < 1) throw shape_error(factorllm::detail::concat(op, ": n_tokens must be >= 1"));
  RegionPlan const layout = par_loss_workspace<W>(n_tokens, d, d_ff, n, de);
  layout.check(ws, op);
  if (ctx.host_scratch.space != MemorySpace::host || ctx.host_scratch.bytes < par_loss_host_bytes())
    throw backend_error(factorllm::detail::concat(op, ": CudaContext::host_scratch must be ", par_loss_host_bytes(),
                                                  " bytes or more of host memory"));
  auto* xw = layout.at<T>(ws, 0, op);
  auto* tg = layout.at<T>(ws, 1, op);
  auto* tu = layout.at<T>(ws, 2, op);
  auto* th = layout.at<T>(ws, 3, op);
  auto* tf = layout.at<T>(ws, 4, op);
  auto* eg = layout.at<T>(ws, 5, op);
  auto* eu = layout.at<T>(ws, 6, op);
  auto* eh = layout.at<T>(ws, 7, op);
  auto* eo = layout.at<T>(ws, 8, op);
  auto* mse = layout.at<double>(ws, 9, op);
  auto* dz_par = layout.at<double>(ws, 10, op);
  auto* dz_bal = layout.at<double>(ws, 11, op);
  auto* token_sums = layout.at<double>(ws, 12, op);
  auto* totals = layout.at<double>(ws, 13, op);
  GemmType const type = detail::gemm_type<W>();

  LaunchConfig const cx = linear_launch(n_tokens * d, op);
  detail::convert_kernel<T><<<to_dim3(cx.grid), to_dim3(cx.block), 0, ctx.stream>>>(x.data(), xw, n_tokens * d);
  check_launch(op);
  // Teacher f = F(x) (steps 2-3), then every expert on every token (step 4).
  detail::swiglu_rows<T>(type, xw, dense_gate.data(), dense_up.data(), dense_down.data(), tg, tu, th, tf, n_tokens,
                         d_ff, d, ctx, op);
  for (std::ptrdiff_t e = 0; e < n; ++e)
    detail::swiglu_rows<T>(type, xw, experts.gate_of(e).data(), experts.up_of(e).data(), experts.down_of(e).data(), eg,
                           eu, eh, eo + e * n_tokens * d, n_tokens, de, d, ctx, op);
  if (n_tokens * n > INT_MAX) throw shape_error(factorllm::detail::concat(op, ": n_tokens * n_experts exceeds 2^31"));
  mse_kernel<T><<<static_cast<unsigned>(n_tokens * n), kMseThreads, 0, ctx.stream>>>(
      eo, tf, n_tokens, static_cast<int>(n), d, GatingParams::code_ref_scale(n, k), mse, out.mse_to_target.data());
  check_launch(op);
  ParTarget const q = par_target_q(n, k);
  double const inv_t = 1.0 / static_cast<double>(n_tokens);
  logic::ParTokenArgs const ta{static_cast<int>(n), static_cast<int>(k), q.selected, q.unselected, config.clip,
                               1.0 - config.clip, inv_t, inv_t / static_cast<double>(n)};
  token_kernel<<<static_cast<unsigned>(n_tokens), kTokenThreads, sizeof(double) * 2 * static_cast<std::size_t>(n),
                 ctx.stream>>>(x.data(), router.weight.data(), router.bias.data(), mse, d, ta, dz_par, dz_bal,
                               token_sums, out.pseudo_label.data(), out.router_topk.data());
  check_launch(op);
  GradArgs const ga{static_cast<int>(n), n_tokens, d, config.par_weight, config.balance_weight,
                    out.grad_weight.data(), out.grad_bias.data(), out.grad_weight_par.data(), out.grad_bias_par.data(),
                    out.grad_weight_balance.data(), out.grad_bias_balance.data()};
  LaunchConfig const cgr = linear_launch(n * (d + 1), op);
  router_grad_kernel<<<to_dim3(cgr.grid), to_dim3(cgr.block), 0, ctx.stream>>>(x.data(), dz_par, dz_bal, ga);
  check_launch(op);
  totals_kernel<<<1, 1, 0, ctx.stream>>>(token_sums, n_tokens, totals);
  check_launch(op);
  // The one host synchronization: the scalar losses are returned by value.
  auto* host_totals = reinterpret_cast<double*>(ctx.host_scratch.data);
  check_cuda(cudaMemcpyAsync(host_totals, totals, 3 * sizeof(double), cudaMemcpyDeviceToHost, ctx.stream), op);
  check_cuda(cudaStreamSynchronize(ctx.stream), op);
  ParLossValues v;
  v.par_loss = host_totals[0] * inv_t;
  v.balance_loss = host_totals[1] * ta.inv_nt;
  v.total_loss = config.par_weight * v.par_loss + config.balance_weight * v.balance_loss;
  v.label_accuracy = host_totals[2] * inv_t;
  return v;
}

}  // namespace

ParLossValues par_loss(MatrixView<float const> x, MatrixView<float const> dense_gate, MatrixView<float const> dense_up,
                       MatrixView<float const> dense_down, ExpertWeightsView<float> const& experts,
                       RouterView<float> router, std::ptrdiff_t top_k, ParLossConfig const& config,
                       ParLossOutView<float> const& out, WorkspaceSpan ws, CudaContext const& ctx) {
  return par_loss_impl(x, dense_gate, dense_up, dense_down, experts, router, top_k, config, out, ws, ctx);
}
ParLossValues par_loss(MatrixView<float const> x, MatrixView<bf16 const> dense_gate, MatrixView<bf16 const> dense_up,
                       MatrixView<bf16 const> dense_down, ExpertWeightsView<bf16> const& experts,
                       RouterView<float> router, std::ptrdiff_t top_k, ParLossConfig const& config,
                       ParLossOutView<float> const& out, WorkspaceSpan ws, CudaContext const& ctx) {
  return par_loss_impl(x, dense_gate, dense_up, dense_down, experts, router, top_k, config, out, ws, ctx);
}
ParLossValues par_loss(MatrixView<float const> x, MatrixView<f16 const> dense_gate, MatrixView<f16 const> dense_up,
                       MatrixView<f16 const> dense_down, ExpertWeightsView<f16> const& experts,
                       RouterView<float> router, std::ptrdiff_t top_k, ParLossConfig const& config,
                       ParLossOutView<float> const& out, WorkspaceSpan ws, CudaContext const& ctx) {
  return par_loss_impl(x, dense_gate, dense_up, dense_down, experts, router, top_k, config, out, ws, ctx);
}

}  // namespace cuda
}  // namespace factorllm
