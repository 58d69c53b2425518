// SPDX-License-Identifier: Apache-2.0
// moe::ExpertParallelFfn: an expert-parallel MoE layer on an MPI communicator (docs/expert_parallel.md §2). The only
// header of the library that includes <mpi.h> (optional: link factorllm::mpi; Debian libopenmpi-dev). Every rank
// holds its experts (an ExpertShard) and routes its own tokens; MPI_Alltoall moves the per-expert counts and
// MPI_Alltoallv the token rows out and the expert outputs back; the backward moves dy rows out and dx shares back.
#pragma once

#include <mpi.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "../../core/error.hpp"
#include "../../core/executor.hpp"
#include "../../core/kernel_args.hpp"
#include "../../core/tensor_view.hpp"
#include "../expert_shard.hpp"

namespace factorllm {
namespace moe {

/// Raised when an MPI call returns an error code (the communicator's error handler must be MPI_ERRORS_RETURN for MPI
/// to return one; with the default MPI_ERRORS_ARE_FATAL it aborts the job first).
class mpi_error : public backend_error {
 public:
  using backend_error::backend_error;
};

namespace mpi_detail {

inline void mpi_check(int rc, char const* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw mpi_error(factorllm::detail::concat("ExpertParallelFfn: ", call, " failed: ", std::string(text, static_cast<std::size_t>(len))));
}

/// MPI counts and displacements are int: a byte count past INT_MAX is refused, never truncated.
inline int mpi_int(std::int64_t v, char const* what) {
  if (v < 0 || v > INT_MAX)
    throw value_error(factorllm::detail::concat("ExpertParallelFfn: ", what, " = ", v,
                                                " bytes does not fit MPI's int counts (at most 2^31 - 1); split the batch"));
  return static_cast<int>(v);
}

}  // namespace mpi_detail

/// One rank's expert-parallel MoE layer on an MPI communicator (docs/expert_parallel.md §2).
/// forward: route own tokens -> MPI_Alltoall counts -> MPI_Alltoallv rows -> local experts -> MPI_Alltoallv outputs
/// back -> combine. backward: MPI_Alltoallv dy rows (with the combine weights) -> local expert gradients (they stay
/// on this rank) -> MPI_Alltoallv dx shares and dL/dw back -> dx and the router gradient (MPI_Allreduce in double).
/// For the tokens of all ranks concatenated in rank order, y, dx, dL/dz and every expert's gradient are the bits of the
/// single-process MoeFfn<T, CpuScalar> / train::moe_backward<CpuScalar> (CpuSimd: to rounding); the router gradient
/// is a sum over ranks (docs/expert_parallel.md §3). All calls are collective: every rank of the communicator calls
/// them in the same order (a rank with no tokens passes a [0, d_model] view). A rank that throws (a mis-shaped view,
/// a count past INT_MAX) leaves the others waiting inside a collective: treat any exception from forward/backward as
/// fatal to the group (e.g. MPI_Abort), as with any failed collective.
template <class T, class Backend = CpuScalar>
class ExpertParallelFfn {
 public:
  using Shard = ExpertShard<T, Backend>;
  using A = typename Shard::A;
  using State = typename Shard::State;

  /// Takes this rank's shard on `comm` (not duplicated: the caller keeps it alive).
  /// \throws value_error if the shard's placement does not fit the communicator (its rank count or this rank).
  ExpertParallelFfn(MPI_Comm comm, Shard shard) : comm_(comm), shard_(std::move(shard)) {
    int size = 0, rank = 0;
    mpi_detail::mpi_check(MPI_Comm_size(comm_, &size), "MPI_Comm_size");
    mpi_detail::mpi_check(MPI_Comm_rank(comm_, &rank), "MPI_Comm_rank");
    shard_.placement().require_fits(size, shard_.n_experts(), "ExpertParallelFfn");
    if (rank != shard_.rank())
      throw value_error(factorllm::detail::concat("ExpertParallelFfn: the shard is for rank ", shard_.rank(),
                                                  ", this process is rank ", rank, " of the communicator"));
  }

