// SPDX-License-Identifier: Apache-2.0
// Tests of the cpu_simd backend against the scalar oracle: random and edge shapes, f32 and bf16 weights, the
// decode (streaming) and prefill (GEMM) paths, and bitwise determinism across thread counts and calls.
#include <catch2/catch.hpp>

#include <factorllm/backend/dispatch.hpp>
#include <factorllm/io/factorized_checkpoint.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/moe/shared_moe.hpp>

#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using Simd = CpuSimd<>;

namespace {
// Tolerance (written down): the simd backend accumulates in float (fixed order per element); against the
// double-accumulating oracle the relative L2 error of an output is bounded by ~sqrt(d_model + d_expert) ulps:
// we require < 2e-5 for every shape here (d up to 300).
constexpr double kTol = 2e-5;

template <class W>
void compare(int d, int d_ff, int n, int k, int n_tokens, moe::CombineMode mode, std::uint64_t seed) {
  fixture::DenseWeights<W> w(ref::random_ffn(d, d_ff, seed));
  auto const experts = ffn::factorize(w.view(), ffn::ExpertPartition::random(d_ff, n, seed + 1));
  moe::Gating g;
  g.mode = mode;
  g.top_k = k;
  auto const router = moe::Router<float>::random(d, n, seed + 2, 1.0);
  moe::MoeFfn<W, CpuScalar> oracle(experts, router, g);
  moe::MoeFfn<W, Simd> fast(experts, router, g);
  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(n_tokens * d), seed + 3, 1.0), n_tokens, d);
  Matrix<float> y_ref({n_tokens, d}), y({n_tokens, d});
  moe::RoutingRecord<float> rec_ref, rec;
  Workspace ws_ref(oracle.workspace_bytes(n_tokens)), ws(fast.workspace_bytes(n_tokens));
  oracle.forward(x.cview(), y_ref.view(), ws_ref, &rec_ref);
  fast.forward(x.cview(), y.view(), ws, &rec);
  INFO(dtype_traits<W>::name() << " d=" << d << " d_ff=" << d_ff << " n=" << n << " k=" << k << " T=" << n_tokens
                               << " mode=" << moe::to_string(mode));
  REQUIRE(ref::rel_l2(y.data(), y_ref.data(), static_cast<std::size_t>(y.size())) < fixture::simd_oracle_tolerance<W>(kTol));
  // Routing is exact: same experts (logits differ only by float rounding, and these are well separated).
  for (std::ptrdiff_t i = 0; i < rec.ids.size(); ++i) REQUIRE(rec.ids[i] == rec_ref.ids[i]);
  for (std::ptrdiff_t i = 0; i < rec.slots.size(); ++i) REQUIRE(rec.slots[i] == rec_ref.slots[i]);
}
}  // namespace

TEMPLATE_TEST_CASE("cpu_simd MoE forward matches the scalar oracle", "[simd][moe]", float, bf16, f16) {
  REQUIRE(Simd::available());
  struct Shape { int d, d_ff, n, k, t; };
  // d not a multiple of the SIMD width, T = 0 and 1 (decode), T in the GEMM range, K = N, N = 1, and an
  // expert with more than one 128-row block.
  Shape const shapes[] = {{64, 172, 4, 1, 1},  {64, 172, 4, 2, 7},  {17, 24, 4, 2, 5},   {33, 40, 8, 3, 0},
                          {33, 40, 8, 8, 9},   {31, 60, 1, 1, 13},  {48, 96, 4, 4, 1},   {300, 640, 4, 1, 40},
                          {129, 264, 2, 1, 3}, {64, 256, 4, 2, 64}, {100, 300, 3, 2, 17}};
  std::uint64_t seed = 1;
  for (auto const& s : shapes)
    for (auto mode : {moe::CombineMode::code_ref, moe::CombineMode::softmax_topk_renorm, moe::CombineMode::sigmoid_topk})
      compare<TestType>(s.d, s.d_ff, s.n, s.k, s.t, mode, seed += 7);
}

