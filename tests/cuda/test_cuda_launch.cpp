// SPDX-License-Identifier: Apache-2.0
// Host-side tests of the CUDA backend (no GPU, no CUDA header; they run in CI):
//   * launch logic (backend/cuda/launch.hpp): grid sizes against the work they must cover, workspace regions (aligned,
//     non-overlapping, large enough for the worst case), the expert GEMM problem descriptors against an independent
//     walk of the offsets, path resolution, argument errors, and the Cuda column of the op table;
//   * the kernels' per-thread logic (backend/cuda/detail/device_logic.hpp, the same functions the kernels call) run
//     over the grid on the host against CpuScalar: TopK and combine weights, grouping, router VJP (bit for bit), the
//     PAR loss's per-token step and router gradients;
//   * the GEMM descriptors of the expert forward and of the backward, run through an emulation of cublasGemmEx's
//     column-major contract, against ExpertSwiglu<CpuScalar> and MoeBackward<CpuScalar>.
// What this cannot check (the kernels' memory accesses on a device, cuBLAS itself) is test_cuda_conformance's job.
#include <catch2/catch.hpp>

#include <factorllm/backend/cuda/cuda.hpp>
#include <factorllm/backend/cuda/detail/device_logic.hpp>
#include <factorllm/backend/ops.hpp>
#include <factorllm/backend/scalar/grouping.hpp>
#include <factorllm/backend/scalar/moe_backward.hpp>
#include <factorllm/backend/scalar/par_loss.hpp>
#include <factorllm/backend/scalar/swiglu.hpp>
#include <factorllm/backend/scalar/topk.hpp>

#include <cmath>
#include <cstring>

#include <cstdint>
#include <random>
#include <vector>

using namespace factorllm;
using namespace factorllm::cuda;
using kernel::implements_op_v;
namespace logic = factorllm::cuda::logic;

namespace {

/// Every region 64-byte aligned, in order, non-overlapping and inside the total.
void check_regions(RegionPlan const& plan) {
  std::size_t end = 0;
  for (int i = 0; i < plan.size(); ++i) {
    CAPTURE(i, plan[i].name);
    CHECK(plan[i].offset % 64 == 0);
    CHECK(plan[i].offset >= end);
    end = plan[i].offset + plan[i].bytes;
  }
  CHECK(end <= plan.bytes());
}

std::size_t region_bytes(RegionPlan const& plan, char const* name) {
  for (int i = 0; i < plan.size(); ++i)
    if (std::string(plan[i].name) == name) return plan[i].bytes;
  FAIL("no region " << name);
  return 0;
}

}  // namespace

TEST_CASE("cuda op table: Cuda implements every op once backend/cuda is included", "[cuda]") {
  STATIC_REQUIRE(implements_op_v<kernel::RouterLogits, Cuda<80>>);
  STATIC_REQUIRE(implements_op_v<kernel::SelectExperts, Cuda<80>>);
  STATIC_REQUIRE(implements_op_v<kernel::GroupByExpert, Cuda<80>>);
  STATIC_REQUIRE(implements_op_v<kernel::ExpertSwiglu, Cuda<80>>);
  STATIC_REQUIRE(implements_op_v<kernel::Combine, Cuda<80>>);
  STATIC_REQUIRE(implements_op_v<kernel::MoeForward, Cuda<90>>);
  STATIC_REQUIRE(implements_op_v<kernel::ParLoss, Cuda<80>>);
  STATIC_REQUIRE(implements_op_v<kernel::MoeTrainForward, Cuda<80>>);
  STATIC_REQUIRE(implements_op_v<kernel::MoeBackward, Cuda<80>>);
  STATIC_REQUIRE(implements_op_v<kernel::Swiglu, Cuda<80>>);
  STATIC_REQUIRE(Cuda<80>::memory_space == MemorySpace::device);
}

TEST_CASE("cuda linear launches cover every work item with whole blocks", "[cuda]") {
  for (std::ptrdiff_t n : {0, 1, 255, 256, 257, 1000000}) {
    LaunchConfig const c = linear_launch(n, "test");
    CAPTURE(n);
    CHECK(c.block.x == static_cast<unsigned>(kThreads));
    CHECK(static_cast<std::ptrdiff_t>(c.grid.x) * kThreads >= n);
    CHECK(c.grid.x >= 1);
    if (n > 0) CHECK((static_cast<std::ptrdiff_t>(c.grid.x) - 1) * kThreads < n);  // no whole idle block
  }
  CHECK_THROWS_AS(linear_launch(-1, "test"), shape_error);
  CHECK_THROWS_AS(linear_launch(std::ptrdiff_t{1} << 45, "test"), shape_error);
}

TEST_CASE("cuda grouping plan: one block per chunk, shared histogram of n_experts counts", "[cuda]") {
  GroupingPlan const p = plan_grouping(1000, 8);
  CHECK(p.n_chunks == 4);  // ceil(1000 / 256)
  CHECK(p.count.grid.x == 4);
  CHECK(p.scatter.grid.x == 4);
  CHECK(p.count.block.x == static_cast<unsigned>(kGroupChunk));
  CHECK(p.count.shared_bytes == 8 * sizeof(std::int32_t));
  CHECK(p.scan.grid.x == 1);
  CHECK(p.scan.block.x == 8);
  CHECK(p.table_elements() == 32);
  CHECK(plan_grouping(0, 4).n_chunks == 0);
  CHECK(plan_grouping(10, 5000).scan.block.x == 1024);  // capped at the block limit, threads loop over experts
  CHECK_THROWS_AS(plan_grouping(10, 0), shape_error);
  CHECK_THROWS_AS(plan_grouping(10, kMaxGroupingExperts + 1), shape_error);
  CHECK_THROWS_AS(plan_grouping(-1, 4), shape_error);

  RegionPlan const ws = grouping_workspace(1000, 8);
  check_regions(ws);
  CHECK(ws[0].bytes == 32 * sizeof(std::int32_t));
  CHECK(ws[1].bytes == 32 * sizeof(std::int64_t));
}