  /// This rank's shard of a whole layer (each rank copies its experts out of `experts`).
  /// \throws value_error as the constructor and ExpertShard::from_experts.
  static ExpertParallelFfn from_experts(MPI_Comm comm, ffn::ExpertWeights<T> const& experts, Router<A> router, Gating gating,
                                        ExpertPlacement placement) {
    int size = 0, rank = 0;
    mpi_detail::mpi_check(MPI_Comm_size(comm, &size), "MPI_Comm_size");
    mpi_detail::mpi_check(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
    placement.require_fits(size, experts.n_experts(), "ExpertParallelFfn::from_experts");
    return ExpertParallelFfn(comm, Shard::from_experts(experts, std::move(router), std::move(gating), std::move(placement), rank));
  }

  Shard const& shard() const noexcept { return shard_; }
  MPI_Comm comm() const noexcept { return comm_; }

  /// y [n_tokens, d_model] = MoE(x) for this rank's tokens x [n_tokens, d_model] (collective). st keeps what the
  /// backward needs. \throws shape_error for mis-shaped views, value_error for a call past MPI's int counts.
  void forward(MatrixView<A const> x, MatrixView<A> y, State& st, Executor const& exec = Executor::openmp()) const {
    detail::require_shape(y, {x.rows(), shard_.d_model()}, "ExpertParallelFfn::forward", "y");
    shard_.dispatch(x, st, exec);
    exchange_counts(st);
    shard_.prepare_receive(st);
    std::ptrdiff_t const d = shard_.d_model();
    alltoallv(st.send_x.data(), st.send.rank_offsets, st.recv_x.data(), st.recv.rank_offsets, d * sizeof(A));
    shard_.run_experts(st, exec);
    using Out = typename Shard::out_type;
    alltoallv(st.out_back.data(), st.recv.rank_offsets, st.out_home.data(), st.send.rank_offsets, d * sizeof(Out));
    shard_.combine(st, y, exec);
  }

  /// The training backward of the last forward on st (collective): dy [n_tokens, d_model] = dL/dy of this rank's
  /// tokens. Writes dx [n_tokens, d_model], this rank's experts' gradients d_gate, d_up [n_local, d_expert, d_model],
  /// d_down [n_local, d_model, d_expert], the router gradient summed over ranks (d_router_weight [n_experts, d_model],
  /// d_router_bias [n_experts], the same on every rank) and optionally dL/dz [n_tokens, n_experts]. On every Backend
  /// the backward's expert step is the CpuScalar oracle's per-slot step (kernel::slot_backward; plain weight formats).
  /// \throws shape_error for mis-shaped views.
  void backward(MatrixView<A const> x, MatrixView<A const> dy, State& st, MatrixView<A> dx, TensorView<A, 3> d_gate,
                TensorView<A, 3> d_up, TensorView<A, 3> d_down, MatrixView<A> d_router_weight, VectorView<A> d_router_bias,
                MatrixView<A> dlogits = {}) const {
    std::ptrdiff_t const d = shard_.d_model();
    shard_.dispatch_backward(dy, st);
    alltoallv(st.send_dy.data(), st.send.rank_offsets, st.recv_dy.data(), st.recv.rank_offsets, (d + 1) * sizeof(A));
    shard_.run_experts_backward(st, d_gate, d_up, d_down);
    alltoallv(st.back.data(), st.recv.rank_offsets, st.back_home.data(), st.send.rank_offsets, (d + 1) * sizeof(double));
    shard_.combine_backward(x, st, dx, dlogits);
    // The router is replicated (data parallel): its gradient is the sum of every rank's share, reduced in double.
    double const t0 = MPI_Wtime();
    mpi_detail::mpi_check(MPI_Allreduce(MPI_IN_PLACE, st.router_w.data(), mpi_detail::mpi_int(static_cast<std::int64_t>(st.router_w.size()), "router gradient"),
                                    MPI_DOUBLE, MPI_SUM, comm_),
                      "MPI_Allreduce");
    mpi_detail::mpi_check(MPI_Allreduce(MPI_IN_PLACE, st.router_b.data(), static_cast<int>(st.router_b.size()), MPI_DOUBLE, MPI_SUM, comm_),
                      "MPI_Allreduce");
    comm_seconds_ += MPI_Wtime() - t0;
    shard_.write_router_grads(st, d_router_weight, d_router_bias);
  }

  /// Seconds spent inside MPI calls (the exchanges and the all-reduce) since construction or the last reset: what the
  /// benchmark reports as the communication share.
  double comm_seconds() const noexcept { return comm_seconds_; }
  void reset_comm_seconds() noexcept { comm_seconds_ = 0; }

 private:
  /// MPI_Alltoall of the per-(destination, local expert) counts: max_local int64 values per rank.
  void exchange_counts(State& st) const {
    std::ptrdiff_t const R = shard_.placement().n_ranks(), L = shard_.placement().max_local();
    st.recv.expert_counts.resize(static_cast<std::size_t>(R * L));
    if (L == 0) return;
    double const t0 = MPI_Wtime();
    mpi_detail::mpi_check(MPI_Alltoall(st.send.expert_counts.data(), static_cast<int>(L), MPI_INT64_T, st.recv.expert_counts.data(),
                                   static_cast<int>(L), MPI_INT64_T, comm_),
                      "MPI_Alltoall");
    comm_seconds_ += MPI_Wtime() - t0;
  }

  /// MPI_Alltoallv of rows of row_bytes bytes: block r of `send` (rows send_off[r] .. send_off[r+1]) goes to rank r,
  /// block r of `recv` comes from rank r. Counts and displacements in bytes, each checked against INT_MAX.
  template <class S, class R>
  void alltoallv(S const* send, std::vector<std::int64_t> const& send_off, R* recv, std::vector<std::int64_t> const& recv_off,
                 std::size_t row_bytes) const {
    std::size_t const n = send_off.size() - 1;
    auto const rb = static_cast<std::int64_t>(row_bytes);
    sc_.resize(n);
    sd_.resize(n);
    rc_.resize(n);
    rd_.resize(n);
    for (std::size_t r = 0; r < n; ++r) {
      sc_[r] = mpi_detail::mpi_int((send_off[r + 1] - send_off[r]) * rb, "a send count");
      sd_[r] = mpi_detail::mpi_int(send_off[r] * rb, "a send displacement");
      rc_[r] = mpi_detail::mpi_int((recv_off[r + 1] - recv_off[r]) * rb, "a receive count");
      rd_[r] = mpi_detail::mpi_int(recv_off[r] * rb, "a receive displacement");
    }
    double const t0 = MPI_Wtime();
    mpi_detail::mpi_check(MPI_Alltoallv(send, sc_.data(), sd_.data(), MPI_BYTE, recv, rc_.data(), rd_.data(),
                                    MPI_BYTE, comm_),
                      "MPI_Alltoallv");
    comm_seconds_ += MPI_Wtime() - t0;
  }

  MPI_Comm comm_;
  Shard shard_;
  // Count and displacement arrays of the exchanges (reused: no allocation once sized) and the timing counter.
  // Mutable: forward/backward are logically const on the layer; a layer is not shared between threads of one rank.
  mutable std::vector<int> sc_, sd_, rc_, rd_;
  mutable double comm_seconds_ = 0;
};

}  // namespace moe
}  // namespace factorllm