TEMPLATE_TEST_CASE("cpu_simd dense SwiGLU matches the scalar oracle", "[simd][swiglu]", float, bf16, f16) {
  for (int t : {0, 1, 3, 8, 9, 50}) {
    fixture::DenseWeights<TestType> w(ref::random_ffn(70, 150, 4));
    auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(t * 70), 5, 1.0), t, 70);
    Matrix<float> y_ref({t, 70}), y({t, 70});
    ffn::swiglu_forward(w.view(), x.cview(), y_ref.view());
    ffn::swiglu_forward(w.view(), x.cview(), y.view(), Simd{});
    INFO("T=" << t);
    // Above 8 rows (prefill) bf16 is widened exactly: the tight bound holds whatever the CPU.
    double const tol = t > 8 ? kTol : fixture::simd_oracle_tolerance<TestType>(kTol);
    REQUIRE(ref::rel_l2(y.data(), y_ref.data(), static_cast<std::size_t>(y.size())) < tol);
  }
}

TEST_CASE("cpu_simd output is bitwise identical for 1 and 2 threads and across calls", "[simd][determinism]") {
  fixture::DenseWeights<float> w(ref::random_ffn(256, 1024, 9));
  moe::Gating g;
  g.mode = moe::CombineMode::softmax_topk_renorm;
  g.top_k = 2;
  moe::MoeFfn<float, Simd> layer(ffn::factorize(w.view(), ffn::ExpertPartition::contiguous(1024, 4)),
                                 moe::Router<float>::random(256, 4, 3, 1.0), g);
  for (int t : {1, 6, 100}) {
    auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(t * 256), 2, 1.0), t, 256);
    Matrix<float> y1({t, 256}), y2({t, 256}), y3({t, 256});
#if defined(_OPENMP)
    int const saved = omp_get_max_threads();
    omp_set_num_threads(1);
    Workspace ws1(layer.workspace_bytes(t));
    layer.forward(x.cview(), y1.view(), ws1);
    omp_set_num_threads(2);
    Workspace ws2(layer.workspace_bytes(t));
    layer.forward(x.cview(), y2.view(), ws2);
    layer.forward(x.cview(), y3.view(), ws2);
    omp_set_num_threads(saved);
#else
    WARN("built without OpenMP: only repeatability is checked");
    Workspace ws2(layer.workspace_bytes(t));
    layer.forward(x.cview(), y1.view(), ws2);
    layer.forward(x.cview(), y2.view(), ws2);
    layer.forward(x.cview(), y3.view(), ws2);
#endif
    INFO("T=" << t);
    REQUIRE(std::memcmp(y1.data(), y2.data(), sizeof(float) * static_cast<std::size_t>(y1.size())) == 0);
    REQUIRE(std::memcmp(y2.data(), y3.data(), sizeof(float) * static_cast<std::size_t>(y1.size())) == 0);
  }
}

