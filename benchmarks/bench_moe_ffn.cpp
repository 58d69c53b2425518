// SPDX-License-Identifier: Apache-2.0
// Benchmarks of the MoE FFN on the cpu_simd backend against the library's fastest dense path, the paper
// code's "mask_all" formulation, and the machine's own limits (STREAM-style read bandwidth, Eigen sgemm),
// all measured in the same run so that the reported figures are ratios.
//
// Shapes: TinyLlama FFN (d 2048, d_ff 5632, N 4, K 1..3), LLaMA-7B FFN (d 4096, d_ff 11008, N 8, K 2),
// stories260K (d 64, d_ff 172, N 4). T in {1, 8, 32, 128, 512}; weights f32 and bf16 (generated), and f16, q8_0,
// q4_0 (generated in float, then converted; ggml's reference rounding) where the shape's sizes are multiples of 32.
// For T <= 8 each iteration uses the next of L copies of the layer, L chosen so that the copies exceed twice
// the last-level cache: weights come from DRAM, as in real decoding of a many-layer model.
//
// Counters: bytes_per_second (active weights streamed), flops (2 x MACs of active experts + router, rate),
// dot_peak_fraction (flops over the register-only peak of the dot instruction the kernel uses, measured in the same
// run; the label names it and the dispatch target),
// bw_fraction (achieved bytes/s over STREAM read bandwidth), gemm_fraction (achieved flop/s over Eigen sgemm
// on [T, d] x [d, d_ff]), speedup_vs_dense (dense FFN time / MoE time at the same T, dense on cpu_simd),
// mask_all_ms and speedup_vs_mask_all (compute every expert on every token, then mask: the paper code).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <unistd.h>
#include <vector>

#include <Eigen/Core>


#include "factorllm/factorllm.hpp"

namespace {

namespace fl = factorllm;
using Simd = fl::CpuSimd<>;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

/// Largest cache the kernel reports for CPU 0 (sysfs, "32768K"); glibc's sysconf as a fallback (on some AMD
/// parts it reports the sum over all CCDs), 32 MiB if neither answers.
std::size_t llc_bytes() {
  static std::size_t const bytes = [] {
    std::size_t best = 0;
    for (int i = 0; i < 8; ++i) {
      std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size");
      std::size_t v = 0;
      char unit = 0;
      if (f >> v >> unit) best = std::max(best, unit == 'M' ? v << 20 : unit == 'K' ? v << 10 : v);
    }
    if (best == 0) {
      long const v = sysconf(_SC_LEVEL3_CACHE_SIZE);
      best = v > 0 ? static_cast<std::size_t>(v) : (32u << 20);
    }
    return best;
  }();
  return bytes;
}

/// One STREAM-style read pass: all threads sum disjoint parts of an array 8x the LLC; returns bytes/s.
double stream_read_pass() {
  // A library Tensor: the same allocator (and so the same huge-page advice) as the weights.
  static fl::Vector<float> const a = [] {
    fl::Vector<float> v({static_cast<std::ptrdiff_t>(std::max<std::size_t>(llc_bytes() * 8, 512u << 20) / sizeof(float))});
    std::fill(v.data(), v.data() + v.size(), 1.0f);
    return v;
  }();
  auto const n = static_cast<std::size_t>(a.size());
  auto const t0 = Clock::now();
  double total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
  for (std::ptrdiff_t blk = 0; blk < static_cast<std::ptrdiff_t>(n / 4096); ++blk) {
    Eigen::Map<Eigen::ArrayXf const> m(a.data() + blk * 4096, 4096);
    total += static_cast<double>(m.sum());
  }
  double const s = seconds_since(t0);
  benchmark::DoNotOptimize(total);
  return static_cast<double>(n * sizeof(float)) / s;
}

/// STREAM-style read bandwidth (bytes/s), best of 5 passes; printed once.
double stream_read_bandwidth() {
  static double const bw = [] {
    double best = 0;
    for (int rep = 0; rep < 5; ++rep) best = std::max(best, stream_read_pass());
    std::fprintf(stderr, "machine: STREAM-style read bandwidth %.1f GB/s (%zu MiB array, %d threads)\n", best / 1e9,
                std::max<std::size_t>(llc_bytes() * 8, 512u << 20) >> 20, fl::detail::max_threads());
    return best;
  }();
  return bw;
}

/// Bandwidth fraction measured in pairs. This VM's read bandwidth drifts by up to 1.5x within seconds
/// (neighbours on the host), so a STREAM figure from the start of the run is not the ceiling a later benchmark
/// met. Each of 9 rounds takes a STREAM pass (best of 2) and then `calls` calls (about 50 ms), back to back;
/// the result is the median over rounds of (bytes / call time) / (that round's STREAM bandwidth).
template <class Call>
std::pair<double, double> paired_bw_fraction(Call&& call, double bytes_per_call, int calls) {
  std::vector<double> ratios, streams;
  for (int round = 0; round < 9; ++round) {
    double const bw = std::max(stream_read_pass(), stream_read_pass());
    auto const t0 = Clock::now();
    for (int i = 0; i < calls; ++i) call();
    double const per_call = seconds_since(t0) / calls;
    ratios.push_back(bytes_per_call / per_call / bw);
    streams.push_back(bw);
  }
  std::sort(ratios.begin(), ratios.end());
  std::sort(streams.begin(), streams.end());
  return {ratios[ratios.size() / 2], streams[streams.size() / 2]};
}

/// Eigen sgemm flop/s on [T, d] x [d, d_ff] (row-major operands, like the FFN), best of 3.
double eigen_sgemm_flops(std::ptrdiff_t t, std::ptrdiff_t d, std::ptrdiff_t d_ff) {
  static std::map<std::tuple<long, long, long>, double> cache;
  auto key = std::make_tuple(static_cast<long>(t), static_cast<long>(d), static_cast<long>(d_ff));
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  using RM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  RM x = RM::Random(t, d), w = RM::Random(d_ff, d), y(t, d_ff);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    auto const t0 = Clock::now();
    y.noalias() = x * w.transpose();
    best = std::max(best, 2.0 * static_cast<double>(t * d * d_ff) / seconds_since(t0));
  }
  benchmark::DoNotOptimize(y.data());
  std::fprintf(stderr, "machine: Eigen sgemm [%ld x %ld] x [%ld x %ld]: %.1f GFLOP/s\n", static_cast<long>(t), static_cast<long>(d),
              static_cast<long>(d), static_cast<long>(d_ff), best / 1e9);
  return cache[key] = best;
}

