// SPDX-License-Identifier: Apache-2.0
// Tests of router training (train/router_training.hpp): training that must reduce the loss and raise label accuracy
// where a linear router can succeed, the cluster-based init, the bias switch, determinism (seed, OpenMP thread count)
// and the documented errors.
#include <catch2/catch.hpp>

#include <factorllm/ffn/factorize.hpp>
#include <factorllm/train/par_loss.hpp>
#include <factorllm/train/router_training.hpp>

#include <cmath>
#include <limits>
#include <initializer_list>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using ffn::ExpertPartition;
using fixture::same_bits;

namespace {

/// A layer whose PAR labels a linear router can learn exactly: expert g's neurons read input direction e_g and all
/// write along one output vector v, and each token is e_a + e_b + noise for a random pair a < b. Then e_a ~ e_b ~ f/2
/// and the other experts are ~0, so the K = 2 pseudo-label is {a, b}: a linear function of x.
struct PlantedLayer {
  static constexpr int d = 8, n = 4, m = 4, d_ff = n * m, n_tokens = 192;
  ref::Ffn f;
  std::vector<std::vector<int>> pairs;
  ref::Vec x;
  explicit PlantedLayer(std::uint64_t seed) : f(ref::random_ffn(d, d_ff, seed)) {
    auto const noise = ref::randn(static_cast<std::size_t>(2 * d_ff * d), seed + 1, 0.05);
    auto const v = ref::randn(static_cast<std::size_t>(d), seed + 2, 1.0);
    for (int i = 0; i < d_ff; ++i) {
      int const g = i / m;
      for (int k = 0; k < d; ++k) {
        f.gate[static_cast<std::size_t>(i * d + k)] = (k == g ? 2.0 : 0.0) + noise[static_cast<std::size_t>(i * d + k)];
        f.up[static_cast<std::size_t>(i * d + k)] = (k == g ? 2.0 : 0.0) + noise[static_cast<std::size_t>(d_ff * d + i * d + k)];
      }
      for (int o = 0; o < d; ++o) f.down[static_cast<std::size_t>(o * d_ff + i)] = v[static_cast<std::size_t>(o)] / m;
    }
    std::mt19937_64 rng(seed + 3);
    auto const xn = ref::randn(static_cast<std::size_t>(n_tokens * d), seed + 4, 0.1);
    x = xn;
    for (int t = 0; t < n_tokens; ++t) {
      int const a = static_cast<int>(rng() % n);
      int b = static_cast<int>(rng() % (n - 1));
      b += b >= a ? 1 : 0;
      pairs.push_back({std::min(a, b), std::max(a, b)});
      x[static_cast<std::size_t>(t * d + a)] += 1.0;
      x[static_cast<std::size_t>(t * d + b)] += 1.0;
    }
  }
};

}  // namespace

TEMPLATE_TEST_CASE("train_router reduces the PAR loss and learns labels a linear router can fit", "[train][router]", float,
                   double) {
  using A = activation_t<TestType>;
  PlantedLayer const p(70);
  fixture::DenseWeights<TestType> w(p.f);
  auto const experts = ffn::factorize(w.view(), ExpertPartition::contiguous(p.d_ff, p.n));
  auto const x = fixture::to_matrix<A>(p.x, p.n_tokens, p.d);
  // The planted labels are what the PAR oracle says.
  auto const labels = train::par_oracle_labels(x.cview(), w.view(), experts, 2);
  int planted = 0;
  for (int t = 0; t < p.n_tokens; ++t) {
    int a = labels(t, 0), b = labels(t, 1);
    planted += std::min(a, b) == p.pairs[static_cast<std::size_t>(t)][0] && std::max(a, b) == p.pairs[static_cast<std::size_t>(t)][1];
  }
  REQUIRE(planted == p.n_tokens);

  auto router = moe::Router<A>::random(p.d, p.n, 3);  // the paper's init (docs/math.md §2.2)
  train::RouterTrainConfig cfg;
  cfg.steps = 200;
  cfg.batch_tokens = 64;
  cfg.seed = 5;
  auto const rep = train::train_router(router, x.cview(), w.view(), experts, 2, cfg);
  INFO("loss " << rep.initial_loss << " -> " << rep.final_loss << ", accuracy " << rep.initial_label_accuracy << " -> "
               << rep.final_label_accuracy);
  CHECK(rep.steps == 200);
  CHECK(rep.initial_label_accuracy < 0.5);
  CHECK(rep.final_label_accuracy >= 0.95);
  CHECK(rep.final_loss < 0.5 * rep.initial_loss);
  // The report's numbers are par_loss's on the whole calibration set.
  auto const check = train::par_loss(x.cview(), w.view(), experts, router, 2);
  CHECK(rep.final_loss == Approx(check.total_loss).epsilon(1e-5));
  CHECK(rep.final_label_accuracy == Approx(check.label_accuracy));
}

