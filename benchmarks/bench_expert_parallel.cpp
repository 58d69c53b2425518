// SPDX-License-Identifier: Apache-2.0
// Expert parallelism over MPI (moe::ExpertParallelFfn, docs/expert_parallel.md §6): tokens per second of the whole
// group and the share of time spent inside MPI calls, for the forward (cpu_simd) and the training step (forward +
// backward, the oracle's per-slot backward). Run under mpirun with 1 and 2 ranks and compare ratios:
//
//   OMP_NUM_THREADS=1 mpirun -np 1 ./build/benchmarks/bench_expert_parallel
//   OMP_NUM_THREADS=1 mpirun -np 2 --oversubscribe --bind-to none ./build/benchmarks/bench_expert_parallel
//
// Weak scaling: every rank brings the argument's tokens, so the group's tokens per second should double with two
// ranks on two free cores. Iteration counts are fixed (every rank must call the collectives equally often: Google
// Benchmark's adaptive count would differ between ranks and deadlock). Only rank 0 reports.
// Counters: tokens_per_s (all ranks' tokens per wall second, rate), comm_share (seconds inside MPI_Alltoall(v) and
// MPI_Allreduce over the timed wall seconds, waiting for a slower rank included), ranks.
#include <benchmark/benchmark.h>

#include <mpi.h>

#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "factorllm/factorllm.hpp"
#include "factorllm/moe/mpi/expert_parallel_ffn.hpp"

namespace {

namespace fl = factorllm;

int g_rank = 0, g_size = 1;

/// A random layer: d_model d, n experts of m neurons, top-2 of softmax_topk_renorm; every rank builds the same one.
struct Layer {
  fl::ffn::ExpertWeights<float> experts;
  fl::moe::Router<float> router;
  fl::moe::Gating gating;
  Layer(std::ptrdiff_t d, std::ptrdiff_t m, std::ptrdiff_t n) : experts(make(d, m, n)), router(fl::moe::Router<float>::random(d, n, 3, 0.5)) {
    gating.top_k = 2;
  }
  static fl::ffn::ExpertWeights<float> make(std::ptrdiff_t d, std::ptrdiff_t m, std::ptrdiff_t n) {
    fl::Tensor<float, 3> g({n, m, d}), u({n, m, d}), dn({n, d, m});
    std::mt19937_64 rng(1);
    std::normal_distribution<float> dist(0.f, 0.05f);
    for (auto* t : {&g, &u, &dn})
      for (std::ptrdiff_t i = 0; i < t->size(); ++i) (*t)[i] = dist(rng);
    return fl::ffn::ExpertWeights<float>(std::move(g), std::move(u), std::move(dn),
                                         fl::ffn::ExpertPartition::contiguous(m * n, n));
  }
};

fl::Matrix<float> random_rows(std::ptrdiff_t rows, std::ptrdiff_t cols, std::uint64_t seed) {
  fl::Matrix<float> x({rows, cols});
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (std::ptrdiff_t i = 0; i < x.size(); ++i) x[i] = dist(rng);
  return x;
}

void report(benchmark::State& state, double wall, double comm, std::ptrdiff_t tokens_per_rank) {
  state.counters["tokens_per_s"] = benchmark::Counter(static_cast<double>(tokens_per_rank * g_size) *
                                                      static_cast<double>(state.iterations()) / wall);
  state.counters["comm_share"] = comm / wall;
  state.counters["ranks"] = g_size;
}

/// Forward on cpu_simd: d_model 1024, 8 experts of 512 neurons (d_ff 4096), top-2; arg = tokens per rank.
void BM_ExpertParallelForward(benchmark::State& state) {
  std::ptrdiff_t const t = state.range(0), d = 1024;
  static Layer const layer(d, 512, 8);
  auto ffn = fl::moe::ExpertParallelFfn<float, fl::DefaultCpu>::from_experts(
      MPI_COMM_WORLD, layer.experts, layer.router, layer.gating, fl::moe::ExpertPlacement::contiguous(8, g_size));
  fl::moe::ExpertParallelFfn<float, fl::DefaultCpu>::State st;
  fl::Matrix<float> const x = random_rows(t, d, 100 + static_cast<std::uint64_t>(g_rank));
  fl::Matrix<float> y({t, d});
  ffn.forward(x.cview(), y.view(), st);  // warm-up: buffers reach their size
  MPI_Barrier(MPI_COMM_WORLD);
  ffn.reset_comm_seconds();
  double const t0 = MPI_Wtime();
  for (auto _ : state) {
    ffn.forward(x.cview(), y.view(), st);
    benchmark::DoNotOptimize(y.data());
  }
  report(state, MPI_Wtime() - t0, ffn.comm_seconds(), t);
}
BENCHMARK(BM_ExpertParallelForward)->Arg(64)->Arg(512)->Iterations(20)->Unit(benchmark::kMillisecond)->UseRealTime();

/// Training step (forward + backward, float, the oracle's kernels): d_model 256, 8 experts of 128 neurons, top-2.
void BM_ExpertParallelTrainStep(benchmark::State& state) {
  std::ptrdiff_t const t = state.range(0), d = 256, m = 128, n = 8;
  static Layer const layer(d, m, n);
  auto ffn = fl::moe::ExpertParallelFfn<float, fl::CpuScalar>::from_experts(
      MPI_COMM_WORLD, layer.experts, layer.router, layer.gating, fl::moe::ExpertPlacement::contiguous(n, g_size));
  fl::moe::ExpertParallelFfn<float, fl::CpuScalar>::State st;
  std::ptrdiff_t const nl = ffn.shard().n_local();
  fl::Matrix<float> const x = random_rows(t, d, 200 + static_cast<std::uint64_t>(g_rank));
  fl::Matrix<float> const dy = random_rows(t, d, 300 + static_cast<std::uint64_t>(g_rank));
  fl::Matrix<float> y({t, d}), dx({t, d}), drw({n, d});
  fl::Tensor<float, 3> dg({nl, m, d}), du({nl, m, d}), dd({nl, d, m});
  fl::Vector<float> drb({n});
  auto step = [&] {
    ffn.forward(x.cview(), y.view(), st);
    ffn.backward(x.cview(), dy.cview(), st, dx.view(), dg.view(), du.view(), dd.view(), drw.view(), drb.view());
  };
  step();
  MPI_Barrier(MPI_COMM_WORLD);
  ffn.reset_comm_seconds();
  double const t0 = MPI_Wtime();
  for (auto _ : state) {
    step();
    benchmark::DoNotOptimize(dx.data());
  }
  report(state, MPI_Wtime() - t0, ffn.comm_seconds(), t);
}
BENCHMARK(BM_ExpertParallelTrainStep)->Arg(64)->Iterations(5)->Unit(benchmark::kMillisecond)->UseRealTime();

/// Swallows the output of ranks other than 0 (they run the same collectives).
class NullReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(Context const&) override { return true; }
  void ReportRuns(std::vector<Run> const&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  benchmark::Initialize(&argc, argv);
  if (g_rank == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    NullReporter quiet;
    benchmark::RunSpecifiedBenchmarks(&quiet);
  }
  benchmark::Shutdown();
  MPI_Finalize();
  return 0;
}
