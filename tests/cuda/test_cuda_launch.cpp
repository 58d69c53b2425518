// SPDX-License-Identifier: Apache-2.0
// Host-side tests of the CUDA backend's launch logic (backend/cuda/launch.hpp and the workspace plans): they need
// no GPU and no CUDA header (plain C++), so they run in CI. Grid sizes against the work they must cover, workspace
// regions (aligned, non-overlapping, large enough for the worst case), the expert GEMM problem descriptors against
// an independent walk of the offsets, path resolution, argument errors, and the Cuda column of the op table.
#include <catch2/catch.hpp>

#include <factorllm/backend/cuda/cuda.hpp>
#include <factorllm/backend/ops.hpp>

#include <cstdint>
#include <random>
#include <vector>

using namespace factorllm;
using namespace factorllm::cuda;
using kernel::implements_op_v;

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
