// SPDX-License-Identifier: Apache-2.0
// Every op of the backend op table (backend/README.md), run on every CPU backend through its kernel entry
// kernel::Op<Backend>::run, against independent plain loops in double (tests/reference/). Tolerances are the
// table's: relative L2 <= 2e-5 for float-accumulating kernels (the oracle must be within 1e-12), bitwise for ids,
// grouping and integer-valued combines.
#include <catch2/catch.hpp>

#include <factorllm/backend/ops.hpp>
#include <factorllm/backend/scalar/combine.hpp>
#include <factorllm/backend/scalar/grouping.hpp>
#include <factorllm/backend/scalar/router.hpp>
#include <factorllm/backend/scalar/swiglu.hpp>
#include <factorllm/backend/scalar/topk.hpp>
#include <factorllm/backend/simd/combine.hpp>
#include <factorllm/backend/simd/router.hpp>
#include <factorllm/backend/simd/swiglu.hpp>
#include <factorllm/detail/threads.hpp>
#include <factorllm/ffn/factorize.hpp>
#include <factorllm/moe/moe_ffn.hpp>

#include <cstdint>
#include <tuple>
#include <vector>

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;

using CpuBackends = std::tuple<CpuScalar, CpuSimd<>>;

namespace {

/// The written tolerance of an op on backend B: the oracle accumulates in double, CpuSimd in float.
template <class B>
constexpr double op_tolerance() {
  return std::is_same_v<B, CpuScalar> ? 1e-12 : 2e-5;
}

/// Float data from doubles.
std::vector<float> to_float(ref::Vec const& v) { return std::vector<float>(v.begin(), v.end()); }

/// Token shapes across the kernels' edges: decode (<= 4 rows: streaming dots), <= 8 (streaming experts),
/// more than one 64-token router block.
constexpr int kTokenCounts[] = {0, 1, 3, 4, 5, 9, 70};

}  // namespace

TEMPLATE_LIST_TEST_CASE("op router_logits matches the double reference", "[ops]", CpuBackends) {
  using B = TestType;
  for (int d : {1, 16, 33}) {
    for (int t : kTokenCounts) {
      int const n = 6;
      auto const x = ref::randn(static_cast<std::size_t>(t * d), 11 + t, 1.0), w = ref::randn(static_cast<std::size_t>(n * d), 12, 0.5),
                 b = ref::randn(static_cast<std::size_t>(n), 13, 0.5);
      auto const xf = to_float(x), wf = to_float(w), bf = to_float(b);
      std::vector<float> z(static_cast<std::size_t>(t * n));
      kernel::RouterLogits<B>::run(matrix_view(xf.data(), t, d),
                                   RouterView<float>{matrix_view(wf.data(), n, d), vector_view(bf.data(), n)},
                                   matrix_view(z.data(), t, n));
      ref::Vec want;
      for (int i = 0; i < t; ++i) {
        ref::Vec xi(xf.begin() + i * d, xf.begin() + (i + 1) * d);
        ref::Vec wi(wf.begin(), wf.end()), bi(bf.begin(), bf.end());
        auto const zi = ref::logits(wi, bi, xi.data(), n, d);
        want.insert(want.end(), zi.begin(), zi.end());
      }
      INFO("d=" << d << " t=" << t);
      if (t > 0) CHECK(ref::rel_l2(z.data(), want.data(), z.size()) <= std::max(op_tolerance<B>(), 1e-7));  // float outputs
    }
  }
}

