// SPDX-License-Identifier: Apache-2.0
// Executor: who runs a CPU kernel's tasks. OpenMP by default; a serial loop; or the caller's own thread pool
// (docs/design.md §5, "Bring your own threads").
//
// A CPU kernel cuts its work into a task list fixed by the problem's shape alone (never by the thread count) and
// asks the executor to run every task once. Tasks write disjoint outputs and share no reduction, and per-worker
// scratch is reinitialized by every task, so the results are bitwise the same whichever worker runs which task, in
// whatever order: the executor decides the speed, never the bits.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <type_traits>
#include <utility>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../detail/threads.hpp"
#include "error.hpp"

namespace factorllm {

/// How a kernel's tasks run: OpenMP (the default), one thread, or the caller's parallel_for. A small value type;
/// copy it freely. A custom executor's pool must outlive every call that uses it.
class Executor {
 public:
  /// One task of a kernel: `context` is the kernel's, `task` in [0, n_tasks), `worker` in [0, n_workers).
  using TaskFn = void (*)(void* context, std::ptrdiff_t task, int worker);
  /// The caller's parallel_for. It must call task(context, i, w) exactly once for every i in [0, n_tasks), with a
  /// worker number w in [0, n_workers) such that no two calls run at the same time with the same w (w names the
  /// scratch the call uses), and return only when every call has returned. Any order, any distribution.
  using ParallelForFn = void (*)(void* pool, std::ptrdiff_t n_tasks, TaskFn task, void* context);

  /// OpenMP with the calling thread's team size (omp_get_max_threads(); one thread without OpenMP).
  static Executor openmp() noexcept { return openmp_with(detail::max_threads()); }
  /// OpenMP with a team of n_threads. \throws value_error unless 1 <= n_threads <= max_workers.
  static Executor openmp(int n_threads) {
    check_workers(n_threads, "Executor::openmp");
    return openmp_with(n_threads);
  }
  /// Every task on the calling thread, in task order.
  static Executor serial() noexcept { return Executor(Kind::serial, nullptr, nullptr, 1); }
  /// The caller's pool: parallel_for(pool, ...) runs the tasks (see ParallelForFn).
  /// \throws value_error if parallel_for is null or n_workers is outside [1, max_workers].
  static Executor custom(void* pool, ParallelForFn parallel_for, int n_workers) {
    if (parallel_for == nullptr) throw value_error("Executor::custom: argument 'parallel_for' is null");
    check_workers(n_workers, "Executor::custom");
    return Executor(Kind::custom, pool, parallel_for, n_workers);
  }

  /// The most workers an executor may have (bounds the per-worker scratch a workspace holds).
  static constexpr int max_workers = 4096;

  /// How many workers may run tasks at once: size per-worker scratch (workspace_bytes) with it.
  int n_workers() const noexcept { return n_workers_; }
  bool is_serial() const noexcept { return kind_ == Kind::serial; }
  bool is_openmp() const noexcept { return kind_ == Kind::openmp; }
  bool is_custom() const noexcept { return kind_ == Kind::custom; }

  /// Runs body(task, worker) for every task in [0, n_tasks). Inside every task Eigen is held to one thread: its
  /// own threading would change its GEMM blocking, and so the summation order, with the thread count. An
  /// exception thrown by a task (or a worker number out of range from a custom pool, as backend_error) is
  /// rethrown here once every task has returned; tasks after the first failure are skipped.
  template <class Body>
  void run(std::ptrdiff_t n_tasks, Body&& body) const {
    if (n_tasks <= 0) return;
    if (kind_ == Kind::serial || (kind_ == Kind::openmp && (n_workers_ == 1 || n_tasks == 1))) {
      run_serial(n_tasks, body);
    } else if (kind_ == Kind::openmp) {
      run_openmp(n_tasks, body);
    } else {
      run_custom(n_tasks, body);
    }
  }

  /// Runs item(i) for every i in [0, n_items), in tasks of `block` consecutive items (the tasks depend on n_items
  /// and block only). For loops whose items write disjoint outputs.
  template <class Item>
  void run_blocked(std::ptrdiff_t n_items, std::ptrdiff_t block, Item&& item) const {
    if (n_items <= 0) return;
    std::ptrdiff_t const b = block < 1 ? 1 : block;
    run((n_items + b - 1) / b, [&](std::ptrdiff_t task, int) {
      std::ptrdiff_t const i1 = std::min(n_items, (task + 1) * b);
      for (std::ptrdiff_t i = task * b; i < i1; ++i) item(i);
    });
  }

