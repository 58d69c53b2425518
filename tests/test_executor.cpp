// SPDX-License-Identifier: Apache-2.0
// Bring your own threads (core/executor.hpp): the forward, the dense SwiGLU and the MoE training kernels run on a
// caller's std::thread pool through Executor::custom and give the same bits as OpenMP with one thread, for several
// pool sizes and repeated calls; the executor's contract is enforced (bad worker numbers, failures inside tasks).
// CI also runs this file under ThreadSanitizer.
#include <catch2/catch.hpp>

#include <factorllm/factorllm.hpp>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using Simd = CpuSimd<>;

namespace {

/// A plain persistent pool as an engine would have one: n_workers - 1 std::threads plus the calling thread.
/// Dynamic (default): parallel_for hands tasks out through an atomic counter, so which worker runs which task
/// varies run to run. Round-robin: worker w runs tasks w, w + n_workers, ... (every worker gets a share, whatever
/// the scheduler does).
class ThreadPool {
 public:
  enum class Schedule { dynamic, round_robin };
  explicit ThreadPool(int n_workers, Schedule schedule = Schedule::dynamic) : n_workers_(n_workers), schedule_(schedule) {
    for (int w = 1; w < n_workers; ++w) threads_.emplace_back([this, w] { worker_loop(w); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  ThreadPool(ThreadPool const&) = delete;
  ThreadPool& operator=(ThreadPool const&) = delete;

  int n_workers() const { return n_workers_; }
  Executor executor() { return Executor::custom(this, &ThreadPool::parallel_for, n_workers_); }
  /// Tasks run by each worker in the last job (to check that the pool really shared the work).
  std::vector<int> const& tasks_per_worker() const { return per_worker_; }

  static void parallel_for(void* self, std::ptrdiff_t n_tasks, Executor::TaskFn task, void* context) {
    static_cast<ThreadPool*>(self)->run(n_tasks, task, context);
  }

 private:
  void run(std::ptrdiff_t n_tasks, Executor::TaskFn task, void* context) {
    per_worker_.assign(static_cast<std::size_t>(n_workers_), 0);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = Job{n_tasks, task, context};
      next_.store(0);
      busy_ = n_workers_ - 1;
      ++generation_;
    }
    wake_.notify_all();
    drain(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
  }
  void drain(int worker) {
    if (schedule_ == Schedule::round_robin) {
      for (std::ptrdiff_t i = worker; i < job_.n_tasks; i += n_workers_) {
        job_.task(job_.context, i, worker);
        ++per_worker_[static_cast<std::size_t>(worker)];
      }
      return;
    }
    for (;;) {
      std::ptrdiff_t const i = next_.fetch_add(1);
      if (i >= job_.n_tasks) return;
      job_.task(job_.context, i, worker);
      ++per_worker_[static_cast<std::size_t>(worker)];
    }
  }
  void worker_loop(int worker) {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain(worker);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        --busy_;
      }
      done_.notify_all();
    }
  }

  struct Job {
    std::ptrdiff_t n_tasks = 0;
    Executor::TaskFn task = nullptr;
    void* context = nullptr;
  };
  int n_workers_;
  Schedule schedule_;
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  Job job_;
  std::atomic<std::ptrdiff_t> next_{0};
  int busy_ = 0;
  std::uint64_t generation_ = 0;
  bool stop_ = false;
  std::vector<int> per_worker_;
};

constexpr int kD = 64, kDff = 512, kN = 4;

template <class T>
bool same_bits(Tensor<T, 2> const& a, Tensor<T, 2> const& b) {
  return a.extents() == b.extents() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}

Matrix<float> inputs(int n_tokens, std::uint64_t seed) {
  return fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(n_tokens) * kD, seed, 1.0), n_tokens, kD);
}

template <class W>
moe::MoeFfn<W, Simd> make_layer(fixture::DenseWeights<W> const& w, int top_k) {
  moe::Gating g;
  g.top_k = top_k;
  return moe::MoeFfn<W, Simd>(ffn::factorize(w.view(), ffn::ExpertPartition::random(kDff, kN, 5)),
                              moe::Router<float>::random(kD, kN, 6, 1.0), g);
}

template <class Layer>
Matrix<float> forward_on(Layer const& layer, Matrix<float> const& x, Executor const& exec) {
  Matrix<float> y({x.extent(0), kD});
  Workspace ws(layer.workspace_bytes(x.extent(0), exec));
  layer.forward(x.cview(), y.view(), ws, exec);
  return y;
}

}  // namespace

