// SPDX-License-Identifier: Apache-2.0
// Balanced clustering of the d_ff intermediate neurons into n_experts equal experts (docs/math.md §1.3), on the
// weights ([W_gate | W_up] rows) or on co-activation over calibration tokens: ONE partition shared by gate, up and
// down.
//
// Why one shared partition: the MoEfication port clusters gate, up and down independently, which breaks
// sum_e E_e(x) = F(x) (docs/math.md §1.3, §7). Every builder here returns an ExpertPartition, which applies the same
// permutation to all three matrices, so K = N still reproduces the dense FFN exactly.
//
// Balanced k-means (exact capacity d_ff / n_experts per cluster), deterministic for a seed:
//   init     k-means++ (D^2 sampling) from a seeded std::mt19937_64 with the library's own uniform draw
//   assign   minimum squared distance under the capacity constraint: greedy on the globally sorted costs, then
//            pairwise exchanges between every two clusters while one lowers the cost; the previous iteration's
//            assignment is refined the same way and the cheaper of the two is kept, so the objective never
//            increases from one iteration to the next
//   update   centroid = mean of its members; stops early when the assignment no longer changes
// Everything runs on one thread in a fixed order (Eigen products forced serial), so results do not depend on
// the OpenMP thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor_view.hpp"
#include "../detail/eigen_serial.hpp"
#include "../detail/math.hpp"
#include "../detail/random.hpp"
#include "permutation.hpp"
#include "swiglu.hpp"

