// SPDX-License-Identifier: Apache-2.0
// Host-side launch logic of the CUDA backend, in plain C++ (no CUDA header): grid and block sizes of every
// kernel, the device workspace layouts (named, aligned, non-overlapping regions), the expert-GEMM problem
// descriptors built from expert offsets, the choice between the decode and the GEMM path, and argument checks.
// The kernels (src/cuda/*.cu) use exactly these functions, and tests/cuda/test_cuda_launch.cpp tests them on a
// machine without a GPU (backend/README.md "CUDA").
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>
#include <string>

#include "../../core/error.hpp"
#include "../../core/workspace.hpp"

namespace factorllm {
namespace cuda {

/// Threads per block of the element-wise and per-token kernels.
inline constexpr int kThreads = 256;
/// Slots per block of the grouping kernels (one block counts and places one chunk of slots).
inline constexpr int kGroupChunk = 256;
/// Largest top_k the select kernel supports (its per-thread id list lives in registers).
inline constexpr std::ptrdiff_t kMaxTopK = 32;
/// Up to this many tokens the experts run in the streaming decode kernels: every expert then has at most this many
/// rows (a token picks an expert once), which the kernels keep in registers. Above it, GEMMs (cuBLAS).
inline constexpr std::ptrdiff_t kDecodeMaxTokens = 8;
/// Warps per block of the decode kernels; each warp computes one weight row against all of the expert's rows.
inline constexpr int kDecodeWarps = 8;
/// Largest n_experts of the grouping kernels (their per-chunk histogram is n_experts int32 in shared memory).
inline constexpr std::ptrdiff_t kMaxGroupingExperts = 12288;
/// Largest grid.y (CUDA limit): the decode kernels put experts there.
inline constexpr std::ptrdiff_t kMaxGridY = 65535;

/// A dim3 without the CUDA header.
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

/// Grid, block and dynamic shared memory of one kernel launch.
struct LaunchConfig {
  Dim3 grid;
  Dim3 block;
  std::size_t shared_bytes = 0;
};

/// ceil(a / b) for a >= 0, b > 0.
constexpr std::ptrdiff_t ceil_div(std::ptrdiff_t a, std::ptrdiff_t b) noexcept { return (a + b - 1) / b; }

/// A 1-D launch of kThreads-thread blocks covering n work items (one thread each).
/// \throws shape_error when n is negative or needs more than 2^31 - 1 blocks (`what` names the kernel).
inline LaunchConfig linear_launch(std::ptrdiff_t n, char const* what) {
  if (n < 0) throw shape_error(detail::concat(what, ": negative work size ", n));
  std::ptrdiff_t const blocks = ceil_div(n, kThreads);
  if (blocks > INT_MAX) throw shape_error(detail::concat(what, ": ", n, " work items exceed the CUDA grid limit"));
  LaunchConfig c;
  c.grid.x = static_cast<unsigned>(blocks > 0 ? blocks : 1);
  c.block.x = kThreads;
  return c;
}

/// The grouping plan: chunks of kGroupChunk slots, one per block of the count and scatter kernels.
struct GroupingPlan {
  std::ptrdiff_t n_slots = 0;
  std::ptrdiff_t n_experts = 0;
  std::ptrdiff_t n_chunks = 0;
  LaunchConfig count;    // per chunk: histogram of its slots by expert (shared-memory integer counts)
  LaunchConfig scan;     // one block: per-expert prefix over chunks, then offsets over experts
  LaunchConfig scatter;  // per chunk: each slot's stable position

