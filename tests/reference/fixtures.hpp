// SPDX-License-Identifier: Apache-2.0
// Test fixtures: library objects built from the reference's double data, in any weight type.
#pragma once

#include <factorllm/core/tensor.hpp>
#include <factorllm/ffn/swiglu.hpp>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <factorllm/backend/simd/target_dispatch.hpp>
#include <factorllm/ffn/permutation.hpp>

#include "reference.hpp"

namespace fixture {

/// Library-owned copies of a reference FFN, converted to weight type T.
template <class T>
struct DenseWeights {
  factorllm::Matrix<T> gate, up, down;
  explicit DenseWeights(ref::Ffn const& f)
      : gate({f.d_ff, f.d_model}), up({f.d_ff, f.d_model}), down({f.d_model, f.d_ff}) {
    for (std::ptrdiff_t i = 0; i < gate.size(); ++i) {
      gate[i] = factorllm::from_double<T>(f.gate[static_cast<std::size_t>(i)]);
      up[i] = factorllm::from_double<T>(f.up[static_cast<std::size_t>(i)]);
    }
    for (std::ptrdiff_t i = 0; i < down.size(); ++i) down[i] = factorllm::from_double<T>(f.down[static_cast<std::size_t>(i)]);
  }
  factorllm::ffn::DenseFfnView<T> view() const { return {gate.cview(), up.cview(), down.cview()}; }
  /// The FFN as the reference sees it after rounding to T (so references compare like with like).
  ref::Ffn rounded() const {
    ref::Ffn f;
    f.d_ff = static_cast<int>(gate.extent(0));
    f.d_model = static_cast<int>(gate.extent(1));
    for (std::ptrdiff_t i = 0; i < gate.size(); ++i) {
      f.gate.push_back(factorllm::to_double(gate[i]));
      f.up.push_back(factorllm::to_double(up[i]));
    }
    for (std::ptrdiff_t i = 0; i < down.size(); ++i) f.down.push_back(factorllm::to_double(down[i]));
    return f;
  }
};

/// A matrix of activations of type A from doubles.
template <class A>
factorllm::Matrix<A> to_matrix(ref::Vec const& v, std::ptrdiff_t rows, std::ptrdiff_t cols) {
  factorllm::Matrix<A> m({rows, cols});
  for (std::ptrdiff_t i = 0; i < m.size(); ++i) m[i] = static_cast<A>(v[static_cast<std::size_t>(i)]);
  return m;
}

/// Doubles of a matrix's elements (for the reference).
template <class T>
ref::Vec to_vec(factorllm::Tensor<T, 2> const& m) {
  ref::Vec v(static_cast<std::size_t>(m.size()));
  for (std::ptrdiff_t i = 0; i < m.size(); ++i) v[static_cast<std::size_t>(i)] = factorllm::to_double(m[i]);
  return v;
}

/// One partition from each builder (contiguous, random, from_permutation, from_assignment) for d_ff, n.
inline std::vector<factorllm::ffn::ExpertPartition> every_partition_builder(std::int64_t d_ff, std::int64_t n) {
  using factorllm::ffn::ExpertPartition;
  std::vector<std::int32_t> reversed(static_cast<std::size_t>(d_ff));
  for (std::int64_t i = 0; i < d_ff; ++i) reversed[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(d_ff - 1 - i);
  std::vector<std::int32_t> round_robin(static_cast<std::size_t>(d_ff));
  for (std::int64_t i = 0; i < d_ff; ++i) round_robin[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i % n);
  return {ExpertPartition::contiguous(d_ff, n), ExpertPartition::random(d_ff, n, 7),
          ExpertPartition::from_permutation(reversed, n), ExpertPartition::from_assignment(round_robin, n)};
}

/// True when two tensors have the same extents and the same bytes (determinism and "left unchanged" checks).
template <class T, int Rank>
bool same_bits(factorllm::Tensor<T, Rank> const& a, factorllm::Tensor<T, Rank> const& b) {
  return a.extents() == b.extents() && std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}

inline std::string shared_path(char const* rel) { return std::string(FACTORLLM_SHARED_DIR) + "/" + rel; }

/// The relative L2 bound of a CpuSimd result against the CpuScalar oracle for weight format W, given the bound
/// `exact_bound` that holds when the kernels only reorder float sums. bf16 decode on a CPU with AVX512-BF16 rounds the
/// activations to bf16 before its `vdpbf16ps` dots (docs/design.md §8): that moves these small layers' outputs by
/// 2e-3 to 3e-3 relative L2 (measured), so the bound is 1e-2 there. The native kernel's own math is checked tightly
/// (1e-5 against a reference that rounds the same way) in test_quant_kernels.
template <class W>
double simd_oracle_tolerance(double exact_bound) {
  if constexpr (std::is_same_v<W, factorllm::bf16>) {
    if (factorllm::detail::bf16_native_dot_dispatch()) return 1e-2;
  }
  return exact_bound;
}

}  // namespace fixture
