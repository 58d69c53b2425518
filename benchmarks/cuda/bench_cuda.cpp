// SPDX-License-Identifier: Apache-2.0
// CUDA benchmarks (Google Benchmark, timed with CUDA events: manual time per iteration).
//   BM_ExpertGemmGrouped / BM_ExpertGemmPerExpert  the gate projection of N experts (d_expert = d_ff / N) on their
//       T * K grouped rows (balanced), bf16, through cublasGemmGroupedBatchedEx or one cublasGemmEx per expert
//   BM_DenseGemm  one cublasGemmEx of the same total FLOPs ([T K, d_model] x [d_model, d_expert])
//   BM_Decode     ExpertSwiglu<Cuda> decode path (1 token, K experts of N): bytes = the active experts' weights
//   BM_CopyD2D    cudaMemcpyAsync device to device of the same bytes; bytes counted read + write
// Ratios (grouped / dense at T = 8192, decode / copy) are computed from the JSON by tests/cuda/run_on_gpu.sh.
// Without a CUDA device it prints "no CUDA device" and exits 0.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <factorllm/backend/cuda/cuda.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace factorllm;
using namespace factorllm::cuda;

namespace {

constexpr std::ptrdiff_t kDModel = 4096;  // Mixtral / Llama-2-7B sizes
constexpr std::ptrdiff_t kDFf = 14336;

void ok(cudaError_t err) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(err));
    std::exit(1);
  }
}

