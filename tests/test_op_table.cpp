// SPDX-License-Identifier: Apache-2.0
// The backend op table (backend/README.md) checked at compile time for every tag, the fallback chain, runtime
// backend choice with an unavailable tag, and a fused forward that MoeFfn prefers over the composed steps.
#include <catch2/catch.hpp>

#include <factorllm/backend/dispatch.hpp>
#include <factorllm/backend/ops.hpp>
#include <factorllm/backend/traits.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/train/moe_backward.hpp>
#include <factorllm/train/par_loss.hpp>

#include <string>
#include <type_traits>

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using kernel::has_op_v;
using kernel::implements_op_v;

namespace {

/// A user tag that re-declares nothing: it must fall back to CpuSimd<>, not past it.
struct MySimd : CpuSimd<> {};

/// A tag whose available() is false: dispatch must skip it.
struct Unavailable : CpuScalar {
  using backend_self = Unavailable;
  using fallback = CpuScalar;
  static constexpr char const* name() noexcept { return "unavailable"; }
  static bool available() noexcept { return false; }
};

/// A tag with a fused forward (it counts its calls, then runs the oracle's steps itself).
struct Fused : CpuScalar {
  using backend_self = Fused;
  using fallback = CpuScalar;
  static constexpr char const* name() noexcept { return "fused_probe"; }
};
int g_fused_calls = 0;

}  // namespace

namespace factorllm {
namespace kernel {
template <>
struct MoeForward<Fused> {
  static constexpr bool implemented = true;
  template <class W, class A>
  static detail::WorkspaceLayout workspace(std::ptrdiff_t max_tokens, std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                           std::ptrdiff_t d_expert, std::ptrdiff_t top_k, int /*max_threads*/) {
    auto const s = static_cast<std::size_t>(max_tokens * top_k);
    return detail::WorkspaceLayout()
        .add(sizeof(A), static_cast<std::size_t>(max_tokens * n_experts))
        .add(sizeof(std::int32_t), s)
        .add(sizeof(A), s)
        .add(sizeof(std::int64_t), static_cast<std::size_t>(n_experts + 1))
        .add(sizeof(std::int32_t), s)
        .add(sizeof(double), s * static_cast<std::size_t>(d_model))
        .add(sizeof(double), static_cast<std::size_t>(d_expert));
  }
  template <class W, class A>
  static void run(ExpertWeightsView<W> const& experts, RouterView<A> router, GatingParams const& gating,
                  MatrixView<A const> x, MatrixView<A> y, WorkspaceSpan ws, RoutingView<A> const* record,
                  Executor const& = Executor::openmp()) {
    ++g_fused_calls;
    std::ptrdiff_t const t = x.rows(), n = experts.n_experts(), k = gating.top_k, d = experts.d_model();
    detail::WorkspaceCursor cursor(ws, "fused probe");
    auto z = matrix_view(cursor.take<A>(static_cast<std::size_t>(t * n)), t, n);
    auto ids = matrix_view(cursor.take<std::int32_t>(static_cast<std::size_t>(t * k)), t, k);
    auto w = matrix_view(cursor.take<A>(static_cast<std::size_t>(t * k)), t, k);
    auto offsets = vector_view(cursor.take<std::int64_t>(static_cast<std::size_t>(n + 1)), n + 1);
    auto slots = vector_view(cursor.take<std::int32_t>(static_cast<std::size_t>(t * k)), t * k);
    auto out = matrix_view(cursor.take<double>(static_cast<std::size_t>(t * k * d)), t * k, d);
    RouterLogits<CpuScalar>::run(x, router, z);
    SelectExperts<CpuScalar>::run(MatrixView<A const>(z), gating, ids, w);
    GroupByExpert<CpuScalar>::run(MatrixView<std::int32_t const>(ids), n, offsets, slots, VectorView<std::int32_t>());
    // Slot order (no inverse map needed): row s of `out` is slot s.
    VectorView<std::int64_t const> o(offsets);
    VectorView<std::int32_t const> sl(slots);
    double* hidden = cursor.take<double>(static_cast<std::size_t>(experts.d_expert()));
    for (std::ptrdiff_t e = 0; e < n; ++e)
      for (std::int64_t r = o(e); r < o(e + 1); ++r)
        swiglu_row(experts.gate_of(e), experts.up_of(e), experts.down_of(e), x.row(sl(r) / k), hidden, out.row(sl(r)));
    Combine<CpuScalar>::run(MatrixView<A const>(w), MatrixView<double const>(out), VectorView<std::int32_t const>(), y);
    if (record != nullptr) record->logits(0, 0) = z(0, 0);  // the record's storage is reachable through the view
  }
};
}  // namespace kernel
}  // namespace factorllm

