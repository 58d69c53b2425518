// SPDX-License-Identifier: Apache-2.0
// Tests of the balanced neuron clustering (ffn/clustering.hpp): balance and validity of every partition, recovery
// of planted clusters (on weights and on co-activation), the shared-expert variant, the K = N identity with a
// clustered partition, determinism (seed, OpenMP thread count) and the documented errors.
#include <catch2/catch.hpp>

#include <factorllm/ffn/clustering.hpp>
#include <factorllm/ffn/factorize.hpp>
#include <factorllm/moe/moe_ffn.hpp>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using ffn::ExpertPartition;

namespace {

/// True when `found` groups items exactly as `planted` does (same sets, any labels).
bool same_grouping(std::vector<std::int32_t> const& found, std::vector<int> const& planted) {
  std::map<int, std::int32_t> to_found;
  std::map<std::int32_t, int> to_planted;
  for (std::size_t i = 0; i < found.size(); ++i) {
    auto a = to_found.emplace(planted[i], found[i]);
    auto b = to_planted.emplace(found[i], planted[i]);
    if (a.first->second != found[i] || b.first->second != planted[i]) return false;
  }
  return true;
}

/// Every expert owns exactly d_ff / n neurons and the permutation is one.
void require_balanced(ExpertPartition const& p, std::int64_t d_ff, std::int64_t n) {
  REQUIRE(p.d_ff() == d_ff);
  REQUIRE(p.n_experts() == n);
  std::vector<int> seen(static_cast<std::size_t>(d_ff), 0), count(static_cast<std::size_t>(n), 0);
  for (auto v : p.permutation()) ++seen[static_cast<std::size_t>(v)];
  for (auto s : seen) REQUIRE(s == 1);
  for (auto e : p.assignment()) ++count[static_cast<std::size_t>(e)];
  for (auto c : count) REQUIRE(c == d_ff / n);
}

/// A random shuffle of `groups` labels, `per_group` of each (seeded).
std::vector<int> shuffled_groups(int groups, int per_group, std::uint64_t seed) {
  std::vector<int> g;
  for (int i = 0; i < groups; ++i)
    for (int j = 0; j < per_group; ++j) g.push_back(i);
  std::mt19937_64 rng(seed);
  std::shuffle(g.begin(), g.end(), rng);
  return g;
}

/// Planted weight clusters: neuron i's gate and up rows are copies of its group's prototype plus small noise.
ref::Ffn planted_weight_ffn(std::vector<int> const& group, int d, int n_groups, std::uint64_t seed, double noise) {
  int const d_ff = static_cast<int>(group.size());
  ref::Ffn f = ref::random_ffn(d, d_ff, seed);
  auto const proto_g = ref::randn(static_cast<std::size_t>(n_groups * d), seed + 10, 1.0);
  auto const proto_u = ref::randn(static_cast<std::size_t>(n_groups * d), seed + 11, 1.0);
  auto const eps = ref::randn(static_cast<std::size_t>(2 * d_ff * d), seed + 12, noise);
  for (int i = 0; i < d_ff; ++i)
    for (int k = 0; k < d; ++k) {
      auto const gi = static_cast<std::size_t>(group[static_cast<std::size_t>(i)] * d + k);
      f.gate[static_cast<std::size_t>(i * d + k)] = proto_g[gi] + eps[static_cast<std::size_t>(i * d + k)];
      f.up[static_cast<std::size_t>(i * d + k)] = proto_u[gi] + eps[static_cast<std::size_t>(d_ff * d + i * d + k)];
    }
  return f;
}

}  // namespace