TEST_CASE("cuda decode launch: a warp per weight row, experts on grid.y", "[cuda]") {
  LaunchConfig const c = decode_launch(1000, 8);
  CHECK(c.block.x == 32u * kDecodeWarps);
  CHECK(c.grid.y == 8);
  CHECK(static_cast<std::ptrdiff_t>(c.grid.x) * kDecodeWarps >= 1000);
  CHECK((static_cast<std::ptrdiff_t>(c.grid.x) - 1) * kDecodeWarps < 1000);
  CHECK_THROWS_AS(decode_launch(0, 8), shape_error);
  CHECK_THROWS_AS(decode_launch(16, kMaxGridY + 1), shape_error);
}

TEST_CASE("cuda expert path: automatic picks decode up to kDecodeMaxTokens tokens", "[cuda]") {
  CHECK(resolve_expert_path(ExpertPath::automatic, 1) == ExpertPath::decode);
  CHECK(resolve_expert_path(ExpertPath::automatic, kDecodeMaxTokens) == ExpertPath::decode);
  CHECK(resolve_expert_path(ExpertPath::automatic, kDecodeMaxTokens + 1) == ExpertPath::grouped);
  CHECK(resolve_expert_path(ExpertPath::per_expert, 3) == ExpertPath::per_expert);
  CHECK_THROWS_AS(resolve_expert_path(ExpertPath::decode, kDecodeMaxTokens + 1), value_error);
  CHECK(std::string(to_string(ExpertPath::grouped)) == "grouped");
}

TEST_CASE("cuda expert GEMM problems follow the offsets: non-empty experts in order, right sizes and bases", "[cuda]") {
  std::mt19937 rng(7);
  std::ptrdiff_t const n_experts = 9, d_model = 48, d_expert = 20;
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<std::int64_t> offsets(n_experts + 1, 0);
    for (std::ptrdiff_t e = 0; e < n_experts; ++e) offsets[e + 1] = offsets[e] + (rng() % 3 == 0 ? 0 : rng() % 40);
    for (Projection which : {Projection::gate, Projection::up, Projection::down}) {
      std::vector<GemmProblem> problems(n_experts);
      int const count =
          expert_gemm_problems(offsets.data(), n_experts, d_model, d_expert, d_expert * d_model, which, problems.data());
      // Independent walk: which experts have rows, and what each GEMM must read and write.
      int expect = 0;
      for (std::ptrdiff_t e = 0; e < n_experts; ++e) {
        std::int64_t const rows = offsets[e + 1] - offsets[e];
        if (rows == 0) continue;
        REQUIRE(expect < count);
        GemmProblem const& p = problems[expect++];
        bool const down = which == Projection::down;
        std::ptrdiff_t const out = down ? d_model : d_expert, in = down ? d_expert : d_model;
        CHECK(p.expert == e);
        CHECK(p.n == rows);
        CHECK(p.m == out);
        CHECK(p.k == in);
        CHECK(p.lda == in);
        CHECK(p.ldb == in);
        CHECK(p.ldc == out);
        CHECK(p.a_offset == e * d_expert * d_model);
        CHECK(p.b_offset == offsets[e] * in);
        CHECK(p.c_offset == offsets[e] * out);
        // The output block stays inside the grouped output [n_slots, out].
        CHECK(p.c_offset + p.n * static_cast<std::int64_t>(p.ldc) <= offsets[n_experts] * out);
      }
      CHECK(count == expect);
    }
  }
  std::vector<GemmProblem> problems(3);
  std::vector<std::int64_t> bad{0, 5, 3, 7};
  CHECK_THROWS_AS(expert_gemm_problems(bad.data(), 3, 8, 8, 64, Projection::gate, problems.data()), shape_error);
  std::vector<std::int64_t> not_zero{1, 5, 6, 7};
  CHECK_THROWS_AS(expert_gemm_problems(not_zero.data(), 3, 8, 8, 64, Projection::gate, problems.data()), shape_error);
}