  /// Elements of the two scratch arrays, each [n_chunks, n_experts]: int32 counts and int64 chunk bases.
  std::ptrdiff_t table_elements() const noexcept { return n_chunks * n_experts; }
};

/// Plans the grouping of n_slots = n_tokens * top_k slots over n_experts.
/// \throws shape_error for negative sizes, n_experts < 1, or a count table that would overflow.
inline GroupingPlan plan_grouping(std::ptrdiff_t n_slots, std::ptrdiff_t n_experts) {
  if (n_slots < 0 || n_slots > INT_MAX)
    throw shape_error(detail::concat("group_by_expert (cuda): n_tokens * top_k = ", n_slots, " must be in [0, 2^31)"));
  if (n_experts < 1 || n_experts > kMaxGroupingExperts)
    throw shape_error(detail::concat("group_by_expert (cuda): n_experts = ", n_experts, " must be in [1, ",
                                     kMaxGroupingExperts, "] (one int32 count per expert in 48 KiB of shared memory)"));
  GroupingPlan p;
  p.n_slots = n_slots;
  p.n_experts = n_experts;
  p.n_chunks = ceil_div(n_slots, kGroupChunk);
  if (p.n_chunks > 0 && n_experts > PTRDIFF_MAX / 8 / p.n_chunks)
    throw shape_error("group_by_expert (cuda): count table [n_chunks, n_experts] overflows");
  p.count.grid.x = static_cast<unsigned>(p.n_chunks > 0 ? p.n_chunks : 1);
  p.count.block.x = kGroupChunk;
  p.count.shared_bytes = static_cast<std::size_t>(n_experts) * sizeof(std::int32_t);
  p.scan.block.x = static_cast<unsigned>(n_experts < 1024 ? n_experts : 1024);
  p.scatter.grid.x = p.count.grid.x;
  p.scatter.block.x = kGroupChunk;
  return p;
}

/// The decode kernels: grid.x covers the weight rows (kDecodeWarps per block), grid.y the experts.
/// \throws shape_error when n_experts exceeds the grid's y limit or a size is not positive.
inline LaunchConfig decode_launch(std::ptrdiff_t weight_rows, std::ptrdiff_t n_experts) {
  if (weight_rows < 1 || n_experts < 1)
    throw shape_error(detail::concat("expert_swiglu (cuda, decode): rows ", weight_rows, " and n_experts ", n_experts,
                                     " must be >= 1"));
  if (n_experts > kMaxGridY)
    throw shape_error(detail::concat("expert_swiglu (cuda, decode): n_experts = ", n_experts, " exceeds ", kMaxGridY));
  std::ptrdiff_t const blocks = ceil_div(weight_rows, kDecodeWarps);
  if (blocks > INT_MAX) throw shape_error("expert_swiglu (cuda, decode): too many weight rows");
  LaunchConfig c;
  c.grid.x = static_cast<unsigned>(blocks);
  c.grid.y = static_cast<unsigned>(n_experts);
  c.block.x = 32 * kDecodeWarps;
  return c;
}

/// How ExpertSwiglu<Cuda> runs the experts.
///   automatic   decode when n_tokens <= kDecodeMaxTokens, else grouped
///   decode      streaming kernels that read only the active experts' rows; counts stay on the device (no host
///               synchronization); needs n_tokens <= kDecodeMaxTokens
///   grouped     one cublasGemmGroupedBatchedEx per projection (gate, up, down) over the non-empty experts
///   per_expert  one cublasGemmEx per (non-empty expert, projection)
/// grouped and per_expert read the expert offsets back to the host first (one cudaMemcpyAsync of
/// n_experts + 1 int64 and a stream synchronization per call): cuBLAS takes GEMM sizes as host integers.
enum class ExpertPath { automatic, decode, grouped, per_expert };

/// Returns "automatic", "decode", "grouped" or "per_expert".
inline char const* to_string(ExpertPath p) noexcept {
  switch (p) {
    case ExpertPath::automatic: return "automatic";
    case ExpertPath::decode: return "decode";
    case ExpertPath::grouped: return "grouped";
    case ExpertPath::per_expert: return "per_expert";
  }
  return "unknown";
}

/// The path `requested` resolves to for n_tokens tokens.
/// \throws value_error for decode with more than kDecodeMaxTokens tokens.
inline ExpertPath resolve_expert_path(ExpertPath requested, std::ptrdiff_t n_tokens) {
  if (requested == ExpertPath::automatic)
    return n_tokens <= kDecodeMaxTokens ? ExpertPath::decode : ExpertPath::grouped;
  if (requested == ExpertPath::decode && n_tokens > kDecodeMaxTokens)
    throw value_error(detail::concat("expert_swiglu (cuda): the decode path takes at most ", kDecodeMaxTokens,
                                     " tokens, got n_tokens = ", n_tokens));
  return requested;
}

/// One named region of a device workspace (byte offset from the workspace start).
struct Region {
  char const* name = "";
  std::size_t offset = 0;
  std::size_t bytes = 0;
};

/// A workspace layout that remembers where each region starts (64-byte aligned, in the order added), so the
/// kernels and the host tests read the same offsets. At most kMaxRegions regions.
class RegionPlan {
 public:
  static constexpr int kMaxRegions = 24;

