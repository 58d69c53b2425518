// SPDX-License-Identifier: Apache-2.0
// The all-to-all layout of expert parallelism (docs/expert_parallel.md §1): per-destination counts and one
// contiguous send buffer ordered by destination rank, then expert, then slot; the matching receive layout on the
// expert side. Plain host buffers, no communication library: an adapter (moe/mpi/expert_parallel_ffn.hpp, or NCCL,
// or torch.distributed) moves them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "../core/error.hpp"
#include "../core/tensor_view.hpp"
#include "expert_placement.hpp"

namespace factorllm {
namespace moe {

/// What one rank sends in the token exchange of one call (its own tokens' slots s = t * top_k + j).
/// Send row q carries slot slots[q] (token slots[q] / top_k); rows are ordered by destination rank, then by the
/// destination's local expert (increasing expert id), then by increasing slot. The order depends only on the routing
/// and the placement, never on timing. The expert outputs come back in the same layout, so row_of_slot is also the
/// combine's map from slot to returned row.
struct SendLayout {
  std::ptrdiff_t n_ranks = 0, max_local = 0;
  std::vector<std::int64_t> expert_counts;  // [n_ranks * max_local]: rows for rank r's local expert i at r * max_local + i
                                            // (0 past rank r's n_local): the block r this rank sends in the count exchange
  std::vector<std::int64_t> rank_offsets;   // [n_ranks + 1]: rows for rank r are [rank_offsets[r], rank_offsets[r+1])
  std::vector<std::int32_t> slots;          // [n_slots]: send row q carries slot slots[q]
  std::vector<std::int32_t> row_of_slot;    // [n_slots]: inverse, row_of_slot[slots[q]] = q
  std::vector<std::int64_t> cursor;         // scratch of build_send_layout (kept so a reused layout does not allocate)

  /// Rows sent to rank r.
  std::int64_t rank_count(std::ptrdiff_t r) const { return rank_offsets[static_cast<std::size_t>(r) + 1] - rank_offsets[static_cast<std::size_t>(r)]; }
  /// Total rows sent (= n_tokens * top_k).
  std::int64_t n_rows() const { return rank_offsets.empty() ? 0 : rank_offsets.back(); }
};

/// What one rank receives in the token exchange: the rows of its local experts from every source rank, the block of
/// source rank r first in rank order, each block ordered by local expert, then by the source's slot order.
/// `rows` lists the received rows grouped by local expert (expert i owns rows[expert_offsets[i] .. expert_offsets[i+1]))
/// in (source rank, source slot) order: the global slot order when the ranks' tokens are concatenated in rank order,
/// which is the order a single process visits them in (docs/expert_parallel.md §3).
struct RecvLayout {
  std::ptrdiff_t n_ranks = 0, max_local = 0, n_local = 0;
  std::vector<std::int64_t> expert_counts;   // [n_ranks * max_local]: rows from rank r for local expert i (count exchange)
  std::vector<std::int64_t> rank_offsets;    // [n_ranks + 1]: rows from rank r are [rank_offsets[r], rank_offsets[r+1])
  std::vector<std::int64_t> expert_offsets;  // [n_local + 1]
  std::vector<std::int32_t> rows;            // [n_rows]: received rows grouped by local expert