TEST_CASE("balanced_kmeans recovers planted, shuffled clusters with exact sizes", "[ffn][cluster]") {
  for (std::uint64_t seed : {1u, 2u, 3u}) {
    int const k = 4, per = 6, dim = 5;
    auto const group = shuffled_groups(k, per, seed);
    auto const centers = ref::randn(static_cast<std::size_t>(k * dim), seed + 100, 3.0);
    auto const noise = ref::randn(group.size() * dim, seed + 200, 0.2);
    Matrix<double> f({static_cast<std::ptrdiff_t>(group.size()), dim});
    for (std::size_t i = 0; i < group.size(); ++i)
      for (int c = 0; c < dim; ++c)
        f(static_cast<std::ptrdiff_t>(i), c) = centers[static_cast<std::size_t>(group[i] * dim + c)] + noise[i * dim + static_cast<std::size_t>(c)];
    auto const a = ffn::balanced_kmeans(f.cview(), k, seed);
    INFO("seed " << seed);
    std::vector<int> count(k, 0);
    for (auto e : a) ++count[static_cast<std::size_t>(e)];
    for (auto c : count) REQUIRE(c == per);
    REQUIRE(same_grouping(a, group));
    REQUIRE(ffn::balanced_kmeans(f.cview(), k, seed) == a);  // deterministic for a seed
  }
}

TEST_CASE("balanced_kmeans keeps sizes exact when the natural clusters are unbalanced", "[ffn][cluster]") {
  // 10 points near 0 and 2 near 10: a plain k-means would split 10 / 2, the balanced one must give 6 / 6 and put
  // both far points in the same cluster.
  Matrix<double> f({12, 1});
  for (int i = 0; i < 10; ++i) f(i, 0) = 0.01 * i;
  f(10, 0) = 10.0;
  f(11, 0) = 10.1;
  auto const a = ffn::balanced_kmeans(f.cview(), 2, 5);
  REQUIRE(std::count(a.begin(), a.end(), 0) == 6);
  REQUIRE(a[10] == a[11]);
  // The cluster holding the far points also takes the four largest near points (the cheapest to move there).
  for (int i = 0; i < 6; ++i) CHECK(a[static_cast<std::size_t>(i)] != a[10]);
  for (int i = 6; i < 10; ++i) CHECK(a[static_cast<std::size_t>(i)] == a[10]);
}

TEMPLATE_TEST_CASE("cluster_weights groups neurons that are noisy copies of the same rows", "[ffn][cluster]", float, double,
                   bf16) {
  int const d = 10, n = 4, per = 8;
  for (std::uint64_t seed : {11u, 12u}) {
    auto const group = shuffled_groups(n, per, seed);
    fixture::DenseWeights<TestType> w(planted_weight_ffn(group, d, n, seed, 0.05));
    auto const p = ffn::cluster_weights(w.view(), n, seed);
    INFO("seed " << seed);
    require_balanced(p, n * per, n);
    REQUIRE(same_grouping(p.assignment(), group));
  }
}