namespace {

// The table of backend/README.md: every "must" op, for every CPU tag (own kernel or inherited).
template <class B>
constexpr bool has_every_required_op() {
  using namespace kernel;
  return has_op_v<RouterLogits, B> && has_op_v<SelectExperts, B> && has_op_v<GroupByExpert, B> &&
         has_op_v<ExpertSwiglu, B> && has_op_v<Combine, B> && has_op_v<Swiglu, B> && has_op_v<ParLoss, B> &&
         has_op_v<MoeTrainForward, B> && has_op_v<MoeBackward, B>;
}
template <class B>
constexpr bool has_no_op() {
  using namespace kernel;
  return !has_op_v<RouterLogits, B> && !has_op_v<SelectExperts, B> && !has_op_v<GroupByExpert, B> &&
         !has_op_v<ExpertSwiglu, B> && !has_op_v<Combine, B> && !has_op_v<MoeForward, B> && !has_op_v<Swiglu, B> &&
         !has_op_v<ParLoss, B> && !has_op_v<MoeTrainForward, B> && !has_op_v<MoeBackward, B>;
}

}  // namespace

TEST_CASE("op table: every CPU tag has every required op, Cuda none without backend/cuda (tests/cuda checks it with)", "[backend]") {
  STATIC_REQUIRE(has_every_required_op<CpuScalar>());
  STATIC_REQUIRE(has_every_required_op<CpuSimd<>>());
  STATIC_REQUIRE(has_every_required_op<MySimd>());
  STATIC_REQUIRE(has_no_op<Cuda<80>>());
  STATIC_REQUIRE(has_no_op<Cuda<90>>());
  STATIC_REQUIRE_FALSE(has_op_v<kernel::MoeForward, CpuScalar>);  // optional: no CPU backend fuses today
  STATIC_REQUIRE_FALSE(has_op_v<kernel::MoeForward, CpuSimd<>>);
}

TEST_CASE("op table: which tag implements which op itself (the README's columns)", "[backend]") {
  using namespace kernel;
  using S = CpuSimd<>;
  // CpuScalar is the oracle of every required op.
  STATIC_REQUIRE(implements_op_v<RouterLogits, CpuScalar>);
  STATIC_REQUIRE(implements_op_v<SelectExperts, CpuScalar>);
  STATIC_REQUIRE(implements_op_v<GroupByExpert, CpuScalar>);
  STATIC_REQUIRE(implements_op_v<ExpertSwiglu, CpuScalar>);
  STATIC_REQUIRE(implements_op_v<Combine, CpuScalar>);
  STATIC_REQUIRE(implements_op_v<Swiglu, CpuScalar>);
  STATIC_REQUIRE(implements_op_v<ParLoss, CpuScalar>);
  STATIC_REQUIRE(implements_op_v<MoeTrainForward, CpuScalar>);
  STATIC_REQUIRE(implements_op_v<MoeBackward, CpuScalar>);
  // CpuSimd specializes the heavy ones and inherits the rest.
  STATIC_REQUIRE(implements_op_v<RouterLogits, S>);
  STATIC_REQUIRE(implements_op_v<ExpertSwiglu, S>);
  STATIC_REQUIRE(implements_op_v<Combine, S>);
  STATIC_REQUIRE(implements_op_v<Swiglu, S>);
  STATIC_REQUIRE(implements_op_v<MoeTrainForward, S>);
  STATIC_REQUIRE(implements_op_v<MoeBackward, S>);
  STATIC_REQUIRE_FALSE(implements_op_v<SelectExperts, S>);
  STATIC_REQUIRE_FALSE(implements_op_v<GroupByExpert, S>);
  STATIC_REQUIRE_FALSE(implements_op_v<ParLoss, S>);
  STATIC_REQUIRE(std::is_base_of_v<SelectExperts<CpuScalar>, SelectExperts<S>>);
  // A user tag inherits CpuSimd's kernels (it falls back to CpuSimd, not past it).
  STATIC_REQUIRE(std::is_same_v<fallback_t<MySimd>, S>);
  STATIC_REQUIRE(std::is_same_v<fallback_t<S>, CpuScalar>);
  STATIC_REQUIRE(std::is_same_v<fallback_t<CpuScalar>, NoBackend>);
  STATIC_REQUIRE(std::is_same_v<fallback_t<Cuda<80>>, NoBackend>);
  STATIC_REQUIRE(std::is_base_of_v<ExpertSwiglu<S>, ExpertSwiglu<MySimd>>);
}