TEST_CASE("cuda expert workspace: regions aligned, disjoint and large enough for max_tokens", "[cuda]") {
  std::ptrdiff_t const T = 37, d = 96, n = 8, de = 40, k = 2;
  RegionPlan const f32 = expert_swiglu_workspace<float>(T, d, n, de, k);
  RegionPlan const b16 = expert_swiglu_workspace<bf16>(T, d, n, de, k);
  check_regions(f32);
  check_regions(b16);
  CHECK(region_bytes(f32, "gathered") == sizeof(float) * T * k * d);
  CHECK(region_bytes(b16, "gathered") == sizeof(bf16) * T * k * d);
  CHECK(region_bytes(f32, "gate_out") == sizeof(float) * T * k * de);
  CHECK(region_bytes(b16, "up_out") == sizeof(bf16) * T * k * de);
  CHECK(region_bytes(b16, "hidden") == sizeof(bf16) * T * k * de);
  CHECK(region_bytes(f32, "decode_hidden") == sizeof(float) * kDecodeMaxTokens * k * de);
  CHECK(region_bytes(f32, "gemm_pointers") == sizeof(void*) * 9 * n);
  CHECK(region_bytes(expert_swiglu_workspace<f16>(3, d, n, de, k), "decode_hidden") == sizeof(float) * 3 * k * de);
  CHECK_THROWS_AS(expert_swiglu_workspace<float>(T, d, n, de, n + 1), shape_error);

  RegionPlan const host = expert_swiglu_host_workspace(n);
  check_regions(host);
  CHECK(region_bytes(host, "offsets") == sizeof(std::int64_t) * (n + 1));
  CHECK(region_bytes(host, "int_arrays") == sizeof(int) * 27 * n);

  RegionPlan const fwd = moe_forward_workspace<bf16>(T, d, n, de, k);
  check_regions(fwd);
  CHECK(region_bytes(fwd, "logits") == sizeof(float) * T * n);
  CHECK(region_bytes(fwd, "expert_out") == sizeof(bf16) * T * k * d);
  CHECK(region_bytes(fwd, "experts") == b16.bytes());
  CHECK(region_bytes(fwd, "grouping") == grouping_workspace(T * k, n).bytes());
  RegionPlan const par = par_loss_workspace<float>(T, d, 3 * de, n, de);
  check_regions(par);
  CHECK(region_bytes(par, "expert_out") == sizeof(float) * n * T * d);
  CHECK(region_bytes(par, "teacher_hidden") == sizeof(float) * T * 3 * de);
  CHECK(region_bytes(par, "mse") == sizeof(double) * T * n);
  CHECK_THROWS_AS(par_loss_workspace<bf16>(T, 0, 3, n, de), shape_error);
  RegionPlan const fwd_train = train_forward_workspace(T, d, n, de, k);
  check_regions(fwd_train);
  CHECK(region_bytes(fwd_train, "gathered") == sizeof(float) * T * k * d);
  CHECK(region_bytes(fwd_train, "grouping") == grouping_workspace(T * k, n).bytes());
  RegionPlan const bwd = moe_backward_workspace(T, d, n, de, k);
  check_regions(bwd);
  CHECK(region_bytes(bwd, "dx_rows") == sizeof(float) * T * k * d);
  CHECK(region_bytes(bwd, "da") == sizeof(float) * T * k * de);
  CHECK(region_bytes(bwd, "dz") == sizeof(double) * T * n);
  CHECK(region_bytes(bwd, "dw") == sizeof(double) * T * k);
  CHECK_THROWS_AS(moe_backward_workspace(T, d, n, de, n + 1), shape_error);
  RegionPlan const dense = swiglu_workspace<f16>(T, d, 3 * de);
  check_regions(dense);
  CHECK(region_bytes(dense, "hidden") == sizeof(f16) * T * 3 * de);
  CHECK(region_bytes(dense, "out") == sizeof(f16) * T * d);
  // The op table's size query is the plan's.
  CHECK(kernel::MoeForward<Cuda<80>>::workspace<bf16>(T, d, n, de, k).bytes() == fwd.bytes());
}

TEST_CASE("cuda workspaces are checked: too small or in host memory is a backend_error", "[cuda]") {
  RegionPlan const plan = grouping_workspace(100, 4);
  alignas(64) static std::byte buffer[4096];
  WorkspaceSpan host{buffer, sizeof buffer, MemorySpace::host};
  CHECK_THROWS_AS(plan.check(host, "test"), backend_error);
  WorkspaceSpan small{buffer, plan.bytes() - 1, MemorySpace::device};
  CHECK_THROWS_AS(plan.check(small, "test"), backend_error);
  WorkspaceSpan ok{buffer, plan.bytes(), MemorySpace::device};
  CHECK_NOTHROW(plan.check(ok, "test"));
  CHECK(plan.at<std::int64_t>(ok, 1, "test") == reinterpret_cast<std::int64_t*>(buffer + plan[1].offset));
  RegionPlan const host_plan = expert_swiglu_host_workspace(4);
  CHECK_THROWS_AS(host_plan.check(ok, "test"), backend_error);  // host scratch must be host memory
}

TEST_CASE("Cuda<>::available() is false without the runtime or a device", "[cuda]") {
#if defined(FLLM_HAS_CUDA)
  CHECK(Cuda<80>::available() == (device_count() > 0 && device_compute_capability() >= 80));
#else
  CHECK_FALSE(Cuda<80>::available());
#endif
}

// ---- The kernels' per-thread logic (backend/cuda/detail/device_logic.hpp), run on the host over the grid ----