namespace factorllm {
namespace detail {

/// Tokens per chunk of abs_hidden_profiles over calibration sets (bounds the scratch).
inline constexpr std::ptrdiff_t kProfileChunkTokens = 256;

/// Sum of squared distances of an assignment.
inline double assignment_cost(RowMatrixD const& dist, std::vector<std::int32_t> const& a) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += dist(static_cast<Eigen::Index>(i), a[i]);
  return s;
}

/// Lowers the cost of a balanced assignment by exchanging members between every two clusters: for clusters
/// (p, q), members of p sorted by the gain of moving to q and members of q by the gain of moving to p are paired
/// best with best while the pair's total gain is positive. Passes repeat until none improves (at most max_passes).
inline void refine_by_exchanges(RowMatrixD const& dist, std::int64_t n_clusters, std::vector<std::int32_t>& a,
                                int max_passes = 50) {
  std::ptrdiff_t const rows = static_cast<std::ptrdiff_t>(a.size());
  std::vector<std::vector<std::ptrdiff_t>> members(static_cast<std::size_t>(n_clusters));
  for (std::ptrdiff_t i = 0; i < rows; ++i) members[static_cast<std::size_t>(a[static_cast<std::size_t>(i)])].push_back(i);
  std::vector<std::pair<double, std::ptrdiff_t>> from_p, from_q;
  // Largest gain first; equal gains keep index order (deterministic).
  auto by_gain = [](auto const& l, auto const& r) { return l.first > r.first || (l.first == r.first && l.second < r.second); };
  for (int pass = 0; pass < max_passes; ++pass) {
    bool improved = false;
    for (std::int32_t p = 0; p < n_clusters; ++p) {
      for (std::int32_t q = p + 1; q < n_clusters; ++q) {
        auto& mp = members[static_cast<std::size_t>(p)];
        auto& mq = members[static_cast<std::size_t>(q)];
        from_p.clear();
        from_q.clear();
        for (std::ptrdiff_t i : mp) from_p.emplace_back(dist(i, p) - dist(i, q), i);
        for (std::ptrdiff_t i : mq) from_q.emplace_back(dist(i, q) - dist(i, p), i);
        std::sort(from_p.begin(), from_p.end(), by_gain);
        std::sort(from_q.begin(), from_q.end(), by_gain);
        std::size_t const pairs = std::min(from_p.size(), from_q.size());
        bool changed = false;
        for (std::size_t j = 0; j < pairs; ++j) {
          std::ptrdiff_t const i = from_p[j].second, k = from_q[j].second;
          // Relative threshold: exchanges that only move rounding noise could cycle forever.
          double const gain = from_p[j].first + from_q[j].first;
          if (!(gain > 1e-12 * (std::fabs(dist(i, p)) + std::fabs(dist(k, q)) + 1e-300))) break;
          a[static_cast<std::size_t>(i)] = q;
          a[static_cast<std::size_t>(k)] = p;
          changed = true;
        }
        if (changed) {
          improved = true;
          mp.clear();
          mq.clear();
          for (auto const& g : from_p) (a[static_cast<std::size_t>(g.second)] == p ? mp : mq).push_back(g.second);
          for (auto const& g : from_q) (a[static_cast<std::size_t>(g.second)] == p ? mp : mq).push_back(g.second);
          std::sort(mp.begin(), mp.end());
          std::sort(mq.begin(), mq.end());
        }
      }
    }
    if (!improved) break;
  }
}

/// Balanced assignment greedy on the globally sorted costs (ties: lower row, then lower cluster).
inline std::vector<std::int32_t> greedy_balanced(RowMatrixD const& dist, std::int64_t n_clusters) {
  std::ptrdiff_t const rows = dist.rows(), cap = rows / static_cast<std::ptrdiff_t>(n_clusters);
  std::vector<std::ptrdiff_t> order(static_cast<std::size_t>(rows * n_clusters));
  std::iota(order.begin(), order.end(), std::ptrdiff_t{0});
  double const* dd = dist.data();  // row-major: entry i * n_clusters + k is dist(i, k)
  std::stable_sort(order.begin(), order.end(), [&](std::ptrdiff_t l, std::ptrdiff_t r) { return dd[l] < dd[r]; });
  std::vector<std::int32_t> a(static_cast<std::size_t>(rows), -1);
  std::vector<std::ptrdiff_t> count(static_cast<std::size_t>(n_clusters), 0);
  for (std::ptrdiff_t ik : order) {
    std::ptrdiff_t const i = ik / n_clusters, k = ik % n_clusters;
    if (a[static_cast<std::size_t>(i)] < 0 && count[static_cast<std::size_t>(k)] < cap) {
      a[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(k);
      ++count[static_cast<std::size_t>(k)];
    }
  }
  return a;
}

/// Squared distances [rows, n_clusters] of the rows of f to the centroids c, clamped at 0.
inline void squared_distances(RowMatrixD const& f, Eigen::VectorXd const& f_sq, RowMatrixD const& c, RowMatrixD& dist) {
  dist.noalias() = f * c.transpose();
  for (Eigen::Index k = 0; k < c.rows(); ++k) {
    double const c_sq = c.row(k).squaredNorm();
    for (Eigen::Index i = 0; i < f.rows(); ++i) dist(i, k) = std::max(0.0, f_sq(i) + c_sq - 2.0 * dist(i, k));
  }
}

inline std::vector<std::int32_t> balanced_kmeans_impl(RowMatrixD const& f, std::int64_t n_clusters, std::uint64_t seed,
                                                      int iterations) {
  std::ptrdiff_t const rows = f.rows();
  if (n_clusters == 1) return std::vector<std::int32_t>(static_cast<std::size_t>(rows), 0);
  Eigen::VectorXd const f_sq = f.rowwise().squaredNorm();
  // k-means++ seeding (D^2 sampling); when every remaining distance is 0 the lowest unchosen row is taken.
  std::mt19937_64 rng(seed);
  RowMatrixD c(n_clusters, f.cols());
  std::vector<char> chosen(static_cast<std::size_t>(rows), 0);
  std::ptrdiff_t first = static_cast<std::ptrdiff_t>(uniform01(rng) * static_cast<double>(rows));
  first = std::min(first, rows - 1);
  c.row(0) = f.row(first);
  chosen[static_cast<std::size_t>(first)] = 1;
  Eigen::VectorXd nearest = (f.rowwise() - c.row(0)).rowwise().squaredNorm();
  for (std::int64_t k = 1; k < n_clusters; ++k) {
    double total = 0;
    for (std::ptrdiff_t i = 0; i < rows; ++i) total += chosen[static_cast<std::size_t>(i)] ? 0.0 : nearest(i);
    std::ptrdiff_t pick = -1;
    if (total > 0) {
      double r = uniform01(rng) * total, acc = 0;
      for (std::ptrdiff_t i = 0; i < rows && pick < 0; ++i) {
        if (chosen[static_cast<std::size_t>(i)] || nearest(i) <= 0) continue;
        acc += nearest(i);
        if (r < acc) pick = i;
      }
      if (pick < 0)  // r landed on the rounding slack at the end: take the last eligible row
        for (std::ptrdiff_t i = rows - 1; i >= 0 && pick < 0; --i)
          if (!chosen[static_cast<std::size_t>(i)] && nearest(i) > 0) pick = i;
    }
    if (pick < 0)
      for (std::ptrdiff_t i = 0; i < rows && pick < 0; ++i)
        if (!chosen[static_cast<std::size_t>(i)]) pick = i;
    c.row(k) = f.row(pick);
    chosen[static_cast<std::size_t>(pick)] = 1;
    nearest = nearest.cwiseMin((f.rowwise() - c.row(k)).rowwise().squaredNorm());
  }

  RowMatrixD dist(rows, n_clusters);
  std::vector<std::int32_t> a;
  std::vector<std::ptrdiff_t> count(static_cast<std::size_t>(n_clusters));
  for (int it = 0; it < iterations; ++it) {
    squared_distances(f, f_sq, c, dist);
    std::vector<std::int32_t> fresh = greedy_balanced(dist, n_clusters);
    refine_by_exchanges(dist, n_clusters, fresh);
    if (!a.empty()) {
      std::vector<std::int32_t> kept = a;
      refine_by_exchanges(dist, n_clusters, kept);
      if (assignment_cost(dist, kept) <= assignment_cost(dist, fresh)) fresh.swap(kept);
    }
    bool const converged = fresh == a;
    a.swap(fresh);
    if (converged) break;
    c.setZero();
    std::fill(count.begin(), count.end(), 0);
    for (std::ptrdiff_t i = 0; i < rows; ++i) {
      c.row(a[static_cast<std::size_t>(i)]) += f.row(i);
      ++count[static_cast<std::size_t>(a[static_cast<std::size_t>(i)])];
    }
    for (std::int64_t k = 0; k < n_clusters; ++k) c.row(k) /= static_cast<double>(count[static_cast<std::size_t>(k)]);
  }
  return a;
}

/// Divides every row by its L2 norm (zero rows stay zero).
inline void normalize_rows(RowMatrixD& f) {
  for (Eigen::Index i = 0; i < f.rows(); ++i) {
    double const nrm = f.row(i).norm();
    if (nrm > 0) f.row(i) /= nrm;
  }
}

inline void check_partition_sizes(std::int64_t d_ff, std::int64_t n_experts, char const* fn) {
  if (n_experts < 1) throw value_error(concat(fn, ": n_experts must be >= 1, got ", n_experts));
  if (d_ff % n_experts != 0)
    throw value_error(concat(fn, ": d_ff (", d_ff, ") is not divisible by n_experts (", n_experts,
                             "); experts must be equal (docs/math.md §1.2)"));
}

inline void check_iterations(int iterations, char const* fn) {
  if (iterations < 1) throw value_error(concat(fn, ": iterations must be >= 1, got ", iterations));
}

/// |h| of every neuron over the calibration tokens, as rows [d_ff, n_tokens] (double).
template <class T, class A>
RowMatrixD abs_hidden_profiles(ffn::DenseFfnView<T> const& dense, MatrixView<A const> x) {
  std::ptrdiff_t const n_tokens = x.rows(), d = dense.d_model(), m = dense.d_ff();
  RowMatrixD const gate = to_eigen_double(dense.gate), up = to_eigen_double(dense.up);
  RowMatrixD prof(m, n_tokens), xc(kProfileChunkTokens, d), h(kProfileChunkTokens, m), pre(kProfileChunkTokens, m);
  for (std::ptrdiff_t t0 = 0; t0 < n_tokens; t0 += kProfileChunkTokens) {
    std::ptrdiff_t const c = std::min(kProfileChunkTokens, n_tokens - t0);
    gather_rows_double(x, t0, c, xc.topRows(c));
    swiglu_hidden(gate, up, xc.topRows(c), h.topRows(c), pre.topRows(c));
    prof.middleCols(t0, c) = h.topRows(c).cwiseAbs().transpose();
  }
  return prof;
}

template <class T, class A>
void validate_calibration(ffn::DenseFfnView<T> const& dense, MatrixView<A const> x, char const* fn) {
  dense.validate(fn);
  if (x.rows() < 1)
    throw value_error(concat(fn, ": argument 'x_calib' has no tokens; co-activation needs a calibration set"));
  require_shape(x, {x.rows(), dense.d_model()}, fn, "x_calib");
}

}  // namespace detail

namespace ffn {

/// Clusters the rows of `features` into n_clusters clusters of exactly rows / n_clusters members each, minimizing
/// the sum of squared Euclidean distances to the cluster means (balanced k-means; algorithm in the file comment).
/// The features are used as given (normalize them first for cosine-like clustering).
/// \param features   [rows, dim] one row per item (e.g. per neuron); finite values
/// \param n_clusters number of clusters; must divide rows
/// \param seed       seeds the k-means++ initialization (same result on every platform)
/// \param iterations maximum number of assign/update rounds (>= 1)
/// \returns the cluster of each row, in [0, n_clusters), every cluster exactly rows / n_clusters times
/// \throws value_error if n_clusters < 1, rows is 0 or not divisible by n_clusters, iterations < 1, or a feature is
///         not finite.
inline std::vector<std::int32_t> balanced_kmeans(MatrixView<double const> features, std::int64_t n_clusters,
                                                 std::uint64_t seed, int iterations = 20) {
  char const* fn = "balanced_kmeans";
  if (features.rows() < 1) throw value_error("balanced_kmeans: argument 'features' has no rows");
  detail::check_partition_sizes(features.rows(), n_clusters, fn);
  detail::check_iterations(iterations, fn);
  detail::RowMatrixD f = detail::to_eigen_double(features);
  if (!f.allFinite()) throw value_error("balanced_kmeans: argument 'features' holds a NaN or infinite value");
  std::vector<std::int32_t> a;
  detail::run_eigen_serial([&] { a = detail::balanced_kmeans_impl(f, n_clusters, seed, iterations); });
  return a;
}

/// Builds a balanced partition by clustering neurons on their weights: the feature of neuron i is the
/// L2-normalized row [W_gate[i, :] | W_up[i, :]] (neurons reading similar input directions land together, the
/// MoEfication idea, but with one partition for gate, up and down; docs/math.md §1.3).
/// \param dense      the dense FFN: gate, up [d_ff, d_model], down [d_model, d_ff]
/// \param n_experts  must divide d_ff; every expert gets d_ff / n_experts neurons
/// \param seed       seeds the clustering (deterministic)
/// \param iterations maximum k-means rounds (>= 1)
/// \throws value_error if n_experts < 1 or does not divide d_ff, iterations < 1, or a weight is not finite;
///         shape_error for inconsistent dense shapes.
template <class T>
ExpertPartition cluster_weights(DenseFfnView<T> const& dense, std::int64_t n_experts, std::uint64_t seed,
                                int iterations = 20) {
  char const* fn = "cluster_weights";
  dense.validate(fn);
  detail::check_partition_sizes(dense.d_ff(), n_experts, fn);
  detail::check_iterations(iterations, fn);
  std::ptrdiff_t const d = dense.d_model(), m = dense.d_ff();
  detail::RowMatrixD f(m, 2 * d);
  f.leftCols(d) = detail::to_eigen_double(dense.gate);
  f.rightCols(d) = detail::to_eigen_double(dense.up);
  if (!f.allFinite()) throw value_error("cluster_weights: the dense gate or up weights hold a NaN or infinite value");
  detail::normalize_rows(f);
  std::vector<std::int32_t> a;
  detail::run_eigen_serial([&] { a = detail::balanced_kmeans_impl(f, n_experts, seed, iterations); });
  return ExpertPartition::from_assignment(a, n_experts);
}

/// Builds a balanced partition by co-activation: the feature of neuron i is its profile |h_i(x_t)| over the
/// calibration tokens (h = SiLU(W_g x) * (W_u x)), L2-normalized, so neurons that are active on the same tokens
/// cluster together and a router that picks an expert for a token picks most of that token's active neurons.
/// (Scaling a neuron's profile by ||W_down[:, i]|| would not change anything: the profile is normalized.)
/// Memory: a [d_ff, n_tokens] double matrix; pass a subset of the calibration rows to bound it.
/// \param x_calib    [n_tokens >= 1, d_model] FFN inputs (post-attention RMSNorm outputs), any row stride
/// \throws value_error for an empty calibration set, n_experts < 1 or not dividing d_ff, iterations < 1, or a
///         non-finite activation; shape_error if x_calib is not [n_tokens, d_model] or the dense shapes disagree.
template <class T, class A>
ExpertPartition cluster_activations(DenseFfnView<T> const& dense, MatrixView<A const> x_calib, std::int64_t n_experts,
                                    std::uint64_t seed, int iterations = 20) {
  char const* fn = "cluster_activations";
  detail::validate_calibration(dense, x_calib, fn);
  detail::check_partition_sizes(dense.d_ff(), n_experts, fn);
  detail::check_iterations(iterations, fn);
  std::vector<std::int32_t> a;
  detail::run_eigen_serial([&] {
    detail::RowMatrixD f = detail::abs_hidden_profiles(dense, x_calib);
    if (!f.allFinite()) throw value_error("cluster_activations: a hidden activation is NaN or infinite (check x_calib)");
    detail::normalize_rows(f);
    a = detail::balanced_kmeans_impl(f, n_experts, seed, iterations);
  });
  return ExpertPartition::from_assignment(a, n_experts);
}

/// Builds an (n_shared + n_routed)-expert partition for a shared-expert layer (moe::make_shared_moe takes the
/// FIRST n_shared experts as the always-on ones): experts 0 .. n_shared-1 get the n_shared * d_expert neurons of
/// largest mean contribution mean_t |h_i(x_t)| * ||W_down[:, i]|| (ties: lower neuron first), and the remaining
/// neurons are clustered by co-activation (as cluster_activations) into experts n_shared .. n_shared+n_routed-1.
/// \throws value_error if n_shared < 0, n_routed < 1, n_shared + n_routed does not divide d_ff, iterations < 1,
///         or the calibration set is empty; shape_error as cluster_activations.
template <class T, class A>
ExpertPartition cluster_activations_shared(DenseFfnView<T> const& dense, MatrixView<A const> x_calib,
                                           std::int64_t n_shared, std::int64_t n_routed, std::uint64_t seed,
                                           int iterations = 20) {
  char const* fn = "cluster_activations_shared";
  detail::validate_calibration(dense, x_calib, fn);
  if (n_shared < 0) throw value_error(detail::concat(fn, ": n_shared must be >= 0, got ", n_shared));
  if (n_routed < 1) throw value_error(detail::concat(fn, ": n_routed must be >= 1, got ", n_routed));
  std::int64_t const n_experts = n_shared + n_routed;
  detail::check_partition_sizes(dense.d_ff(), n_experts, fn);
  detail::check_iterations(iterations, fn);
  std::ptrdiff_t const m_all = dense.d_ff(), d = dense.d_model(), m = m_all / n_experts;
  std::vector<std::int32_t> assign(static_cast<std::size_t>(m_all), -1);
  detail::run_eigen_serial([&] {
    detail::RowMatrixD f = detail::abs_hidden_profiles(dense, x_calib);
    if (!f.allFinite()) throw value_error("cluster_activations_shared: a hidden activation is NaN or infinite (check x_calib)");
    std::vector<double> importance(static_cast<std::size_t>(m_all));
    for (std::ptrdiff_t i = 0; i < m_all; ++i) {
      double down_sq = 0;
      for (std::ptrdiff_t o = 0; o < d; ++o) down_sq += to_double(dense.down(o, i)) * to_double(dense.down(o, i));
      importance[static_cast<std::size_t>(i)] = f.row(i).sum() * std::sqrt(down_sq);
    }
    std::vector<std::ptrdiff_t> order(static_cast<std::size_t>(m_all));
    std::iota(order.begin(), order.end(), std::ptrdiff_t{0});
    std::stable_sort(order.begin(), order.end(), [&](std::ptrdiff_t l, std::ptrdiff_t r) {
      return importance[static_cast<std::size_t>(l)] > importance[static_cast<std::size_t>(r)];
    });
    std::vector<std::ptrdiff_t> routed;
    for (std::ptrdiff_t j = 0; j < m_all; ++j) {
      std::ptrdiff_t const i = order[static_cast<std::size_t>(j)];
      if (j < n_shared * m) assign[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(j / m);
      else routed.push_back(i);
    }
    std::sort(routed.begin(), routed.end());
    detail::RowMatrixD fr(static_cast<Eigen::Index>(routed.size()), f.cols());
    for (std::size_t j = 0; j < routed.size(); ++j) fr.row(static_cast<Eigen::Index>(j)) = f.row(routed[j]);
    detail::normalize_rows(fr);
    std::vector<std::int32_t> const a = detail::balanced_kmeans_impl(fr, n_routed, seed, iterations);
    for (std::size_t j = 0; j < routed.size(); ++j)
      assign[static_cast<std::size_t>(routed[j])] = static_cast<std::int32_t>(n_shared + a[j]);
  });
  return ExpertPartition::from_assignment(assign, n_experts);
}

}  // namespace ffn
}  // namespace factorllm
