// SPDX-License-Identifier: Apache-2.0
// CUDA grouping of slots by expert: a stable counting sort in three kernels (per-chunk integer histograms, one
// scan block, per-chunk stable placement), so the slots, offsets and inverse rows equal CpuScalar's bit for bit.
// No float atomics; the only atomics are shared-memory integer counts, whose result does not depend on order.
#pragma once

#include <cstdint>

#include "../../core/tensor_view.hpp"
#include "../../core/workspace.hpp"
#include "../ops.hpp"
#include "context.hpp"
#include "launch.hpp"

namespace factorllm {
namespace cuda {

/// The device workspace of group_by_expert: the [n_chunks, n_experts] count and base tables.
inline RegionPlan grouping_workspace(std::ptrdiff_t n_slots, std::ptrdiff_t n_experts) {
  GroupingPlan const plan = plan_grouping(n_slots, n_experts);
  RegionPlan ws;
  ws.add("chunk_counts", sizeof(std::int32_t), static_cast<std::size_t>(plan.table_elements()));
  ws.add("chunk_bases", sizeof(std::int64_t), static_cast<std::size_t>(plan.table_elements()));
  return ws;
}

/// Same contract as GroupByExpert<CpuScalar> (backend/scalar/grouping.hpp), on device memory: offsets
/// [n_experts + 1], slots [n_tokens * top_k], rows [n_tokens * top_k] or empty. Every id must be in
/// [0, n_experts) (an id out of range is skipped by the kernels and leaves its slot unwritten; the select
/// kernel never writes one). No host synchronization.
/// \throws shape_error for bad shapes; backend_error for a too-small or host workspace, or a CUDA failure.
void group_by_expert(MatrixView<std::int32_t const> ids, std::ptrdiff_t n_experts, VectorView<std::int64_t> offsets,
                     VectorView<std::int32_t> slots, VectorView<std::int32_t> rows, WorkspaceSpan ws,
                     CudaContext const& ctx);

}  // namespace cuda

namespace kernel {

/// GroupByExpert on CUDA. Tolerance vs CpuScalar: bitwise (offsets, slots, rows).
template <int kSm>
struct GroupByExpert<Cuda<kSm>> {
  static constexpr bool implemented = true;
  static detail::WorkspaceLayout workspace(std::ptrdiff_t n_slots, std::ptrdiff_t n_experts) {
    return cuda::grouping_workspace(n_slots, n_experts).layout();
  }
  static void run(MatrixView<std::int32_t const> ids, std::ptrdiff_t n_experts, VectorView<std::int64_t> offsets,
                  VectorView<std::int32_t> slots, VectorView<std::int32_t> rows, WorkspaceSpan ws,
                  cuda::CudaContext const& ctx) {
    cuda::group_by_expert(ids, n_experts, offsets, slots, rows, ws, ctx);
  }
};

}  // namespace kernel
}  // namespace factorllm