TEST_CASE("cuda select kernel logic, run per token on the host: SelectExperts<CpuScalar>'s ids and weights bit for bit",
          "[cuda]") {
  std::mt19937 rng(11);
  std::normal_distribution<float> dist(0.f, 2.f);
  std::ptrdiff_t const T = 200, n = 12;
  std::vector<float> logits(static_cast<std::size_t>(T * n)), bias(static_cast<std::size_t>(n));
  for (auto& v : logits) v = dist(rng);
  for (auto& v : bias) v = dist(rng);
  for (std::ptrdiff_t i = 0; i < 60 * n; ++i) logits[static_cast<std::size_t>(i)] = std::round(logits[static_cast<std::size_t>(i)]);  // ties
  logits[static_cast<std::size_t>(100 * n + 2)] = std::nanf("");
  for (std::ptrdiff_t e = 0; e < n; ++e) logits[static_cast<std::size_t>(110 * n + e)] = -800.f + static_cast<float>(e);
  bias[7] = 900.f;  // a selection far below the largest logit: the renormalized modes' underflow fallback
  for (CombineMode mode : {CombineMode::code_ref, CombineMode::softmax_topk, CombineMode::softmax_topk_renorm,
                           CombineMode::topk_softmax, CombineMode::sigmoid_topk})
    for (std::ptrdiff_t k : {1, 3})
      for (bool with_bias : {false, true})
        for (bool renorm : {false, true}) {
          CAPTURE(to_string(mode), k, with_bias, renorm);
          GatingParams g;
          g.mode = mode;
          g.top_k = k;
          g.sigmoid_renormalize = renorm;
          g.output_scale = 0.75f;
          g.selection_bias = with_bias ? bias.data() : nullptr;
          g.bias_len = with_bias ? n : 0;
          std::vector<std::int32_t> ids(static_cast<std::size_t>(T * k)), got_ids(ids.size());
          std::vector<float> w(ids.size()), got_w(ids.size());
          kernel::SelectExperts<CpuScalar>::run(matrix_view<float const>(logits.data(), T, n), g,
                                                matrix_view(ids.data(), T, k), matrix_view(w.data(), T, k));
          logic::SelectArgs const a{static_cast<int>(n), static_cast<int>(k), static_cast<int>(mode), renorm,
                                    g.selection_bias, g.output_scale, GatingParams::code_ref_scale(n, k)};
          for (std::ptrdiff_t t = 0; t < T; ++t)  // one "thread" per token, as select_experts_kernel
            logic::select_token(logits.data() + t * n, a, got_ids.data() + t * k, got_w.data() + t * k);
          CHECK(got_ids == ids);
          std::size_t mismatches = 0;
          for (std::size_t i = 0; i < w.size(); ++i)
            mismatches += (std::isnan(w[i]) && std::isnan(got_w[i])) || std::memcmp(&w[i], &got_w[i], sizeof(float)) == 0 ? 0 : 1;
          CHECK(mismatches == 0);
        }
}

TEST_CASE("cuda grouping kernels' logic, run chunk by chunk on the host: GroupByExpert<CpuScalar> bit for bit", "[cuda]") {
  std::mt19937 rng(12);
  for (std::ptrdiff_t T : {1, 100, 128, 129, 1500})
    for (std::ptrdiff_t n : {3, 16}) {
      std::ptrdiff_t const k = 2, S = T * k;
      CAPTURE(T, n);
      std::vector<std::int32_t> ids(static_cast<std::size_t>(S));
      for (std::ptrdiff_t t = 0; t < T; ++t) {
        auto const a = static_cast<std::int32_t>(rng() % 3);  // skewed: long runs of the same experts
        auto const b = static_cast<std::int32_t>((a + 1 + static_cast<std::int32_t>(rng() % static_cast<unsigned>(n - 1))) % n);
        ids[static_cast<std::size_t>(t * k)] = a;
        ids[static_cast<std::size_t>(t * k + 1)] = b;
      }
      std::vector<std::int64_t> offsets(static_cast<std::size_t>(n + 1));
      std::vector<std::int32_t> slots(static_cast<std::size_t>(S)), rows(slots.size());
      kernel::GroupByExpert<CpuScalar>::run(matrix_view<std::int32_t const>(ids.data(), T, k), n,
                                            VectorView<std::int64_t>(offsets.data(), {n + 1}),
                                            VectorView<std::int32_t>(slots.data(), {S}),
                                            VectorView<std::int32_t>(rows.data(), {S}));
      // The three kernels of group_by_expert, block by block and thread by thread.
      GroupingPlan const plan = plan_grouping(S, n);
      std::vector<std::int32_t> counts(static_cast<std::size_t>(plan.table_elements()), 0);
      std::vector<std::int64_t> bases(counts.size()), got_offsets(offsets.size(), -1);
      std::vector<std::int32_t> got_slots(slots.size(), -1), got_rows(rows.size(), -1);
      for (std::ptrdiff_t c = 0; c < plan.n_chunks; ++c)  // count kernel
        for (int lane = 0; lane < kGroupChunk; ++lane) {
          std::ptrdiff_t const s = c * kGroupChunk + lane;
          if (s < S) ++counts[static_cast<std::size_t>(c * n + ids[static_cast<std::size_t>(s)])];
        }
      for (int e = 0; e < n; ++e)  // scan kernel
        got_offsets[static_cast<std::size_t>(e + 1)] = logic::group_scan_expert(counts.data(), plan.n_chunks, static_cast<int>(n), e, bases.data());
      got_offsets[0] = 0;
      for (std::ptrdiff_t e = 0; e < n; ++e) got_offsets[static_cast<std::size_t>(e + 1)] += got_offsets[static_cast<std::size_t>(e)];
      for (std::ptrdiff_t e = 0; e < n; ++e)
        for (std::ptrdiff_t c = 0; c < plan.n_chunks; ++c) bases[static_cast<std::size_t>(c * n + e)] += got_offsets[static_cast<std::size_t>(e)];
      for (std::ptrdiff_t c = 0; c < plan.n_chunks; ++c) {  // scatter kernel
        std::int32_t chunk_ids[kGroupChunk];
        for (int lane = 0; lane < kGroupChunk; ++lane) {
          std::ptrdiff_t const s = c * kGroupChunk + lane;
          chunk_ids[lane] = s < S ? ids[static_cast<std::size_t>(s)] : -1;
        }
        for (int lane = 0; lane < kGroupChunk; ++lane) {
          std::ptrdiff_t const s = c * kGroupChunk + lane;
          if (s >= S) continue;
          std::int64_t const pos = bases[static_cast<std::size_t>(c * n + chunk_ids[lane])] + logic::group_rank_in_chunk(chunk_ids, lane);
          got_slots[static_cast<std::size_t>(pos)] = static_cast<std::int32_t>(s);
          got_rows[static_cast<std::size_t>(s)] = static_cast<std::int32_t>(pos);
        }
      }
      CHECK(got_offsets == offsets);
      CHECK(got_slots == slots);
      CHECK(got_rows == rows);
    }
}