/// Peak rate (multiply-adds x 2 per second, all threads) of the dot instruction the MoE kernels for W run on the
/// dispatched target, from the library's register-only loop (dot_peak_loop: 12 independent accumulators, no memory
/// operand). Decode of q8_0 / q4_0 uses vpdpbusd on AVX3_DL (64 byte products an instruction), vpmaddubsw +
/// vpmaddwd on AVX2 (32 a pair); bf16 decode with AVX512-BF16 uses vdpbf16ps (32 products); everything else (f32,
/// f16, widened bf16, and every prefill: Eigen sgemm on float panels) is float FMA at the target's vector width.
/// rate 0: the target has no such instruction (the counter is then omitted).
struct DotPeak {
  char const* instruction;
  double rate;
};

DotPeak dot_peak(fl::detail::DotInstruction kind) {
  static std::map<int, DotPeak> cache;
  if (auto it = cache.find(static_cast<int>(kind)); it != cache.end()) return it->second;
  std::string const target = fl::simd_dispatch_target();
  char const* name = kind == fl::detail::DotInstruction::f32_fma ? "float FMA"
                     : kind == fl::detail::DotInstruction::bf16_dot ? "vdpbf16ps"
                     : target == "AVX3_DL" ? "vpdpbusd" : "vpmaddubsw+vpmaddwd";
  constexpr std::int64_t kIterations = 4000000;
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    std::int64_t products = 0;
    auto const t0 = Clock::now();
#pragma omp parallel reduction(+ : products)
    products += fl::detail::dot_peak_loop_dispatch(kind, kIterations);
    best = std::max(best, 2.0 * static_cast<double>(products) / seconds_since(t0));
  }
  if (best > 0)
    std::fprintf(stderr, "machine: %s (target %s) register-only peak %.1f G multiply-adds x 2 / s (%d threads)\n", name,
                 target.c_str(), best / 1e9, fl::detail::max_threads());
  return cache[static_cast<int>(kind)] = DotPeak{name, best};
}