TEST_CASE("cluster_activations groups neurons that fire on the same tokens, even with orthogonal weights",
          "[ffn][cluster]") {
  // Three token types; type g excites 4 orthogonal input directions b_{g,0..3}. Each neuron reads ONE direction
  // (two neurons per direction), so neurons of one type have orthogonal weights (the weight clustering cannot
  // tell which directions belong together) but co-activate on exactly the tokens of that type.
  int const n_types = 3, dirs = 4, d = n_types * dirs, d_ff = 2 * d, n_tokens = 90;
  std::vector<int> neuron_dir(static_cast<std::size_t>(d_ff));
  for (int i = 0; i < d_ff; ++i) neuron_dir[static_cast<std::size_t>(i)] = i % d;  // shuffle by a stride
  std::vector<int> group(static_cast<std::size_t>(d_ff));
  ref::Ffn f = ref::random_ffn(d, d_ff, 4);
  auto const eps = ref::randn(static_cast<std::size_t>(2 * d_ff * d), 5, 0.02);
  for (int i = 0; i < d_ff; ++i) {
    int const dir = (neuron_dir[static_cast<std::size_t>(i)] * 7) % d;  // permute directions across types
    group[static_cast<std::size_t>(i)] = dir / dirs;
    for (int k = 0; k < d; ++k) {
      f.gate[static_cast<std::size_t>(i * d + k)] = (k == dir ? 3.0 : 0.0) + eps[static_cast<std::size_t>(i * d + k)];
      f.up[static_cast<std::size_t>(i * d + k)] = (k == dir ? 1.0 : 0.0) + eps[static_cast<std::size_t>(d_ff * d + i * d + k)];
    }
  }
  fixture::DenseWeights<float> w(f);
  std::mt19937_64 rng(6);
  Matrix<float> x({n_tokens, d});
  for (int t = 0; t < n_tokens; ++t) {
    int const type = t % n_types;
    for (int k = 0; k < d; ++k)
      x(t, k) = static_cast<float>((k / dirs == type ? 0.5 + detail::uniform01(rng) : 0.0) + 0.05 * detail::standard_normal(rng));
  }
  auto const p = ffn::cluster_activations(w.view(), x.cview(), n_types, 3);
  require_balanced(p, d_ff, n_types);
  REQUIRE(same_grouping(p.assignment(), group));
  // A row stride larger than d_model gives the same partition.
  Matrix<float> wide({n_tokens, d + 5});
  for (int t = 0; t < n_tokens; ++t)
    for (int k = 0; k < d; ++k) wide(t, k) = x(t, k);
  auto const strided = matrix_view(wide.data(), n_tokens, d, d + 5);
  REQUIRE(ffn::cluster_activations(w.view(), MatrixView<float const>(strided), n_types, 3).permutation() == p.permutation());
}

TEST_CASE("cluster_activations_shared puts the most important neurons in the first experts", "[ffn][cluster]") {
  int const d = 8, d_ff = 24, n_tokens = 40;
  ref::Ffn f = ref::random_ffn(d, d_ff, 21);
  // Neurons 3, 7, 11, 19 get a 50x larger down column: the largest mean |h_i| * ||W_d[:, i]||.
  std::vector<int> const big = {3, 7, 11, 19};
  for (int i : big)
    for (int o = 0; o < d; ++o) f.down[static_cast<std::size_t>(o * d_ff + i)] *= 50.0;
  fixture::DenseWeights<double> w(f);
  auto const x = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(n_tokens * d), 22, 1.0), n_tokens, d);
  auto const p = ffn::cluster_activations_shared(w.view(), x.cview(), 1, 5, 1);  // 6 experts of 4 neurons
  require_balanced(p, d_ff, 6);
  auto const a = p.assignment();
  for (int i : big) CHECK(a[static_cast<std::size_t>(i)] == 0);
  // n_shared = 0 clusters everything, like cluster_activations.
  REQUIRE(ffn::cluster_activations_shared(w.view(), x.cview(), 0, 4, 9).permutation() ==
          ffn::cluster_activations(w.view(), x.cview(), 4, 9).permutation());
}

TEST_CASE("clustered partitions keep K = N exact and are valid for every expert count", "[ffn][cluster][exact]") {
  int const d = 12, d_ff = 48, n_tokens = 20;
  fixture::DenseWeights<double> w(ref::random_ffn(d, d_ff, 31));
  auto const x = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(n_tokens * d), 32, 1.0), n_tokens, d);
  Matrix<double> yd({n_tokens, d}), ym({n_tokens, d});
  ffn::swiglu_forward(w.view(), x.cview(), yd.view());
  for (int n : {1, 2, 3, 4, 6, 8, 12, 16, 24, 48}) {
    INFO("n=" << n);
    for (auto const& p : {ffn::cluster_weights(w.view(), n, 2), ffn::cluster_activations(w.view(), x.cview(), n, 2)}) {
      require_balanced(p, d_ff, n);
      moe::Gating g;
      g.mode = moe::CombineMode::code_ref;
      g.top_k = n;
      moe::MoeFfn<double, CpuScalar> layer(ffn::factorize(w.view(), p), moe::Router<double>::random(d, n, 1), g);
      layer.forward(x.cview(), ym.view());
      REQUIRE(ref::rel_l2(ym.data(), yd.data(), static_cast<std::size_t>(ym.size())) < 1e-12);
    }
  }
}

