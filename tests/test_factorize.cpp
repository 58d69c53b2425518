// SPDX-License-Identifier: Apache-2.0
// Tests of partitions, factorize / unfactorize and the factorization identity sum_e E_e(x) = F(x) (docs/math.md §1.2).
#include <catch2/catch.hpp>

#include <factorllm/ffn/factorize.hpp>
#include <factorllm/ffn/permutation.hpp>
#include <factorllm/ffn/swiglu.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using ffn::ExpertPartition;

namespace {
bool is_permutation_of_iota(std::vector<std::int32_t> p) {
  std::sort(p.begin(), p.end());
  for (std::size_t i = 0; i < p.size(); ++i)
    if (p[i] != static_cast<std::int32_t>(i)) return false;
  return true;
}


/// A reference FFN stored with `pad` unused floats (99) after every row, as a host engine may hand its weights, and
/// the strided views of it.
struct StridedFfn {
  std::vector<float> gate, up, down;
  ffn::DenseFfnView<float> view;
  StridedFfn(ref::Ffn const& f, std::ptrdiff_t d, std::ptrdiff_t d_ff, std::ptrdiff_t pad)
      : gate(static_cast<std::size_t>(d_ff * (d + pad)), 99.f), up(gate), down(static_cast<std::size_t>(d * (d_ff + pad)), 99.f) {
    for (std::ptrdiff_t i = 0; i < d_ff; ++i)
      for (std::ptrdiff_t k = 0; k < d; ++k) {
        gate[static_cast<std::size_t>(i * (d + pad) + k)] = static_cast<float>(f.gate[static_cast<std::size_t>(i * d + k)]);
        up[static_cast<std::size_t>(i * (d + pad) + k)] = static_cast<float>(f.up[static_cast<std::size_t>(i * d + k)]);
        down[static_cast<std::size_t>(k * (d_ff + pad) + i)] = static_cast<float>(f.down[static_cast<std::size_t>(k * d_ff + i)]);
      }
    view = ffn::DenseFfnView<float>{matrix_view<float const>(gate.data(), d_ff, d, d + pad),
                                    matrix_view<float const>(up.data(), d_ff, d, d + pad),
                                    matrix_view<float const>(down.data(), d, d_ff, d_ff + pad)};
  }
  StridedFfn(StridedFfn const&) = delete;  // the views point into this object's vectors
  StridedFfn& operator=(StridedFfn const&) = delete;
};
}  // namespace

TEST_CASE("convert_format gives the experts factorize gives from the converted dense FFN, bit for bit", "[ffn][factorize]") {
  int const d = 12, d_ff = 24, n = 3;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 61));
  fixture::DenseWeights<bf16> wb(ref::random_ffn(d, d_ff, 61));  // the same values rounded to bf16
  auto const part = ffn::ExpertPartition::random(d_ff, n, 62);
  auto const converted = ffn::convert_format<bf16>(ffn::factorize(w.view(), part));
  auto const direct = ffn::factorize(wb.view(), part);
  REQUIRE(converted.partition().permutation() == direct.partition().permutation());
  for (std::ptrdiff_t i = 0; i < direct.gate_tensor().size(); ++i) {
    REQUIRE(converted.gate_tensor()[i] == direct.gate_tensor()[i]);
    REQUIRE(converted.up_tensor()[i] == direct.up_tensor()[i]);
  }
  for (std::ptrdiff_t i = 0; i < direct.down_tensor().size(); ++i) REQUIRE(converted.down_tensor()[i] == direct.down_tensor()[i]);
}

TEST_CASE("partition builders produce valid balanced permutations", "[ffn][partition]") {
  auto const c = ExpertPartition::contiguous(12, 3);
  CHECK(c.d_expert() == 4);
  CHECK(c.permutation() == std::vector<std::int32_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11});
  auto const r1 = ExpertPartition::random(172, 4, 42), r2 = ExpertPartition::random(172, 4, 42),
             r3 = ExpertPartition::random(172, 4, 43);
  CHECK(is_permutation_of_iota(r1.permutation()));
  CHECK(r1.permutation() == r2.permutation());  // seeded: reproducible
  CHECK(r1.permutation() != r3.permutation());
  CHECK(r1.permutation() != c.permutation());
  auto const a = ExpertPartition::from_assignment({1, 0, 1, 0, 2, 2}, 3);
  CHECK(a.permutation() == std::vector<std::int32_t>{1, 3, 0, 2, 4, 5});
  CHECK(a.assignment() == std::vector<std::int32_t>{1, 0, 1, 0, 2, 2});
  auto const inv = r1.inverse();
  for (std::size_t p = 0; p < inv.size(); ++p) REQUIRE(inv[static_cast<std::size_t>(r1.permutation()[p])] == static_cast<std::int32_t>(p));
  CHECK(ExpertPartition::contiguous(5, 1).d_expert() == 5);  // N = 1
}