/// The dot instruction the kernels for W run at T rows per expert on this CPU (see dot_peak).
template <class W>
fl::detail::DotInstruction dot_instruction(std::ptrdiff_t t) {
  bool const decode = t <= fl::detail::kGemvMaxRows;
  if constexpr (fl::is_block_format_v<W>) {
    return decode ? fl::detail::DotInstruction::int8_dot : fl::detail::DotInstruction::f32_fma;
  } else if constexpr (std::is_same_v<W, fl::bf16>) {
    return decode && fl::detail::bf16_native_dot_dispatch() ? fl::detail::DotInstruction::bf16_dot
                                                            : fl::detail::DotInstruction::f32_fma;
  } else {
    return fl::detail::DotInstruction::f32_fma;
  }
}

/// A generated FFN layer in both layouts (dense and factorized), for weight type W. Copies made only to cycle
/// through DRAM hold just the MoE layer (dense == nullptr): see layers().
template <class W>
struct Layer {
  std::unique_ptr<fl::ffn::DenseFfn<W>> dense;
  std::unique_ptr<fl::moe::MoeFfn<W, Simd>> moe;
};

/// Bytes one weight of format W takes (a block format stores 32 weights and a scale in one element).
template <class W>
constexpr double bytes_per_weight() { return static_cast<double>(sizeof(W)) / static_cast<double>(fl::block_weights_v<W>); }

template <class W>
fl::Matrix<W> random_matrix(std::ptrdiff_t r, std::ptrdiff_t c, double scale, std::uint64_t seed);

/// Block formats: generated in float, then quantized row by row (ggml's reference rounding).
template <class W>
fl::Matrix<W> random_weights(std::ptrdiff_t r, std::ptrdiff_t c, double scale, std::uint64_t seed) {
  if constexpr (fl::is_block_format_v<W>)
    return fl::convert<W>(random_matrix<float>(r, c, scale, seed).cview());
  else
    return random_matrix<W>(r, c, scale, seed);
}

template <class W>
fl::Matrix<W> random_matrix(std::ptrdiff_t r, std::ptrdiff_t c, double scale, std::uint64_t seed) {
  fl::Matrix<W> m({r, c});
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (std::ptrdiff_t i = 0; i < m.size(); ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    double const u = static_cast<double>(s >> 11) * (1.0 / 9007199254740992.0) - 0.5;  // uniform, var 1/12
    m[i] = fl::from_double<W>(u * scale * 3.4641016);                                    // std = scale
  }
  return m;
}

struct Shape {
  char const* name;
  std::ptrdiff_t d, d_ff, n;
};
constexpr Shape kTinyLlama{"tinyllama", 2048, 5632, 4};
constexpr Shape kLlama7b{"llama7b", 4096, 11008, 8};
constexpr Shape kStories{"stories260k", 64, 172, 4};

/// Layers of a shape for weight type W and top_k K, cached across benchmarks (generation is slow). The first
/// `distinct` layers (at most 2) are generated, with their dense form; further copies clone the MoE layer of one of
/// them (only where the bytes sit matters for streaming from DRAM, and cloning is far faster than generating).
template <class W>
std::vector<Layer<W>>& layers(Shape const& s, std::ptrdiff_t k, std::size_t count) {
  static std::map<std::tuple<std::string, long, long>, std::vector<Layer<W>>> cache;
  auto& v = cache[std::make_tuple(std::string(s.name), static_cast<long>(k), static_cast<long>(s.d))];
  while (v.size() < count) {
    if (v.size() >= 2) {
      auto const& src = *v[v.size() % 2].moe;
      v.push_back(Layer<W>{nullptr, std::make_unique<fl::moe::MoeFfn<W, Simd>>(src.experts(), src.router(), src.gating())});
      continue;
    }
    auto const seed = static_cast<std::uint64_t>(v.size() + 1);
    double const a = 1.0 / std::sqrt(static_cast<double>(s.d)), b = 1.0 / std::sqrt(static_cast<double>(s.d_ff));
    auto dense = std::make_unique<fl::ffn::DenseFfn<W>>(fl::ffn::DenseFfn<W>{
        random_weights<W>(s.d_ff, s.d, a, seed), random_weights<W>(s.d_ff, s.d, a, seed + 100),
        random_weights<W>(s.d, s.d_ff, b, seed + 200)});
    fl::moe::Gating g;
    g.mode = fl::moe::CombineMode::softmax_topk_renorm;
    g.top_k = k;
    auto const partition = fl::ffn::ExpertPartition::contiguous(s.d_ff, s.n);
    fl::ffn::ExpertWeights<W> experts;
    if constexpr (fl::is_block_format_v<W>) {
      // A column of W_down is not a block: factorize the float weights, then quantize the experts (the same bytes as
      // quantizing the dense rows, since a contiguous partition keeps each down row's blocks whole).
      fl::ffn::DenseFfn<float> const f{random_matrix<float>(s.d_ff, s.d, a, seed), random_matrix<float>(s.d_ff, s.d, a, seed + 100),
                                       random_matrix<float>(s.d, s.d_ff, b, seed + 200)};
      experts = fl::ffn::convert_format<W>(fl::ffn::factorize(f.view(), partition));
    } else {
      experts = fl::ffn::factorize(dense->view(), partition);
    }
    v.push_back(Layer<W>{std::move(dense), std::make_unique<fl::moe::MoeFfn<W, Simd>>(
                                               std::move(experts), fl::moe::Router<float>::random(s.d, s.n, seed, 1.0), g)});
  }
  return v;
}

