// SPDX-License-Identifier: Apache-2.0
// Tests of the Adam optimizer the trainers share (train/adam.hpp): the update against a plain-loop Adam in double over
// several steps (bias correction included), the storage types router training and distillation use, and the checks of
// the trainers' Adam settings.
#include <catch2/catch.hpp>

#include <factorllm/train/adam.hpp>
#include <factorllm/train/distillation.hpp>
#include <factorllm/train/router_training.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

using namespace factorllm;

namespace {

/// Adam as written in Kingma & Ba (2015), Algorithm 1, in double: one step t = 1, 2, ... per call.
struct ReferenceAdam {
  double lr, beta1, beta2, eps;
  std::vector<double> m, v;
  int t = 0;
  void step(std::vector<double>& p, std::vector<double> const& g) {
    ++t;
    for (std::size_t i = 0; i < p.size(); ++i) {
      m[i] = beta1 * m[i] + (1.0 - beta1) * g[i];
      v[i] = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i];
      double const m_hat = m[i] / (1.0 - std::pow(beta1, t));
      double const v_hat = v[i] / (1.0 - std::pow(beta2, t));
      p[i] -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
  }
};

constexpr int kSteps = 6;
constexpr std::size_t kCount = 7;

/// Gradient of step `step` (1-based): entry 3 is always 0, the others change sign and size from step to step, with
/// |g| in [0.1, 3] so that sqrt(v_hat) >= 0.1 bounds how much rounding the update can amplify.
std::vector<double> gradient(int step) {
  std::vector<double> g(kCount);
  for (std::size_t i = 0; i < kCount; ++i) {
    double const mag = 0.1 + 0.29 * static_cast<double>((i * 7 + static_cast<std::size_t>(step) * 3) % 11);
    g[i] = ((i + static_cast<std::size_t>(step)) % 3 == 0 ? -mag : mag);
  }
  g[3] = 0.0;
  return g;
}

std::vector<double> initial_params() { return {0.5, -1.25, 2.0, 0.75, -0.3, 1.0, 0.0}; }

}  // namespace

TEST_CASE("adam_update matches a plain-loop Adam in double over several steps", "[train][adam]") {
  // Tolerance (written down): both sides evaluate the same double expressions, so they differ only where the compiler
  // contracts a * b + c into an FMA (a few ulps). Moments: 1e-13 of the largest |g| (m) or g^2 (v); parameters,
  // which are O(1) and move by about lr per step: 1e-13 absolute.
  ReferenceAdam ref{1e-2, 0.9, 0.999, 1e-8, std::vector<double>(kCount, 0.0), std::vector<double>(kCount, 0.0)};
  std::vector<double> p_ref = initial_params(), p = p_ref, m(kCount, 0.0), v(kCount, 0.0);
  double const g_max = 3.0;
  for (int step = 1; step <= kSteps; ++step) {
    CAPTURE(step);
    auto const g = gradient(step);
    ref.step(p_ref, g);
    detail::adam_update(p.data(), g.data(), m.data(), v.data(), static_cast<std::ptrdiff_t>(kCount), step, ref.lr, ref.beta1,
                        ref.beta2, ref.eps);
    for (std::size_t i = 0; i < kCount; ++i) {
      CAPTURE(i);
      CHECK(std::fabs(m[i] - ref.m[i]) <= 1e-13 * g_max);
      CHECK(std::fabs(v[i] - ref.v[i]) <= 1e-13 * g_max * g_max);
      CHECK(std::fabs(p[i] - p_ref[i]) <= 1e-13);
    }
    // A parameter whose gradient is always 0 never moves: m = v = 0 and the update is 0 / (0 + eps).
    CHECK(p[3] == initial_params()[3]);
  }
  // The steps did move the other parameters (the comparison above is not vacuous).
  CHECK(std::fabs(p[0] - initial_params()[0]) > 1e-3);
}

TEST_CASE("adam_update: bias correction makes the first step lr * sign(g) whatever |g|", "[train][adam]") {
  // At step 1, m_hat = g and v_hat = g^2, so the update is lr * g / (|g| + eps): within lr * eps / |g| of lr * sign(g).
  // Without the bias correction it would be lr * 0.1 g / (sqrt(0.001) |g|) ~ 3.16 lr.
  double const lr = 1e-2, eps = 1e-8;
  for (double g : {1e-2, -0.5, 3.0, -40.0}) {
    CAPTURE(g);
    double p = 1.0, m = 0.0, v = 0.0;
    detail::adam_update(&p, &g, &m, &v, 1, 1, lr, 0.9, 0.999, eps);
    CHECK(std::fabs((1.0 - p) - (g > 0 ? lr : -lr)) <= lr * eps / std::fabs(g) + 1e-15);
  }
}

