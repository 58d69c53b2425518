// SPDX-License-Identifier: Apache-2.0
// Compiled by the host compiler alone, with no CUDA include path and the strict warnings of
// tests/compile_strict (ctest cuda_headers_are_plain_cxx): the backend/cuda headers hold no kernel and no CUDA
// header, so an engine's plain C++ sources can include them. Instantiates every host-side template they define.
#include <factorllm/backend/cuda/cuda.hpp>
#include <factorllm/backend/cuda/detail/device_logic.hpp>

#include <cstdint>
#include <vector>

namespace fl = factorllm;

/// README "CUDA backend": the usage lines, spelled as there (compiled here, never run: this test stops at syntax).
void readme_usage(fl::ExpertWeightsView<fl::bf16> const& experts, fl::RouterView<float> router,
                  fl::GatingParams const& gating, fl::MatrixView<float const> x, fl::MatrixView<float> y,
                  CUstream_st* stream, cublasContext* cublas_handle, std::byte* host_scratch, std::size_t host_bytes,
                  void* dev_ws, std::ptrdiff_t max_tokens) {
  std::ptrdiff_t const d_model = experts.d_model(), n_experts = experts.n_experts(), d_expert = experts.d_expert(),
                       top_k = gating.top_k;
  namespace fc = factorllm::cuda;
  auto plan = fc::moe_forward_workspace<factorllm::bf16>(max_tokens, d_model, n_experts, d_expert, top_k);
  fc::CudaContext ctx{stream, cublas_handle, factorllm::WorkspaceSpan{host_scratch, host_bytes, factorllm::MemorySpace::host}};
  fc::moe_forward(experts, router, gating, x, y,
                  factorllm::Workspace::wrap(dev_ws, plan.bytes(), factorllm::MemorySpace::device).span(), ctx);
}

int main() {
  std::size_t total = 0;
  total += fl::cuda::expert_swiglu_workspace<float>(4, 64, 8, 32, 2).bytes();
  total += fl::cuda::expert_swiglu_workspace<fl::bf16>(4, 64, 8, 32, 2).bytes();
  total += fl::cuda::moe_forward_workspace<fl::f16>(4, 64, 8, 32, 2).bytes();
  total += fl::cuda::par_loss_workspace<fl::bf16>(4, 64, 96, 8, 12).bytes();
  total += fl::cuda::swiglu_workspace<float>(4, 64, 96).bytes();
  total += fl::cuda::grouping_workspace(8, 8).bytes();
  total += fl::cuda::expert_swiglu_host_workspace(8).bytes();
  total += fl::cuda::training_host_bytes(8);
  total += fl::kernel::ExpertSwiglu<fl::Cuda<90>>::workspace<fl::f16>(4, 64, 8, 32, 2).bytes();
  total += fl::kernel::Swiglu<fl::Cuda<80>>::workspace<fl::bf16>(4, 64, 96).bytes();
  std::vector<std::int64_t> offsets{0, 3, 3, 8};
  std::vector<fl::cuda::GemmProblem> problems(3);
  total += static_cast<std::size_t>(fl::cuda::expert_gemm_problems(offsets.data(), 3, 64, 32, 64 * 32,
                                                                   fl::cuda::Projection::down, problems.data()));
  total += fl::cuda::plan_grouping(8, 3).count.grid.x + fl::cuda::decode_launch(32, 3).grid.x;
  total += fl::cuda::linear_launch(1000, "check").grid.x;
  float z[4] = {0.5f, -1.f, 2.f, 0.f};
  std::int32_t ids[2];
  float w[2];
  fl::cuda::logic::select_token(z, fl::cuda::logic::SelectArgs{4, 2, 4, true, nullptr, 1.f, 2.0}, ids, w);
  double dw[2] = {1.0, -1.0}, dz[4];
  fl::cuda::logic::combine_weights_vjp(z, ids, dw, fl::cuda::logic::VjpArgs{4, 2, 4, true, 1.0}, dz);
  std::int32_t counts[4] = {1, 2, 0, 1};
  std::int64_t bases[4];
  total += static_cast<std::size_t>(fl::cuda::logic::group_scan_expert(counts, 2, 2, 1, bases));
  total += static_cast<std::size_t>(fl::cuda::logic::group_rank_in_chunk(ids, 1));
  double zd[4] = {0.5, -1.0, 2.0, 0.0}, p[4], mse[4] = {1.0, 2.0, 0.5, 3.0}, dz_par[4], dz_bal[4], sums[3], grad[2];
  fl::cuda::logic::par_token(zd, p, mse, fl::cuda::logic::ParTokenArgs{4, 2, 0.3, 0.1, 1e-7, 1.0 - 1e-7, 1.0, 0.25},
                             dz_par, dz_bal, ids, ids, sums);
  fl::cuda::logic::router_grad_output(z, dz_par, dz_bal, 1, 4, 1, 0, 0, grad);
  float h, da, db;
  grad[1] += fl::cuda::logic::slot_backward_element(0.5, -1.0, 2.0, 0.3, &h, &da, &db);
  fl::cuda::BackwardGemm gemms[8];
  total += static_cast<std::size_t>(fl::cuda::expert_backward_gemms(1, 2, 3, 4, 64, 32, true, gemms));
  return total > 0 && dz[0] == dz[0] && grad[0] == grad[0] ? 0 : 1;
}