/// Copies of the layer needed so that T <= 8 streams from DRAM. A call reads only the selected experts' weights
/// (a fixed K of N per copy, since x is fixed), so the copies are counted by those active bytes: cycling through
/// at least 2 x LLC of active weights leaves none of them in the cache when its copy comes round again (2x, not
/// more: this VM reports a 480 MiB LLC, and the copies hold every expert, N / K times the active bytes). At least
/// 2 copies.
std::size_t layer_copies(Shape const& s, double weight_bytes, std::ptrdiff_t t, std::ptrdiff_t k) {
  if (t > 8) return 1;
  auto const active_bytes = static_cast<std::size_t>(static_cast<double>(3 * s.d * (s.d_ff / s.n) * k) * weight_bytes);
  return std::max<std::size_t>(2, (2 * llc_bytes()) / active_bytes + 1);
}

/// Dense FFN time (seconds per call) on cpu_simd at this T; cached. For T <= 8 it cycles clones of the generated
/// dense layers, counted like layer_copies by the dense layer's bytes (all of them are read), so that the dense
/// baseline streams from DRAM too; the clones are freed on return.
template <class W>
double dense_seconds(Shape const& s, std::vector<Layer<W>>& ls, fl::Matrix<float> const& x) {
  static std::map<std::tuple<std::string, long>, double> cache;
  auto key = std::make_tuple(std::string(s.name) + fl::dtype_traits<W>::name(), static_cast<long>(x.extent(0)));
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  std::ptrdiff_t const t = x.extent(0);
  auto const dense_bytes = static_cast<std::size_t>(3.0 * static_cast<double>(s.d * s.d_ff) * bytes_per_weight<W>());
  std::size_t const n_dense = t > 8 ? 1 : std::max<std::size_t>(2, (2 * llc_bytes()) / dense_bytes + 1);
  std::vector<fl::ffn::DenseFfn<W>> clones;
  for (std::size_t i = 0; i < n_dense; ++i) clones.push_back(*ls[i % std::min<std::size_t>(ls.size(), 2)].dense);
  fl::Workspace ws(fl::ffn::swiglu_workspace_bytes<Simd, W>(t, s.d, s.d_ff, Simd{}));
  fl::Matrix<float> y({t, s.d});
  int const reps = static_cast<int>(std::max<std::size_t>(n_dense, 3));
  double best = 1e30;
  for (int round = 0; round < 3; ++round) {
    auto const t0 = Clock::now();
    for (int r = 0; r < reps; ++r) fl::ffn::swiglu_forward(clones[static_cast<std::size_t>(r) % n_dense].view(), x.cview(), y.view(), ws, Simd{});
    best = std::min(best, seconds_since(t0) / reps);
  }
  return cache[key] = best;
}