TEST_CASE("partition builders reject invalid input", "[ffn][partition][errors]") {
  CHECK_THROWS_AS(ExpertPartition::contiguous(172, 5), value_error);  // 172 % 5 != 0
  CHECK_THROWS_WITH(ExpertPartition::contiguous(172, 5), Catch::Contains("not divisible"));
  CHECK_THROWS_AS(ExpertPartition::contiguous(8, 0), value_error);
  CHECK_THROWS_AS(ExpertPartition::contiguous(0, 1), value_error);
  CHECK_THROWS_AS(ExpertPartition::random(10, 3, 1), value_error);
  CHECK_THROWS_AS(ExpertPartition::from_permutation({0, 1, 1, 3}, 2), value_error);   // repeat
  CHECK_THROWS_AS(ExpertPartition::from_permutation({0, 1, 2, 4}, 2), value_error);   // out of range
  CHECK_THROWS_AS(ExpertPartition::from_permutation({0, -1, 2, 3}, 2), value_error);  // negative
  CHECK_THROWS_AS(ExpertPartition::from_permutation({0, 1, 2}, 2), value_error);      // not divisible
  CHECK_THROWS_AS(ExpertPartition::from_assignment({0, 0, 0, 1}, 2), value_error);    // unbalanced
  CHECK_THROWS_AS(ExpertPartition::from_assignment({0, 2, 1, 1}, 2), value_error);    // expert out of range
}

TEST_CASE("factorize gathers gate/up rows and down columns by one permutation, unfactorize is bit-exact",
          "[ffn][factorize]") {
  auto const f = ref::random_ffn(6, 12, 3);
  fixture::DenseWeights<float> w(f);
  for (auto const& part : fixture::every_partition_builder(12, 3)) {
    auto const ex = ffn::factorize(w.view(), part);
    REQUIRE(ex.n_experts() == 3);
    REQUIRE(ex.d_expert() == 4);
    for (std::ptrdiff_t e = 0; e < 3; ++e)
      for (std::ptrdiff_t i = 0; i < 4; ++i) {
        std::ptrdiff_t const neuron = part.permutation()[static_cast<std::size_t>(e * 4 + i)];
        for (std::ptrdiff_t k = 0; k < 6; ++k) {
          REQUIRE(ex.gate(e)(i, k) == w.gate(neuron, k));
          REQUIRE(ex.up(e)(i, k) == w.up(neuron, k));
          REQUIRE(ex.down(e)(k, i) == w.down(k, neuron));  // the SAME permutation on down's columns
        }
      }
    auto const back = ffn::unfactorize(ex);
    REQUIRE(std::equal(back.gate.data(), back.gate.data() + back.gate.size(), w.gate.data()));
    REQUIRE(std::equal(back.up.data(), back.up.data() + back.up.size(), w.up.data()));
    REQUIRE(std::equal(back.down.data(), back.down.data() + back.down.size(), w.down.data()));
  }
  fixture::DenseWeights<float> w2(ref::random_ffn(6, 8, 4));
  CHECK_THROWS_AS(ffn::factorize(w2.view(), ExpertPartition::contiguous(12, 3)), shape_error);
}

TEST_CASE("factorize works on strided (padded) host weights", "[ffn][factorize]") {
  // A host engine may hand weights with padded rows; the view's stride must be honoured.
  std::ptrdiff_t const d = 5, d_ff = 8, pad = 3;
  auto const f = ref::random_ffn(static_cast<int>(d), static_cast<int>(d_ff), 11);
  StridedFfn const host(f, d, d_ff, pad);
  ffn::DenseFfnView<float> const strided = host.view;
  fixture::DenseWeights<float> dense(f);
  auto const a = ffn::factorize(strided, ExpertPartition::random(d_ff, 2, 1));
  auto const b = ffn::factorize(dense.view(), ExpertPartition::random(d_ff, 2, 1));
  REQUIRE(std::equal(a.gate_tensor().data(), a.gate_tensor().data() + a.gate_tensor().size(), b.gate_tensor().data()));
  REQUIRE(std::equal(a.down_tensor().data(), a.down_tensor().data() + a.down_tensor().size(), b.down_tensor().data()));
}