TEMPLATE_LIST_TEST_CASE("op select_experts: ids bitwise (ties to the lower index), weights for every mode", "[ops]",
                        CpuBackends) {
  using B = TestType;
  int const n = 6, t = 7;
  for (auto mode : {CombineMode::code_ref, CombineMode::softmax_topk, CombineMode::softmax_topk_renorm,
                    CombineMode::topk_softmax, CombineMode::sigmoid_topk}) {
    for (int k : {1, 2, 6}) {
      ref::Vec z = ref::randn(static_cast<std::size_t>(t * n), 21, 2.0);
      for (int e = 0; e < n; ++e) z[static_cast<std::size_t>(e)] = 0.5;  // token 0: every logit tied
      z[static_cast<std::size_t>(n + 3)] = z[static_cast<std::size_t>(n + 1)];  // token 1: one tie
      std::vector<float> zf = to_float(z);
      std::vector<std::int32_t> ids(static_cast<std::size_t>(t * k));
      std::vector<float> w(static_cast<std::size_t>(t * k));
      GatingParams g;
      g.mode = mode;
      g.top_k = k;
      kernel::SelectExperts<B>::run(matrix_view<float const>(zf.data(), t, n), g, matrix_view(ids.data(), t, k),
                                    matrix_view(w.data(), t, k));
      for (int i = 0; i < t; ++i) {
        ref::Vec zi(zf.begin() + i * n, zf.begin() + (i + 1) * n);
        auto const sel = ref::topk(zi, k);
        auto const wi = ref::combine_weights(to_string(mode), zi, sel);
        for (int j = 0; j < k; ++j) {
          INFO("mode=" << to_string(mode) << " k=" << k << " token " << i << " j " << j);
          REQUIRE(ids[static_cast<std::size_t>(i * k + j)] == sel[static_cast<std::size_t>(j)]);
          CHECK(w[static_cast<std::size_t>(i * k + j)] == Approx(wi[static_cast<std::size_t>(j)]).epsilon(1e-6));
        }
      }
    }
  }
}

TEMPLATE_LIST_TEST_CASE("op group_by_expert: stable groups and the inverse map, bitwise", "[ops]", CpuBackends) {
  using B = TestType;
  int const n = 5, k = 2;
  for (int t : kTokenCounts) {
    std::vector<std::int32_t> ids(static_cast<std::size_t>(t * k));
    for (int i = 0; i < t; ++i) {  // distinct experts per token; expert 4 never chosen, expert 0 by every token
      ids[static_cast<std::size_t>(i * k)] = 0;
      ids[static_cast<std::size_t>(i * k + 1)] = 1 + (i * 7) % 3;
    }
    std::vector<std::int64_t> offsets(n + 1);
    std::vector<std::int32_t> slots(static_cast<std::size_t>(t * k)), rows(static_cast<std::size_t>(t * k));
    kernel::GroupByExpert<B>::run(matrix_view<std::int32_t const>(ids.data(), t, k), n, vector_view(offsets.data(), n + 1),
                                  vector_view(slots.data(), t * k), vector_view(rows.data(), t * k));
    std::vector<std::int32_t> want;
    std::vector<std::int64_t> want_offsets{0};
    for (int e = 0; e < n; ++e) {
      for (int s = 0; s < t * k; ++s)
        if (ids[static_cast<std::size_t>(s)] == e) want.push_back(s);
      want_offsets.push_back(static_cast<std::int64_t>(want.size()));
    }
    INFO("t=" << t);
    REQUIRE(slots == want);
    REQUIRE(offsets == want_offsets);
    for (int r = 0; r < t * k; ++r) REQUIRE(rows[static_cast<std::size_t>(slots[static_cast<std::size_t>(r)])] == r);
  }
}

TEMPLATE_LIST_TEST_CASE("op combine: integer-valued inputs give exact sums, in slot or grouped order", "[ops]",
                        CpuBackends) {
  using B = TestType;
  int const t = 9, k = 3, d = 17;
  std::vector<float> w(static_cast<std::size_t>(t * k)), out(static_cast<std::size_t>(t * k * d));
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(static_cast<int>(i * 5 % 17) - 8);
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(static_cast<int>(i * 3 % 17) - 8);
  // A grouped order: slot s stored at row rows[s] (a fixed permutation).
  std::vector<std::int32_t> rows(static_cast<std::size_t>(t * k));
  for (int s = 0; s < t * k; ++s) rows[static_cast<std::size_t>(s)] = (s * 7) % (t * k);
  for (bool grouped : {false, true}) {
    std::vector<float> y(static_cast<std::size_t>(t * d), -1.f);
    kernel::Combine<B>::run(matrix_view<float const>(w.data(), t, k), matrix_view<float const>(out.data(), t * k, d),
                            grouped ? vector_view<std::int32_t const>(rows.data(), t * k) : VectorView<std::int32_t const>(),
                            matrix_view(y.data(), t, d));
    for (int i = 0; i < t; ++i)
      for (int c = 0; c < d; ++c) {
        double want = 0;
        for (int j = 0; j < k; ++j) {
          int const s = i * k + j, r = grouped ? rows[static_cast<std::size_t>(s)] : s;
          want += static_cast<double>(w[static_cast<std::size_t>(s)]) * out[static_cast<std::size_t>(r * d + c)];
        }
        REQUIRE(y[static_cast<std::size_t>(i * d + c)] == static_cast<float>(want));
      }
  }
}

