// SPDX-License-Identifier: Apache-2.0
// CUDA runtime queries, router logits, TopK + combine weights, grouping by expert and the combine
// (backend/cuda/{context,router,topk,grouping,combine}.hpp).
#include <cmath>

#include <factorllm/backend/cuda/combine.hpp>
#include <factorllm/backend/cuda/grouping.hpp>
#include <factorllm/backend/cuda/router.hpp>
#include <factorllm/backend/cuda/topk.hpp>

#include <factorllm/backend/cuda/detail/device_logic.hpp>

#include "common.cuh"

static_assert(factorllm::cuda::logic::kMaxTopK == factorllm::cuda::kMaxTopK, "one TopK bound for host and device");

namespace factorllm {
namespace cuda {

using detail::check_cublas;
using detail::check_cuda;
using detail::check_launch;
using detail::to_dim3;

// ---- Runtime ----

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clears the sticky "no driver" / "no device" error for later calls
    return 0;
  }
  return n;
}

int device_compute_capability() noexcept {
  if (device_count() == 0) return 0;
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return major * 10 + minor;
}

void synchronize(CUstream_st* stream) { check_cuda(cudaStreamSynchronize(stream), "cuda::synchronize"); }

namespace {

template <class T, int R>
void require_dense(TensorView<T, R> const& v, char const* op, char const* name) {
  if (!v.is_contiguous())
    throw shape_error(factorllm::detail::concat(op, ": argument '", name, "' must be dense row-major"));
}

// ---- Router logits ----

__global__ void add_bias_kernel(float* z, float const* bias, std::int64_t n_tokens, std::int64_t n_experts) {
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n_tokens * n_experts) z[i] += bias[i % n_experts];
}

// ---- TopK and combine weights: a thread per token, cuda::logic::select_token (SelectExperts<CpuScalar>'s math) ----

__global__ void select_experts_kernel(float const* logits, std::int64_t n_tokens, logic::SelectArgs a,
                                      std::int32_t* ids_out, float* weights_out) {
  std::int64_t const t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < n_tokens) logic::select_token(logits + t * a.n_experts, a, ids_out + t * a.top_k, weights_out + t * a.top_k);
}

// ---- Grouping: stable counting sort in three kernels (backend/cuda/grouping.hpp) ----

__global__ void group_count_kernel(std::int32_t const* ids, std::int64_t n_slots, int n_experts, std::int32_t* counts) {
  extern __shared__ std::int32_t hist[];
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  std::int64_t const s = static_cast<std::int64_t>(blockIdx.x) * kGroupChunk + threadIdx.x;
  if (s < n_slots) {
    int const e = ids[s];
    // Integer atomics: the count is the same whatever the order of the increments.
    if (e >= 0 && e < n_experts) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x)
    counts[static_cast<std::int64_t>(blockIdx.x) * n_experts + e] = hist[e];
}

__global__ void group_scan_kernel(std::int32_t const* counts, std::int64_t n_chunks, int n_experts,
                                  std::int64_t* bases, std::int64_t* offsets) {
  // Per expert: the chunk-relative start of each chunk's run, and the expert's total (in offsets[e + 1]).
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x)
    offsets[e + 1] = logic::group_scan_expert(counts, n_chunks, n_experts, e, bases);
  __syncthreads();
  if (threadIdx.x == 0) {  // exclusive prefix over experts, in expert order (n_experts is small)
    offsets[0] = 0;
    for (int e = 0; e < n_experts; ++e) offsets[e + 1] += offsets[e];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x)
    for (std::int64_t c = 0; c < n_chunks; ++c) bases[c * n_experts + e] += offsets[e];
}

__global__ void group_scatter_kernel(std::int32_t const* ids, std::int64_t n_slots, int n_experts,
                                     std::int64_t const* bases, std::int32_t* slots, std::int32_t* rows) {
  __shared__ std::int32_t chunk_ids[kGroupChunk];
  std::int64_t const first = static_cast<std::int64_t>(blockIdx.x) * kGroupChunk;
  std::int64_t const s = first + threadIdx.x;
  chunk_ids[threadIdx.x] = s < n_slots ? ids[s] : -1;
  __syncthreads();
  if (s >= n_slots) return;
  int const e = chunk_ids[threadIdx.x];
  if (e < 0 || e >= n_experts) return;
  // Stable: the rank among this chunk's earlier slots of the same expert.
  int const rank = logic::group_rank_in_chunk(chunk_ids, static_cast<int>(threadIdx.x));
  std::int64_t const pos = bases[static_cast<std::int64_t>(blockIdx.x) * n_experts + e] + rank;
  slots[pos] = static_cast<std::int32_t>(s);
  if (rows != nullptr) rows[s] = static_cast<std::int32_t>(pos);
}

