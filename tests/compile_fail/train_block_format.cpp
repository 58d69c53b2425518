// SPDX-License-Identifier: Apache-2.0
// Must NOT compile: the training forward and backward take plain weight formats only, and block-quantized experts
// (q8_0) stop the build with MoeParamsView's message. The test that builds this file (tests/CMakeLists.txt:
// training_on_block_format_fails_to_compile) passes only when the compiler prints that message.
#include <factorllm/core/quant.hpp>
#include <factorllm/train/moe_backward.hpp>

int main() {
  using namespace factorllm;
  Tensor<q8_0, 3> gate({1, 32, 1}), up({1, 32, 1}), down({1, 32, 1});
  ffn::ExpertWeights<q8_0> experts(std::move(gate), std::move(up), std::move(down), ffn::ExpertPartition::contiguous(32, 1));
  moe::Router<float> router = moe::Router<float>::random(32, 1, 1);
  auto const params = train::params_view(experts, router);
  return static_cast<int>(params.n_experts());
}