TEST_CASE("backend tags: names, memory spaces, availability", "[backend]") {
  STATIC_REQUIRE(backend_traits<CpuScalar>::memory_space == MemorySpace::host);
  STATIC_REQUIRE(backend_traits<CpuSimd<>>::memory_space == MemorySpace::host);
  STATIC_REQUIRE(backend_traits<Cuda<80>>::memory_space == MemorySpace::device);
  STATIC_REQUIRE(backend_traits<Cuda<80>>::is_device);
  CHECK(CpuScalar::available());
  CHECK(CpuSimd<>::available());  // the tests are compiled for this machine's ISA
  CHECK_FALSE(Cuda<80>::available());  // this build does not link factorllm::cuda (tests/cuda covers it)
  CHECK(std::string(CpuSimd<>::name()) == "cpu_simd");
}

TEST_CASE("dispatch skips an unavailable tag and fails loudly when none is available", "[backend]") {
  std::string chosen = dispatch(BackendList<Unavailable, CpuScalar>{}, [](auto b) { return std::string(b.name()); });
  CHECK(chosen == "cpu_scalar");
  CHECK_THROWS_AS(dispatch(BackendList<Unavailable>{}, [](auto) { return 0; }), backend_error);
  CHECK_THROWS_WITH(dispatch(BackendList<Unavailable, Cuda<80>>{}, [](auto) { return 0; }),
                    Catch::Contains("no backend in the list is available"));
}

TEST_CASE("MoeFfn prefers a backend's fused forward over the composed steps, with the same result", "[backend]") {
  int const d = 12, d_ff = 16, n = 4, k = 2, t = 5;
  fixture::DenseWeights<double> w(ref::random_ffn(d, d_ff, 91));
  auto const experts = ffn::factorize(w.view(), ffn::ExpertPartition::random(d_ff, n, 92));
  auto const router = moe::Router<double>::random(d, n, 93, 1.0);
  moe::Gating g;
  g.mode = moe::CombineMode::softmax_topk_renorm;
  g.top_k = k;
  moe::MoeFfn<double, CpuScalar> composed(experts, router, g);
  moe::MoeFfn<double, Fused> fused(experts, router, g);
  auto const x = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(t * d), 94, 1.0), t, d);
  Matrix<double> y1({t, d}), y2({t, d});
  Workspace ws1(composed.workspace_bytes(t)), ws2(fused.workspace_bytes(t));
  CHECK(fused.workspace_bytes(t) != composed.workspace_bytes(t));  // the fused op's own size query is used
  g_fused_calls = 0;
  composed.forward(x.cview(), y1.view(), ws1);
  CHECK(g_fused_calls == 0);
  fused.forward(x.cview(), y2.view(), ws2);
  CHECK(g_fused_calls == 1);
  for (std::ptrdiff_t i = 0; i < y1.size(); ++i) REQUIRE(y1[i] == y2[i]);  // same oracle arithmetic
  moe::RoutingRecord<double> rec;
  fused.forward(x.cview(), y2.view(), ws2, &rec);
  CHECK(g_fused_calls == 2);
  CHECK(rec.logits.extent(0) == t);  // sized by the front before the fused kernel wrote into it
}

TEST_CASE("fronts refuse a workspace in the wrong memory space", "[backend]") {
  int const d = 8, d_ff = 8, n = 2;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 5));
  moe::Gating g;
  g.mode = moe::CombineMode::code_ref;
  moe::MoeFfn<float, CpuScalar> layer(ffn::factorize(w.view(), ffn::ExpertPartition::contiguous(d_ff, n)),
                                      moe::Router<float>::random(d, n, 6), g);
  Workspace owned(layer.workspace_bytes(1));
  Workspace device_like = Workspace::wrap(owned.data(), owned.bytes(), MemorySpace::device);
  Matrix<float> x({1, d}), y({1, d});
  CHECK_THROWS_WITH(layer.forward(x.cview(), y.view(), device_like),
                    Catch::Contains("argument 'ws' is device memory; backend cpu_scalar needs host memory"));
  Workspace host_wrap = Workspace::wrap(owned.data(), owned.bytes());
  CHECK_FALSE(host_wrap.owns_memory());
  CHECK_NOTHROW(layer.forward(x.cview(), y.view(), host_wrap));
}
