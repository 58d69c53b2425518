// SPDX-License-Identifier: Apache-2.0
// CUDA kernels of the TORCH_LIBRARY "factorllm" operators (issue 16 part 7; docs/python.md "CUDA tensors"): the ops
// on CUDA tensors run on the CUDA backend (factorllm::cuda, backend/README.md "CUDA") with the caller's current
// stream (c10::cuda::getCurrentCUDAStream()) and torch's cuBLAS handle for that stream
// (at::cuda::getCurrentCUDABlasHandle()). Device workspaces are torch::empty byte tensors on the tensors' device, so
// they come from torch's caching allocator (no cudaMalloc per call after the first; freed in stream order).
//
// Compiled only when FACTORLLM_ENABLE_CUDA is ON and the torch found is CUDA-enabled (python/torch_ops.cmake defines
// FLLM_TORCH_WITH_CUDA). Implemented on CUDA tensors: par_loss (float32 activations and weights) and moe_infer
// (inference forward, float32). balance_loss raises a clear error here (no device kernel yet); moe_forward /
// moe_backward have no CUDA kernel, so CUDA tensors reach the CPU kernels (registered catch-all in torch_ops.cpp),
// whose device check names the missing piece: a device-side MoeRouting (the record lives in host memory).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "torch_checks.hpp"

#include <factorllm/backend/cuda/moe_forward.hpp>
#include <factorllm/backend/cuda/par_loss.hpp>

namespace fl = factorllm;

