// SPDX-License-Identifier: Apache-2.0
// Determinism and thread safety: bitwise equal results for 1 and 2 OpenMP threads and across repeated calls, and
// concurrent use of shared read-only objects (MoeFfn, ExpertPartition, Router, Gating, dense weights) from several
// std::threads, each with its own Workspace. CI also runs this file under ThreadSanitizer (clang + libomp).
#include <catch2/catch.hpp>

#include <factorllm/factorllm.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using Simd = CpuSimd<>;

namespace {

// Sizes: d_model 64, d_ff 256, 4 experts of 64 neurons. Token counts cover the streaming path (<= 8 rows per
// expert) and the GEMM path, and every call has at least two tasks per phase so two threads really share work.
constexpr int kD = 64, kDff = 256, kN = 4;
constexpr int kTokenCounts[] = {1, 5, 24, 64};

/// Sets the OpenMP thread count for the current thread and restores it on scope exit (no-op without OpenMP).
class ScopedThreads {
 public:
  explicit ScopedThreads(int n) {
#if defined(_OPENMP)
    saved_ = omp_get_max_threads();
    omp_set_num_threads(n);
#else
    (void)n;
#endif
  }
  ~ScopedThreads() {
#if defined(_OPENMP)
    omp_set_num_threads(saved_);
#endif
  }
  ScopedThreads(ScopedThreads const&) = delete;
  ScopedThreads& operator=(ScopedThreads const&) = delete;

 private:
  int saved_ = 1;
};

template <class T>
bool same_bits(Tensor<T, 2> const& a, Tensor<T, 2> const& b) {
  return a.extents() == b.extents() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}

template <class W, class Backend>
moe::MoeFfn<W, Backend> make_layer(fixture::DenseWeights<W> const& w, moe::CombineMode mode, int top_k) {
  moe::Gating g;
  g.mode = mode;
  g.top_k = top_k;
  return moe::MoeFfn<W, Backend>(ffn::factorize(w.view(), ffn::ExpertPartition::random(kDff, kN, 11)),
                                 moe::Router<float>::random(kD, kN, 12, 1.0), g);
}

Matrix<float> inputs(int n_tokens, std::uint64_t seed) {
  return fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(n_tokens) * kD, seed, 1.0), n_tokens, kD);
}

/// Runs layer.forward with `threads` OpenMP threads (workspace sized under that count).
template <class Layer>
Matrix<float> forward_with(Layer const& layer, Matrix<float> const& x, int threads) {
  ScopedThreads scoped(threads);
  Matrix<float> y({x.extent(0), kD});
  Workspace ws(layer.workspace_bytes(x.extent(0)));
  layer.forward(x.cview(), y.view(), ws);
  return y;
}

}  // namespace

TEMPLATE_TEST_CASE("cpu_simd MoE forward: same bits for 1 and 2 threads and across calls", "[concurrency][determinism]",
                   float, bf16, f16) {
  fixture::DenseWeights<TestType> w(ref::random_ffn(kD, kDff, 21));
  for (auto mode : {moe::CombineMode::code_ref, moe::CombineMode::softmax_topk_renorm}) {
    auto const layer = make_layer<TestType, Simd>(w, mode, 2);
    for (int t : kTokenCounts) {
      auto const x = inputs(t, 100 + static_cast<std::uint64_t>(t));
      auto const y1 = forward_with(layer, x, 1);
      auto const y2 = forward_with(layer, x, 2);
      auto const y2_again = forward_with(layer, x, 2);
      auto const y1_again = forward_with(layer, x, 1);
      INFO("T=" << t << " mode=" << moe::to_string(mode));
      CHECK(same_bits(y1, y2));
      CHECK(same_bits(y2, y2_again));
      CHECK(same_bits(y1, y1_again));
    }
  }
}