/// The paper code's formulation: every expert on every token, then mask and sum (seconds per call).
template <class W>
double mask_all_seconds(Shape const& s, Layer<W>& l, fl::Matrix<float> const& x, fl::moe::RoutingRecord<float> const& rec) {
  std::ptrdiff_t const t = x.extent(0), m = s.d_ff / s.n, k = l.moe->top_k();
  auto const& ex = l.moe->experts();
  fl::Workspace ws(fl::ffn::swiglu_workspace_bytes<Simd, W>(t, s.d, m, Simd{}));
  fl::Matrix<float> ye({t, s.d}), y({t, s.d});
  double best = 1e30;
  for (int round = 0; round < 2; ++round) {
    auto const t0 = Clock::now();
    std::fill(y.data(), y.data() + y.size(), 0.0f);
    for (std::ptrdiff_t e = 0; e < s.n; ++e) {
      fl::ffn::swiglu_forward(ex.expert(e), x.cview(), ye.view(), ws, Simd{});
      for (std::ptrdiff_t tok = 0; tok < t; ++tok)
        for (std::ptrdiff_t j = 0; j < k; ++j)
          if (rec.ids(tok, j) == e) {
            float const w = rec.weights(tok, j);
            for (std::ptrdiff_t c = 0; c < s.d; ++c) y(tok, c) += w * ye(tok, c);
          }
    }
    best = std::min(best, seconds_since(t0));
  }
  benchmark::DoNotOptimize(y.data());
  return best;
}

template <class W>
void BM_moe(benchmark::State& state, Shape s) {
  std::ptrdiff_t const t = state.range(0), k = state.range(1);
  std::size_t const copies = layer_copies(s, bytes_per_weight<W>(), t, k);
  auto& ls = layers<W>(s, k, copies);
  fl::Matrix<float> x = random_matrix<float>(t, s.d, 1.0, 77);
  fl::Matrix<float> y({t, s.d});
  fl::Workspace ws(ls[0].moe->workspace_bytes(t));
  fl::moe::RoutingRecord<float> rec;
  ls[0].moe->forward(x.cview(), y.view(), ws, &rec);
  std::ptrdiff_t active = 0;  // experts that receive at least one token (their weights are streamed)
  for (std::ptrdiff_t e = 0; e < s.n; ++e) active += rec.load(e) > 0 ? 1 : 0;
  double const m = static_cast<double>(s.d_ff / s.n);
  double const bytes = static_cast<double>(active) * 3.0 * m * static_cast<double>(s.d) * bytes_per_weight<W>() +
                       static_cast<double>(s.n * s.d) * sizeof(float);
  double const flops = 2.0 * static_cast<double>(t) * (static_cast<double>(k) * 3.0 * m * static_cast<double>(s.d) +
                                                       static_cast<double>(s.n * s.d));
  double const dense_s = dense_seconds<W>(s, ls, x);
  // One untimed pass over every copy first: the first pass over freshly cloned gigabytes ran at half speed (measured:
  // the first benchmark of a process took 2x, its CPU time half its real time), whatever the kernel.
  for (std::size_t c = 0; c < copies; ++c) ls[c].moe->forward(x.cview(), y.view(), ws);
  std::size_t i = 0;
  auto const t0 = Clock::now();
  for (auto _ : state) {
    ls[i++ % copies].moe->forward(x.cview(), y.view(), ws);
    benchmark::DoNotOptimize(y.data());
  }
  double const per_call = seconds_since(t0) / static_cast<double>(state.iterations());
  double const mask_s = mask_all_seconds<W>(s, ls[0], x, rec);
  state.counters["bytes_per_second"] = benchmark::Counter(bytes / per_call);
  state.counters["flops"] = benchmark::Counter(flops / per_call);
  if (t <= 8) {
    int const calls = std::max(1, static_cast<int>(0.05 / per_call));
    auto const [fraction, stream_bw] = paired_bw_fraction([&] { ls[i++ % copies].moe->forward(x.cview(), y.view(), ws); },
                                                          bytes, calls);
    state.counters["bw_fraction"] = fraction;
    state.counters["stream_GBps"] = stream_bw / 1e9;
  } else {
    state.counters["bw_fraction"] = bytes / per_call / stream_read_bandwidth();
  }
  state.counters["gemm_fraction"] = flops / per_call / eigen_sgemm_flops(t, s.d, s.d_ff);
  if (DotPeak const peak = dot_peak(dot_instruction<W>(t)); peak.rate > 0) {
    state.counters["dot_peak_fraction"] = flops / per_call / peak.rate;
    state.SetLabel(std::string("dot: ") + peak.instruction + ", target " + fl::simd_dispatch_target());
  }
  state.counters["speedup_vs_dense"] = dense_s / per_call;
  state.counters["mask_all_ms"] = mask_s * 1e3;
  state.counters["speedup_vs_mask_all"] = mask_s / per_call;
  state.counters["working_set_MiB"] = static_cast<double>(copies) * 3.0 * static_cast<double>(s.d * s.d_ff) * bytes_per_weight<W>() / (1 << 20);
  state.counters["active_set_MiB"] = static_cast<double>(copies) * bytes / (1 << 20);
  state.SetItemsProcessed(state.iterations() * t);
}