namespace {

using factorllm_torch::shape_str;

/// The CPU ops' checks (torch_ops.cpp check_tensor), for CUDA tensors on `device`, float32 only: the CUDA backend
/// runs f32 activations and router (float64 stays a CPU-oracle dtype, for gradcheck).
void check_cuda_tensor(at::Tensor const& t, char const* fn, char const* arg, c10::Device device,
                       std::vector<std::int64_t> const& shape, char const* shape_names) {
  TORCH_CHECK_VALUE(t.defined(), fn, ": argument '", arg, "' is undefined (None)");
  TORCH_CHECK_VALUE(t.device() == device, fn, ": argument '", arg, "' must be on ", device,
                    " (the device of 'x'), got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, fn, ": argument '", arg,
                   "' must have dtype float32 on CUDA (the CUDA backend's activation type), got ",
                   c10::toString(t.scalar_type()));
  factorllm_torch::check_layout_shape(t, fn, arg, shape, shape_names);
}

c10::Device device_of_x(at::Tensor const& x, char const* fn) {
  TORCH_CHECK_VALUE(x.defined(), fn, ": argument 'x' is undefined (None)");
  TORCH_CHECK_VALUE(x.is_cuda(), fn, ": argument 'x' must be a CUDA tensor here, got device ", x.device());
  return x.device();
}

void check_params(char const* fn, c10::Device dev, at::Tensor const& x, at::Tensor const& rw, at::Tensor const& rb,
                  at::Tensor const& gate, at::Tensor const& up, at::Tensor const& down) {
  check_cuda_tensor(x, fn, "x", dev, {-1, -1}, "(n_tokens, d_model)");
  std::int64_t const d = x.size(1);
  check_cuda_tensor(gate, fn, "gate", dev, {-1, -1, d}, "(n_experts, d_expert, d_model)");
  std::int64_t const n = gate.size(0), m = gate.size(1);
  TORCH_CHECK_VALUE(n >= 1 && m >= 1, fn, ": argument 'gate' must have n_experts >= 1 and d_expert >= 1, got ",
                    shape_str(gate.sizes()));
  check_cuda_tensor(up, fn, "up", dev, {n, m, d}, "(n_experts, d_expert, d_model)");
  check_cuda_tensor(down, fn, "down", dev, {n, d, m}, "(n_experts, d_model, d_expert)");
  check_cuda_tensor(rw, fn, "router_weight", dev, {n, d}, "(n_experts, d_model)");
  check_cuda_tensor(rb, fn, "router_bias", dev, {n}, "(n_experts)");
}

fl::MatrixView<float const> mview(at::Tensor const& t) { return fl::matrix_view(t.data_ptr<float>(), t.size(0), t.size(1)); }
fl::MatrixView<float> mview_mut(at::Tensor& t) { return fl::matrix_view(t.data_ptr<float>(), t.size(0), t.size(1)); }
fl::VectorView<float> vview_mut(at::Tensor& t) { return fl::vector_view(t.data_ptr<float>(), t.size(0)); }
fl::TensorView<float const, 3> tview3(at::Tensor const& t) {
  return fl::TensorView<float const, 3>(t.data_ptr<float>(), {t.size(0), t.size(1), t.size(2)});
}

using factorllm_torch::translate_errors;

/// A caller-owned workspace of `bytes` from torch's caching allocator, on `opts`' device (device or pinned host).
struct TorchWorkspace {
  at::Tensor buf;
  fl::WorkspaceSpan span;
  TorchWorkspace(std::size_t bytes, at::TensorOptions opts, fl::MemorySpace space)
      : buf(torch::empty({static_cast<std::int64_t>(bytes == 0 ? 1 : bytes)}, opts.dtype(torch::kUInt8))),
        span{reinterpret_cast<std::byte*>(buf.data_ptr<std::uint8_t>()), bytes, space} {}
};

/// The caller's stream and torch's cuBLAS handle for it (torch sets the handle's stream; the op sets it again).
fl::cuda::CudaContext context_for(fl::WorkspaceSpan host) {
  fl::cuda::CudaContext ctx;
  ctx.stream = c10::cuda::getCurrentCUDAStream().stream();
  ctx.cublas = at::cuda::getCurrentCUDABlasHandle();
  ctx.host_scratch = host;
  return ctx;
}

/// par_loss on CUDA tensors: same schema and return list as the CPU op (torch_ops.cpp par_loss).
std::vector<at::Tensor> par_loss_cuda(at::Tensor x, at::Tensor dense_gate, at::Tensor dense_up, at::Tensor dense_down,
                                      at::Tensor gate, at::Tensor up, at::Tensor down, at::Tensor router_weight,
                                      at::Tensor router_bias, std::int64_t top_k, double clip) {
  char const* fn = "par_loss";
  auto const dev = device_of_x(x, fn);
  c10::cuda::CUDAGuard guard(dev);
  check_params(fn, dev, x, router_weight, router_bias, gate, up, down);
  std::int64_t const t = x.size(0), n = gate.size(0), m = gate.size(1), d = x.size(1);
  TORCH_CHECK_VALUE(t >= 1, fn, ": argument 'x' has no tokens; the loss is a mean over tokens");
  check_cuda_tensor(dense_gate, fn, "dense_gate", dev, {n * m, d}, "(d_ff = n_experts * d_expert, d_model)");
  check_cuda_tensor(dense_up, fn, "dense_up", dev, {n * m, d}, "(d_ff, d_model)");
  check_cuda_tensor(dense_down, fn, "dense_down", dev, {d, n * m}, "(d_model, d_ff)");
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= n, fn, ": top_k = ", top_k, " must be in [1, n_experts = ", n, "]");
  auto const f32 = x.options();
  auto const i32 = x.options().dtype(torch::kInt32);
  std::vector<at::Tensor> out{torch::empty({n, d}, f32), torch::empty({n}, f32), torch::empty({n, d}, f32),
                              torch::empty({n}, f32),    torch::empty({n, d}, f32), torch::empty({n}, f32),
                              torch::empty({t, n}, f32), torch::empty({t, top_k}, i32), torch::empty({t, top_k}, i32)};
  fl::ParLossOutView<float> ov{mview_mut(out[0]), vview_mut(out[1]), mview_mut(out[2]), vview_mut(out[3]),
                               mview_mut(out[4]), vview_mut(out[5]), mview_mut(out[6]),
                               fl::matrix_view(out[7].data_ptr<std::int32_t>(), t, top_k),
                               fl::matrix_view(out[8].data_ptr<std::int32_t>(), t, top_k)};
  fl::ParLossConfig cfg;
  cfg.clip = clip;
  fl::ParLossValues const v = translate_errors([&] {
    TorchWorkspace ws(fl::cuda::par_loss_workspace<float>(t, d, n * m, n, m).bytes(), f32, fl::MemorySpace::device);
    TorchWorkspace host(fl::cuda::par_loss_host_bytes(), torch::TensorOptions().device(torch::kCPU),
                        fl::MemorySpace::host);
    fl::ExpertWeightsView<float> experts{tview3(gate), tview3(up), tview3(down)};
    fl::RouterView<float> router{mview(router_weight), fl::vector_view(router_bias.data_ptr<float>(), n)};
    // Returns after its one host synchronization (the four sums): every output is then ready on the stream.
    return fl::cuda::par_loss(mview(x), mview(dense_gate), mview(dense_up), mview(dense_down), experts, router, top_k,
                              cfg, ov, ws.span, context_for(host.span));
  });
  // The scalars as 0-dim tensors on x's device, like every other output (the CPU op returns them on the CPU).
  auto scalar = [&](double s) { return torch::tensor(s, torch::TensorOptions().dtype(torch::kFloat32)).to(dev); };
  return {scalar(v.par_loss), scalar(v.balance_loss), scalar(v.label_accuracy), out[2], out[3], out[4], out[5], out[7]};
}

