// SPDX-License-Identifier: Apache-2.0
// Internal double-precision Eigen helpers shared by ffn/clustering.hpp and train/ (diagnostics, router training,
// recovery): a row-major double matrix type, a scope that forces Eigen products onto one thread, copies of views
// into double matrices, and the SwiGLU hidden activations of a block of rows.
#pragma once

#include <cstddef>
#include <exception>

#include <Eigen/Core>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../core/dtype.hpp"
#include "../core/tensor_view.hpp"
#include "math.hpp"

namespace factorllm {
namespace detail {

/// Row-major dynamic double matrix (the training and clustering code computes in double).
using RowMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Runs body() so that every Eigen product inside it is single-threaded: Eigen's GEMM blocking, and so its
/// summation order, depends on its thread count, which would make results depend on OMP_NUM_THREADS. Inside a
/// one-thread team the implicit task's thread budget is set to 1 (omp_set_num_threads acts on that task only,
/// the caller's setting is untouched). An exception thrown by body is carried out of the region and rethrown.
/// (Without OpenMP Eigen is serial and body() runs directly.)
template <class Body>
void run_eigen_serial(Body&& body) {
#if defined(_OPENMP)
  std::exception_ptr failure;
#pragma omp parallel num_threads(1)
  {
    omp_set_num_threads(1);
    try {
      body();
    } catch (...) {
      failure = std::current_exception();
    }
  }
  if (failure) std::rethrow_exception(failure);
#else
  body();
#endif
}

/// Copies a matrix view of any supported element type into a double Eigen matrix.
template <class T>
RowMatrixD to_eigen_double(MatrixView<T const> v) {
  RowMatrixD m(v.rows(), v.cols());
  for (std::ptrdiff_t r = 0; r < v.rows(); ++r) {
    T const* row = v.row(r);
    for (std::ptrdiff_t c = 0; c < v.cols(); ++c) m(r, c) = to_double(row[c]);
  }
  return m;
}

/// SwiGLU hidden activations h = SiLU(x W_g^T) * (x W_u^T) of rows x [c, d_model] (double) for the neurons of
/// gate, up [m, d_model] (double), written into h [c, m]; gate_pre is scratch of the same shape.
inline void swiglu_hidden(RowMatrixD const& gate, RowMatrixD const& up, Eigen::Ref<RowMatrixD const> x,
                          Eigen::Ref<RowMatrixD> h, Eigen::Ref<RowMatrixD> gate_pre) {
  gate_pre.noalias() = x * gate.transpose();
  h.noalias() = x * up.transpose();
  for (Eigen::Index r = 0; r < h.rows(); ++r)
    for (Eigen::Index i = 0; i < h.cols(); ++i) h(r, i) *= silu(gate_pre(r, i));
}

/// Copies rows [t0, t0 + c) of x into a double matrix (any element type, any row stride).
template <class A>
void gather_rows_double(MatrixView<A const> x, std::ptrdiff_t t0, std::ptrdiff_t c, Eigen::Ref<RowMatrixD> out) {
  for (std::ptrdiff_t r = 0; r < c; ++r) {
    A const* row = x.row(t0 + r);
    for (std::ptrdiff_t k = 0; k < x.cols(); ++k) out(r, k) = to_double(row[k]);
  }
}

}  // namespace detail
}  // namespace factorllm