  std::int64_t rank_count(std::ptrdiff_t r) const { return rank_offsets[static_cast<std::size_t>(r) + 1] - rank_offsets[static_cast<std::size_t>(r)]; }
  std::int64_t n_rows() const { return rank_offsets.empty() ? 0 : rank_offsets.back(); }
};

/// Fills `out` from one call's routing: ids [n_tokens, top_k] (every entry in [0, n_experts)). Stable counting sort
/// on the key (rank, local expert); reuses out's storage (no allocation once it has grown to the call's size).
/// \throws value_error for an id outside [0, placement.n_experts()) or more than 2^31 - 1 slots.
inline void build_send_layout(MatrixView<std::int32_t const> ids, ExpertPlacement const& placement, SendLayout& out) {
  std::ptrdiff_t const n_tokens = ids.rows(), k = ids.cols(), n_slots = n_tokens * k, R = placement.n_ranks(),
                       L = placement.max_local(), n = placement.n_experts();
  if (n_slots > std::numeric_limits<std::int32_t>::max())
    throw value_error(detail::concat("build_send_layout: n_tokens * top_k = ", n_slots, " exceeds 2^31 - 1 slots"));
  out.n_ranks = R;
  out.max_local = L;
  out.expert_counts.assign(static_cast<std::size_t>(R * L), 0);
  out.rank_offsets.assign(static_cast<std::size_t>(R) + 1, 0);
  out.slots.resize(static_cast<std::size_t>(n_slots));
  out.row_of_slot.resize(static_cast<std::size_t>(n_slots));
  for (std::ptrdiff_t t = 0; t < n_tokens; ++t)
    for (std::ptrdiff_t j = 0; j < k; ++j) {
      std::int32_t const e = ids(t, j);
      if (e < 0 || e >= n)
        throw value_error(detail::concat("build_send_layout: argument 'ids' entry (", t, ", ", j, ") = ", e,
                                         " is outside [0, n_experts = ", n, ")"));
      ++out.expert_counts[static_cast<std::size_t>(placement.rank_of(e) * L + placement.local_index(e))];
    }
  // Keys (r, i) in row-major order of expert_counts are exactly the send order; cursor = start of each key's rows.
  std::vector<std::int64_t>& c = out.expert_counts;
  std::int64_t running = 0;
  for (std::ptrdiff_t r = 0; r < R; ++r) {
    out.rank_offsets[static_cast<std::size_t>(r)] = running;
    for (std::ptrdiff_t i = 0; i < L; ++i) running += c[static_cast<std::size_t>(r * L + i)];
  }
  out.rank_offsets[static_cast<std::size_t>(R)] = running;
  // Second pass: each key's write cursor starts at its first row; slots are visited in increasing order (stable).
  std::int64_t prefix = 0;
  std::vector<std::int64_t>& cursor = out.cursor;
  cursor.resize(static_cast<std::size_t>(R * L));
  for (std::ptrdiff_t q = 0; q < R * L; ++q) {
    cursor[static_cast<std::size_t>(q)] = prefix;
    prefix += c[static_cast<std::size_t>(q)];
  }
  for (std::ptrdiff_t t = 0; t < n_tokens; ++t)
    for (std::ptrdiff_t j = 0; j < k; ++j) {
      std::int32_t const e = ids(t, j);
      auto const key = static_cast<std::size_t>(placement.rank_of(e) * L + placement.local_index(e));
      auto const row = cursor[key]++;
      out.slots[static_cast<std::size_t>(row)] = static_cast<std::int32_t>(t * k + j);
      out.row_of_slot[static_cast<std::size_t>(t * k + j)] = static_cast<std::int32_t>(row);
    }
}

/// Fills `out` (the receiving rank `rank`'s layout) from out.expert_counts, which the count exchange filled: block r
/// (max_local entries) holds the rows rank r sends for each of this rank's local experts.
/// \throws value_error for a negative count, padding entries that are not zero, a total past 2^31 - 1 rows, or an
///         expert_counts of the wrong size (a count exchange that does not fit the placement).
inline void build_recv_layout(ExpertPlacement const& placement, std::ptrdiff_t rank, RecvLayout& out) {
  std::ptrdiff_t const R = placement.n_ranks(), L = placement.max_local(), n_local = placement.n_local(rank);
  if (static_cast<std::ptrdiff_t>(out.expert_counts.size()) != R * L)
    throw value_error(detail::concat("build_recv_layout: expert_counts has ", out.expert_counts.size(),
                                     " entries, expected n_ranks * max_local = ", R * L));
  out.n_ranks = R;
  out.max_local = L;
  out.n_local = n_local;
  out.rank_offsets.assign(static_cast<std::size_t>(R) + 1, 0);
  out.expert_offsets.assign(static_cast<std::size_t>(n_local) + 1, 0);
  std::int64_t total = 0;
  for (std::ptrdiff_t r = 0; r < R; ++r) {
    out.rank_offsets[static_cast<std::size_t>(r)] = total;
    for (std::ptrdiff_t i = 0; i < L; ++i) {
      std::int64_t const c = out.expert_counts[static_cast<std::size_t>(r * L + i)];
      if (c < 0 || (i >= n_local && c != 0))
        throw value_error(detail::concat("build_recv_layout: rank ", r, " sends ", c, " row(s) for local expert ", i,
                                         " of rank ", rank, ", which holds ", n_local, " expert(s)"));
      total += c;
      if (i < n_local) out.expert_offsets[static_cast<std::size_t>(i) + 1] += c;
      if (total > std::numeric_limits<std::int32_t>::max())
        throw value_error(detail::concat("build_recv_layout: rank ", rank, " would receive more than 2^31 - 1 rows"));
    }
  }
  out.rank_offsets[static_cast<std::size_t>(R)] = total;
  for (std::ptrdiff_t i = 0; i < n_local; ++i)
    out.expert_offsets[static_cast<std::size_t>(i) + 1] += out.expert_offsets[static_cast<std::size_t>(i)];
  out.rows.resize(static_cast<std::size_t>(total));
  // Group by local expert: for expert i, the sources in rank order, each source's rows in its (slot) order.
  for (std::ptrdiff_t i = 0; i < n_local; ++i) {
    std::int64_t w = out.expert_offsets[static_cast<std::size_t>(i)];
    for (std::ptrdiff_t r = 0; r < R; ++r) {
      std::int64_t first = out.rank_offsets[static_cast<std::size_t>(r)];
      for (std::ptrdiff_t q = 0; q < i; ++q) first += out.expert_counts[static_cast<std::size_t>(r * L + q)];
      std::int64_t const c = out.expert_counts[static_cast<std::size_t>(r * L + i)];
      for (std::int64_t q = 0; q < c; ++q) out.rows[static_cast<std::size_t>(w++)] = static_cast<std::int32_t>(first + q);
    }
  }
}

}  // namespace moe
}  // namespace factorllm