TEMPLATE_TEST_CASE("adam_update with the trainers' storage types rounds each stored value once", "[train][adam]", double,
                   float) {
  // Float parameters and gradients with moments of type M: double in router training, float in distillation. The
  // update runs in double either way; the reference rounds what is stored the same way, so the results agree to
  // within one rounding of the stored type (relative epsilon of that type), with an absolute floor of 1e-13 of the
  // value's scale (|g|, g^2 or 1) for values that FMA-contracted double arithmetic may put on the other side of a
  // rounding boundary.
  using M = TestType;
  double const lr = 3e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, g_max = 3.0;
  auto within = [](double got, double want, double rel, double scale) {
    return std::fabs(got - want) <= rel * std::fabs(want) + 1e-13 * scale;
  };
  double const feps = std::numeric_limits<float>::epsilon(), meps = std::numeric_limits<M>::epsilon();
  std::vector<float> p(kCount);
  std::vector<M> m(kCount, M(0)), v(kCount, M(0));
  std::vector<double> p_ref = initial_params(), m_ref(kCount, 0.0), v_ref(kCount, 0.0);
  for (std::size_t i = 0; i < kCount; ++i) p[i] = static_cast<float>(p_ref[i]);
  for (int step = 1; step <= kSteps; ++step) {
    auto const gd = gradient(step);
    std::vector<float> const g(gd.begin(), gd.end());
    detail::adam_update(p.data(), g.data(), m.data(), v.data(), static_cast<std::ptrdiff_t>(kCount), step, lr, beta1, beta2, eps);
    for (std::size_t i = 0; i < kCount; ++i) {
      double const gi = static_cast<double>(g[i]);
      double const mi = beta1 * m_ref[i] + (1.0 - beta1) * gi, vi = beta2 * v_ref[i] + (1.0 - beta2) * gi * gi;
      double const upd = lr * (mi / (1.0 - std::pow(beta1, step))) / (std::sqrt(vi / (1.0 - std::pow(beta2, step))) + eps);
      m_ref[i] = static_cast<double>(static_cast<M>(mi));  // stored rounded; this step used mi itself
      v_ref[i] = static_cast<double>(static_cast<M>(vi));
      p_ref[i] = static_cast<double>(static_cast<float>(p_ref[i] - upd));
      CAPTURE(step, i);
      CHECK(within(static_cast<double>(m[i]), m_ref[i], meps, g_max));
      CHECK(within(static_cast<double>(v[i]), v_ref[i], meps, g_max * g_max));
      CHECK(within(static_cast<double>(p[i]), p_ref[i], feps, 1.0));
    }
  }
}

TEMPLATE_TEST_CASE("validate_adam_config accepts the trainers' defaults and rejects each bad Adam field", "[train][adam][errors]",
                   train::RouterTrainConfig, train::DistillConfig) {
  using Config = TestType;
  CHECK_NOTHROW(detail::validate_adam_config(Config{}, "trainer"));
  Config edge;  // the inclusive ends of every range
  edge.steps = 0;
  edge.batch_tokens = 1;
  edge.beta1 = 0.0;
  edge.beta2 = 0.0;
  CHECK_NOTHROW(detail::validate_adam_config(edge, "trainer"));
  struct Bad {
    void (*mutate)(Config&);
    char const* message;
  };
  for (Bad const& bad : std::vector<Bad>{
           {[](Config& c) { c.steps = -1; }, "trainer: cfg.steps must be >= 0"},
           {[](Config& c) { c.batch_tokens = 0; }, "trainer: cfg.batch_tokens must be >= 1"},
           {[](Config& c) { c.lr = 0; }, "trainer: cfg.lr must be positive and finite"},
           {[](Config& c) { c.lr = -1e-3; }, "trainer: cfg.lr must be positive and finite"},
           {[](Config& c) { c.lr = std::numeric_limits<double>::quiet_NaN(); }, "trainer: cfg.lr must be positive and finite"},
           {[](Config& c) { c.lr = std::numeric_limits<double>::infinity(); }, "trainer: cfg.lr must be positive and finite"},
           {[](Config& c) { c.beta1 = 1.0; }, "trainer: cfg.beta1 and cfg.beta2 must be in [0, 1)"},
           {[](Config& c) { c.beta1 = -0.1; }, "trainer: cfg.beta1 and cfg.beta2 must be in [0, 1)"},
           {[](Config& c) { c.beta1 = std::numeric_limits<double>::quiet_NaN(); }, "trainer: cfg.beta1 and cfg.beta2"},
           {[](Config& c) { c.beta2 = 1.0; }, "trainer: cfg.beta1 and cfg.beta2 must be in [0, 1)"},
           {[](Config& c) { c.beta2 = -0.1; }, "trainer: cfg.beta1 and cfg.beta2 must be in [0, 1)"},
           {[](Config& c) { c.eps = 0; }, "trainer: cfg.eps must be positive and finite"},
           {[](Config& c) { c.eps = std::numeric_limits<double>::infinity(); }, "trainer: cfg.eps must be positive and finite"},
           {[](Config& c) { c.eps = std::numeric_limits<double>::quiet_NaN(); }, "trainer: cfg.eps must be positive and finite"}}) {
    Config c;
    bad.mutate(c);
    CAPTURE(bad.message);
    CHECK_THROWS_AS(detail::validate_adam_config(c, "trainer"), value_error);
    CHECK_THROWS_WITH(detail::validate_adam_config(c, "trainer"), Catch::StartsWith(bad.message));
  }
}
