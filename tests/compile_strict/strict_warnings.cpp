// SPDX-License-Identifier: Apache-2.0
// Must compile without a single warning under -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wold-style-cast
// -Werror (tests/CMakeLists.txt: headers_compile_with_strict_warnings): instantiates the fronts an engine calls, on
// both CPU backends and every weight format, so the library's headers stay clean for engines built that strictly.
#include <factorllm/factorllm.hpp>

#include <vector>

namespace fl = factorllm;

template <class T, class Backend>
float run_layer(fl::ffn::DenseFfnView<T> const& dense, fl::ffn::ExpertPartition const& partition) {
  fl::moe::Gating gating;
  gating.mode = fl::moe::CombineMode::softmax_topk_renorm;
  gating.top_k = 2;
  fl::moe::MoeFfn<T, Backend> layer(fl::ffn::factorize(dense, partition),
                                    fl::moe::Router<fl::activation_t<T>>::random(dense.d_model(), 4, 1), gating);
  std::vector<fl::activation_t<T>> x(static_cast<std::size_t>(3 * dense.d_model()), 0.5f), y(x.size());
  fl::Workspace ws(layer.workspace_bytes(3));
  fl::moe::RoutingRecord<fl::activation_t<T>> record;
  layer.forward(fl::matrix_view(std::as_const(x), 3, dense.d_model()), fl::matrix_view(y, 3, dense.d_model()), ws, &record);
  return static_cast<float>(y[0]);
}

int main() {
  int const d = 8, d_ff = 16;
  std::vector<float> gate(d_ff * d, 0.1f), up(d_ff * d, 0.2f), down(d * d_ff, 0.3f);
  fl::ffn::DenseFfnView<float> dense{fl::matrix_view(std::as_const(gate), d_ff, d), fl::matrix_view(std::as_const(up), d_ff, d),
                                     fl::matrix_view(std::as_const(down), d, d_ff)};
  auto const partition = fl::ffn::ExpertPartition::contiguous(d_ff, 4);
  float sum = run_layer<float, fl::CpuSimd<>>(dense, partition) + run_layer<float, fl::CpuScalar>(dense, partition);
  auto const gb = fl::convert<fl::bf16>(dense.gate), ub = fl::convert<fl::bf16>(dense.up), db = fl::convert<fl::bf16>(dense.down);
  fl::ffn::DenseFfnView<fl::bf16> dense_bf16{gb.cview(), ub.cview(), db.cview()};
  sum += run_layer<fl::bf16, fl::CpuSimd<>>(dense_bf16, partition);
  auto const gh = fl::convert<fl::f16>(dense.gate), uh = fl::convert<fl::f16>(dense.up), dh = fl::convert<fl::f16>(dense.down);
  sum += run_layer<fl::f16, fl::CpuSimd<>>(fl::ffn::DenseFfnView<fl::f16>{gh.cview(), uh.cview(), dh.cview()}, partition);
  // Block-quantized experts (q8_0, q4_0) on both backends, converted from float ones (d_model, d_expert = 32).
  {
    int const dq = 32, dq_ff = 64;
    std::vector<float> gq(dq_ff * dq, 0.1f), uq(dq_ff * dq, 0.2f), wq(dq * dq_ff, 0.3f), xq(3 * dq, 0.25f), yq(xq.size());
    fl::ffn::DenseFfnView<float> dense_q{fl::matrix_view(std::as_const(gq), dq_ff, dq), fl::matrix_view(std::as_const(uq), dq_ff, dq),
                                         fl::matrix_view(std::as_const(wq), dq, dq_ff)};
    auto const experts_f = fl::ffn::factorize(dense_q, fl::ffn::ExpertPartition::contiguous(dq_ff, 2));
    fl::moe::Gating gq_gating;
    gq_gating.top_k = 1;
    fl::moe::MoeFfn<fl::q8_0, fl::CpuSimd<>> l8(fl::ffn::convert_format<fl::q8_0>(experts_f), fl::moe::Router<float>::random(dq, 2, 1),
                                                gq_gating);
    fl::moe::MoeFfn<fl::q4_0, fl::CpuScalar> l4(fl::ffn::convert_format<fl::q4_0>(experts_f), fl::moe::Router<float>::random(dq, 2, 1),
                                                gq_gating);
    l8.forward(fl::matrix_view(std::as_const(xq), 3, dq), fl::matrix_view(yq, 3, dq));
    sum += yq[0];
    l4.forward(fl::matrix_view(std::as_const(xq), 3, dq), fl::matrix_view(yq, 3, dq));
    sum += yq[0];
    auto const back = fl::ffn::convert_format<float>(l8.experts());
    sum += back.gate_tensor()[0];
    // Zero-neuron padding: d_ff 64 -> 96, 4 experts of 24 -> 32 (whole blocks), then quantized.
    auto const dense_96 = fl::ffn::pad_hidden(dense_q, 96);
    auto const padded = fl::ffn::pad_experts(fl::ffn::factorize(dense_96.view(), fl::ffn::ExpertPartition::contiguous(96, 4)),
                                             fl::kQuantBlock);
    sum += static_cast<float>(fl::ffn::convert_format<fl::q4_0>(padded).d_expert());
  }
  // Dense FFN, PAR loss and the training forward/backward.
  std::vector<float> x(3 * d, 0.25f), y(3 * d);
  fl::ffn::swiglu_forward(dense, fl::matrix_view(x, 3, d), fl::matrix_view(y, 3, d), fl::CpuSimd<>{});
  auto const experts = fl::ffn::factorize(dense, partition);
  auto const router = fl::moe::Router<float>::random(d, 4, 2);
  auto const par = fl::train::par_loss(fl::matrix_view(x, 3, d), dense, experts, router, 2);
  fl::moe::Gating gating;
  gating.top_k = 2;
  auto const params = fl::train::params_view(experts, router);
  fl::moe::RoutingRecord<float> record;
  fl::Workspace ws(fl::train::moe_backward_workspace_bytes<fl::CpuSimd<>>(params, 2, 3) +
                   fl::train::moe_forward_workspace_bytes<fl::CpuSimd<>>(params, 2, 3));
  fl::train::moe_forward<fl::CpuSimd<>>(params, gating, fl::matrix_view(std::as_const(x), 3, d), fl::matrix_view(y, 3, d),
                                        record, ws);
  fl::Tensor<float, 3> g_gate({4, d_ff / 4, d}), g_up({4, d_ff / 4, d}), g_down({4, d, d_ff / 4});
  fl::Matrix<float> g_x({3, d}), g_rw({4, d});
  fl::Vector<float> g_rb({4});
  fl::train::MoeGradsView<float> grads{g_x.view(), g_gate.view(), g_up.view(), g_down.view(), g_rw.view(), g_rb.view(), {}};
  fl::train::moe_backward<fl::CpuSimd<>>(params, gating, record, fl::matrix_view(std::as_const(x), 3, d),
                                         fl::matrix_view(std::as_const(y), 3, d), grads, ws);
  return sum + static_cast<float>(par.total_loss) + g_x(0, 0) > 1e30f ? 1 : 0;
}