  /// A plan for memory in `space` (device for the kernels' workspaces, host for the host scratch).
  explicit RegionPlan(MemorySpace space = MemorySpace::device) noexcept : space_(space) {}

  /// Appends a region of `count` elements of `element_bytes`; returns its index.
  /// \throws value_error on overflow or when the plan is full.
  int add(char const* name, std::size_t element_bytes, std::size_t count) {
    if (n_ == kMaxRegions) throw value_error("cuda::RegionPlan: too many regions");
    std::size_t const before = layout_.bytes();
    layout_.add(element_bytes, count);
    regions_[n_] = Region{name, before, element_bytes * count};
    return n_++;
  }
  int size() const noexcept { return n_; }
  Region const& operator[](int i) const noexcept { return regions_[i]; }
  /// Total bytes (each region rounded up to 64 bytes).
  std::size_t bytes() const noexcept { return layout_.bytes(); }
  /// The layout as the rest of the library expresses it.
  detail::WorkspaceLayout layout() const noexcept { return layout_; }
  /// Pointer to region i inside `ws`.
  /// \throws backend_error when ws is smaller than the plan, or in the wrong memory space.
  template <class T>
  T* at(WorkspaceSpan ws, int i, char const* op) const {
    check(ws, op);
    return reinterpret_cast<T*>(ws.data + regions_[i].offset);
  }
  /// \throws backend_error when ws is smaller than the plan or in the wrong memory space (`op` names the caller).
  void check(WorkspaceSpan ws, char const* op) const {
    if (ws.space != space_)
      throw backend_error(detail::concat(op, ": the ", space_ == MemorySpace::device ? "workspace" : "host scratch",
                                         " must be ", to_string(space_), " memory (Workspace::wrap(ptr, bytes, MemorySpace::",
                                         to_string(space_), ")), got ", to_string(ws.space)));
    if (ws.bytes < bytes())
      throw backend_error(detail::concat(op, ": workspace of ", ws.bytes, " bytes is too small, ", bytes(),
                                         " needed; size it with workspace()"));
  }