// ---- Combine ----

template <class E>
__global__ void combine_kernel(float const* weights, E const* expert_out, std::int32_t const* rows, float* y,
                               std::int64_t n_tokens, int top_k, std::int64_t d_model) {
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_tokens * d_model) return;
  std::int64_t const t = i / d_model, o = i % d_model;
  float s = 0.f;
  for (int j = 0; j < top_k; ++j) {  // j in order, one thread per output: no atomics
    std::int64_t const slot = t * top_k + j;
    std::int64_t const r = rows != nullptr ? rows[slot] : slot;
    s = fmaf(weights[slot], detail::to_f(expert_out[r * d_model + o]), s);
  }
  y[i] = s;
}

template <class E>
void combine_impl(MatrixView<float const> weights, MatrixView<E const> expert_out, VectorView<std::int32_t const> rows,
                  MatrixView<float> y, CudaContext const& ctx) {
  char const* op = "combine (cuda)";
  std::ptrdiff_t const n_tokens = y.rows(), k = weights.cols(), d = y.cols();
  if (weights.rows() != n_tokens || expert_out.rows() != n_tokens * k || expert_out.cols() != d ||
      (rows.extent(0) != 0 && rows.extent(0) != n_tokens * k))
    throw shape_error(factorllm::detail::concat(op, ": expected weights [n_tokens, top_k], expert_out [n_tokens * top_k, ",
                                                "d_model], rows [n_tokens * top_k] or empty, y [n_tokens, d_model]; got y [",
                                                n_tokens, ", ", d, "], weights [", weights.rows(), ", ", k,
                                                "], expert_out [", expert_out.rows(), ", ", expert_out.cols(), "]"));
  require_dense(weights, op, "weights");
  require_dense(expert_out, op, "expert_out");
  require_dense(y, op, "y");
  if (n_tokens == 0 || d == 0) return;
  LaunchConfig const c = linear_launch(n_tokens * d, op);
  combine_kernel<<<to_dim3(c.grid), to_dim3(c.block), 0, ctx.stream>>>(
      weights.data(), reinterpret_cast<detail::device_t<E> const*>(expert_out.data()),
      rows.extent(0) != 0 ? rows.data() : nullptr, y.data(), n_tokens, static_cast<int>(k), d);
  check_launch(op);
}

}  // namespace

void router_logits(MatrixView<float const> x, RouterView<float> router, MatrixView<float> logits,
                   CudaContext const& ctx) {
  char const* op = "router_logits (cuda)";
  std::ptrdiff_t const n_tokens = x.rows(), d = x.cols(), n = router.n_experts();
  if (router.d_model() != d || router.bias.extent(0) != n || logits.rows() != n_tokens || logits.cols() != n)
    throw shape_error(factorllm::detail::concat(op, ": expected router weight [n_experts, d_model = ", d,
                                                "], bias [n_experts], logits [", n_tokens, ", n_experts]; got weight [",
                                                n, ", ", router.d_model(), "], bias [", router.bias.extent(0),
                                                "], logits [", logits.rows(), ", ", logits.cols(), "]"));
  require_dense(x, op, "x");
  require_dense(router.weight, op, "router.weight");
  require_dense(logits, op, "logits");
  if (n_tokens > INT_MAX || d > INT_MAX || n > INT_MAX) throw shape_error(factorllm::detail::concat(op, ": size exceeds 2^31"));
  if (n_tokens == 0 || n == 0) return;
  cublasHandle_t h = detail::bind_cublas(ctx, op);
  float const one = 1.f, zero = 0.f;
  // Column-major: z^T [n, T] = W [d, n]^T x^T [d, T].
  check_cublas(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(n_tokens),
                            static_cast<int>(d), &one, router.weight.data(), CUDA_R_32F, static_cast<int>(d), x.data(),
                            CUDA_R_32F, static_cast<int>(d), &zero, logits.data(), CUDA_R_32F, static_cast<int>(n),
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               op);
  LaunchConfig const c = linear_launch(n_tokens * n, op);
  add_bias_kernel<<<to_dim3(c.grid), to_dim3(c.block), 0, ctx.stream>>>(logits.data(), router.bias.data(), n_tokens, n);
  check_launch(op);
}