TEST_CASE("train_router with subset labels (LabelKind::subset) learns the planted subsets", "[train][router]") {
  PlantedLayer const p(75);
  fixture::DenseWeights<double> w(p.f);
  auto const experts = ffn::factorize(w.view(), ExpertPartition::contiguous(p.d_ff, p.n));
  auto const x = fixture::to_matrix<double>(p.x, p.n_tokens, p.d);
  // e_a + e_b ~ f: the planted pair is also the K-subset whose sum is closest to the dense output.
  auto const labels = train::subset_oracle_labels(x.cview(), w.view(), experts, 2);
  int planted = 0;
  for (int t = 0; t < p.n_tokens; ++t)
    planted += labels(t, 0) == p.pairs[static_cast<std::size_t>(t)][0] && labels(t, 1) == p.pairs[static_cast<std::size_t>(t)][1];
  REQUIRE(planted == p.n_tokens);

  auto router = moe::Router<double>::random(p.d, p.n, 3);
  train::RouterTrainConfig cfg;
  cfg.steps = 200;
  cfg.batch_tokens = 64;
  cfg.seed = 5;
  cfg.labels = train::LabelKind::subset;
  auto const rep = train::train_router(router, x.cview(), w.view(), experts, 2, cfg);
  INFO("loss " << rep.initial_loss << " -> " << rep.final_loss << ", accuracy " << rep.initial_label_accuracy << " -> "
               << rep.final_label_accuracy);
  CHECK(rep.initial_label_accuracy < 0.5);
  CHECK(rep.final_label_accuracy >= 0.95);
  // The report's numbers are the cached-label loss against the subset labels on the whole calibration set.
  Workspace ws(train::par_loss_from_labels_workspace_bytes(p.d, p.n, 2));
  train::ParLossResult<double> res;
  train::par_loss_from_labels(x.cview(), labels.cview(), router, 2, cfg.loss, res, ws);
  CHECK(rep.final_loss == Approx(res.total_loss).epsilon(1e-12));
  CHECK(rep.final_label_accuracy == res.label_accuracy);

  // Too many experts for the exhaustive subset search: a clear error before any training.
  int const big = static_cast<int>(train::kMaxSubsetExperts) + 1;
  fixture::DenseWeights<double> wb(ref::random_ffn(p.d, big, 76));
  auto const many = ffn::factorize(wb.view(), ExpertPartition::contiguous(big, big));
  auto rb = moe::Router<double>::random(p.d, big, 4);
  CHECK_THROWS_AS(train::train_router(rb, x.cview(), wb.view(), many, 2, cfg), value_error);
  cfg.labels = train::LabelKind::par;
  cfg.steps = 1;
  CHECK_NOTHROW(train::train_router(rb, x.cview(), wb.view(), many, 2, cfg));
}

