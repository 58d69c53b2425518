// SPDX-License-Identifier: Apache-2.0
// Internal: chunked double-precision passes over calibration tokens (oracle labels, router training, recovery):
// double copies of the dense and expert weights, the scratch of one chunk, and the teacher's and experts' outputs
// of a chunk.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include <Eigen/Core>

#include "../../core/tensor_view.hpp"
#include "../../detail/eigen_serial.hpp"
#include "../../ffn/factorize.hpp"
#include "../../ffn/swiglu.hpp"

namespace factorllm {
namespace detail {

/// Tokens per chunk of the Eigen passes over calibration sets (bounds their scratch).
inline constexpr std::ptrdiff_t kCalibrationChunkTokens = 256;

/// Double copies of stacked expert weights: gate and up as [n_experts * d_expert, d_model] (expert-major rows,
/// i.e. the experts' permuted neuron order), down as one [d_model, d_expert] matrix per expert.
struct ExpertsDouble {
  std::ptrdiff_t n = 0, m = 0, d = 0;
  RowMatrixD gate, up;
  std::vector<RowMatrixD> down;
};

/// Returns double copies of the experts' stacked weights.
template <class T>
ExpertsDouble experts_double(ffn::ExpertWeights<T> const& experts) {
  ExpertsDouble r;
  r.n = experts.n_experts();
  r.m = experts.d_expert();
  r.d = experts.d_model();
  r.gate = to_eigen_double(matrix_view(experts.gate_tensor().data(), r.n * r.m, r.d));
  r.up = to_eigen_double(matrix_view(experts.up_tensor().data(), r.n * r.m, r.d));
  for (std::ptrdiff_t e = 0; e < r.n; ++e) r.down.push_back(to_eigen_double(experts.down(e)));
  return r;
}

/// Double copies of a dense FFN's weights.
struct DenseDouble {
  RowMatrixD gate, up, down;  // [d_ff, d_model], [d_ff, d_model], [d_model, d_ff]
};

/// Returns double copies of the dense FFN's weights.
template <class T>
DenseDouble dense_double(ffn::DenseFfnView<T> const& dense) {
  return DenseDouble{to_eigen_double(dense.gate), to_eigen_double(dense.up), to_eigen_double(dense.down)};
}

/// Scratch of the chunked passes: input rows, hidden activations, pre-activations, outputs.
struct ChunkScratch {
  RowMatrixD x, h, pre, f;
  std::vector<RowMatrixD> e_out;  // [n_experts] of [chunk, d_model]
  ChunkScratch(std::ptrdiff_t chunk, std::ptrdiff_t d_model, std::ptrdiff_t d_hidden, std::ptrdiff_t n_experts)
      : x(chunk, d_model), h(chunk, d_hidden), pre(chunk, d_hidden), f(chunk, d_model),
        e_out(static_cast<std::size_t>(n_experts), RowMatrixD(chunk, d_model)) {}
};

/// Dense teacher F(x) of the c rows in s.x into s.f (uses s.h, s.pre of width >= dense d_ff).
inline void dense_output_chunk(DenseDouble const& w, std::ptrdiff_t c, ChunkScratch& s) {
  std::ptrdiff_t const m = w.gate.rows();
  swiglu_hidden(w.gate, w.up, s.x.topRows(c), s.h.topLeftCorner(c, m), s.pre.topLeftCorner(c, m));
  s.f.topRows(c).noalias() = s.h.topLeftCorner(c, m) * w.down.transpose();
}

/// Every expert's output on the c rows in s.x into s.e_out[e]; leaves the experts' hidden activations in
/// s.h[:, e*m .. (e+1)*m).
inline void expert_outputs_chunk(ExpertsDouble const& w, std::ptrdiff_t c, ChunkScratch& s) {
  std::ptrdiff_t const nm = w.n * w.m;
  swiglu_hidden(w.gate, w.up, s.x.topRows(c), s.h.topLeftCorner(c, nm), s.pre.topLeftCorner(c, nm));
  for (std::ptrdiff_t e = 0; e < w.n; ++e)
    s.e_out[static_cast<std::size_t>(e)].topRows(c).noalias() = s.h.block(0, e * w.m, c, w.m) * w.down[static_cast<std::size_t>(e)].transpose();
}

/// Runs body(t0, c, scratch) for consecutive chunks of at most kCalibrationChunkTokens rows of x, with scratch.f
/// holding the dense teacher's outputs F(x) and scratch.e_out[e] every expert's outputs E_e(x) for those rows (double,
/// Eigen held serial): the shared front of the oracle labellers (PAR and subset labels).
template <class T, class A, class Body>
void for_each_teacher_expert_chunk(MatrixView<A const> x, ffn::DenseFfnView<T> const& dense,
                                   ffn::ExpertWeights<T> const& experts, Body&& body) {
  run_eigen_serial([&] {
    auto const w = experts_double(experts);
    auto const dw = dense_double(dense);
    ChunkScratch sc(kCalibrationChunkTokens, experts.d_model(), std::max(experts.n_experts() * w.m, dense.d_ff()),
                    experts.n_experts());
    for (std::ptrdiff_t t0 = 0; t0 < x.rows(); t0 += kCalibrationChunkTokens) {
      std::ptrdiff_t const c = std::min(kCalibrationChunkTokens, x.rows() - t0);
      gather_rows_double(x, t0, c, sc.x.topRows(c));
      dense_output_chunk(dw, c, sc);
      expert_outputs_chunk(w, c, sc);
      body(t0, c, sc);
    }
  });
}

}  // namespace detail
}  // namespace factorllm