TEST_CASE("cuda router VJP logic: kernel::combine_weights_vjp bit for bit in every mode", "[cuda]") {
  std::mt19937 rng(13);
  std::normal_distribution<float> dist(0.f, 1.5f);
  int const n = 8, k = 3;
  for (CombineMode mode : {CombineMode::code_ref, CombineMode::softmax_topk, CombineMode::softmax_topk_renorm,
                           CombineMode::topk_softmax, CombineMode::sigmoid_topk})
    for (bool renorm : {false, true})
      for (int trial = 0; trial < 20; ++trial) {
        CAPTURE(to_string(mode), renorm, trial);
        std::vector<float> z(n);
        for (auto& v : z) v = trial == 0 ? -800.f + dist(rng) : dist(rng);  // trial 0: every sigmoid underflows
        std::int32_t ids[k] = {static_cast<std::int32_t>(rng() % n), 0, 0};
        ids[1] = (ids[0] + 1) % n;
        ids[2] = (ids[0] + 3) % n;
        double dw[k] = {static_cast<double>(dist(rng)), static_cast<double>(dist(rng)), static_cast<double>(dist(rng))};
        GatingParams g;
        g.mode = mode;
        g.top_k = k;
        g.sigmoid_renormalize = renorm;
        g.output_scale = 1.5f;
        double expect[n], got[n];
        kernel::combine_weights_vjp(z.data(), n, ids, k, dw, g, expect);
        logic::combine_weights_vjp(z.data(), ids, dw, logic::VjpArgs{n, k, static_cast<int>(mode), renorm, 1.5}, got);
        CHECK(std::memcmp(expect, got, sizeof expect) == 0);
      }
}

TEST_CASE("cuda PAR loss kernels' logic, run per token and per output on the host: ParLoss<CpuScalar>", "[cuda]") {
  std::mt19937 rng(14);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::ptrdiff_t const T = 50, d = 16, f = 24, n = 4, de = 6, k = 2;
  auto fill = [&](std::size_t count, float scale) {
    std::vector<float> v(count);
    for (auto& x : v) x = scale * dist(rng);
    return v;
  };
  auto const x = fill(static_cast<std::size_t>(T * d), 1.f), dg = fill(static_cast<std::size_t>(f * d), 0.25f),
             du = fill(static_cast<std::size_t>(f * d), 0.25f), dd = fill(static_cast<std::size_t>(d * f), 0.2f),
             eg = fill(static_cast<std::size_t>(n * de * d), 0.25f), eu = fill(static_cast<std::size_t>(n * de * d), 0.25f),
             ed = fill(static_cast<std::size_t>(n * d * de), 0.4f), rw = fill(static_cast<std::size_t>(n * d), 0.5f),
             rb = fill(static_cast<std::size_t>(n), 0.1f);
  std::vector<float> gw(static_cast<std::size_t>(n * d)), gb(static_cast<std::size_t>(n)), gwp(gw.size()), gbp(gb.size()),
      gwb(gw.size()), gbb(gb.size()), mse(static_cast<std::size_t>(T * n));
  std::vector<std::int32_t> labels(static_cast<std::size_t>(T * k)), topk(labels.size());
  ParLossOutView<float> out{matrix_view(gw.data(), n, d), VectorView<float>(gb.data(), {n}), matrix_view(gwp.data(), n, d),
                            VectorView<float>(gbp.data(), {n}), matrix_view(gwb.data(), n, d), VectorView<float>(gbb.data(), {n}),
                            matrix_view(mse.data(), T, n), matrix_view(labels.data(), T, k), matrix_view(topk.data(), T, k)};
  ParLossConfig const config;
  Workspace ws(kernel::ParLoss<CpuScalar>::workspace<float, float>(d, f, n, k).bytes());
  ExpertWeightsView<float> const experts{TensorView<float const, 3>(eg.data(), {n, de, d}),
                                         TensorView<float const, 3>(eu.data(), {n, de, d}),
                                         TensorView<float const, 3>(ed.data(), {n, d, de})};
  ParLossValues const expect = kernel::ParLoss<CpuScalar>::run<float, float>(
      matrix_view<float const>(x.data(), T, d), matrix_view<float const>(dg.data(), f, d),
      matrix_view<float const>(du.data(), f, d), matrix_view<float const>(dd.data(), d, f), experts,
      RouterView<float>{matrix_view<float const>(rw.data(), n, d), VectorView<float const>(rb.data(), {n})}, k, config,
      out, ws.span());

  // The kernels' steps after the MSEs (which the GPU computes with cuBLAS; here the oracle's, widened back).
  ParTarget const q = par_target_q(n, k);
  double const inv_t = 1.0 / static_cast<double>(T);
  logic::ParTokenArgs const a{static_cast<int>(n), static_cast<int>(k), q.selected, q.unselected, config.clip,
                              1.0 - config.clip, inv_t, inv_t / static_cast<double>(n)};
  std::vector<double> dz_par(static_cast<std::size_t>(T * n)), dz_bal(dz_par.size()), sums(static_cast<std::size_t>(3 * T));
  std::vector<std::int32_t> got_labels(labels.size()), got_topk(topk.size());
  for (std::ptrdiff_t t = 0; t < T; ++t) {  // token kernel: z in double, then thread 0
    double z[n], p[n], m[n];
    for (std::ptrdiff_t e = 0; e < n; ++e) {
      double acc = rb[static_cast<std::size_t>(e)];
      for (std::ptrdiff_t c = 0; c < d; ++c)
        acc += static_cast<double>(rw[static_cast<std::size_t>(e * d + c)]) * static_cast<double>(x[static_cast<std::size_t>(t * d + c)]);
      z[e] = acc;
      m[e] = mse[static_cast<std::size_t>(t * n + e)];
    }
    logic::par_token(z, p, m, a, dz_par.data() + t * n, dz_bal.data() + t * n, got_labels.data() + t * k,
                     got_topk.data() + t * k, sums.data() + 3 * t);
  }
  CHECK(got_labels == labels);
  CHECK(got_topk == topk);
  double kl = 0, mass = 0, match = 0;
  for (std::ptrdiff_t t = 0; t < T; ++t) {
    kl += sums[static_cast<std::size_t>(3 * t)];
    mass += sums[static_cast<std::size_t>(3 * t + 1)];
    match += sums[static_cast<std::size_t>(3 * t + 2)];
  }
  CHECK(kl * inv_t == Approx(expect.par_loss).epsilon(1e-12));
  CHECK(mass * a.inv_nt == Approx(expect.balance_loss).epsilon(1e-12));
  CHECK(match * inv_t == expect.label_accuracy);
  double num = 0, den = 0;
  for (int e = 0; e < n; ++e)  // router gradient kernel: one output per (e, c)
    for (std::ptrdiff_t c = 0; c <= d; ++c) {
      double sp[2];
      logic::router_grad_output(x.data(), dz_par.data(), dz_bal.data(), T, static_cast<int>(n), d, e, c, sp);
      double const want_p = c < d ? gwp[static_cast<std::size_t>(e * d + c)] : gbp[static_cast<std::size_t>(e)];
      double const want_b = c < d ? gwb[static_cast<std::size_t>(e * d + c)] : gbb[static_cast<std::size_t>(e)];
      num += (static_cast<float>(sp[0]) - want_p) * (static_cast<float>(sp[0]) - want_p) +
             (static_cast<float>(sp[1]) - want_b) * (static_cast<float>(sp[1]) - want_b);
      den += want_p * want_p + want_b * want_b;
    }
  CHECK(std::sqrt(num / den) <= 1e-6);
}

