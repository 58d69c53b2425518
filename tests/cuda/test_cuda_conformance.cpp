// SPDX-License-Identifier: Apache-2.0
// Conformance of the CUDA backend: every CUDA op runs on the same inputs as its CpuScalar oracle and is compared with
// the tolerance written in backend/README.md (ids, grouping: bitwise). Needs a CUDA device: without one it prints
// "skipped: no CUDA device" and exits 77, which ctest reports as Skipped (tests/cuda/CMakeLists.txt), never a pass.
// Plain C++ (cuda_runtime.h and cublas_v2.h for memory, streams and the handle); the kernels are in factorllm::cuda.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <factorllm/backend/cuda/cuda.hpp>
#include <factorllm/backend/scalar/combine.hpp>
#include <factorllm/backend/scalar/grouping.hpp>
#include <factorllm/backend/scalar/moe_backward.hpp>
#include <factorllm/backend/scalar/par_loss.hpp>
#include <factorllm/backend/scalar/router.hpp>
#include <factorllm/backend/scalar/swiglu.hpp>
#include <factorllm/backend/scalar/topk.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

using namespace factorllm;
using factorllm::cuda::CudaContext;
using factorllm::cuda::ExpertPath;

namespace {

void cuda_ok(cudaError_t err) {
  if (err != cudaSuccess) FAIL("CUDA error: " << cudaGetErrorString(err));
}

/// Device memory of n elements of T (cudaMalloc, freed on destruction).
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    if (n > 0) cuda_ok(cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T)));
  }
  explicit DeviceBuffer(std::vector<T> const& host) : DeviceBuffer(host.size()) { upload(host); }
  DeviceBuffer(DeviceBuffer const&) = delete;
  DeviceBuffer& operator=(DeviceBuffer const&) = delete;
  ~DeviceBuffer() { cudaFree(p_); }
  T* get() const noexcept { return p_; }
  std::size_t size() const noexcept { return n_; }
  void upload(std::vector<T> const& host) {
    REQUIRE(host.size() == n_);
    if (n_ > 0) cuda_ok(cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    if (n_ > 0) cuda_ok(cudaMemcpy(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* p_ = nullptr;
  std::size_t n_;
};

/// A stream, a cuBLAS handle and host scratch: what the ops receive.
struct Device {
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  std::vector<std::byte> host_storage;
  Device() {
    cuda_ok(cudaStreamCreate(&stream));
    REQUIRE(cublasCreate(&cublas) == CUBLAS_STATUS_SUCCESS);
  }
  ~Device() {
    cublasDestroy(cublas);
    cudaStreamDestroy(stream);
  }
  CudaContext context(std::size_t host_bytes) {
    host_storage.assign(host_bytes + 64, std::byte{0});
    auto addr = reinterpret_cast<std::uintptr_t>(host_storage.data());
    auto* aligned = host_storage.data() + ((64 - addr % 64) % 64);
    return CudaContext{stream, cublas, WorkspaceSpan{aligned, host_bytes, MemorySpace::host}};
  }
  void sync() { cuda_ok(cudaStreamSynchronize(stream)); }
};

/// Device workspace of `bytes` (cudaMalloc is 256-byte aligned).
struct DeviceWorkspace {
  DeviceBuffer<std::byte> buffer;
  explicit DeviceWorkspace(std::size_t bytes) : buffer(bytes > 0 ? bytes : 64) {}
  WorkspaceSpan span() const { return WorkspaceSpan{buffer.get(), buffer.size(), MemorySpace::device}; }
};

std::vector<float> random_floats(std::size_t n, std::mt19937& rng, float scale = 1.f) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

template <class W>
std::vector<W> convert(std::vector<float> const& v) {
  std::vector<W> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = dtype_traits<W>::from_float(v[i]);
  return out;
}

/// ||a - b|| / ||b|| over doubles.
template <class A, class B>
double rel_l2(std::vector<A> const& a, std::vector<B> const& b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    double const x = to_double(a[i]), y = to_double(b[i]);
    num += (x - y) * (x - y);
    den += y * y;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

/// The expert tolerance of backend/README.md for a weight format.
template <class W>
double expert_tolerance() {
  if constexpr (std::is_same_v<W, float>) return 2e-5;
  if constexpr (std::is_same_v<W, f16>) return 3e-3;
  return 2e-2;
}

/// One MoE layer's host data (float master copies).
struct Layer {
  std::ptrdiff_t d_model, d_expert, n_experts;
  std::vector<float> gate, up, down, router_w, router_b;
  Layer(std::ptrdiff_t d, std::ptrdiff_t de, std::ptrdiff_t n, std::mt19937& rng)
      : d_model(d), d_expert(de), n_experts(n) {
    float const s_in = 1.f / std::sqrt(static_cast<float>(d)), s_hid = 1.f / std::sqrt(static_cast<float>(de));
    gate = random_floats(static_cast<std::size_t>(n * de * d), rng, s_in);
    up = random_floats(static_cast<std::size_t>(n * de * d), rng, s_in);
    down = random_floats(static_cast<std::size_t>(n * d * de), rng, s_hid);
    router_w = random_floats(static_cast<std::size_t>(n * d), rng, s_in);
    router_b = random_floats(static_cast<std::size_t>(n), rng, 0.1f);
  }
  template <class W>
  ExpertWeightsView<W> view(W const* g, W const* u, W const* dn) const {
    return ExpertWeightsView<W>{TensorView<W const, 3>(g, {n_experts, d_expert, d_model}),
                                TensorView<W const, 3>(u, {n_experts, d_expert, d_model}),
                                TensorView<W const, 3>(dn, {n_experts, d_model, d_expert})};
  }
};

/// CpuScalar's routing of logits: ids, weights, offsets, slots, rows.
struct HostRouting {
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
  std::vector<std::int64_t> offsets;
  std::vector<std::int32_t> slots, rows;
};
HostRouting cpu_route(std::vector<float> const& logits, std::ptrdiff_t T, std::ptrdiff_t n, GatingParams const& g) {
  HostRouting r;
  std::ptrdiff_t const k = g.top_k;
  r.ids.resize(static_cast<std::size_t>(T * k));
  r.weights.resize(static_cast<std::size_t>(T * k));
  r.offsets.resize(static_cast<std::size_t>(n + 1));
  r.slots.resize(static_cast<std::size_t>(T * k));
  r.rows.resize(static_cast<std::size_t>(T * k));
  kernel::SelectExperts<CpuScalar>::run(matrix_view<float const>(logits.data(), T, n), g,
                                        matrix_view(r.ids.data(), T, k), matrix_view(r.weights.data(), T, k));
  kernel::GroupByExpert<CpuScalar>::run(matrix_view<std::int32_t const>(r.ids.data(), T, k), n,
                                        VectorView<std::int64_t>(r.offsets.data(), {n + 1}),
                                        VectorView<std::int32_t>(r.slots.data(), {T * k}),
                                        VectorView<std::int32_t>(r.rows.data(), {T * k}));
  return r;
}

/// CpuScalar's expert outputs (double) of routing r: one row per grouped slot, [T * top_k, d_model].
template <class W>
std::vector<double> cpu_expert_outputs(ExpertWeightsView<W> const& experts, std::vector<float> const& x,
                                       HostRouting const& r, std::ptrdiff_t T, std::ptrdiff_t k) {
  std::ptrdiff_t const d = experts.d_model(), n = experts.n_experts(), de = experts.d_expert();
  std::vector<double> out(static_cast<std::size_t>(T * k * d));
  Workspace cpu_ws(kernel::ExpertSwiglu<CpuScalar>::workspace<W, float>(T * k, d, n, de, 1).bytes());
  kernel::ExpertSwiglu<CpuScalar>::run<W, float>(experts, matrix_view<float const>(x.data(), T, d), k,
                                                 VectorView<std::int64_t const>(r.offsets.data(), {n + 1}),
                                                 VectorView<std::int32_t const>(r.slots.data(), {T * k}),
                                                 matrix_view(out.data(), T * k, d), cpu_ws.span());
  return out;
}

}  // namespace

TEST_CASE("cuda conformance: router logits vs CpuScalar (relative L2 <= 2e-5)", "[cuda]") {
  std::mt19937 rng(1);
  Device dev;
  std::ptrdiff_t const T = 77, d = 96, n = 8;
  Layer layer(d, 16, n, rng);
  auto x = random_floats(static_cast<std::size_t>(T * d), rng);
  std::vector<float> expect(static_cast<std::size_t>(T * n));
  kernel::RouterLogits<CpuScalar>::run(matrix_view<float const>(x.data(), T, d),
                                       RouterView<float>{matrix_view<float const>(layer.router_w.data(), n, d),
                                                         VectorView<float const>(layer.router_b.data(), {n})},
                                       matrix_view(expect.data(), T, n));
  DeviceBuffer<float> dx(x), dw(layer.router_w), db(layer.router_b), dz(static_cast<std::size_t>(T * n));
  kernel::RouterLogits<Cuda<80>>::run(matrix_view<float const>(dx.get(), T, d),
                                      RouterView<float>{matrix_view<float const>(dw.get(), n, d),
                                                        VectorView<float const>(db.get(), {n})},
                                      matrix_view(dz.get(), T, n), dev.context(0));
  dev.sync();
  CHECK(rel_l2(dz.download(), expect) <= 2e-5);
}

TEST_CASE("cuda conformance: TopK ids bitwise and combine weights (1e-6) in every mode, bias, scale, ties, NaN", "[cuda]") {
  std::mt19937 rng(2);
  Device dev;
  std::ptrdiff_t const T = 300, n = 16;
  auto logits = random_floats(static_cast<std::size_t>(T * n), rng, 2.f);
  for (std::ptrdiff_t t = 0; t < 100; ++t)  // ties: logits on a coarse grid
    for (std::ptrdiff_t e = 0; e < n; ++e) logits[static_cast<std::size_t>(t * n + e)] = std::round(logits[static_cast<std::size_t>(t * n + e)]);
  logits[static_cast<std::size_t>(150 * n + 3)] = std::nanf("");  // a NaN row
  for (std::ptrdiff_t e = 0; e < n; ++e) logits[static_cast<std::size_t>(160 * n + e)] = -800.f + static_cast<float>(e);
  auto bias = random_floats(static_cast<std::size_t>(n), rng, 1.f);
  bias[5] = 900.f;  // selection far from the largest logit: the renormalized modes' underflow branch
  DeviceBuffer<float> dz(logits), dbias(bias);
  for (CombineMode mode : {CombineMode::code_ref, CombineMode::softmax_topk, CombineMode::softmax_topk_renorm,
                           CombineMode::topk_softmax, CombineMode::sigmoid_topk})
    for (std::ptrdiff_t k : {1, 2, 4})
      for (bool with_bias : {false, true})
        for (bool renorm : {false, true}) {
          CAPTURE(to_string(mode), k, with_bias, renorm);
          GatingParams g;
          g.mode = mode;
          g.top_k = k;
          g.sigmoid_renormalize = renorm;
          g.output_scale = 1.5f;
          g.selection_bias = with_bias ? bias.data() : nullptr;
          g.bias_len = with_bias ? n : 0;
          HostRouting const expect = cpu_route(logits, T, n, g);
          GatingParams gd = g;
          gd.selection_bias = with_bias ? dbias.get() : nullptr;  // the kernel reads the bias on the device
          DeviceBuffer<std::int32_t> ids(static_cast<std::size_t>(T * k));
          DeviceBuffer<float> w(static_cast<std::size_t>(T * k));
          kernel::SelectExperts<Cuda<80>>::run(matrix_view<float const>(dz.get(), T, n), gd, matrix_view(ids.get(), T, k),
                                               matrix_view(w.get(), T, k), dev.context(0));
          dev.sync();
          CHECK(ids.download() == expect.ids);
          auto const got = w.download();
          std::size_t bad = 0;
          for (std::size_t i = 0; i < got.size(); ++i) {
            float const a = got[i], b = expect.weights[i];
            bool const ok = (std::isnan(a) && std::isnan(b)) || std::fabs(a - b) <= 1e-6 * std::fabs(b) + 1e-30;
            bad += ok ? 0 : 1;
          }
          CHECK(bad == 0);
        }
}

TEST_CASE("cuda conformance: grouping by expert is bitwise CpuScalar's (offsets, slots, rows)", "[cuda]") {
  std::mt19937 rng(3);
  Device dev;
  for (std::ptrdiff_t T : {1, 7, 300, 2000})
    for (std::ptrdiff_t n : {4, 64}) {
      std::ptrdiff_t const k = 2;
      CAPTURE(T, n);
      std::vector<std::int32_t> ids(static_cast<std::size_t>(T * k));
      for (std::ptrdiff_t t = 0; t < T; ++t) {  // two distinct experts per token, skewed toward low ids
        auto const a = static_cast<std::int32_t>(rng() % static_cast<unsigned>(n < 6 ? n : 6));
        auto b = static_cast<std::int32_t>(rng() % static_cast<unsigned>(n));
        if (b == a) b = (a + 1) % static_cast<std::int32_t>(n);
        ids[static_cast<std::size_t>(t * k)] = a;
        ids[static_cast<std::size_t>(t * k + 1)] = b;
      }
      std::vector<std::int64_t> offsets(static_cast<std::size_t>(n + 1));
      std::vector<std::int32_t> slots(static_cast<std::size_t>(T * k)), rows(slots.size());
      kernel::GroupByExpert<CpuScalar>::run(matrix_view<std::int32_t const>(ids.data(), T, k), n,
                                            VectorView<std::int64_t>(offsets.data(), {n + 1}),
                                            VectorView<std::int32_t>(slots.data(), {T * k}),
                                            VectorView<std::int32_t>(rows.data(), {T * k}));
      DeviceBuffer<std::int32_t> dids(ids), dslots(slots.size()), drows(rows.size());
      DeviceBuffer<std::int64_t> doffsets(offsets.size());
      DeviceWorkspace ws(kernel::GroupByExpert<Cuda<80>>::workspace(T * k, n).bytes());
      kernel::GroupByExpert<Cuda<80>>::run(matrix_view<std::int32_t const>(dids.get(), T, k), n,
                                           VectorView<std::int64_t>(doffsets.get(), {n + 1}),
                                           VectorView<std::int32_t>(dslots.get(), {T * k}),
                                           VectorView<std::int32_t>(drows.get(), {T * k}), ws.span(), dev.context(0));
      dev.sync();
      CHECK(doffsets.download() == offsets);
      CHECK(dslots.download() == slots);
      CHECK(drows.download() == rows);
    }
}

TEMPLATE_TEST_CASE("cuda conformance: experts on their grouped rows vs CpuScalar (decode, grouped, per_expert)", "[cuda]",
                   float, bf16, f16) {
  using W = TestType;
  using E = cuda::expert_out_t<W>;
  std::mt19937 rng(4);
  Device dev;
  std::ptrdiff_t const d = 128, de = 64, n = 8, k = 2;
  Layer layer(d, de, n, rng);
  auto const gw = convert<W>(layer.gate), uw = convert<W>(layer.up), dw = convert<W>(layer.down);
  DeviceBuffer<W> dgate(gw), dup(uw), ddown(dw);
  for (auto [T, path] : {std::pair{std::ptrdiff_t{5}, ExpertPath::decode}, std::pair{std::ptrdiff_t{1}, ExpertPath::decode},
                         std::pair{std::ptrdiff_t{70}, ExpertPath::grouped},
                         std::pair{std::ptrdiff_t{70}, ExpertPath::per_expert},
                         std::pair{std::ptrdiff_t{3}, ExpertPath::grouped}}) {
    CAPTURE(T, cuda::to_string(path));
    auto x = random_floats(static_cast<std::size_t>(T * d), rng);
    auto logits = random_floats(static_cast<std::size_t>(T * n), rng);
    GatingParams g;
    g.mode = CombineMode::softmax_topk_renorm;
    g.top_k = k;
    HostRouting const r = cpu_route(logits, T, n, g);
    // Oracle on the same (format-rounded) weights.
    std::vector<double> const expect = cpu_expert_outputs(layer.view<W>(gw.data(), uw.data(), dw.data()), x, r, T, k);
    DeviceBuffer<float> dx(x);
    DeviceBuffer<std::int64_t> doff(r.offsets);
    DeviceBuffer<std::int32_t> dslots(r.slots);
    DeviceBuffer<E> out(static_cast<std::size_t>(T * k * d));
    DeviceWorkspace ws(kernel::ExpertSwiglu<Cuda<80>>::workspace<W>(T, d, n, de, k).bytes());
    CudaContext ctx = dev.context(cuda::expert_swiglu_host_workspace(n).bytes());
    kernel::ExpertSwiglu<Cuda<80>>::run<W>(layer.view<W>(dgate.get(), dup.get(), ddown.get()),
                                           matrix_view<float const>(dx.get(), T, d), k,
                                           VectorView<std::int64_t const>(doff.get(), {n + 1}),
                                           VectorView<std::int32_t const>(dslots.get(), {T * k}),
                                           matrix_view(out.get(), T * k, d), ws.span(), ctx, path);
    dev.sync();
    auto const got = out.download();
    CHECK(rel_l2(got, expect) <= expert_tolerance<W>());
    // Run to run: the same bits.
    kernel::ExpertSwiglu<Cuda<80>>::run<W>(layer.view<W>(dgate.get(), dup.get(), ddown.get()),
                                           matrix_view<float const>(dx.get(), T, d), k,
                                           VectorView<std::int64_t const>(doff.get(), {n + 1}),
                                           VectorView<std::int32_t const>(dslots.get(), {T * k}),
                                           matrix_view(out.get(), T * k, d), ws.span(), ctx, path);
    dev.sync();
    auto const again = out.download();
    CHECK(std::memcmp(again.data(), got.data(), got.size() * sizeof(E)) == 0);
  }
}

TEMPLATE_TEST_CASE("cuda conformance: combine vs CpuScalar (relative L2 <= 2e-5)", "[cuda]", float, bf16, f16) {
  using E = TestType;
  std::mt19937 rng(5);
  Device dev;
  std::ptrdiff_t const T = 50, k = 3, d = 40, n = 6;
  auto const eo = convert<E>(random_floats(static_cast<std::size_t>(T * k * d), rng));
  auto const w = random_floats(static_cast<std::size_t>(T * k), rng);
  std::vector<std::int32_t> rows(static_cast<std::size_t>(T * k));
  for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<std::int32_t>((i * 7) % rows.size());  // a permutation
  (void)n;
  for (bool grouped : {false, true}) {
    std::vector<float> expect(static_cast<std::size_t>(T * d));
    VectorView<std::int32_t const> host_rows = grouped ? VectorView<std::int32_t const>(rows.data(), {T * k})
                                                       : VectorView<std::int32_t const>(rows.data(), {0});
    kernel::Combine<CpuScalar>::run(matrix_view<float const>(w.data(), T, k), matrix_view<E const>(eo.data(), T * k, d),
                                    host_rows, matrix_view(expect.data(), T, d));
    DeviceBuffer<E> deo(eo);
    DeviceBuffer<float> dw(w), dy(static_cast<std::size_t>(T * d));
    DeviceBuffer<std::int32_t> drows(rows);
    VectorView<std::int32_t const> dev_rows = grouped ? VectorView<std::int32_t const>(drows.get(), {T * k})
                                                      : VectorView<std::int32_t const>(drows.get(), {0});
    kernel::Combine<Cuda<80>>::run<E>(matrix_view<float const>(dw.get(), T, k), matrix_view<E const>(deo.get(), T * k, d),
                                      dev_rows, matrix_view(dy.get(), T, d), dev.context(0));
    dev.sync();
    CHECK(rel_l2(dy.download(), expect) <= 2e-5);
  }
}

TEMPLATE_TEST_CASE("cuda conformance: fused forward vs the CpuScalar composed forward, bitwise run to run", "[cuda]",
                   float, bf16, f16) {
  using W = TestType;
  std::mt19937 rng(6);
  Device dev;
  std::ptrdiff_t const d = 128, de = 48, n = 8, k = 2;
  Layer layer(d, de, n, rng);
  auto const gw = convert<W>(layer.gate), uw = convert<W>(layer.up), dw = convert<W>(layer.down);
  DeviceBuffer<W> dgate(gw), dup(uw), ddown(dw);
  DeviceBuffer<float> drw(layer.router_w), drb(layer.router_b);
  for (std::ptrdiff_t T : {std::ptrdiff_t{4}, std::ptrdiff_t{200}}) {
    CAPTURE(T);
    auto x = random_floats(static_cast<std::size_t>(T * d), rng);
    GatingParams g;
    g.mode = CombineMode::softmax_topk;
    g.top_k = k;
    // Oracle: the composed CpuScalar steps 1-5.
    std::vector<float> logits(static_cast<std::size_t>(T * n)), expect(static_cast<std::size_t>(T * d));
    kernel::RouterLogits<CpuScalar>::run(matrix_view<float const>(x.data(), T, d),
                                         RouterView<float>{matrix_view<float const>(layer.router_w.data(), n, d),
                                                           VectorView<float const>(layer.router_b.data(), {n})},
                                         matrix_view(logits.data(), T, n));
    HostRouting const r = cpu_route(logits, T, n, g);
    std::vector<double> const eo = cpu_expert_outputs(layer.view<W>(gw.data(), uw.data(), dw.data()), x, r, T, k);
    kernel::Combine<CpuScalar>::run(matrix_view<float const>(r.weights.data(), T, k),
                                    matrix_view<double const>(eo.data(), T * k, d),
                                    VectorView<std::int32_t const>(r.rows.data(), {T * k}), matrix_view(expect.data(), T, d));

    DeviceBuffer<float> dx(x), dy(static_cast<std::size_t>(T * d));
    cuda::RegionPlan const plan = cuda::moe_forward_workspace<W>(T, d, n, de, k);
    DeviceWorkspace ws(plan.bytes());
    CudaContext ctx = dev.context(cuda::expert_swiglu_host_workspace(n).bytes());
    auto run = [&] {
      kernel::MoeForward<Cuda<80>>::run<W>(layer.view<W>(dgate.get(), dup.get(), ddown.get()),
                                           RouterView<float>{matrix_view<float const>(drw.get(), n, d),
                                                             VectorView<float const>(drb.get(), {n})},
                                           g, matrix_view<float const>(dx.get(), T, d), matrix_view(dy.get(), T, d),
                                           ws.span(), ctx);
      dev.sync();
      return dy.download();
    };
    auto const got = run();
    CHECK(rel_l2(got, expect) <= expert_tolerance<W>());
    // The ids the forward chose (its workspace's ids region) equal the oracle's.
    std::vector<std::int32_t> ids(static_cast<std::size_t>(T * k));
    cuda_ok(cudaMemcpy(ids.data(), ws.buffer.get() + plan[cuda::kFwdIds].offset, ids.size() * sizeof(std::int32_t),
                       cudaMemcpyDeviceToHost));
    CHECK(ids == r.ids);
    auto const again = run();
    CHECK(std::memcmp(again.data(), got.data(), got.size() * sizeof(float)) == 0);
  }
}

/// The nine output tensors of a PAR evaluation, in host (std::vector) or device (DeviceBuffer) storage.
template <template <class> class Store>
struct ParOut {
  std::ptrdiff_t T, n, d, k;
  Store<float> gw, gb, gwp, gbp, gwb, gbb, mse;
  Store<std::int32_t> labels, topk;
  ParOut(std::ptrdiff_t T_, std::ptrdiff_t n_, std::ptrdiff_t d_, std::ptrdiff_t k_)
      : T(T_), n(n_), d(d_), k(k_), gw(sz(n * d)), gb(sz(n)), gwp(sz(n * d)), gbp(sz(n)), gwb(sz(n * d)), gbb(sz(n)),
        mse(sz(T * n)), labels(sz(T * k)), topk(sz(T * k)) {}
  static std::size_t sz(std::ptrdiff_t v) { return static_cast<std::size_t>(v); }
  template <class S>
  static auto* ptr(S& s) {
    if constexpr (std::is_same_v<S, std::vector<float>> || std::is_same_v<S, std::vector<std::int32_t>>)
      return s.data();
    else
      return s.get();
  }
  ParLossOutView<float> view() {
    return ParLossOutView<float>{matrix_view(ptr(gw), n, d), VectorView<float>(ptr(gb), {n}),
                                 matrix_view(ptr(gwp), n, d), VectorView<float>(ptr(gbp), {n}),
                                 matrix_view(ptr(gwb), n, d), VectorView<float>(ptr(gbb), {n}),
                                 matrix_view(ptr(mse), T, n), matrix_view(ptr(labels), T, k), matrix_view(ptr(topk), T, k)};
  }
};
template <class T>
using HostVec = std::vector<T>;

TEMPLATE_TEST_CASE("cuda conformance: dense SwiGLU vs CpuScalar", "[cuda]", float, bf16, f16) {
  using W = TestType;
  std::mt19937 rng(10);
  Device dev;
  std::ptrdiff_t const T = 33, d = 64, f = 160;
  auto const g = convert<W>(random_floats(static_cast<std::size_t>(f * d), rng, 0.125f));
  auto const u = convert<W>(random_floats(static_cast<std::size_t>(f * d), rng, 0.125f));
  auto const dn = convert<W>(random_floats(static_cast<std::size_t>(d * f), rng, 0.08f));
  auto const x = random_floats(static_cast<std::size_t>(T * d), rng);
  std::vector<float> expect(static_cast<std::size_t>(T * d));
  Workspace cpu_ws(kernel::Swiglu<CpuScalar>::workspace<W, float>(T, d, f, 1).bytes());
  kernel::Swiglu<CpuScalar>::run<W, float>(matrix_view<W const>(g.data(), f, d), matrix_view<W const>(u.data(), f, d),
                                           matrix_view<W const>(dn.data(), d, f), matrix_view<float const>(x.data(), T, d),
                                           matrix_view(expect.data(), T, d), cpu_ws.span());
  DeviceBuffer<W> dg(g), du(u), ddn(dn);
  DeviceBuffer<float> dx(x), dy(expect.size());
  DeviceWorkspace ws(kernel::Swiglu<Cuda<80>>::workspace<W>(T, d, f).bytes());
  kernel::Swiglu<Cuda<80>>::run<W>(matrix_view<W const>(dg.get(), f, d), matrix_view<W const>(du.get(), f, d),
                                   matrix_view<W const>(ddn.get(), d, f), matrix_view<float const>(dx.get(), T, d),
                                   matrix_view(dy.get(), T, d), ws.span(), dev.context(0));
  dev.sync();
  CHECK(rel_l2(dy.download(), expect) <= expert_tolerance<W>());
}

TEST_CASE("cuda conformance: PAR loss and router gradients vs CpuScalar (f32 weights)", "[cuda]") {
  std::mt19937 rng(8);
  Device dev;
  std::ptrdiff_t const T = 64, d = 64, d_ff = 96, n = 4, de = d_ff / n, k = 2;
  Layer layer(d, de, n, rng);
  float const s_in = 1.f / std::sqrt(static_cast<float>(d));
  auto const dg = random_floats(static_cast<std::size_t>(d_ff * d), rng, s_in);
  auto const du = random_floats(static_cast<std::size_t>(d_ff * d), rng, s_in);
  auto const dd = random_floats(static_cast<std::size_t>(d * d_ff), rng, 1.f / std::sqrt(static_cast<float>(d_ff)));
  auto const x = random_floats(static_cast<std::size_t>(T * d), rng);
  ParLossConfig const config;
  ParOut<HostVec> expect(T, n, d, k);
  Workspace cpu_ws(kernel::ParLoss<CpuScalar>::workspace<float, float>(d, d_ff, n, k).bytes());
  ParLossValues const ev = kernel::ParLoss<CpuScalar>::run<float, float>(
      matrix_view<float const>(x.data(), T, d), matrix_view<float const>(dg.data(), d_ff, d),
      matrix_view<float const>(du.data(), d_ff, d), matrix_view<float const>(dd.data(), d, d_ff),
      layer.view<float>(layer.gate.data(), layer.up.data(), layer.down.data()),
      RouterView<float>{matrix_view<float const>(layer.router_w.data(), n, d),
                        VectorView<float const>(layer.router_b.data(), {n})},
      k, config, expect.view(), cpu_ws.span());

  DeviceBuffer<float> dx(x), ddg(dg), ddu(du), ddd(dd), dgate(layer.gate), dup(layer.up), ddown(layer.down),
      drw(layer.router_w), drb(layer.router_b);
  ParOut<DeviceBuffer> got(T, n, d, k);
  DeviceWorkspace ws(kernel::ParLoss<Cuda<80>>::workspace<float>(T, d, d_ff, n, de).bytes());
  CudaContext ctx = dev.context(cuda::par_loss_host_bytes());
  auto run = [&] {
    return kernel::ParLoss<Cuda<80>>::run<float>(
        matrix_view<float const>(dx.get(), T, d), matrix_view<float const>(ddg.get(), d_ff, d),
        matrix_view<float const>(ddu.get(), d_ff, d), matrix_view<float const>(ddd.get(), d, d_ff),
        layer.view<float>(dgate.get(), dup.get(), ddown.get()),
        RouterView<float>{matrix_view<float const>(drw.get(), n, d), VectorView<float const>(drb.get(), {n})}, k, config,
        got.view(), ws.span(), ctx);
  };
  ParLossValues const gv = run();
  CHECK(got.labels.download() == expect.labels);
  CHECK(got.topk.download() == expect.topk);
  CHECK(gv.label_accuracy == ev.label_accuracy);
  CHECK(std::fabs(gv.par_loss - ev.par_loss) <= 1e-5 * std::fabs(ev.par_loss));
  CHECK(std::fabs(gv.balance_loss - ev.balance_loss) <= 1e-5 * std::fabs(ev.balance_loss));
  CHECK(std::fabs(gv.total_loss - ev.total_loss) <= 1e-5 * std::fabs(ev.total_loss));
  CHECK(rel_l2(got.mse.download(), expect.mse) <= 1e-4);
  CHECK(rel_l2(got.gw.download(), expect.gw) <= 1e-4);
  CHECK(rel_l2(got.gb.download(), expect.gb) <= 1e-4);
  CHECK(rel_l2(got.gwp.download(), expect.gwp) <= 1e-4);
  CHECK(rel_l2(got.gwb.download(), expect.gwb) <= 1e-4);
  CHECK(rel_l2(got.gbb.download(), expect.gbb) <= 1e-4);
  auto const first = got.gw.download();
  ParLossValues const again = run();
  CHECK(again.total_loss == gv.total_loss);
  auto const second = got.gw.download();
  CHECK(std::memcmp(first.data(), second.data(), first.size() * sizeof(float)) == 0);
}

TEST_CASE("cuda conformance: training forward and MoE backward vs CpuScalar (f32, relative L2 <= 5e-5)", "[cuda]") {
  std::mt19937 rng(9);
  Device dev;
  std::ptrdiff_t const T = 40, d = 32, m = 24, n = 4, k = 2, S = T * k;
  Layer layer(d, m, n, rng);
  auto const x = random_floats(static_cast<std::size_t>(T * d), rng);
  auto const dy = random_floats(static_cast<std::size_t>(T * d), rng);
  DeviceBuffer<float> dgate(layer.gate), dup(layer.up), ddown(layer.down), drw(layer.router_w), drb(layer.router_b),
      dx(x), ddy(dy);
  auto params = [&](float const* g, float const* u, float const* dn, float const* rw, float const* rb) {
    return MoeParamsView<float>{TensorView<float const, 3>(g, {n, m, d}), TensorView<float const, 3>(u, {n, m, d}),
                                TensorView<float const, 3>(dn, {n, d, m}), matrix_view<float const>(rw, n, d),
                                VectorView<float const>(rb, {n})};
  };
  MoeParamsView<float> const hp =
      params(layer.gate.data(), layer.up.data(), layer.down.data(), layer.router_w.data(), layer.router_b.data());
  MoeParamsView<float> const dp = params(dgate.get(), dup.get(), ddown.get(), drw.get(), drb.get());
  for (CombineMode mode : {CombineMode::softmax_topk, CombineMode::softmax_topk_renorm, CombineMode::sigmoid_topk}) {
    CAPTURE(to_string(mode));
    GatingParams g;
    g.mode = mode;
    g.top_k = k;
    g.sigmoid_renormalize = true;
    g.output_scale = 1.25f;
    // CpuScalar forward: the record and pre-activations both backwards start from.
    std::vector<float> logits(static_cast<std::size_t>(T * n)), w(static_cast<std::size_t>(S)), y(static_cast<std::size_t>(T * d)),
        a(static_cast<std::size_t>(S * m)), b(static_cast<std::size_t>(S * m));
    std::vector<std::int32_t> ids(static_cast<std::size_t>(S)), slots(static_cast<std::size_t>(S));
    std::vector<std::int64_t> offsets(static_cast<std::size_t>(n + 1));
    RoutingView<float> rec{matrix_view(logits.data(), T, n), matrix_view(ids.data(), T, k), matrix_view(w.data(), T, k),
                           VectorView<std::int64_t>(offsets.data(), {n + 1}), VectorView<std::int32_t>(slots.data(), {S})};
    MoeActivationsView<float> saved{matrix_view(a.data(), S, m), matrix_view(b.data(), S, m)};
    Workspace fw(kernel::MoeTrainForward<CpuScalar>::workspace(hp, k, T).bytes());
    kernel::MoeTrainForward<CpuScalar>::run<float, float>(hp, g, matrix_view<float const>(x.data(), T, d),
                                                          matrix_view(y.data(), T, d), rec, &saved, fw.span());
    // CUDA forward.
    DeviceBuffer<float> dlogits(logits.size()), dwts(w.size()), dy_out(y.size()), da(a.size()), db(b.size());
    DeviceBuffer<std::int32_t> dids(ids.size()), dslots(slots.size());
    DeviceBuffer<std::int64_t> doff(offsets.size());
    RoutingView<float> drec{matrix_view(dlogits.get(), T, n), matrix_view(dids.get(), T, k), matrix_view(dwts.get(), T, k),
                            VectorView<std::int64_t>(doff.get(), {n + 1}), VectorView<std::int32_t>(dslots.get(), {S})};
    MoeActivationsView<float> dsaved{matrix_view(da.get(), S, m), matrix_view(db.get(), S, m)};
    DeviceWorkspace fws(kernel::MoeTrainForward<Cuda<80>>::workspace(dp, k, T).bytes());
    CudaContext ctx = dev.context(cuda::training_host_bytes(n));
    kernel::MoeTrainForward<Cuda<80>>::run(dp, g, matrix_view<float const>(dx.get(), T, d), matrix_view(dy_out.get(), T, d),
                                           drec, &dsaved, fws.span(), ctx);
    dev.sync();
    CHECK(dids.download() == ids);
    CHECK(dslots.download() == slots);
    CHECK(doff.download() == offsets);
    CHECK(rel_l2(dy_out.download(), y) <= 5e-5);
    CHECK(rel_l2(da.download(), a) <= 5e-5);
    CHECK(rel_l2(db.download(), b) <= 5e-5);

    // Backward from the same record (the oracle's, uploaded), with and without saved pre-activations.
    dlogits.upload(logits);
    dwts.upload(w);
    da.upload(a);
    db.upload(b);
    for (bool with_saved : {true, false}) {
      CAPTURE(with_saved);
      std::vector<float> gx(static_cast<std::size_t>(T * d)), gg(layer.gate.size()), gu(layer.up.size()),
          gd(layer.down.size()), grw(static_cast<std::size_t>(n * d)), grb(static_cast<std::size_t>(n)),
          gz(static_cast<std::size_t>(T * n));
      MoeGradsView<float> hg{matrix_view(gx.data(), T, d), TensorView<float, 3>(gg.data(), {n, m, d}),
                             TensorView<float, 3>(gu.data(), {n, m, d}), TensorView<float, 3>(gd.data(), {n, d, m}),
                             matrix_view(grw.data(), n, d), VectorView<float>(grb.data(), {n}), matrix_view(gz.data(), T, n)};
      MoeActivationsView<float const> hs{matrix_view<float const>(a.data(), S, m), matrix_view<float const>(b.data(), S, m)};
      Workspace bw(kernel::MoeBackward<CpuScalar>::workspace(hp, k, T).bytes());
      kernel::MoeBackward<CpuScalar>::run<float, float>(hp, g, RoutingView<float const>(rec),
                                                        matrix_view<float const>(x.data(), T, d),
                                                        matrix_view<float const>(dy.data(), T, d), with_saved ? &hs : nullptr,
                                                        hg, bw.span());
      DeviceBuffer<float> dgx(gx.size()), dgg(gg.size()), dgu(gu.size()), dgd(gd.size()), dgrw(grw.size()),
          dgrb(grb.size()), dgz(gz.size());
      MoeGradsView<float> dg{matrix_view(dgx.get(), T, d), TensorView<float, 3>(dgg.get(), {n, m, d}),
                             TensorView<float, 3>(dgu.get(), {n, m, d}), TensorView<float, 3>(dgd.get(), {n, d, m}),
                             matrix_view(dgrw.get(), n, d), VectorView<float>(dgrb.get(), {n}), matrix_view(dgz.get(), T, n)};
      MoeActivationsView<float const> ds{matrix_view<float const>(da.get(), S, m), matrix_view<float const>(db.get(), S, m)};
      RoutingView<float> const drec_in{matrix_view(dlogits.get(), T, n), matrix_view(dids.get(), T, k),
                                       matrix_view(dwts.get(), T, k), VectorView<std::int64_t>(doff.get(), {n + 1}),
                                       VectorView<std::int32_t>(dslots.get(), {S})};
      DeviceWorkspace bws(kernel::MoeBackward<Cuda<80>>::workspace(dp, k, T).bytes());
      kernel::MoeBackward<Cuda<80>>::run(dp, g, RoutingView<float const>(drec_in), matrix_view<float const>(dx.get(), T, d),
                                         matrix_view<float const>(ddy.get(), T, d), with_saved ? &ds : nullptr, dg,
                                         bws.span(), ctx);
      dev.sync();
      CHECK(rel_l2(dgx.download(), gx) <= 5e-5);
      CHECK(rel_l2(dgg.download(), gg) <= 5e-5);
      CHECK(rel_l2(dgu.download(), gu) <= 5e-5);
      CHECK(rel_l2(dgd.download(), gd) <= 5e-5);
      CHECK(rel_l2(dgrw.download(), grw) <= 5e-5);
      CHECK(rel_l2(dgrb.download(), grb) <= 5e-5);
      CHECK(rel_l2(dgz.download(), gz) <= 5e-5);
    }
  }
}

TEST_CASE("cuda conformance: bad arguments are typed errors", "[cuda]") {
  Device dev;
  std::ptrdiff_t const T = 4, n = 4, k = 2;
  DeviceBuffer<std::int32_t> ids(static_cast<std::size_t>(T * k)), slots(static_cast<std::size_t>(T * k));
  DeviceBuffer<std::int64_t> offsets(static_cast<std::size_t>(n + 1));
  std::vector<std::byte> host(4096);
  WorkspaceSpan host_ws{host.data(), host.size(), MemorySpace::host};
  CHECK_THROWS_AS(kernel::GroupByExpert<Cuda<80>>::run(matrix_view<std::int32_t const>(ids.get(), T, k), n,
                                                       VectorView<std::int64_t>(offsets.get(), {n + 1}),
                                                       VectorView<std::int32_t>(slots.get(), {T * k}),
                                                       VectorView<std::int32_t>(), host_ws, dev.context(0)),
                  backend_error);
  CHECK_THROWS_AS(kernel::GroupByExpert<Cuda<80>>::run(matrix_view<std::int32_t const>(ids.get(), T, k), n,
                                                       VectorView<std::int64_t>(offsets.get(), {n}),
                                                       VectorView<std::int32_t>(slots.get(), {T * k}),
                                                       VectorView<std::int32_t>(), host_ws, dev.context(0)),
                  shape_error);
  DeviceBuffer<float> logits(static_cast<std::size_t>(T * n)), w(static_cast<std::size_t>(T * k));
  GatingParams g;
  g.top_k = 40;
  CHECK_THROWS_AS(kernel::SelectExperts<Cuda<80>>::run(matrix_view<float const>(logits.get(), T, n), g,
                                                       matrix_view(ids.get(), T, k), matrix_view(w.get(), T, k),
                                                       dev.context(0)),
                  value_error);
}

int main(int argc, char** argv) {
  if (cuda::device_count() == 0) {
    std::printf("skipped: no CUDA device\n");
    return 77;  // SKIP_RETURN_CODE in tests/cuda/CMakeLists.txt: ctest reports Skipped
  }
  std::printf("CUDA device: compute capability %d\n", cuda::device_compute_capability());
  return Catch::Session().run(argc, argv);
}