TEMPLATE_TEST_CASE("MoeFfn::forward on a caller's std::thread pool gives the bits of one OpenMP thread",
                   "[executor][determinism]", float, bf16) {
  fixture::DenseWeights<TestType> w(ref::random_ffn(kD, kDff, 1));
  auto const layer = make_layer(w, 2);
  for (int n_workers : {1, 2, 3, 8}) {
    ThreadPool pool(n_workers);
    Executor const exec = pool.executor();
    CHECK(exec.is_custom());
    CHECK(exec.n_workers() == n_workers);
    for (int t : {1, 5, 24, 200}) {
      auto const x = inputs(t, 10 + static_cast<std::uint64_t>(t));
      auto const y_ref = forward_on(layer, x, Executor::openmp(1));
      auto const y_serial = forward_on(layer, x, Executor::serial());
      auto const y_pool = forward_on(layer, x, exec);
      auto const y_pool_again = forward_on(layer, x, exec);
      INFO("workers=" << n_workers << " T=" << t);
      CHECK(same_bits(y_ref, y_serial));
      CHECK(same_bits(y_ref, y_pool));
      CHECK(same_bits(y_ref, y_pool_again));
    }
  }
}

TEST_CASE("a pool that splits every call between its threads gives the same bits", "[executor]") {
  fixture::DenseWeights<float> w(ref::random_ffn(kD, kDff, 2));
  auto const layer = make_layer(w, 2);
  // Round-robin: each of the two threads runs half of every task list, so the two really compute at once (a
  // dynamic pool on a loaded 2-core machine may let the calling thread take every task).
  ThreadPool pool(2, ThreadPool::Schedule::round_robin);
  for (int t : {1, 256}) {
    auto const x = inputs(t, 3);
    auto const y = forward_on(layer, x, pool.executor());
    CHECK(pool.tasks_per_worker()[0] > 0);
    CHECK(pool.tasks_per_worker()[1] > 0);
    CHECK(same_bits(y, forward_on(layer, x, Executor::openmp(1))));
  }
}

TEST_CASE("dense SwiGLU and shared-expert layers on a caller's pool give the OpenMP bits", "[executor][determinism]") {
  fixture::DenseWeights<float> w(ref::random_ffn(kD, kDff, 4));
  ThreadPool pool(3);
  Executor const exec = pool.executor();
  for (int t : {1, 7, 130}) {
    auto const x = inputs(t, 40 + static_cast<std::uint64_t>(t));
    Matrix<float> y_ref({t, kD}), y_pool({t, kD});
    Workspace ws_ref(ffn::swiglu_workspace_bytes(t, kD, kDff, Simd{}, Executor::openmp(1)));
    Workspace ws(ffn::swiglu_workspace_bytes(t, kD, kDff, Simd{}, exec));
    ffn::swiglu_forward(w.view(), x.cview(), y_ref.view(), ws_ref, Simd{}, Executor::openmp(1));
    ffn::swiglu_forward(w.view(), x.cview(), y_pool.view(), ws, Simd{}, exec);
    INFO("T=" << t);
    CHECK(same_bits(y_ref, y_pool));

    moe::Gating g;
    g.top_k = 1;
    auto const shared = moe::make_shared_moe<Simd>(w.view(), ffn::ExpertPartition::random(kDff, 4, 8), 1,
                                                   moe::Router<float>::random(kD, 3, 9, 1.0), g);
    CHECK(same_bits(forward_on(shared, x, Executor::openmp(1)), forward_on(shared, x, exec)));
  }
}