TEST_CASE("train_router: bias switch, zero steps, seeded determinism, thread count", "[train][router]") {
  PlantedLayer const p(80);
  fixture::DenseWeights<float> w(p.f);
  auto const experts = ffn::factorize(w.view(), ExpertPartition::contiguous(p.d_ff, p.n));
  auto const x = fixture::to_matrix<float>(p.x, p.n_tokens, p.d);
  train::RouterTrainConfig cfg;
  cfg.steps = 40;
  cfg.batch_tokens = 50;  // not a divisor of 192: batches straddle epochs
  cfg.seed = 9;

  SECTION("train_bias = false keeps a zero bias zero") {
    auto r = moe::Router<float>::random(p.d, p.n, 1);
    cfg.train_bias = false;
    auto const rep = train::train_router(r, x.cview(), w.view(), experts, 2, cfg);
    for (int e = 0; e < p.n; ++e) CHECK(r.bias()(e) == 0.0f);
    CHECK(rep.final_loss < rep.initial_loss);
    cfg.train_bias = true;
    auto r2 = moe::Router<float>::random(p.d, p.n, 1);
    train::train_router(r2, x.cview(), w.view(), experts, 2, cfg);
    bool moved = false;
    for (int e = 0; e < p.n; ++e) moved |= r2.bias()(e) != 0.0f;
    CHECK(moved);
  }
  SECTION("steps = 0 only evaluates") {
    auto r = moe::Router<float>::random(p.d, p.n, 1);
    auto const before = Matrix<float>(r.weight());
    cfg.steps = 0;
    auto const rep = train::train_router(r, x.cview(), w.view(), experts, 2, cfg);
    CHECK(rep.final_loss == rep.initial_loss);
    CHECK(rep.final_label_accuracy == rep.initial_label_accuracy);
    CHECK(same_bits(before, r.mutable_weight()));
  }
  SECTION("same seed, same router, for any OpenMP thread count") {
    auto r1 = moe::Router<float>::random(p.d, p.n, 1), r2 = r1;
    train::train_router(r1, x.cview(), w.view(), experts, 2, cfg);
#if defined(_OPENMP)
    int const saved = omp_get_max_threads();
    omp_set_num_threads(saved == 1 ? 2 : 1);
#endif
    train::train_router(r2, x.cview(), w.view(), experts, 2, cfg);
#if defined(_OPENMP)
    omp_set_num_threads(saved);
#endif
    CHECK(same_bits(r1.mutable_weight(), r2.mutable_weight()));
    auto r3 = moe::Router<float>::random(p.d, p.n, 1);
    cfg.seed = 10;
    train::train_router(r3, x.cview(), w.view(), experts, 2, cfg);
    CHECK_FALSE(same_bits(r1.mutable_weight(), r3.mutable_weight()));
  }
}

TEST_CASE("router_from_partition: normalized centred gate means, zero bias, routes a planted layer", "[train][router]") {
  PlantedLayer const p(90);
  fixture::DenseWeights<double> w(p.f);
  auto const part = ExpertPartition::contiguous(p.d_ff, p.n);
  auto const r = train::router_from_partition(w.view(), part, 2.5);
  REQUIRE(r.n_experts() == p.n);
  REQUIRE(r.d_model() == p.d);
  for (int e = 0; e < p.n; ++e) {
    double nrm = 0;
    for (int k = 0; k < p.d; ++k) nrm += r.weight()(e, k) * r.weight()(e, k);
    CHECK(std::sqrt(nrm) == Approx(2.5).epsilon(1e-12));
    CHECK(r.bias()(e) == 0.0);
    // Row e points along e_e (expert e reads input direction e), minus the common mean.
    for (int k = 0; k < p.d; ++k)
      if (k != e) CHECK(r.weight()(e, e) > r.weight()(e, k));
  }
  auto const experts = ffn::factorize(w.view(), part);
  auto const x = fixture::to_matrix<double>(p.x, p.n_tokens, p.d);
  CHECK(train::par_loss(x.cview(), w.view(), experts, r, 2).label_accuracy >= 0.95);
  // One expert: the centred mean vanishes, the router is zero.
  auto const r1 = train::router_from_partition(w.view(), ExpertPartition::contiguous(p.d_ff, 1));
  for (int k = 0; k < p.d; ++k) CHECK(r1.weight()(0, k) == 0.0);
  // bf16 weights give a float router.
  fixture::DenseWeights<bf16> wb(p.f);
  moe::Router<float> const rb = train::router_from_partition(wb.view(), part);
  CHECK(rb.n_experts() == p.n);
}