namespace {

/// cublasGemmEx's contract for the problems the expert path issues (A transposed, B not; column-major, f32 here):
/// C[i + j ldc] = sum_l A[l + i lda] B[l + j ldb] for i < m, j < n.
void emulate_gemm(GemmProblem const& p, float const* w_base, float const* x_base, float* y_base) {
  float const* a = w_base + p.a_offset;
  float const* b = x_base + p.b_offset;
  float* c = y_base + p.c_offset;
  for (int j = 0; j < p.n; ++j)
    for (int i = 0; i < p.m; ++i) {
      double s = 0;
      for (int l = 0; l < p.k; ++l)
        s += static_cast<double>(a[l + static_cast<std::ptrdiff_t>(i) * p.lda]) * b[l + static_cast<std::ptrdiff_t>(j) * p.ldb];
      c[i + static_cast<std::ptrdiff_t>(j) * p.ldc] = static_cast<float>(s);
    }
}

}  // namespace

TEST_CASE("cuda expert GEMM descriptors drive a cuBLAS-contract GEMM to ExpertSwiglu<CpuScalar>'s outputs", "[cuda]") {
  std::mt19937 rng(15);
  std::normal_distribution<float> dist(0.f, 0.3f);
  std::ptrdiff_t const T = 37, d = 24, n = 5, de = 10, k = 2, S = T * k;
  std::vector<float> gate(static_cast<std::size_t>(n * de * d)), up(gate.size()), down(static_cast<std::size_t>(n * d * de)),
      x(static_cast<std::size_t>(T * d));
  for (auto* v : {&gate, &up, &down, &x})
    for (auto& e : *v) e = dist(rng);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(S));
  for (std::ptrdiff_t t = 0; t < T; ++t) {
    auto const a = static_cast<std::int32_t>(rng() % 3);  // experts 3 and 4 may get no token
    ids[static_cast<std::size_t>(t * k)] = a;
    ids[static_cast<std::size_t>(t * k + 1)] = (a + 1 + static_cast<std::int32_t>(rng() % 2)) % static_cast<std::int32_t>(n);
  }
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(n + 1));
  std::vector<std::int32_t> slots(static_cast<std::size_t>(S));
  kernel::GroupByExpert<CpuScalar>::run(matrix_view<std::int32_t const>(ids.data(), T, k), n,
                                        VectorView<std::int64_t>(offsets.data(), {n + 1}),
                                        VectorView<std::int32_t>(slots.data(), {S}), VectorView<std::int32_t>());
  ExpertWeightsView<float> const experts{TensorView<float const, 3>(gate.data(), {n, de, d}),
                                         TensorView<float const, 3>(up.data(), {n, de, d}),
                                         TensorView<float const, 3>(down.data(), {n, d, de})};
  std::vector<double> expect(static_cast<std::size_t>(S * d));
  Workspace ws(kernel::ExpertSwiglu<CpuScalar>::workspace<float, float>(S, d, n, de, 1).bytes());
  kernel::ExpertSwiglu<CpuScalar>::run<float, float>(experts, matrix_view<float const>(x.data(), T, d), k,
                                                     VectorView<std::int64_t const>(offsets.data(), {n + 1}),
                                                     VectorView<std::int32_t const>(slots.data(), {S}),
                                                     matrix_view(expect.data(), S, d), ws.span());
  // The prefill path of expert_swiglu with the GEMMs emulated: gather, gate and up problems, SiLU * up, down problems.
  std::vector<float> xg(static_cast<std::size_t>(S * d)), g(static_cast<std::size_t>(S * de)), u(g.size()), h(g.size()),
      out(static_cast<std::size_t>(S * d), std::nanf(""));
  for (std::ptrdiff_t r = 0; r < S; ++r)
    for (std::ptrdiff_t c = 0; c < d; ++c)
      xg[static_cast<std::size_t>(r * d + c)] = x[static_cast<std::size_t>(slots[static_cast<std::size_t>(r)] / k * d + c)];
  std::vector<GemmProblem> pg(static_cast<std::size_t>(n)), pd(static_cast<std::size_t>(n));
  int const count = expert_gemm_problems(offsets.data(), n, d, de, de * d, Projection::gate, pg.data());
  int const count_down = expert_gemm_problems(offsets.data(), n, d, de, d * de, Projection::down, pd.data());
  REQUIRE(count == count_down);
  for (int i = 0; i < count; ++i) {
    emulate_gemm(pg[static_cast<std::size_t>(i)], gate.data(), xg.data(), g.data());
    emulate_gemm(pg[static_cast<std::size_t>(i)], up.data(), xg.data(), u.data());
  }
  for (std::size_t i = 0; i < h.size(); ++i)
    h[i] = static_cast<float>(factorllm::detail::silu(static_cast<double>(g[i]))) * u[i];
  for (int i = 0; i < count; ++i) emulate_gemm(pd[static_cast<std::size_t>(i)], down.data(), h.data(), out.data());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    num += (out[i] - expect[i]) * (out[i] - expect[i]);
    den += expect[i] * expect[i];
  }
  CHECK(std::sqrt(num / den) <= 1e-6);  // NaN (a row no problem wrote) fails too
}