void select_experts(MatrixView<float const> logits, GatingParams const& gating, MatrixView<std::int32_t> ids,
                    MatrixView<float> weights, CudaContext const& ctx) {
  char const* op = "select_experts (cuda)";
  std::ptrdiff_t const n_tokens = logits.rows(), n = logits.cols(), k = gating.top_k;
  if (k < 1 || k > n || k > kMaxTopK)
    throw value_error(factorllm::detail::concat(op, ": top_k = ", k, " must be in [1, min(n_experts = ", n, ", ",
                                                kMaxTopK, ")]"));
  if (gating.bias_len != 0 && gating.bias_len != n)
    throw shape_error(factorllm::detail::concat(op, ": selection bias has ", gating.bias_len, " entries, expected ", n));
  if (ids.rows() != n_tokens || ids.cols() != k || weights.rows() != n_tokens || weights.cols() != k)
    throw shape_error(factorllm::detail::concat(op, ": ids and weights must be [n_tokens = ", n_tokens, ", top_k = ", k,
                                                "], got [", ids.rows(), ", ", ids.cols(), "] and [", weights.rows(),
                                                ", ", weights.cols(), "]"));
  require_dense(logits, op, "logits");
  require_dense(ids, op, "ids");
  require_dense(weights, op, "weights");
  if (n > INT_MAX) throw shape_error(factorllm::detail::concat(op, ": n_experts exceeds 2^31"));
  if (n_tokens == 0) return;
  logic::SelectArgs a{static_cast<int>(n),
               static_cast<int>(k),
               static_cast<int>(gating.mode),
               gating.sigmoid_renormalize,
               gating.has_selection_bias() ? gating.selection_bias : nullptr,
               gating.output_scale,
               GatingParams::code_ref_scale(n, k)};
  LaunchConfig const c = linear_launch(n_tokens, op);
  select_experts_kernel<<<to_dim3(c.grid), to_dim3(c.block), 0, ctx.stream>>>(logits.data(), n_tokens, a, ids.data(),
                                                                             weights.data());
  check_launch(op);
}

void group_by_expert(MatrixView<std::int32_t const> ids, std::ptrdiff_t n_experts, VectorView<std::int64_t> offsets,
                     VectorView<std::int32_t> slots, VectorView<std::int32_t> rows, WorkspaceSpan ws,
                     CudaContext const& ctx) {
  char const* op = "group_by_expert (cuda)";
  std::ptrdiff_t const n_slots = ids.rows() * ids.cols();
  GroupingPlan const plan = plan_grouping(n_slots, n_experts);
  if (offsets.extent(0) != n_experts + 1 || slots.extent(0) != n_slots ||
      (rows.extent(0) != 0 && rows.extent(0) != n_slots))
    throw shape_error(factorllm::detail::concat(op, ": expected offsets [n_experts + 1 = ", n_experts + 1,
                                                "], slots [n_tokens * top_k = ", n_slots, "], rows [", n_slots,
                                                "] or empty; got offsets [", offsets.extent(0), "], slots [",
                                                slots.extent(0), "], rows [", rows.extent(0), "]"));
  require_dense(ids, op, "ids");
  RegionPlan const layout = grouping_workspace(n_slots, n_experts);
  auto* counts = layout.at<std::int32_t>(ws, 0, op);
  auto* bases = layout.at<std::int64_t>(ws, 1, op);
  if (plan.n_chunks > 0) {
    group_count_kernel<<<to_dim3(plan.count.grid), to_dim3(plan.count.block), plan.count.shared_bytes, ctx.stream>>>(
        ids.data(), n_slots, static_cast<int>(n_experts), counts);
    check_launch(op);
  }
  group_scan_kernel<<<to_dim3(plan.scan.grid), to_dim3(plan.scan.block), 0, ctx.stream>>>(
      counts, plan.n_chunks, static_cast<int>(n_experts), bases, offsets.data());
  check_launch(op);
  if (plan.n_chunks > 0) {
    group_scatter_kernel<<<to_dim3(plan.scatter.grid), to_dim3(plan.scatter.block), 0, ctx.stream>>>(
        ids.data(), n_slots, static_cast<int>(n_experts), bases, slots.data(),
        rows.extent(0) != 0 ? rows.data() : nullptr);
    check_launch(op);
  }
}

void combine(MatrixView<float const> weights, MatrixView<float const> expert_out, VectorView<std::int32_t const> rows,
             MatrixView<float> y, CudaContext const& ctx) {
  combine_impl(weights, expert_out, rows, y, ctx);
}
void combine(MatrixView<float const> weights, MatrixView<bf16 const> expert_out, VectorView<std::int32_t const> rows,
             MatrixView<float> y, CudaContext const& ctx) {
  combine_impl(weights, expert_out, rows, y, ctx);
}
void combine(MatrixView<float const> weights, MatrixView<f16 const> expert_out, VectorView<std::int32_t const> rows,
             MatrixView<float> y, CudaContext const& ctx) {
  combine_impl(weights, expert_out, rows, y, ctx);
}

}  // namespace cuda
}  // namespace factorllm