TEMPLATE_TEST_CASE("each expert matches the reference expert, all experts sum to the dense FFN", "[ffn][factorize]",
                   float, double, bf16) {
  using A = activation_t<TestType>;
  int const d = 16, d_ff = 48, n_tokens = 9;
  fixture::DenseWeights<TestType> w(ref::random_ffn(d, d_ff, 21));
  ref::Ffn const f = w.rounded();  // the reference sees the same (rounded) weights
  auto const xv = ref::randn(static_cast<std::size_t>(n_tokens * d), 5, 1.0);
  auto const x = fixture::to_matrix<A>(xv, n_tokens, d);
  // Tolerance: outputs are sums of d_ff products in double, rounded once to the activation type.
  double const tol = std::is_same_v<A, double> ? 1e-12 : 2e-6;
  for (int n : {1, 2, 4, 8}) {
    for (auto const& part : fixture::every_partition_builder(d_ff, n)) {
      auto const ex = ffn::factorize(w.view(), part);
      Matrix<A> sum({n_tokens, d});
      Matrix<A> ye({n_tokens, d});
      std::vector<double> acc(static_cast<std::size_t>(n_tokens * d), 0.0);
      for (int e = 0; e < n; ++e) {
        ffn::swiglu_forward(ex.expert(e), x.cview(), ye.view());
        for (int t = 0; t < n_tokens; ++t) {
          ref::Vec xd(xv.begin() + t * d, xv.begin() + (t + 1) * d);
          for (auto& v : xd) v = static_cast<double>(static_cast<A>(v));
          auto const r = ref::expert(f, part.permutation(), n, e, xd.data());
          INFO("n=" << n << " expert " << e << " token " << t);
          REQUIRE(ref::max_rel(ye.view().row(t), r, static_cast<std::size_t>(d), 1e-3) < tol);
          for (int o = 0; o < d; ++o) acc[static_cast<std::size_t>(t * d + o)] += static_cast<double>(ye(t, o));
        }
      }
      Matrix<A> yd({n_tokens, d});
      ffn::swiglu_forward(w.view(), x.cview(), yd.view());
      Matrix<A> x_copy = x, yw({n_tokens, d});
      ffn::swiglu_forward(w.view(), x_copy.view(), yw.view());  // a writable x view is accepted as well
      for (std::ptrdiff_t i = 0; i < yd.size(); ++i) REQUIRE(yw[i] == yd[i]);
      INFO("n=" << n);
      CHECK(ref::rel_l2(acc, yd.data(), acc.size()) < tol);
    }
  }
}

// ---- Zero-neuron padding: pad_hidden (dense) and pad_experts (factorized) ----

TEMPLATE_TEST_CASE("pad_hidden appends zero neurons: the padded FFN equals the unpadded one against the reference",
                   "[ffn][pad]", float, double, bf16) {
  using A = activation_t<TestType>;
  int const d = 12, n_tokens = 7;
  double const tol = std::is_same_v<A, double> ? 1e-12 : 2e-6;  // one rounding of a double sum to A
  struct Case {
    int d_ff;
    std::ptrdiff_t multiple, padded;
  };
  for (Case const c : {Case{10, 8, 16}, Case{16, 8, 16}, Case{10, 1, 10}, Case{7, 32, 32}, Case{43, 32, 64},
                       Case{172, 128, 256}}) {
    INFO("d_ff " << c.d_ff << ", multiple " << c.multiple);
    fixture::DenseWeights<TestType> w(ref::random_ffn(d, c.d_ff, 300 + static_cast<std::uint64_t>(c.d_ff)));
    ref::Ffn const f = w.rounded();  // the UNPADDED FFN, as the double-loop reference sees it
    auto const p = ffn::pad_hidden(w.view(), c.multiple);
    REQUIRE(p.view().d_ff() == c.padded);
    REQUIRE(p.view().d_model() == d);
    // Neurons keep their index and bits; the new ones are exactly zero.
    for (std::ptrdiff_t i = 0; i < c.padded; ++i)
      for (std::ptrdiff_t k = 0; k < d; ++k) {
        double const g = i < c.d_ff ? to_double(w.gate(i, k)) : 0.0, u = i < c.d_ff ? to_double(w.up(i, k)) : 0.0,
                     dn = i < c.d_ff ? to_double(w.down(k, i)) : 0.0;
        REQUIRE(to_double(p.gate(i, k)) == g);
        REQUIRE(to_double(p.up(i, k)) == u);
        REQUIRE(to_double(p.down(k, i)) == dn);
      }
    auto const xv = ref::randn(static_cast<std::size_t>(n_tokens * d), 17, 1.5);
    auto const x = fixture::to_matrix<A>(xv, n_tokens, d);
    Matrix<A> y_pad({n_tokens, d}), y_pad_simd({n_tokens, d}), y({n_tokens, d});
    ffn::swiglu_forward(p.view(), x.cview(), y_pad.view());                     // CpuScalar oracle
    ffn::swiglu_forward(p.view(), x.cview(), y_pad_simd.view(), CpuSimd<>{});  // the SIMD kernels
    ffn::swiglu_forward(w.view(), x.cview(), y.view());
    for (int t = 0; t < n_tokens; ++t) {
      ref::Vec xd(xv.begin() + t * d, xv.begin() + (t + 1) * d);
      for (auto& v : xd) v = static_cast<double>(static_cast<A>(v));
      auto const r = ref::dense(f, xd.data());  // double loops over the d_ff original neurons only
      INFO("token " << t);
      REQUIRE(ref::max_rel(y_pad.view().row(t), r, static_cast<std::size_t>(d), 1e-3) < tol);
      // float sums (and, for bf16 decode on a CPU with AVX512-BF16, activations rounded to bf16)
      REQUIRE(ref::rel_l2(y_pad_simd.view().row(t), r, static_cast<std::size_t>(d)) < fixture::simd_oracle_tolerance<TestType>(1e-5));
    }
    // And the library's own unpadded output: the zero neurons add zeros to the same double sums (not always the same
    // bits: the compiler may contract and vectorize the sums differently for another d_ff).
    REQUIRE(ref::max_rel(y_pad.data(), y.data(), static_cast<std::size_t>(y.size()), 1e-3) < tol);
  }
}