TEST_CASE("clustering is deterministic: same seed, any OpenMP thread count", "[ffn][cluster]") {
  int const d = 16, d_ff = 64, n_tokens = 300;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 41));
  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(n_tokens * d), 42, 1.0), n_tokens, d);
  auto const pw = ffn::cluster_weights(w.view(), 4, 7).permutation();
  auto const pa = ffn::cluster_activations(w.view(), x.cview(), 4, 7).permutation();
#if defined(_OPENMP)
  int const saved = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    CHECK(ffn::cluster_weights(w.view(), 4, 7).permutation() == pw);
    CHECK(ffn::cluster_activations(w.view(), x.cview(), 4, 7).permutation() == pa);
  }
  omp_set_num_threads(saved);
#else
  CHECK(ffn::cluster_weights(w.view(), 4, 7).permutation() == pw);
  CHECK(ffn::cluster_activations(w.view(), x.cview(), 4, 7).permutation() == pa);
#endif
  // A different seed may give a different (still balanced) partition.
  require_balanced(ffn::cluster_weights(w.view(), 4, 8), d_ff, 4);
}

TEST_CASE("clustering rejects bad inputs with the documented exceptions", "[ffn][cluster][errors]") {
  int const d = 6, d_ff = 12;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 51));
  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(5 * d), 52, 1.0), 5, d);
  CHECK_THROWS_AS(ffn::cluster_weights(w.view(), 5, 1), value_error);  // 5 does not divide 12
  CHECK_THROWS_WITH(ffn::cluster_weights(w.view(), 5, 1), Catch::Contains("not divisible"));
  CHECK_THROWS_AS(ffn::cluster_weights(w.view(), 0, 1), value_error);
  CHECK_THROWS_AS(ffn::cluster_weights(w.view(), 4, 1, 0), value_error);  // iterations
  CHECK_THROWS_AS(ffn::cluster_activations(w.view(), x.cview(), 5, 1), value_error);
  CHECK_THROWS_AS(ffn::cluster_activations(w.view(), x.cview().slice_rows(0, 0), 4, 1), value_error);  // empty set
  CHECK_THROWS_WITH(ffn::cluster_activations(w.view(), x.cview().slice_rows(0, 0), 4, 1), Catch::Contains("x_calib"));
  Matrix<float> x_bad({5, d + 1});
  CHECK_THROWS_AS(ffn::cluster_activations(w.view(), x_bad.cview(), 4, 1), shape_error);
  CHECK_THROWS_AS(ffn::cluster_activations_shared(w.view(), x.cview(), -1, 4, 1), value_error);
  CHECK_THROWS_AS(ffn::cluster_activations_shared(w.view(), x.cview(), 1, 0, 1), value_error);
  CHECK_THROWS_AS(ffn::cluster_activations_shared(w.view(), x.cview(), 1, 4, 1), value_error);  // 5 experts
  Matrix<float> x_nan(x.cview());
  x_nan(2, 3) = std::nanf("");
  CHECK_THROWS_AS(ffn::cluster_activations(w.view(), x_nan.cview(), 4, 1), value_error);
  ffn::DenseFfnView<float> bad{w.gate.cview(), w.up.cview().slice_rows(0, d_ff - 1), w.down.cview()};
  CHECK_THROWS_AS(ffn::cluster_weights(bad, 4, 1), shape_error);
  Matrix<double> empty({0, 3});
  CHECK_THROWS_AS(ffn::balanced_kmeans(empty.cview(), 1, 1), value_error);
  Matrix<double> f({6, 2});
  CHECK_THROWS_AS(ffn::balanced_kmeans(f.cview(), 4, 1), value_error);
}
