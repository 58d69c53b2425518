// SPDX-License-Identifier: Apache-2.0
// moe::ExpertParallelFfn under a real MPI (ctest runs it with mpirun -np 1, 2 and 4; docs/expert_parallel.md §5).
// Every rank builds the same random layer and tokens, computes the single-process oracle on all tokens, runs the
// expert-parallel forward and backward on its own tokens and experts, and checks its slice bitwise: y, dx, dL/dz and
// its experts' gradients, in float and double, for several placements. The router gradient (a sum over ranks) is
// checked to 1e-6 relative (bitwise with one rank). Bad placements must be refused with value_error. A plain main
// (not Catch2): each rank counts its failures, MPI_Allreduce sums them, and every rank exits non-zero on any failure.
#include <factorllm/moe/mpi/expert_parallel_ffn.hpp>

#include <mpi.h>

#include <climits>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "reference/expert_parallel_fixtures.hpp"

using namespace factorllm;

namespace {

int g_failures = 0;
int g_rank = 0;

void check(bool ok, std::string const& what) {
  if (ok) return;
  ++g_failures;
  std::fprintf(stderr, "rank %d: FAILED: %s\n", g_rank, what.c_str());
}

template <class T>
MatrixView<T> rows(Matrix<T>& m, std::ptrdiff_t first, std::ptrdiff_t last) {
  return matrix_view(m.data() + first * m.extent(1), last - first, m.extent(1));
}

/// One problem, every placement for this communicator's size: forward and backward against the oracle.
template <class T, class Backend>
void run_problem(ep_fixture::Problem<T> const& p, bool bitwise, std::string const& tag) {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  ep_fixture::Reference<T> const ref(p);
  auto const split = ep_fixture::token_split(p.n_tokens, size);
  std::ptrdiff_t const t0 = split[static_cast<std::size_t>(g_rank)], t1 = split[static_cast<std::size_t>(g_rank) + 1];
  std::ptrdiff_t const d = p.d_model, m = p.d_expert, n = p.n_experts;
  for (auto const& [name, placement] : ep_fixture::placements(n, size)) {
    std::string const what = tag + ", " + name + ", " + std::to_string(size) + " rank(s)";
    auto const layer = moe::ExpertParallelFfn<T, Backend>::from_experts(MPI_COMM_WORLD, p.experts, p.router, p.gating, placement);
    typename moe::ExpertParallelFfn<T, Backend>::State st;
    Matrix<T> x(p.x), y({p.n_tokens, d});
    // Twice on one state: a reused state must give the same bits (buffers only grow).
    for (int call = 0; call < 2; ++call) {
      layer.forward(rows(x, t0, t1), rows(y, t0, t1), st);
      std::ptrdiff_t const bad = bitwise ? ep_fixture::bit_mismatches(y.data() + t0 * d, ref.y.data() + t0 * d, (t1 - t0) * d)
                                         : (ref::rel_l2(y.data() + t0 * d, ref.y.data() + t0 * d, static_cast<std::size_t>((t1 - t0) * d)) < 1e-5 ? 0 : 1);
      check(bad == 0, what + ": forward y differs from the single-process layer (" + std::to_string(bad) + " values)");
    }
    if (!bitwise) continue;  // the backward runs the oracle's per-slot step: checked on CpuScalar only

    std::ptrdiff_t const nl = layer.shard().n_local();
    Matrix<T> dx({p.n_tokens, d}), dlogits({p.n_tokens, n}), drw({n, d});
    Tensor<T, 3> dg({nl, m, d}), du({nl, m, d}), dd({nl, d, m});
    Vector<T> drb({n});
    Matrix<T> dy(p.dy);
    layer.backward(rows(x, t0, t1), rows(dy, t0, t1), st, rows(dx, t0, t1), dg.view(), du.view(), dd.view(), drw.view(),
                   drb.view(), rows(dlogits, t0, t1));
    check(ep_fixture::bit_mismatches(dx.data() + t0 * d, ref.dx.data() + t0 * d, (t1 - t0) * d) == 0, what + ": dx");
    check(ep_fixture::bit_mismatches(dlogits.data() + t0 * n, ref.dlogits.data() + t0 * n, (t1 - t0) * n) == 0, what + ": dL/dz");
    for (std::ptrdiff_t i = 0; i < nl; ++i) {
      std::int32_t const e = placement.expert_of(g_rank, i);
      check(ep_fixture::bit_mismatches(dg.data() + i * m * d, ref.d_gate.data() + e * m * d, m * d) == 0,
            what + ": d_gate of expert " + std::to_string(e));
      check(ep_fixture::bit_mismatches(du.data() + i * m * d, ref.d_up.data() + e * m * d, m * d) == 0,
            what + ": d_up of expert " + std::to_string(e));
      check(ep_fixture::bit_mismatches(dd.data() + i * m * d, ref.d_down.data() + e * m * d, m * d) == 0,
            what + ": d_down of expert " + std::to_string(e));
    }
    check(ref::rel_l2(drw.data(), ref.d_router_w.data(), static_cast<std::size_t>(drw.size())) < 1e-6, what + ": router weight grad");
    check(ref::rel_l2(drb.data(), ref.d_router_b.data(), static_cast<std::size_t>(drb.size())) < 1e-6, what + ": router bias grad");
    if (size == 1)
      check(ep_fixture::bit_mismatches(drw.data(), ref.d_router_w.data(), drw.size()) == 0, what + ": router grad (one rank)");
  }
}

template <class F>
void expect_value_error(F&& f, std::string const& what, char const* needle) {
  try {
    f();
  } catch (value_error const& e) {
    check(std::string(e.what()).find(needle) != std::string::npos, what + ": message '" + e.what() + "' lacks '" + needle + "'");
    return;
  }
  check(false, what + ": no value_error");
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  try {
    for (auto mode : {moe::CombineMode::softmax_topk_renorm, moe::CombineMode::sigmoid_topk}) {
      std::string const m = "mode " + std::to_string(static_cast<int>(mode));
      run_problem<double, CpuScalar>(ep_fixture::Problem<double>(12, 6, 6, 3, 23, 41, mode), true, "double, " + m);
      run_problem<float, CpuScalar>(ep_fixture::Problem<float>(12, 6, 6, 2, 23, 43, mode), true, "float, " + m);
    }
    run_problem<float, DefaultCpu>(ep_fixture::Problem<float>(32, 16, 8, 2, 40, 47), false, "float cpu_simd");
    // Only one token in all: every rank but the last routes none (a [0, d_model] batch).
    run_problem<double, CpuScalar>(ep_fixture::Problem<double>(8, 4, 4, 2, 1, 53), true, "one token");

    ep_fixture::Problem<float> const p(8, 4, 4, 2, 4, 59);
    using Ffn = moe::ExpertParallelFfn<float>;
    expect_value_error([&] { Ffn::from_experts(MPI_COMM_WORLD, p.experts, p.router, p.gating, moe::ExpertPlacement::contiguous(4, size + 1)); },
                       "a placement for another rank count", "does not fit");
    expect_value_error([&] { Ffn::from_experts(MPI_COMM_WORLD, p.experts, p.router, p.gating, moe::ExpertPlacement::contiguous(8, size)); },
                       "a placement for another expert count", "the layer has 4");
    auto other = moe::ExpertShard<float>::from_experts(p.experts, p.router, p.gating, moe::ExpertPlacement::contiguous(4, size),
                                                      (g_rank + 1) % size);
    if (size > 1) expect_value_error([&] { Ffn(MPI_COMM_WORLD, std::move(other)); }, "another rank's shard", "is for rank");
    // MPI counts are int: a byte count past INT_MAX is refused, never truncated.
    expect_value_error([] { moe::mpi_detail::mpi_int(std::int64_t{INT_MAX} + 1, "a send count"); }, "a count past INT_MAX",
                       "does not fit MPI's int counts");
    check(moe::mpi_detail::mpi_int(INT_MAX, "a send count") == INT_MAX, "INT_MAX itself is a valid count");
  } catch (std::exception const& e) {
    check(false, std::string("exception: ") + e.what());
  }
  int total = 0;
  MPI_Allreduce(&g_failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (g_rank == 0) std::printf("test_expert_parallel_mpi: %d rank(s), %d failure(s)\n", size, total);
  MPI_Finalize();
  return total == 0 ? 0 : 1;
}