/// Router + TopK + grouping alone, and its share of the whole MoE forward at the same T.
void BM_routing_share(benchmark::State& state) {
  Shape const s = kTinyLlama;
  std::ptrdiff_t const t = state.range(0), k = state.range(1);
  auto& ls = layers<float>(s, k, 1);
  auto const& layer = *ls[0].moe;
  fl::Matrix<float> x = random_matrix<float>(t, s.d, 1.0, 77), y({t, s.d});
  fl::Matrix<float> logits({t, s.n}), weights({t, k});
  fl::Matrix<std::int32_t> ids({t, k});
  fl::Vector<std::int64_t> offsets({s.n + 1});
  fl::Vector<std::int32_t> slots({t * k});
  fl::Workspace ws(layer.workspace_bytes(t));
  auto const f0 = Clock::now();
  for (int r = 0; r < 3; ++r) layer.forward(x.cview(), y.view(), ws);
  double const forward_s = seconds_since(f0) / 3;
  auto const t0 = Clock::now();
  for (auto _ : state) {
    fl::moe::router_logits(layer.router(), x.cview(), logits.view(), Simd{});
    fl::moe::select_experts(logits.cview(), layer.gating(), ids.view(), weights.view(), Simd{});
    fl::moe::group_by_expert(ids.cview(), s.n, offsets.view(), slots.view(), Simd{});
    benchmark::DoNotOptimize(slots.data());
  }
  double const per_call = seconds_since(t0) / static_cast<double>(state.iterations());
  state.counters["fraction_of_forward"] = per_call / forward_s;
}

void register_all() {
  std::fprintf(stderr, "machine: last-level cache %zu MiB, %d OpenMP threads\n", llc_bytes() >> 20, fl::detail::max_threads());
  stream_read_bandwidth();
  std::ptrdiff_t const ts[] = {1, 8, 32, 128, 512};
  for (auto const& [s, ks] : {std::make_pair(kTinyLlama, std::vector<long>{1, 2, 3}), std::make_pair(kLlama7b, std::vector<long>{2}),
                              std::make_pair(kStories, std::vector<long>{1, 2})}) {
    for (long k : ks) {
      for (auto t : ts) {
        benchmark::RegisterBenchmark((std::string("moe/f32/") + s.name).c_str(), BM_moe<float>, s)
            ->Args({t, k})->ArgNames({"T", "K"})->MinTime(0.2)->Unit(benchmark::kMillisecond)->UseRealTime();
        benchmark::RegisterBenchmark((std::string("moe/bf16/") + s.name).c_str(), BM_moe<fl::bf16>, s)
            ->Args({t, k})->ArgNames({"T", "K"})->MinTime(0.2)->Unit(benchmark::kMillisecond)->UseRealTime();
        if (s.d % 32 != 0 || (s.d_ff / s.n) % 32 != 0) continue;  // block formats need multiples of 32
        benchmark::RegisterBenchmark((std::string("moe/f16/") + s.name).c_str(), BM_moe<fl::f16>, s)
            ->Args({t, k})->ArgNames({"T", "K"})->MinTime(0.2)->Unit(benchmark::kMillisecond)->UseRealTime();
        benchmark::RegisterBenchmark((std::string("moe/q8_0/") + s.name).c_str(), BM_moe<fl::q8_0>, s)
            ->Args({t, k})->ArgNames({"T", "K"})->MinTime(0.2)->Unit(benchmark::kMillisecond)->UseRealTime();
        benchmark::RegisterBenchmark((std::string("moe/q4_0/") + s.name).c_str(), BM_moe<fl::q4_0>, s)
            ->Args({t, k})->ArgNames({"T", "K"})->MinTime(0.2)->Unit(benchmark::kMillisecond)->UseRealTime();
      }
    }
  }
  benchmark::RegisterBenchmark("routing_share/f32/tinyllama", BM_routing_share)
      ->Args({1, 1})->Args({512, 1})->ArgNames({"T", "K"})->MinTime(0.2)->Unit(benchmark::kMicrosecond)->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