TEST_CASE("cpu_simd dense SwiGLU and router logits are bitwise identical for 1 and 2 threads", "[simd][determinism]") {
  // Shapes with a single task per phase (stories260K at T = 32: one 128-row down block), where Eigen used to
  // start its own nested parallel GEMM, and a router GEMM large enough that Eigen would thread it (T = 512).
#if defined(_OPENMP)
  struct Shape { int d, d_ff, t; };
  for (auto const s : {Shape{64, 172, 32}, Shape{64, 172, 200}, Shape{300, 640, 50}}) {
    fixture::DenseWeights<float> w(ref::random_ffn(s.d, s.d_ff, 21));
    auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(s.t * s.d), 22, 1.0), s.t, s.d);
    Matrix<float> y1({s.t, s.d}), y2({s.t, s.d});
    int const saved = omp_get_max_threads();
    omp_set_num_threads(1);
    ffn::swiglu_forward(w.view(), x.cview(), y1.view(), Simd{});
    omp_set_num_threads(2);
    ffn::swiglu_forward(w.view(), x.cview(), y2.view(), Simd{});
    omp_set_num_threads(saved);
    INFO("dense d=" << s.d << " d_ff=" << s.d_ff << " T=" << s.t);
    REQUIRE(std::memcmp(y1.data(), y2.data(), sizeof(float) * static_cast<std::size_t>(y1.size())) == 0);
  }
  auto const router = moe::Router<float>::random(2048, 8, 5, 1.0);
  for (int t : {1, 3, 512}) {
    auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(t * 2048), 23, 1.0), t, 2048);
    Matrix<float> z1({t, 8}), z2({t, 8}), z_ref({t, 8});
    int const saved = omp_get_max_threads();
    omp_set_num_threads(1);
    moe::router_logits(router, x.cview(), z1.view(), Simd{});
    omp_set_num_threads(2);
    moe::router_logits(router, x.cview(), z2.view(), Simd{});
    omp_set_num_threads(saved);
    moe::router_logits(router, x.cview(), z_ref.view(), CpuScalar{});
    INFO("router T=" << t);
    REQUIRE(std::memcmp(z1.data(), z2.data(), sizeof(float) * static_cast<std::size_t>(z1.size())) == 0);
    REQUIRE(ref::rel_l2(z1.data(), z_ref.data(), static_cast<std::size_t>(z1.size())) < kTol);
  }
#else
  WARN("built without OpenMP: nothing to compare");
#endif
}

TEST_CASE("cpu_simd's default architecture is available, and is NEON on aarch64", "[simd][dispatch]") {
  INFO("xsimd architecture: " << Simd::arch::name());
#if defined(__aarch64__)
  // The aarch64 run (tests/cross/run_aarch64.sh, under QEMU) compares these NEON kernels with the oracle.
  STATIC_REQUIRE(std::is_same<Simd::arch, xsimd::neon64>::value);
#endif
  REQUIRE(Simd::available());
}

TEST_CASE("dispatch picks the first available backend", "[simd][dispatch]") {
  std::string picked = dispatch(BackendList<Simd, CpuScalar>{}, [](auto b) { return std::string(decltype(b)::name()); });
  CHECK(picked == "cpu_simd");
  picked = dispatch(BackendList<CpuScalar>{}, [](auto b) { return std::string(decltype(b)::name()); });
  CHECK(picked == "cpu_scalar");
}

TEST_CASE("cpu_simd refuses a workspace sized for fewer tokens or threads", "[simd][errors]") {
  fixture::DenseWeights<float> w(ref::random_ffn(32, 64, 9));
  moe::Gating g;
  g.mode = moe::CombineMode::code_ref;
  g.top_k = 1;
  moe::MoeFfn<float, Simd> layer(ffn::factorize(w.view(), ffn::ExpertPartition::contiguous(64, 4)),
                                 moe::Router<float>::random(32, 4, 3), g);
  Matrix<float> x({10, 32}), y({10, 32});
  Workspace small(layer.workspace_bytes(5));
  CHECK_THROWS_AS(layer.forward(x.cview(), y.view(), small), backend_error);
}

TEST_CASE("cpu_simd workspace: sized per thread count, and a too-small one names both thread counts", "[simd][workspace]") {
  int const d = 32, d_ff = 64, n = 4, k = 2, t = 16;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 71));
  moe::Gating g;
  g.mode = moe::CombineMode::softmax_topk_renorm;
  g.top_k = k;
  moe::MoeFfn<float, Simd> layer(ffn::factorize(w.view(), ffn::ExpertPartition::random(d_ff, n, 72)),
                                 moe::Router<float>::random(d, n, 73, 1.0), g);
  CHECK(layer.workspace_bytes(t, 4) > layer.workspace_bytes(t, 1));  // one panel per thread
  CHECK(layer.workspace_bytes(t) == layer.workspace_bytes(t, detail::max_threads()));
  CHECK_THROWS_AS(layer.workspace_bytes(t, 0), value_error);
  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(t * d), 74, 1.0), t, d);
  Matrix<float> y1({t, d}), y2({t, d});