 private:
  detail::WorkspaceLayout layout_;
  Region regions_[kMaxRegions];
  int n_ = 0;
  MemorySpace space_;
};

/// Which expert projection a GEMM computes (row-major: Y[rows, out] = X[rows, in] W^T).
///   gate, up: X = gathered tokens [n_e, d_model], W = W_gate,e / W_up,e [d_expert, d_model] -> [n_e, d_expert]
///   down:     X = hidden [n_e, d_expert],         W = W_down,e [d_model, d_expert]          -> [n_e, d_model]
enum class Projection { gate, up, down };

/// One expert's GEMM in cuBLAS's column-major terms: C[m, n] = op_T(A)[m, k] B[k, n] with A the weight
/// (row-major [m, k] = column-major [k, m], transposed), B the expert's rows, C its outputs. Offsets are in
/// elements from the bases of the stacked weights (a), the grouped input rows (b) and the grouped outputs (c).
struct GemmProblem {
  int expert = 0;
  int m = 0, n = 0, k = 0;
  int lda = 0, ldb = 0, ldc = 0;
  std::int64_t a_offset = 0, b_offset = 0, c_offset = 0;
};

/// Fills `out` (room for n_experts problems) with one problem per expert that has rows, in expert order, and
/// returns how many. offsets (host, n_experts + 1 entries) are the grouping's; weight_expert_stride is the
/// element stride between two experts of the stacked weight (d_expert * d_model for dense tensors).
/// \throws shape_error when the offsets are not non-decreasing from 0, or a size exceeds cuBLAS's int.
inline int expert_gemm_problems(std::int64_t const* offsets, std::ptrdiff_t n_experts, std::ptrdiff_t d_model,
                                std::ptrdiff_t d_expert, std::ptrdiff_t weight_expert_stride, Projection which,
                                GemmProblem* out) {
  if (offsets[0] != 0) throw shape_error("expert GEMM problems: offsets[0] must be 0");
  if (d_model > INT_MAX || d_expert > INT_MAX || d_model < 1 || d_expert < 1)
    throw shape_error(detail::concat("expert GEMM problems: d_model ", d_model, " and d_expert ", d_expert,
                                     " must be in [1, 2^31)"));
  int const out_cols = static_cast<int>(which == Projection::down ? d_model : d_expert);
  int const in_cols = static_cast<int>(which == Projection::down ? d_expert : d_model);
  int count = 0;
  for (std::ptrdiff_t e = 0; e < n_experts; ++e) {
    std::int64_t const rows = offsets[e + 1] - offsets[e];
    if (rows < 0) throw shape_error(detail::concat("expert GEMM problems: offsets decrease at expert ", e));
    if (rows > INT_MAX) throw shape_error(detail::concat("expert GEMM problems: expert ", e, " has too many rows"));
    if (rows == 0) continue;
    GemmProblem p;
    p.expert = static_cast<int>(e);
    p.m = out_cols;
    p.n = static_cast<int>(rows);
    p.k = in_cols;
    p.lda = in_cols;
    p.ldb = in_cols;
    p.ldc = out_cols;
    p.a_offset = static_cast<std::int64_t>(e) * weight_expert_stride;
    p.b_offset = offsets[e] * in_cols;
    p.c_offset = offsets[e] * out_cols;
    out[count++] = p;
  }
  return count;
}

/// The buffers the backward's GEMMs read and write (backend/cuda/moe_backward.hpp, src/cuda/training.cu).
enum class BwdBuffer {
  weight_gate, weight_up, weight_down,  // the stacked expert weights
  x_rows, dy_rows, wdy_rows,            // [S, d_model]: x, dy and w * dy of each grouped row
  pre_gate, pre_up, g, h, da, db,       // [S, d_expert]
  dx_rows,                              // [S, d_model]
  grad_gate, grad_up, grad_down         // the expert gradients
};

/// One cublasGemmEx of the backward, column-major: C[m, n] = op(A)[m, k] op(B)[k, n] + beta C, offsets in elements.
struct BackwardGemm {
  bool trans_a = false, trans_b = false;
  int m = 0, n = 0, k = 0;
  BwdBuffer a{}, b{}, c{};
  std::int64_t a_offset = 0, b_offset = 0, c_offset = 0;
  int lda = 0, ldb = 0, ldc = 0;
  float beta = 0.f;
};

/// The backward's GEMMs of expert e (grouped rows r0 .. r0 + rows), in order, into out (room for 8); returns how many.
/// stage 0 (before the per-row kernel): the pre-activations when `recompute` (a = X W_g^T, b = X W_u^T) and
///   g = dY W_d;
/// stage 1 (after it): dW_g = DA^T X, dW_u = DB^T X, dW_d = (w dY)^T H, dX = DA W_g + DB W_u.
/// Row-major [r, c] matrices are column-major [c, r] to cuBLAS, which is how each line below reads.
inline int expert_backward_gemms(int stage, std::ptrdiff_t e, std::int64_t r0, std::int64_t rows, std::ptrdiff_t d_model,
                                 std::ptrdiff_t d_expert, bool recompute, BackwardGemm* out) {
  if (d_model > INT_MAX || d_expert > INT_MAX || rows > INT_MAX || rows < 0)
    throw shape_error("expert backward GEMMs: a size exceeds cuBLAS's int");
  int const d = static_cast<int>(d_model), m = static_cast<int>(d_expert), ne = static_cast<int>(rows);
  std::int64_t const w_off = static_cast<std::int64_t>(e) * d_model * d_expert;
  std::int64_t const rows_d = r0 * d_model, rows_m = r0 * d_expert;
  auto gemm = [](bool ta, bool tb, int m_, int n_, int k_, BwdBuffer a, std::int64_t ao, int lda, BwdBuffer b,
                 std::int64_t bo, int ldb, float beta, BwdBuffer c, std::int64_t co, int ldc) {
    BackwardGemm g;
    g.trans_a = ta;
    g.trans_b = tb;
    g.m = m_;
    g.n = n_;
    g.k = k_;
    g.a = a;
    g.a_offset = ao;
    g.lda = lda;
    g.b = b;
    g.b_offset = bo;
    g.ldb = ldb;
    g.beta = beta;
    g.c = c;
    g.c_offset = co;
    g.ldc = ldc;
    return g;
  };
  int count = 0;
  if (stage == 0) {
    if (recompute) {  // [m, ne] = W^T [m, d] X^T [d, ne]
      out[count++] = gemm(true, false, m, ne, d, BwdBuffer::weight_gate, w_off, d, BwdBuffer::x_rows, rows_d, d, 0.f,
                          BwdBuffer::pre_gate, rows_m, m);
      out[count++] = gemm(true, false, m, ne, d, BwdBuffer::weight_up, w_off, d, BwdBuffer::x_rows, rows_d, d, 0.f,
                          BwdBuffer::pre_up, rows_m, m);
    }
    // g: [m, ne] = W_d [m, d] (row-major [d, m]) dY^T [d, ne]
    out[count++] = gemm(false, false, m, ne, d, BwdBuffer::weight_down, w_off, m, BwdBuffer::dy_rows, rows_d, d, 0.f,
                        BwdBuffer::g, rows_m, m);
    return count;
  }
  // dW_g, dW_u: [d, m] = X^T [d, ne] DA [ne, m]
  out[count++] = gemm(false, true, d, m, ne, BwdBuffer::x_rows, rows_d, d, BwdBuffer::da, rows_m, m, 0.f,
                      BwdBuffer::grad_gate, w_off, d);
  out[count++] = gemm(false, true, d, m, ne, BwdBuffer::x_rows, rows_d, d, BwdBuffer::db, rows_m, m, 0.f,
                      BwdBuffer::grad_up, w_off, d);
  // dW_d: [m, d] = H^T [m, ne] (w dY) [ne, d]
  out[count++] = gemm(false, true, m, d, ne, BwdBuffer::h, rows_m, m, BwdBuffer::wdy_rows, rows_d, d, 0.f,
                      BwdBuffer::grad_down, w_off, m);
  // dX rows: [d, ne] = W_g^T [d, m] DA^T [m, ne], then + W_u^T DB^T
  out[count++] = gemm(false, false, d, ne, m, BwdBuffer::weight_gate, w_off, d, BwdBuffer::da, rows_m, m, 0.f,
                      BwdBuffer::dx_rows, rows_d, d);
  out[count++] = gemm(false, false, d, ne, m, BwdBuffer::weight_up, w_off, d, BwdBuffer::db, rows_m, m, 1.f,
                      BwdBuffer::dx_rows, rows_d, d);
  return count;
}

}  // namespace cuda
}  // namespace factorllm