TEST_CASE("MoE training forward and backward on a caller's pool give the OpenMP bits", "[executor][determinism][train]") {
  fixture::DenseWeights<float> w(ref::random_ffn(kD, kDff, 50));
  auto const layer = make_layer(w, 2);
  auto const params = train::params_view(layer.experts(), layer.router());
  int const t = 96;
  auto const x = inputs(t, 51);
  auto const dy = inputs(t, 52);
  ThreadPool pool(3);
  struct Run {
    Matrix<float> y{{t, kD}}, dx{{t, kD}}, d_rw{{kN, kD}};
    Tensor<float, 3> d_gate, d_up, d_down;
    Vector<float> d_rb{{kN}};
  };
  auto run_with = [&](Executor const& exec) {
    Run r;
    r.d_gate = Tensor<float, 3>({kN, layer.d_expert(), kD});
    r.d_up = Tensor<float, 3>({kN, layer.d_expert(), kD});
    r.d_down = Tensor<float, 3>({kN, kD, layer.d_expert()});
    moe::RoutingRecord<float> record;
    Workspace fws(train::moe_forward_workspace_bytes(params, 2, t, Simd{}));
    train::moe_forward(params, layer.gating(), x.cview(), r.y.view(), record, fws, nullptr, Simd{}, exec);
    MoeGradsView<float> grads{r.dx.view(), r.d_gate.view(), r.d_up.view(), r.d_down.view(), r.d_rw.view(), r.d_rb.view(), MatrixView<float>()};
    Workspace bws(train::moe_backward_workspace_bytes(params, 2, t, Simd{}));
    train::moe_backward(params, layer.gating(), record, x.cview(), dy.cview(), grads, bws, nullptr, Simd{}, exec);
    return r;
  };
  Run const ref_run = run_with(Executor::openmp(1));
  Run const pool_run = run_with(pool.executor());
  auto same3 = [](Tensor<float, 3> const& a, Tensor<float, 3> const& b) {
    return std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
  };
  CHECK(same_bits(ref_run.y, pool_run.y));
  CHECK(same_bits(ref_run.dx, pool_run.dx));
  CHECK(same_bits(ref_run.d_rw, pool_run.d_rw));
  CHECK(same3(ref_run.d_gate, pool_run.d_gate));
  CHECK(same3(ref_run.d_up, pool_run.d_up));
  CHECK(same3(ref_run.d_down, pool_run.d_down));
  CHECK(std::memcmp(ref_run.d_rb.data(), pool_run.d_rb.data(), sizeof(float) * kN) == 0);
}

namespace {
/// A broken pool: reports worker n_workers (one past the end) for every task.
void out_of_range_pool(void* /*pool*/, std::ptrdiff_t n_tasks, Executor::TaskFn task, void* context) {
  for (std::ptrdiff_t i = 0; i < n_tasks; ++i) task(context, i, 2);
}
void serial_pool(void* /*pool*/, std::ptrdiff_t n_tasks, Executor::TaskFn task, void* context) {
  for (std::ptrdiff_t i = 0; i < n_tasks; ++i) task(context, i, 0);
}
}  // namespace

TEST_CASE("Executor: bad arguments, a pool's bad worker numbers and task failures are typed errors", "[executor][errors]") {
  CHECK_THROWS_AS(Executor::custom(nullptr, nullptr, 2), value_error);
  CHECK_THROWS_AS(Executor::custom(nullptr, &serial_pool, 0), value_error);
  CHECK_THROWS_AS(Executor::custom(nullptr, &serial_pool, Executor::max_workers + 1), value_error);
  CHECK_THROWS_AS(Executor::openmp(0), value_error);

  Executor const broken = Executor::custom(nullptr, &out_of_range_pool, 2);
  std::vector<int> hits(4, 0);
  CHECK_THROWS_WITH(broken.run(4, [&](std::ptrdiff_t task, int) { ++hits[static_cast<std::size_t>(task)]; }),
                    Catch::Contains("worker 2") && Catch::Contains("n_workers = 2"));
  CHECK(hits == std::vector<int>(4, 0));  // no task ran with a worker number that names no scratch

  // An exception inside a task comes out of run() after the pool returns; later tasks are skipped.
  Executor const one = Executor::custom(nullptr, &serial_pool, 1);
  int ran = 0;
  CHECK_THROWS_AS(one.run(5,
                          [&](std::ptrdiff_t task, int) {
                            ++ran;
                            if (task == 1) throw std::runtime_error("task 1 failed");
                          }),
                  std::runtime_error);
  CHECK(ran == 2);

  // A workspace sized for fewer workers than the executor has is refused, naming both counts.
  fixture::DenseWeights<float> w(ref::random_ffn(kD, kDff, 60));
  auto const layer = make_layer(w, 2);
  auto const x = inputs(40, 61);
  Matrix<float> y({40, kD});
  ThreadPool pool(4);
  Workspace small(layer.workspace_bytes(40, Executor::serial()));
  CHECK_THROWS_WITH(layer.forward(x.cview(), y.view(), small, pool.executor()),
                    Catch::Contains("4 executor worker(s)") && Catch::Contains("it fits 1"));
}