TEMPLATE_TEST_CASE("cpu_simd dense SwiGLU: same bits for 1 and 2 threads and across calls", "[concurrency][determinism]",
                   float, bf16, f16) {
  fixture::DenseWeights<TestType> w(ref::random_ffn(kD, kDff, 22));
  for (int t : kTokenCounts) {
    auto const x = inputs(t, 200 + static_cast<std::uint64_t>(t));
    Matrix<float> y[4] = {Matrix<float>({t, kD}), Matrix<float>({t, kD}), Matrix<float>({t, kD}), Matrix<float>({t, kD})};
    int const threads[4] = {1, 2, 2, 1};
    for (int i = 0; i < 4; ++i) {
      ScopedThreads scoped(threads[i]);
      Workspace ws(ffn::swiglu_workspace_bytes<Simd, TestType>(t, kD, kDff, Simd{}));
      ffn::swiglu_forward(w.view(), x.cview(), y[i].view(), ws, Simd{});
    }
    INFO("T=" << t);
    CHECK(same_bits(y[0], y[1]));
    CHECK(same_bits(y[1], y[2]));
    CHECK(same_bits(y[0], y[3]));
  }
}

TEST_CASE("par_loss: same bits for 1 and 2 threads and across calls", "[concurrency][determinism]") {
  fixture::DenseWeights<float> w(ref::random_ffn(kD, kDff, 23));
  auto const experts = ffn::factorize(w.view(), ffn::ExpertPartition::contiguous(kDff, kN));
  auto const router = moe::Router<float>::random(kD, kN, 24, 0.5);
  auto const x = inputs(16, 25);
  std::vector<train::ParLossResult<float>> runs;
  for (int threads : {1, 2, 2, 1}) {
    ScopedThreads scoped(threads);
    runs.push_back(train::par_loss(x.cview(), w.view(), experts, router, 2));
  }
  for (std::size_t i = 1; i < runs.size(); ++i) {
    INFO("run " << i);
    CHECK(std::memcmp(&runs[0].total_loss, &runs[i].total_loss, sizeof(double)) == 0);
    CHECK(std::memcmp(&runs[0].par_loss, &runs[i].par_loss, sizeof(double)) == 0);
    CHECK(std::memcmp(&runs[0].balance_loss, &runs[i].balance_loss, sizeof(double)) == 0);
    CHECK(same_bits(runs[0].grad_weight, runs[i].grad_weight));
    CHECK(same_bits(runs[0].pseudo_label, runs[i].pseudo_label));
    CHECK(std::memcmp(runs[0].grad_bias.data(), runs[i].grad_bias.data(), sizeof(float) * kN) == 0);
  }
}