/// y = MoE(x) on CUDA tensors, inference only (no routing record, no autograd): the CUDA backend's fused forward.
at::Tensor moe_infer_cuda(at::Tensor x, at::Tensor router_weight, at::Tensor router_bias, at::Tensor gate, at::Tensor up,
                          at::Tensor down, std::string mode, std::int64_t top_k, double output_scale,
                          bool sigmoid_renormalize, c10::optional<at::Tensor> selection_bias) {
  char const* fn = "moe_infer";
  auto const dev = device_of_x(x, fn);
  c10::cuda::CUDAGuard guard(dev);
  check_params(fn, dev, x, router_weight, router_bias, gate, up, down);
  std::int64_t const t = x.size(0), n = gate.size(0), m = gate.size(1), d = x.size(1);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= n, fn, ": top_k = ", top_k, " must be in [1, n_experts = ", n, "]");
  fl::GatingParams g;
  g.mode = translate_errors([&] { return fl::combine_mode_from_string(mode); });
  g.top_k = top_k;
  g.output_scale = static_cast<float>(output_scale);
  g.sigmoid_renormalize = sigmoid_renormalize;
  if (selection_bias.has_value() && selection_bias->defined()) {
    check_cuda_tensor(*selection_bias, fn, "selection_bias", dev, {n}, "(n_experts)");
    g.selection_bias = selection_bias->data_ptr<float>();
    g.bias_len = n;
  }
  auto y = torch::empty_like(x);
  if (t == 0) return y;
  translate_errors([&] {
    TorchWorkspace ws(fl::cuda::moe_forward_workspace<float>(t, d, n, m, top_k).bytes(), x.options(),
                      fl::MemorySpace::device);
    TorchWorkspace host(fl::cuda::expert_swiglu_host_workspace(n).bytes(), torch::TensorOptions().device(torch::kCPU),
                        fl::MemorySpace::host);
    fl::ExpertWeightsView<float> experts{tview3(gate), tview3(up), tview3(down)};
    fl::RouterView<float> router{mview(router_weight), fl::vector_view(router_bias.data_ptr<float>(), n)};
    fl::cuda::moe_forward(experts, router, g, mview(x), mview_mut(y), ws.span, context_for(host.span));
    return 0;
  });
  return y;
}

/// The ops not (yet) on the CUDA backend: a clear error naming the missing piece instead of torch's
/// "could not run ... with arguments from the 'CUDA' backend".
[[noreturn]] void not_on_cuda(char const* fn, char const* missing) {
  // A direct throw (not TORCH_CHECK_NOT_IMPLEMENTED, whose throw sits behind a condition) so [[noreturn]] holds.
  C10_THROW_ERROR(NotImplementedError, c10::str(fn, " on CUDA tensors is not implemented: ", missing,
                                                " (docs/python.md \"CUDA tensors\"); move the tensors to the CPU (.cpu())"));
}

std::vector<at::Tensor> balance_loss_cuda(at::Tensor, std::int64_t) {
  not_on_cuda("balance_loss", "no device balance_loss kernel (par_loss on CUDA returns the balance loss and its router "
                              "gradients)");
}

}  // namespace

TORCH_LIBRARY_IMPL(factorllm, CUDA, m) {
  m.impl("par_loss", &par_loss_cuda);
  m.impl("moe_infer", &moe_infer_cuda);
  m.impl("balance_loss", &balance_loss_cuda);
}