TEST_CASE("pad_hidden reads strided views and refuses bad arguments with typed errors naming them", "[ffn][pad][errors]") {
  std::ptrdiff_t const d = 5, d_ff = 6, pad = 3;
  auto const f = ref::random_ffn(static_cast<int>(d), static_cast<int>(d_ff), 31);
  StridedFfn const host(f, d, d_ff, pad);
  ffn::DenseFfnView<float> const strided = host.view;
  fixture::DenseWeights<float> dense(f);
  auto const a = ffn::pad_hidden(strided, 4), b = ffn::pad_hidden(dense.view(), 4);
  REQUIRE(a.gate.extent(0) == 8);
  REQUIRE(fixture::same_bits(a.gate, b.gate));  // the 99s between rows are never read
  REQUIRE(fixture::same_bits(a.up, b.up));
  REQUIRE(fixture::same_bits(a.down, b.down));

  CHECK_THROWS_AS(ffn::pad_hidden(dense.view(), 0), value_error);
  CHECK_THROWS_WITH(ffn::pad_hidden(dense.view(), 0), Catch::Contains("pad_hidden: argument 'multiple' = 0"));
  CHECK_THROWS_WITH(ffn::pad_hidden(dense.view(), -32), Catch::Contains("argument 'multiple' = -32 must be >= 1"));
  std::ptrdiff_t const too_big = std::ptrdiff_t{1} << 31;  // 2^31: the padded d_ff no longer fits int32
  CHECK_THROWS_AS(ffn::pad_hidden(dense.view(), too_big), value_error);
  CHECK_THROWS_WITH(ffn::pad_hidden(dense.view(), too_big), Catch::Contains("beyond 2^31 - 1 neurons"));
  CHECK_NOTHROW(ffn::pad_hidden(dense.view(), 1 << 10));
  ffn::DenseFfnView<float> bad{dense.gate.cview(), dense.gate.cview().slice_rows(0, 4), dense.down.cview()};
  CHECK_THROWS_AS(ffn::pad_hidden(bad, 8), shape_error);
  CHECK_THROWS_WITH(ffn::pad_hidden(bad, 8), Catch::Contains("pad_hidden: argument 'up'"));
}