/// Device bytes, freed on destruction.
struct Buffer {
  void* p = nullptr;
  explicit Buffer(std::size_t bytes) { ok(cudaMalloc(&p, bytes > 0 ? bytes : 64)); }
  Buffer(Buffer const&) = delete;
  Buffer& operator=(Buffer const&) = delete;
  ~Buffer() { cudaFree(p); }
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

/// One stream, one cuBLAS handle, pinned host scratch and two events, shared by every benchmark.
struct Env {
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  void* host = nullptr;
  std::size_t host_bytes = 1 << 20;
  Env() {
    ok(cudaStreamCreate(&stream));
    cublasCreate(&cublas);
    ok(cudaEventCreate(&start));
    ok(cudaEventCreate(&stop));
    ok(cudaMallocHost(&host, host_bytes));
  }
  CudaContext context() const { return CudaContext{stream, cublas, WorkspaceSpan{static_cast<std::byte*>(host), host_bytes, MemorySpace::host}}; }
  /// Times f() on the stream with events; sets the iteration's manual time.
  template <class F>
  void time(benchmark::State& state, F&& f) {
    ok(cudaEventRecord(start, stream));
    f();
    ok(cudaEventRecord(stop, stream));
    ok(cudaEventSynchronize(stop));
    float ms = 0;
    ok(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(static_cast<double>(ms) * 1e-3);
  }
};

Env& env() {
  static Env e;
  return e;
}

/// Balanced offsets: T K rows over N experts.
std::vector<std::int64_t> balanced_offsets(std::ptrdiff_t rows, std::ptrdiff_t n) {
  std::vector<std::int64_t> off(static_cast<std::size_t>(n + 1), 0);
  for (std::ptrdiff_t e = 0; e < n; ++e) off[static_cast<std::size_t>(e + 1)] = off[static_cast<std::size_t>(e)] + rows / n + (e < rows % n ? 1 : 0);
  return off;
}

void expert_gemm(benchmark::State& state, bool grouped) {
  std::ptrdiff_t const T = state.range(0), n = state.range(1), k = state.range(2), de = kDFf / n, rows = T * k;
  Buffer w(static_cast<std::size_t>(n * de * kDModel) * 2), x(static_cast<std::size_t>(rows * kDModel) * 2),
      y(static_cast<std::size_t>(rows * de) * 2), ptrs(sizeof(void*) * 3 * static_cast<std::size_t>(n));
  ok(cudaMemset(w.p, 0, static_cast<std::size_t>(n * de * kDModel) * 2));
  ok(cudaMemset(x.p, 0, static_cast<std::size_t>(rows * kDModel) * 2));
  auto const off = balanced_offsets(rows, n);
  std::vector<GemmProblem> problems(static_cast<std::size_t>(n));
  int const count = expert_gemm_problems(off.data(), n, kDModel, de, de * kDModel, Projection::gate, problems.data());
  std::vector<int> ints(static_cast<std::size_t>(9 * n));
  std::vector<float> scalars(static_cast<std::size_t>(2 * n));
  std::vector<void const*> pointers(static_cast<std::size_t>(3 * n));
  GroupedGemmHostArrays host{ints.data(), scalars.data(), pointers.data(), static_cast<int>(n)};
  CudaContext const ctx = env().context();
  auto run = [&] {
    if (grouped)
      grouped_gemm(GemmType::bf16, problems.data(), count, w.p, x.p, y.p, ptrs.as<void*>(), host, ctx);
    else
      per_problem_gemm(GemmType::bf16, problems.data(), count, w.p, x.p, y.p, ctx);
  };
  run();  // warm-up (cuBLAS heuristics, pointer copy)
  for (auto _ : state) env().time(state, run);
  state.counters["TFLOPS"] = benchmark::Counter(2.0 * static_cast<double>(rows * de * kDModel) * 1e-12,
                                                benchmark::Counter::kIsIterationInvariantRate);
}

void BM_ExpertGemmGrouped(benchmark::State& state) { expert_gemm(state, true); }
void BM_ExpertGemmPerExpert(benchmark::State& state) { expert_gemm(state, false); }

void BM_DenseGemm(benchmark::State& state) {
  std::ptrdiff_t const T = state.range(0), n = state.range(1), k = state.range(2), de = kDFf / n, rows = T * k;
  Buffer w(static_cast<std::size_t>(de * kDModel) * 2), x(static_cast<std::size_t>(rows * kDModel) * 2),
      y(static_cast<std::size_t>(rows * de) * 2);
  ok(cudaMemset(w.p, 0, static_cast<std::size_t>(de * kDModel) * 2));
  ok(cudaMemset(x.p, 0, static_cast<std::size_t>(rows * kDModel) * 2));
  CudaContext const ctx = env().context();
  auto run = [&] { gemm_xwt(GemmType::bf16, x.p, w.p, y.p, rows, de, kDModel, ctx); };
  run();
  for (auto _ : state) env().time(state, run);
  state.counters["TFLOPS"] = benchmark::Counter(2.0 * static_cast<double>(rows * de * kDModel) * 1e-12,
                                                benchmark::Counter::kIsIterationInvariantRate);
}

void args_gemm(benchmark::internal::Benchmark* b) {
  for (std::int64_t T : {512, 1024, 2048, 4096, 8192})
    for (std::int64_t n : {4, 8})
      for (std::int64_t k : {1, 2}) b->Args({T, n, k});
  b->ArgNames({"T", "N", "K"})->UseManualTime()->Unit(benchmark::kMicrosecond);
}

/// Decode: one token routed to K of N experts, bf16 weights.
void BM_Decode(benchmark::State& state) {
  std::ptrdiff_t const n = state.range(0), k = state.range(1), de = kDFf / n;
  std::size_t const expert_bytes = static_cast<std::size_t>(n * de * kDModel) * sizeof(bf16);
  Buffer gate(expert_bytes), up(expert_bytes), down(expert_bytes), x(sizeof(float) * kDModel),
      out(static_cast<std::size_t>(k * kDModel) * sizeof(bf16));
  ok(cudaMemset(gate.p, 0, expert_bytes));
  ok(cudaMemset(up.p, 0, expert_bytes));
  ok(cudaMemset(down.p, 0, expert_bytes));
  ok(cudaMemset(x.p, 0, sizeof(float) * kDModel));
  std::vector<std::int64_t> off(static_cast<std::size_t>(n + 1), 0);
  std::vector<std::int32_t> slots(static_cast<std::size_t>(k));
  for (std::ptrdiff_t e = 0; e < n; ++e) off[static_cast<std::size_t>(e + 1)] = off[static_cast<std::size_t>(e)] + (e < k ? 1 : 0);
  for (std::ptrdiff_t j = 0; j < k; ++j) slots[static_cast<std::size_t>(j)] = static_cast<std::int32_t>(j);
  Buffer doff(sizeof(std::int64_t) * off.size()), dslots(sizeof(std::int32_t) * slots.size());
  ok(cudaMemcpy(doff.p, off.data(), sizeof(std::int64_t) * off.size(), cudaMemcpyHostToDevice));
  ok(cudaMemcpy(dslots.p, slots.data(), sizeof(std::int32_t) * slots.size(), cudaMemcpyHostToDevice));
  RegionPlan const plan = expert_swiglu_workspace<bf16>(1, kDModel, n, de, k);
  Buffer ws(plan.bytes());
  ExpertWeightsView<bf16> view{TensorView<bf16 const, 3>(gate.as<bf16 const>(), {n, de, kDModel}),
                               TensorView<bf16 const, 3>(up.as<bf16 const>(), {n, de, kDModel}),
                               TensorView<bf16 const, 3>(down.as<bf16 const>(), {n, kDModel, de})};
  CudaContext const ctx = env().context();
  auto run = [&] {
    expert_swiglu(view, matrix_view<float const>(x.as<float const>(), 1, kDModel), k,
                  VectorView<std::int64_t const>(doff.as<std::int64_t const>(), {n + 1}),
                  VectorView<std::int32_t const>(dslots.as<std::int32_t const>(), {k}),
                  matrix_view(out.as<bf16>(), k, kDModel), WorkspaceSpan{ws.as<std::byte>(), plan.bytes(), MemorySpace::device},
                  ctx, ExpertPath::decode);
  };
  run();
  for (auto _ : state) env().time(state, run);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * 3 * k * de * kDModel *
                          static_cast<std::int64_t>(sizeof(bf16)));
}

/// Copy of the bytes BM_Decode reads, counted as read + write.
void BM_CopyD2D(benchmark::State& state) {
  std::ptrdiff_t const n = state.range(0), k = state.range(1), de = kDFf / n;
  auto const bytes = static_cast<std::size_t>(3 * k * de * kDModel) * sizeof(bf16);
  Buffer src(bytes), dst(bytes);
  ok(cudaMemset(src.p, 0, bytes));
  auto run = [&] { ok(cudaMemcpyAsync(dst.p, src.p, bytes, cudaMemcpyDeviceToDevice, env().stream)); };
  run();
  for (auto _ : state) env().time(state, run);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * 2 * static_cast<std::int64_t>(bytes));
}

void args_decode(benchmark::internal::Benchmark* b) {
  for (std::int64_t n : {4, 8})
    for (std::int64_t k : {1, 2}) b->Args({n, k});
  b->ArgNames({"N", "K"})->UseManualTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_ExpertGemmGrouped)->Apply(args_gemm);
BENCHMARK(BM_ExpertGemmPerExpert)->Apply(args_gemm);
BENCHMARK(BM_DenseGemm)->Apply(args_gemm);
BENCHMARK(BM_Decode)->Apply(args_decode);
BENCHMARK(BM_CopyD2D)->Apply(args_decode);

}  // namespace

int main(int argc, char** argv) {
  if (device_count() == 0) {
    std::printf("no CUDA device: the CUDA benchmarks need a GPU\n");
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