namespace {

/// Runs `layer` on every input from `n_threads` std::threads at once, each with its own Workspace and
/// RoutingRecord, `rounds` times; returns out[thread][input]. The layer is only read.
template <class Layer>
std::vector<std::vector<Matrix<float>>> forward_from_threads(Layer const& layer, std::vector<Matrix<float>> const& xs,
                                                             int n_threads, int rounds) {
  std::vector<std::vector<Matrix<float>>> out(static_cast<std::size_t>(n_threads));
  std::vector<std::thread> pool;
  for (int i = 0; i < n_threads; ++i) {
    pool.emplace_back([&, i] {
      auto& mine = out[static_cast<std::size_t>(i)];
      std::ptrdiff_t max_t = 0;
      for (auto const& x : xs) max_t = std::max(max_t, x.extent(0));
      // Sized on this thread: workspace_bytes counts the panels of this thread's OpenMP team.
      Workspace ws(layer.workspace_bytes(max_t));
      moe::RoutingRecord<float> record;
      mine.resize(xs.size());
      for (int r = 0; r < rounds; ++r) {
        // Each thread starts at a different input so that different shapes run at the same time.
        for (std::size_t j = 0; j < xs.size(); ++j) {
          std::size_t const idx = (j + static_cast<std::size_t>(i)) % xs.size();
          Matrix<float> y({xs[idx].extent(0), kD});
          layer.forward(xs[idx].cview(), y.view(), ws, &record);
          mine[idx] = std::move(y);
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  return out;
}

template <class W, class Backend>
void check_shared_layer(moe::CombineMode mode) {
  fixture::DenseWeights<W> w(ref::random_ffn(kD, kDff, 31));
  auto const layer = make_layer<W, Backend>(w, mode, 2);
  std::vector<Matrix<float>> xs;
  for (int t : kTokenCounts) xs.push_back(inputs(t, 300 + static_cast<std::uint64_t>(t)));
  // Serial reference on this thread.
  std::vector<Matrix<float>> serial;
  for (auto const& x : xs) serial.push_back(forward_with(layer, x, 1));
  int const n_threads = 4;
  auto const out = forward_from_threads(layer, xs, n_threads, 2);
  for (int i = 0; i < n_threads; ++i) {
    for (std::size_t j = 0; j < xs.size(); ++j) {
      INFO(Backend::name() << " thread " << i << " input " << j << " (T=" << xs[j].extent(0) << ")");
      CHECK(same_bits(out[static_cast<std::size_t>(i)][j], serial[j]));
    }
  }
}

}  // namespace

TEST_CASE("one shared MoeFfn used from several std::threads gives the serial bits", "[concurrency][threads]") {
  check_shared_layer<float, Simd>(moe::CombineMode::softmax_topk_renorm);
  check_shared_layer<bf16, Simd>(moe::CombineMode::code_ref);
  check_shared_layer<float, CpuScalar>(moe::CombineMode::sigmoid_topk);
}

TEST_CASE("shared partition, dense weights, router and gating are read-only across threads", "[concurrency][threads]") {
  fixture::DenseWeights<float> w(ref::random_ffn(kD, kDff, 41));
  auto const partition = ffn::ExpertPartition::random(kDff, kN, 42);
  auto const router = moe::Router<float>::random(kD, kN, 43, 1.0);
  moe::Gating gating;
  gating.mode = moe::CombineMode::softmax_topk;
  gating.top_k = 2;
  gating.selection_bias = {0.5f, 0.f, -0.5f, 0.f};
  auto const x = inputs(9, 44);

  // Serial results.
  auto const experts_ref = ffn::factorize(w.view(), partition);
  Matrix<float> logits_ref({9, kN}), weights_ref({9, 2}), y_dense_ref({9, kD});
  Matrix<std::int32_t> ids_ref({9, 2});
  moe::router_logits(router, x.cview(), logits_ref.view(), Simd{});
  moe::select_experts(logits_ref.cview(), gating, ids_ref.view(), weights_ref.view());
  ffn::swiglu_forward(w.view(), x.cview(), y_dense_ref.view());

  int const n_threads = 4;
  std::vector<int> ok(static_cast<std::size_t>(n_threads), 0);
  std::vector<std::thread> pool;
  for (int i = 0; i < n_threads; ++i) {
    pool.emplace_back([&, i] {
      bool good = true;
      for (int r = 0; r < 2; ++r) {
        auto const experts = ffn::factorize(w.view(), partition);
        good = good && std::memcmp(experts.gate_tensor().data(), experts_ref.gate_tensor().data(),
                                   sizeof(float) * static_cast<std::size_t>(experts_ref.gate_tensor().size())) == 0;
        good = good && std::memcmp(experts.down_tensor().data(), experts_ref.down_tensor().data(),
                                   sizeof(float) * static_cast<std::size_t>(experts_ref.down_tensor().size())) == 0;
        Matrix<float> logits({9, kN}), weights({9, 2}), y_dense({9, kD});
        Matrix<std::int32_t> ids({9, 2});
        moe::router_logits(router, x.cview(), logits.view(), Simd{});
        moe::select_experts(logits.cview(), gating, ids.view(), weights.view());
        ffn::swiglu_forward(w.view(), x.cview(), y_dense.view());
        good = good && same_bits(logits, logits_ref) && same_bits(weights, weights_ref) && same_bits(ids, ids_ref) &&
               same_bits(y_dense, y_dense_ref);
        good = good && partition.inverse().size() == static_cast<std::size_t>(kDff);
      }
      ok[static_cast<std::size_t>(i)] = good ? 1 : 0;
    });
  }
  for (auto& th : pool) th.join();
  for (int i = 0; i < n_threads; ++i) {
    INFO("thread " << i);
    CHECK(ok[static_cast<std::size_t>(i)] == 1);
  }
}