namespace {

/// cublasGemmEx's contract, column-major, f32: C = op(A) op(B) + beta C.
void emulate_gemm(BackwardGemm const& p, float const* a, float const* b, float* c) {
  for (int j = 0; j < p.n; ++j)
    for (int i = 0; i < p.m; ++i) {
      double s = 0;
      for (int l = 0; l < p.k; ++l) {
        double const av = p.trans_a ? a[l + static_cast<std::ptrdiff_t>(i) * p.lda] : a[i + static_cast<std::ptrdiff_t>(l) * p.lda];
        double const bv = p.trans_b ? b[j + static_cast<std::ptrdiff_t>(l) * p.ldb] : b[l + static_cast<std::ptrdiff_t>(j) * p.ldb];
        s += av * bv;
      }
      float& out = c[i + static_cast<std::ptrdiff_t>(j) * p.ldc];
      out = static_cast<float>(s + (p.beta != 0.f ? static_cast<double>(p.beta) * out : 0.0));
    }
}

template <class V>
double rel_l2_of(V const& got, V const& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    num += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

TEST_CASE("cuda backward: GEMM descriptors and per-row logic, emulated on the host, give MoeBackward<CpuScalar>'s gradients",
          "[cuda]") {
  std::mt19937 rng(16);
  std::normal_distribution<float> dist(0.f, 0.4f);
  std::ptrdiff_t const T = 30, d = 12, m = 8, n = 5, k = 2, S = T * k;
  auto fill = [&](std::ptrdiff_t count) {
    std::vector<float> v(static_cast<std::size_t>(count));
    for (auto& e : v) e = dist(rng);
    return v;
  };
  auto const gate = fill(n * m * d), up = fill(n * m * d), down = fill(n * d * m), rw = fill(n * d), rb = fill(n),
             x = fill(T * d), dy = fill(T * d);
  MoeParamsView<float> const p{TensorView<float const, 3>(gate.data(), {n, m, d}), TensorView<float const, 3>(up.data(), {n, m, d}),
                               TensorView<float const, 3>(down.data(), {n, d, m}), matrix_view<float const>(rw.data(), n, d),
                               VectorView<float const>(rb.data(), {n})};
  GatingParams g;
  g.mode = CombineMode::softmax_topk_renorm;
  g.top_k = k;
  std::vector<float> logits(static_cast<std::size_t>(T * n)), w(static_cast<std::size_t>(S)), y(static_cast<std::size_t>(T * d)),
      a(static_cast<std::size_t>(S * m)), b(a.size());
  std::vector<std::int32_t> ids(static_cast<std::size_t>(S)), slots(ids.size());
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(n + 1));
  RoutingView<float> rec{matrix_view(logits.data(), T, n), matrix_view(ids.data(), T, k), matrix_view(w.data(), T, k),
                         VectorView<std::int64_t>(offsets.data(), {n + 1}), VectorView<std::int32_t>(slots.data(), {S})};
  MoeActivationsView<float> saved{matrix_view(a.data(), S, m), matrix_view(b.data(), S, m)};
  Workspace fw(kernel::MoeTrainForward<CpuScalar>::workspace(p, k, T).bytes());
  kernel::MoeTrainForward<CpuScalar>::run<float, float>(p, g, matrix_view<float const>(x.data(), T, d),
                                                        matrix_view(y.data(), T, d), rec, &saved, fw.span());
  std::vector<float> gx(static_cast<std::size_t>(T * d)), gg(gate.size()), gu(up.size()), gd(down.size()), grw(rw.size()),
      grb(rb.size());
  MoeGradsView<float> grads{matrix_view(gx.data(), T, d), TensorView<float, 3>(gg.data(), {n, m, d}),
                            TensorView<float, 3>(gu.data(), {n, m, d}), TensorView<float, 3>(gd.data(), {n, d, m}),
                            matrix_view(grw.data(), n, d), VectorView<float>(grb.data(), {n}), MatrixView<float>()};
  MoeActivationsView<float const> const saved_c{matrix_view<float const>(a.data(), S, m), matrix_view<float const>(b.data(), S, m)};
  Workspace bw(kernel::MoeBackward<CpuScalar>::workspace(p, k, T).bytes());
  kernel::MoeBackward<CpuScalar>::run<float, float>(p, g, RoutingView<float const>(rec), matrix_view<float const>(x.data(), T, d),
                                                    matrix_view<float const>(dy.data(), T, d), &saved_c, grads, bw.span());

  for (bool recompute : {false, true}) {
    CAPTURE(recompute);
    // moe_backward's steps: gather, stage-0 GEMMs, the per-row kernel, stage-1 GEMMs, router VJP, dW_r, dx.
    std::vector<float> xg(static_cast<std::size_t>(S * d)), dyg(xg.size()), wdyg(xg.size()), dxg(xg.size()),
        ga(a.size()), gb(a.size()), gg_rows(a.size()), h(a.size()), da(a.size()), db(a.size());
    std::vector<float> eg(gate.size(), 0.f), eu(up.size(), 0.f), ed(down.size(), 0.f);
    std::vector<std::int32_t> rows(static_cast<std::size_t>(S));
    for (std::ptrdiff_t r = 0; r < S; ++r) {
      std::ptrdiff_t const s = slots[static_cast<std::size_t>(r)], t = s / k;
      rows[static_cast<std::size_t>(s)] = static_cast<std::int32_t>(r);
      for (std::ptrdiff_t c = 0; c < d; ++c) {
        auto const i = static_cast<std::size_t>(r * d + c), src = static_cast<std::size_t>(t * d + c);
        xg[i] = x[src];
        dyg[i] = dy[src];
        wdyg[i] = w[static_cast<std::size_t>(s)] * dy[src];
      }
    }
    if (!recompute) {
      ga = a;
      gb = b;
    }
    auto buffer = [&](BwdBuffer which) -> float* {
      switch (which) {
        case BwdBuffer::weight_gate: return const_cast<float*>(gate.data());
        case BwdBuffer::weight_up: return const_cast<float*>(up.data());
        case BwdBuffer::weight_down: return const_cast<float*>(down.data());
        case BwdBuffer::x_rows: return xg.data();
        case BwdBuffer::dy_rows: return dyg.data();
        case BwdBuffer::wdy_rows: return wdyg.data();
        case BwdBuffer::pre_gate: return ga.data();
        case BwdBuffer::pre_up: return gb.data();
        case BwdBuffer::g: return gg_rows.data();
        case BwdBuffer::h: return h.data();
        case BwdBuffer::da: return da.data();
        case BwdBuffer::db: return db.data();
        case BwdBuffer::dx_rows: return dxg.data();
        case BwdBuffer::grad_gate: return eg.data();
        case BwdBuffer::grad_up: return eu.data();
        case BwdBuffer::grad_down: return ed.data();
      }
      return nullptr;
    };
    std::vector<double> dw(static_cast<std::size_t>(S), 0.0);
    BackwardGemm gemms[8];
    for (int stage = 0; stage < 2; ++stage) {
      if (stage == 1)
        for (std::ptrdiff_t r = 0; r < S; ++r) {
          auto const s = static_cast<std::size_t>(slots[static_cast<std::size_t>(r)]);
          for (std::ptrdiff_t i = 0; i < m; ++i) {
            auto const o = static_cast<std::size_t>(r * m + i);
            dw[s] += logic::slot_backward_element(ga[o], gb[o], gg_rows[o], w[s], &h[o], &da[o], &db[o]);
          }
        }
      for (std::ptrdiff_t e = 0; e < n; ++e) {
        std::int64_t const r0 = offsets[static_cast<std::size_t>(e)], ne = offsets[static_cast<std::size_t>(e + 1)] - r0;
        if (ne == 0) continue;
        int const count = expert_backward_gemms(stage, e, r0, ne, d, m, recompute, gemms);
        for (int i = 0; i < count; ++i)
          emulate_gemm(gemms[i], buffer(gemms[i].a) + gemms[i].a_offset, buffer(gemms[i].b) + gemms[i].b_offset,
                       buffer(gemms[i].c) + gemms[i].c_offset);
      }
    }
    CHECK(rel_l2_of(eg, gg) <= 1e-5);
    CHECK(rel_l2_of(eu, gu) <= 1e-5);
    CHECK(rel_l2_of(ed, gd) <= 1e-5);
    // Router and dx.
    std::vector<double> dz(static_cast<std::size_t>(T * n));
    logic::VjpArgs const va{static_cast<int>(n), static_cast<int>(k), static_cast<int>(g.mode), g.sigmoid_renormalize,
                            static_cast<double>(g.output_scale)};
    for (std::ptrdiff_t t = 0; t < T; ++t)
      logic::combine_weights_vjp(logits.data() + t * n, ids.data() + t * k, dw.data() + t * k, va, dz.data() + t * n);
    std::vector<float> ex(gx.size());
    for (std::ptrdiff_t t = 0; t < T; ++t)
      for (std::ptrdiff_t c = 0; c < d; ++c) {
        double s = 0;
        for (std::ptrdiff_t j = 0; j < k; ++j) s += dxg[static_cast<std::size_t>(rows[static_cast<std::size_t>(t * k + j)] * d + c)];
        for (std::ptrdiff_t e = 0; e < n; ++e)
          s += dz[static_cast<std::size_t>(t * n + e)] * static_cast<double>(rw[static_cast<std::size_t>(e * d + c)]);
        ex[static_cast<std::size_t>(t * d + c)] = static_cast<float>(s);
      }
    CHECK(rel_l2_of(ex, gx) <= 1e-5);
  }
}