TEST_CASE("router training rejects bad inputs with the documented exceptions", "[train][router][errors]") {
  int const d = 6, d_ff = 12, n = 4;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 95));
  auto const experts = ffn::factorize(w.view(), ExpertPartition::contiguous(d_ff, n));
  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(8 * d), 96, 1.0), 8, d);
  auto r = moe::Router<float>::random(d, n, 1);
  train::RouterTrainConfig cfg;
  cfg.steps = 2;
  CHECK_THROWS_AS(train::train_router(r, x.cview().slice_rows(0, 0), w.view(), experts, 2, cfg), value_error);
  CHECK_THROWS_AS(train::train_router(r, x.cview(), w.view(), experts, 5, cfg), value_error);  // top_k > N
  CHECK_THROWS_AS(train::train_router(r, x.cview(), w.view(), experts, 0, cfg), value_error);
  Matrix<float> x_bad({8, d + 1});
  CHECK_THROWS_AS(train::train_router(r, x_bad.cview(), w.view(), experts, 2, cfg), shape_error);
  auto r3 = moe::Router<float>::random(d, 3, 1);
  CHECK_THROWS_AS(train::train_router(r3, x.cview(), w.view(), experts, 2, cfg), shape_error);
  auto const other = ffn::factorize(w.view(), ExpertPartition::contiguous(d_ff, 3));
  CHECK_THROWS_AS(train::train_router(r, x.cview(), w.view(), other, 2, cfg), shape_error);  // router vs experts
  using Mutate = void (*)(train::RouterTrainConfig&);
  for (Mutate bad : std::initializer_list<Mutate>{
           [](train::RouterTrainConfig& c) { c.steps = -1; }, [](train::RouterTrainConfig& c) { c.batch_tokens = 0; },
           [](train::RouterTrainConfig& c) { c.lr = 0; }, [](train::RouterTrainConfig& c) { c.lr = std::nan(""); },
           [](train::RouterTrainConfig& c) { c.beta1 = 1.0; }, [](train::RouterTrainConfig& c) { c.beta2 = -0.1; },
           [](train::RouterTrainConfig& c) { c.eps = 0; }, [](train::RouterTrainConfig& c) { c.loss.clip = 0.7; }}) {
    train::RouterTrainConfig c = cfg;
    bad(c);
    CHECK_THROWS_AS(train::train_router(r, x.cview(), w.view(), experts, 2, c), value_error);
  }
  // One NaN (or infinity) in the calibration data is refused, naming its row, and the router is left untouched.
  for (float bad_value : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    auto x_nan = x;
    x_nan(5, 2) = bad_value;
    auto const before = r.weight()(0, 0);
    CHECK_THROWS_WITH(train::train_router(r, x_nan.cview(), w.view(), experts, 2, cfg),
                      Catch::Contains("'x' row 5 (column 2) is not finite"));
    CHECK(r.weight()(0, 0) == before);
  }
  // router_from_partition: partition for another d_ff, bad scale.
  CHECK_THROWS_AS(train::router_from_partition(w.view(), ExpertPartition::contiguous(8, 4)), shape_error);
  CHECK_THROWS_AS(train::router_from_partition(w.view(), ExpertPartition::contiguous(d_ff, 4), 0.0), value_error);
}