 private:
  enum class Kind { serial, openmp, custom };
  Executor(Kind kind, void* pool, ParallelForFn parallel_for, int n_workers) noexcept
      : kind_(kind), pool_(pool), parallel_for_(parallel_for), n_workers_(n_workers) {}
  static Executor openmp_with(int n_threads) noexcept { return Executor(Kind::openmp, nullptr, nullptr, n_threads); }
  static void check_workers(int n, char const* function) {
    if (n < 1 || n > max_workers)
      throw value_error(detail::concat(function, ": argument 'n_workers' = ", n, " must be in [1, ", max_workers, "]"));
  }

  /// Holds this thread's OpenMP budget at one for a scope (the caller's budget comes back after), so that Eigen,
  /// which asks omp_get_max_threads(), runs serially inside a task.
  struct SerialEigenScope {
#if defined(_OPENMP)
    int saved = omp_get_max_threads();
    SerialEigenScope() noexcept { omp_set_num_threads(1); }
    ~SerialEigenScope() { omp_set_num_threads(saved); }
#else
    SerialEigenScope() noexcept {}  // user-provided: the scope variables below are then not "unused"
#endif
    SerialEigenScope(SerialEigenScope const&) = delete;
    SerialEigenScope& operator=(SerialEigenScope const&) = delete;
  };

  template <class Body>
  static void run_serial(std::ptrdiff_t n_tasks, Body& body) {
    SerialEigenScope const serial_eigen;
    for (std::ptrdiff_t task = 0; task < n_tasks; ++task) body(task, 0);
  }

  template <class Body>
  void run_openmp(std::ptrdiff_t n_tasks, Body& body) const {
#if defined(_OPENMP)
    std::exception_ptr failure;
    std::atomic<bool> failed{false};
#pragma omp parallel num_threads(n_workers_)
    {
      // omp_set_num_threads acts on this implicit task only: the team's threads, not the caller, go serial.
      omp_set_num_threads(1);
      int const worker = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
      for (std::ptrdiff_t task = 0; task < n_tasks; ++task) {
        if (failed.load(std::memory_order_relaxed)) continue;
        try {
          body(task, worker);
        } catch (...) {
#pragma omp critical(factorllm_executor_failure)
          if (!failure) failure = std::current_exception();
          failed.store(true, std::memory_order_relaxed);
        }
      }
    }
    if (failure) std::rethrow_exception(failure);
#else
    run_serial(n_tasks, body);
#endif
  }

  template <class Body>
  struct CustomContext {
    Body* body;
    int n_workers;
    std::atomic<bool> failed{false};
    std::atomic<bool> claimed{false};
    std::exception_ptr failure;
    void fail(std::exception_ptr e) noexcept {
      failed.store(true, std::memory_order_relaxed);
      if (!claimed.exchange(true)) failure = std::move(e);
    }
  };

  template <class Body>
  static void custom_task(void* context, std::ptrdiff_t task, int worker) noexcept {
    auto& ctx = *static_cast<CustomContext<Body>*>(context);
    if (ctx.failed.load(std::memory_order_relaxed)) return;
    try {
      if (worker < 0 || worker >= ctx.n_workers)
        throw backend_error(detail::concat("Executor (custom): the pool passed worker ", worker, " for task ", task,
                                           "; workers must be in [0, n_workers = ", ctx.n_workers, ")"));
      SerialEigenScope const serial_eigen;
      (*ctx.body)(task, worker);
    } catch (...) {
      ctx.fail(std::current_exception());
    }
  }

  template <class Body>
  void run_custom(std::ptrdiff_t n_tasks, Body& body) const {
    using B = std::remove_reference_t<Body>;
    CustomContext<B> ctx;
    ctx.body = &body;
    ctx.n_workers = n_workers_;
    parallel_for_(pool_, n_tasks, &custom_task<B>, &ctx);
    // The pool returned, so every task has: the failure (if any) is complete and visible.
    if (ctx.claimed.load()) std::rethrow_exception(ctx.failure);
  }

  Kind kind_ = Kind::serial;
  void* pool_ = nullptr;
  ParallelForFn parallel_for_ = nullptr;
  int n_workers_ = 1;
};

}  // namespace factorllm