TEST_CASE("pad_experts pads every expert with zero neurons: same experts, unfactorize gives pad_hidden's FFN",
          "[ffn][pad]") {
  int const d = 12, d_ff = 172, n_tokens = 5;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 41));
  ref::Ffn const f = w.rounded();
  auto const xv = ref::randn(static_cast<std::size_t>(n_tokens * d), 43, 1.0);
  auto const x = fixture::to_matrix<float>(xv, n_tokens, d);
  for (int n : {1, 2, 4}) {
    for (auto const& part : fixture::every_partition_builder(d_ff, n)) {
      std::ptrdiff_t const m = d_ff / n, multiple = 32, mp = (m + 31) / 32 * 32;
      INFO("N " << n << ", d_expert " << m << " -> " << mp);
      auto const ex = ffn::factorize(w.view(), part);
      auto const p = ffn::pad_experts(ex, multiple);
      REQUIRE(p.n_experts() == n);
      REQUIRE(p.d_expert() == mp);
      REQUIRE(p.d_ff() == n * mp);
      REQUIRE(p.d_model() == d);
      // The padding of the dense FFN, spread evenly over the experts, bit for bit.
      auto const back = ffn::unfactorize(p);
      auto const dense_padded = ffn::pad_hidden(w.view(), n * multiple);
      REQUIRE(fixture::same_bits(back.gate, dense_padded.gate));
      REQUIRE(fixture::same_bits(back.up, dense_padded.up));
      REQUIRE(fixture::same_bits(back.down, dense_padded.down));
      // Each padded expert is the unpadded expert e of the reference (its m original neurons).
      Matrix<float> ye({n_tokens, d});
      for (int e = 0; e < n; ++e) {
        ffn::swiglu_forward(p.expert(e), x.cview(), ye.view());
        for (int t = 0; t < n_tokens; ++t) {
          ref::Vec xd(xv.begin() + t * d, xv.begin() + (t + 1) * d);
          for (auto& v : xd) v = static_cast<double>(static_cast<float>(v));  // the float inputs the layer sees
          auto const r = ref::expert(f, part.permutation(), n, e, xd.data());
          INFO("expert " << e << " token " << t);
          REQUIRE(ref::max_rel(ye.view().row(t), r, static_cast<std::size_t>(d), 1e-3) < 2e-6);
        }
      }
    }
  }
  CHECK_THROWS_AS(ffn::pad_experts(ffn::ExpertWeights<float>{}, 32), value_error);
  CHECK_THROWS_WITH(ffn::pad_experts(ffn::ExpertWeights<float>{}, 32), Catch::Contains("argument 'experts'"));
  auto const ex = ffn::factorize(w.view(), ExpertPartition::contiguous(d_ff, 4));
  CHECK_THROWS_AS(ffn::pad_experts(ex, 0), value_error);
  CHECK_THROWS_WITH(ffn::pad_experts(ex, 0), Catch::Contains("pad_experts: argument 'multiple' = 0 must be >= 1"));
  // 4 experts of 2^30 neurons: 2^32 in all, beyond the int32 neuron numbers.
  CHECK_THROWS_WITH(ffn::pad_experts(ex, std::ptrdiff_t{1} << 30), Catch::Contains("beyond 2^31 - 1 neurons in all"));
}

TEST_CASE("pad_experts makes d_expert 43 quantizable: the zero blocks dequantize to exact zeros", "[ffn][pad][quant]") {
  int const d = 32, d_ff = 172, n = 4;  // stories260K's d_ff split 4 ways: d_expert 43 holds no whole block
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 51));
  auto const ex = ffn::factorize(w.view(), ExpertPartition::random(d_ff, n, 52));
  CHECK_THROWS_AS(ffn::convert_format<q8_0>(ex), shape_error);
  auto const p = ffn::pad_experts(ex, kQuantBlock);
  auto const q8 = ffn::convert_format<q8_0>(p);
  auto const q4 = ffn::convert_format<q4_0>(p);
  auto const back8 = ffn::convert_format<float>(q8), back4 = ffn::convert_format<float>(q4);
  for (auto const* back : {&back8, &back4})
    for (std::ptrdiff_t e = 0; e < n; ++e)
      for (std::ptrdiff_t i = 43; i < 64; ++i)
        for (std::ptrdiff_t k = 0; k < d; ++k) {
          REQUIRE(back->gate(e)(i, k) == 0.f);
          REQUIRE(back->up(e)(i, k) == 0.f);
          REQUIRE(back->down(e)(k, i) == 0.f);
        }
  // Gate and up rows (d_model long) are untouched by the padding: their blocks are those of the unpadded rows.
  auto const gate8 = convert<q8_0>(ex.gate_tensor().cview());
  for (std::ptrdiff_t e = 0; e < n; ++e)
    for (std::ptrdiff_t i = 0; i < 43; ++i) REQUIRE(std::memcmp(q8.gate(e).row(i), gate8.cview()[e].row(i), sizeof(q8_0)) == 0);
  // The quantized padded experts run on the oracle: each output is the dequantized expert's (exact weights).
  auto const xv = ref::randn(static_cast<std::size_t>(3 * d), 53, 1.0);
  auto const x = fixture::to_matrix<float>(xv, 3, d);
  Matrix<float> yq({3, d}), yf({3, d});
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    ffn::swiglu_forward(q4.expert(e), x.cview(), yq.view());
    ffn::swiglu_forward(back4.expert(e), x.cview(), yf.view());
    for (std::ptrdiff_t i = 0; i < yq.size(); ++i) REQUIRE(yq[i] == yf[i]);
  }
}