#if defined(_OPENMP)
  int const saved = omp_get_max_threads();
  Workspace small(layer.workspace_bytes(t, 1));
  Workspace both(layer.workspace_bytes(t, 2));
  omp_set_num_threads(2);
  CHECK_THROWS_WITH(layer.forward(x.cview(), y1.view(), small),
                    Catch::Contains("on 2 OpenMP thread(s)") && Catch::Contains("it fits 1 thread(s)") &&
                        Catch::Contains("workspace_bytes(max_tokens, max_threads)"));
  layer.forward(x.cview(), y1.view(), both);
  omp_set_num_threads(1);
  layer.forward(x.cview(), y2.view(), both);  // a workspace for 2 threads serves 1 as well, with the same bits
  omp_set_num_threads(saved);
  for (std::ptrdiff_t i = 0; i < y1.size(); ++i) REQUIRE(y1[i] == y2[i]);
#else
  Workspace ws(layer.workspace_bytes(t, 1));
  layer.forward(x.cview(), y1.view(), ws);
  WARN("built without OpenMP: only the size queries and a one-thread forward are checked");
#endif
}

TEST_CASE("the layer types and the loader default to DefaultCpu; to_backend moves a layer (issue 13, item 5)", "[simd][moe]") {
  static_assert(std::is_same_v<moe::MoeFfn<float>, moe::MoeFfn<float, DefaultCpu>>, "MoeFfn defaults to DefaultCpu");
  static_assert(std::is_same_v<moe::SharedExpertMoe<float>, moe::SharedExpertMoe<float, DefaultCpu>>,
                "SharedExpertMoe defaults to DefaultCpu");
  static_assert(std::is_same_v<decltype(io::load_factorized(std::string())), std::vector<moe::MoeFfn<float, DefaultCpu>>>,
                "load_factorized defaults to DefaultCpu");
  int const d = 64, d_ff = 256, n = 4, n_tokens = 9;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 71));
  moe::Gating g;
  g.top_k = 2;
  moe::MoeFfn<float, CpuScalar> oracle(ffn::factorize(w.view(), ffn::ExpertPartition::random(d_ff, n, 72)),
                                       moe::Router<float>::random(d, n, 73, 1.0), g);
  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(n_tokens * d), 74, 1.0), n_tokens, d);
  Matrix<float> y_oracle({n_tokens, d}), y_fast({n_tokens, d}), y_back({n_tokens, d});
  oracle.forward(x.cview(), y_oracle.view());

  moe::MoeFfn<float, CpuScalar> copy = oracle;
  float const* gate_before = copy.experts().gate_tensor().data();
  float const* router_before = copy.router().weight().data();
  moe::MoeFfn<float> fast = std::move(copy).to_backend<DefaultCpu>();
  CHECK(fast.experts().gate_tensor().data() == gate_before);  // moved, not copied
  CHECK(fast.router().weight().data() == router_before);
  fast.forward(x.cview(), y_fast.view());
  CHECK(ref::rel_l2(y_fast.data(), y_oracle.data(), static_cast<std::size_t>(y_fast.size())) < kTol);

  // An lvalue copies (the source stays usable) and the round trip is the oracle again, bit for bit.
  moe::MoeFfn<float, CpuScalar> back = fast.to_backend<CpuScalar>();
  CHECK(back.experts().gate_tensor().data() != fast.experts().gate_tensor().data());
  back.forward(x.cview(), y_back.view());
  CHECK(std::memcmp(y_back.data(), y_oracle.data(), sizeof(float) * static_cast<std::size_t>(y_back.size())) == 0);
  CHECK(back.gating().mode == g.mode);
  CHECK(back.top_k() == 2);
}