namespace {

/// Runs op expert_swiglu on B for weights of format W and compares every grouped row with the reference expert
/// (on the weights as rounded to W).
template <class B, class W>
void check_expert_swiglu(int d, int d_ff, int n, int k, int t) {
  fixture::DenseWeights<W> dense(ref::random_ffn(d, d_ff, 31 + static_cast<std::uint64_t>(t)));
  auto const partition = ffn::ExpertPartition::random(d_ff, n, 32);
  auto const experts = ffn::factorize(dense.view(), partition);
  ref::Ffn const rounded = dense.rounded();
  auto const x = to_float(ref::randn(static_cast<std::size_t>(t * d), 33, 1.0));
  std::vector<std::int32_t> ids(static_cast<std::size_t>(t * k));
  for (int i = 0; i < t; ++i)
    for (int j = 0; j < k; ++j) ids[static_cast<std::size_t>(i * k + j)] = (i + j * 3) % n;  // distinct when k <= 3
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(n + 1));
  std::vector<std::int32_t> slots(static_cast<std::size_t>(t * k));
  kernel::GroupByExpert<CpuScalar>::run(matrix_view<std::int32_t const>(ids.data(), t, k), n,
                                        vector_view(offsets.data(), n + 1), vector_view(slots.data(), t * k),
                                        VectorView<std::int32_t>());
  using Step = kernel::ExpertSwiglu<B>;
  using Out = typename Step::template output_t<W, float>;
  std::vector<Out> out(static_cast<std::size_t>(t * k * d));
  Workspace ws(Step::template workspace<W, float>(t * k, d, n, experts.d_expert(), detail::max_threads()).bytes());
  Step::run(experts.view(), matrix_view<float const>(x.data(), t, d), k, vector_view<std::int64_t const>(offsets.data(), n + 1),
            vector_view<std::int32_t const>(slots.data(), t * k), matrix_view(out.data(), t * k, d), ws.span());
  auto const& perm = partition.permutation();
  ref::Vec got, want;
  for (int e = 0; e < n; ++e)
    for (std::int64_t r = offsets[static_cast<std::size_t>(e)]; r < offsets[static_cast<std::size_t>(e + 1)]; ++r) {
      int const token = slots[static_cast<std::size_t>(r)] / k;
      ref::Vec xi(x.begin() + token * d, x.begin() + (token + 1) * d);
      auto const yi = ref::expert(rounded, perm, n, e, xi.data());
      want.insert(want.end(), yi.begin(), yi.end());
      got.insert(got.end(), out.begin() + r * d, out.begin() + (r + 1) * d);
    }
  INFO("format=" << dtype_traits<W>::name() << " d=" << d << " d_ff=" << d_ff << " n=" << n << " k=" << k << " t=" << t);
  // f64 and f16 run the oracle on every backend (double accumulation).
  double const tol = std::is_same_v<Out, double>          ? 1e-12
                     : std::is_same_v<B, CpuScalar> ? op_tolerance<B>()
                                                    : fixture::simd_oracle_tolerance<W>(op_tolerance<B>());
  if (!got.empty()) CHECK(ref::rel_l2(got.data(), want.data(), got.size()) <= tol);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("op expert_swiglu matches the reference experts for f32, bf16, f16 and f64 weights", "[ops]",
                        CpuBackends) {
  using B = TestType;
  for (int t : kTokenCounts) {
    check_expert_swiglu<B, float>(24, 64, 4, 2, t);
    check_expert_swiglu<B, bf16>(24, 64, 4, 2, t);
    check_expert_swiglu<B, f16>(24, 64, 4, 2, t);
    check_expert_swiglu<B, double>(24, 64, 4, 2, t);
  }
  check_expert_swiglu<B, float>(33, 300, 3, 3, 130);  // more than one 128-row block per expert (prefill GEMMs)
  check_expert_swiglu<B, bf16>(33, 300, 3, 1, 2);
}

TEMPLATE_LIST_TEST_CASE("op swiglu (dense FFN) matches the reference", "[ops]", CpuBackends) {
  using B = TestType;
  for (int t : kTokenCounts) {
    int const d = 20, d_ff = 40;
    fixture::DenseWeights<float> dense(ref::random_ffn(d, d_ff, 41));
    auto const x = to_float(ref::randn(static_cast<std::size_t>(t * d), 42, 1.0));
    std::vector<float> y(static_cast<std::size_t>(t * d));
    Workspace ws(kernel::Swiglu<B>::template workspace<float, float>(t, d, d_ff, detail::max_threads()).bytes());
    kernel::Swiglu<B>::run(dense.gate.cview(), dense.up.cview(), dense.down.cview(), matrix_view<float const>(x.data(), t, d),
                           matrix_view(y.data(), t, d), ws.span());
    ref::Vec want;
    for (int i = 0; i < t; ++i) {
      ref::Vec xi(x.begin() + i * d, x.begin() + (i + 1) * d);
      auto const yi = ref::dense(dense.rounded(), xi.data());
      want.insert(want.end(), yi.begin(), yi.end());
    }
    INFO("t=" << t);
    if (t > 0) CHECK(ref::rel_l2(y.data(), want.data(), y.size()) <= std::max(op_tolerance<B>(), 1e-7));
  }
}

TEMPLATE_LIST_TEST_CASE("the composed forward runs f16 experts end to end (oracle kernels) on every backend", "[ops]",
                        CpuBackends) {
  using B = TestType;
  int const d = 16, d_ff = 32, n = 4, k = 2, t = 6;
  fixture::DenseWeights<f16> dense(ref::random_ffn(d, d_ff, 51));
  auto const partition = ffn::ExpertPartition::random(d_ff, n, 52);
  auto const router = moe::Router<float>::random(d, n, 53, 1.0);
  moe::Gating g;
  g.mode = moe::CombineMode::softmax_topk_renorm;
  g.top_k = k;
  moe::MoeFfn<f16, B> layer(ffn::factorize(dense.view(), partition), router, g);
  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(t * d), 54, 1.0), t, d);
  Matrix<float> y({t, d});
  layer.forward(x.cview(), y.view());
  ref::Ffn const rounded = dense.rounded();
  ref::Vec rw, rb(static_cast<std::size_t>(n));
  for (std::ptrdiff_t i = 0; i < router.weight().size(); ++i) rw.push_back(router.weight().data()[i]);
  for (int e = 0; e < n; ++e) rb[static_cast<std::size_t>(e)] = router.bias()(e);
  for (int i = 0; i < t; ++i) {
    ref::Vec xi(x.data() + i * d, x.data() + (i + 1) * d);
    auto const z = ref::logits(rw, rb, xi.data(), n, d);
    auto const sel = ref::topk(z, k);
    auto const w = ref::combine_weights("softmax_topk_renorm", z, sel);
    ref::Vec want(static_cast<std::size_t>(d), 0.0);
    for (int j = 0; j < k; ++j) {
      auto const o = ref::expert(rounded, partition.permutation(), n, sel[static_cast<std::size_t>(j)], xi.data());
      for (int c = 0; c < d; ++c) want[static_cast<std::size_t>(c)] += w[static_cast<std::size_t>(j)] * o[static_cast<std::size_t>(c)];
    }
    CHECK(ref::rel_l2(y.data() + i * d, want.data(), static_cast<std::size_t>(d)) <= 1e-6);
  }
}
