// SPDX-License-Identifier: Apache-2.0
// Owning, 64-byte aligned, row-major tensors: the only memory the library allocates for its users.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "dtype.hpp"
#include "error.hpp"
#include "tensor_view.hpp"

namespace factorllm {

/// Byte alignment of every buffer the library allocates (one cache line; enough for AVX-512 loads).
inline constexpr std::size_t kAlignment = 64;

/// Allocations of at least this many bytes are aligned to 2 MiB and, on Linux, advised to use transparent huge
/// pages: decode streams every weight row once per token, and with 4 KiB pages each 4 KiB of weights costs a TLB
/// miss (measured on the TinyLlama FFN decode, THP in "madvise" mode, alternating runs: 0.73-0.80 ms per call with
/// huge pages against 0.93-1.18 ms without). Smaller buffers keep
/// the 64-byte alignment.
inline constexpr std::size_t kHugePageBytes = std::size_t{2} << 20;
inline constexpr std::size_t kHugePageThreshold = std::size_t{4} << 20;

namespace detail {
/// Frees what allocate_aligned returned (the alignment it used travels with the pointer).
struct AlignedFree {
  std::size_t alignment = kAlignment;
  void operator()(void* p) const noexcept { ::operator delete(p, std::align_val_t{alignment}); }
};
/// Allocates `count` zero-initialized elements of T, 64-byte aligned (2 MiB aligned and huge-page advised from
/// kHugePageThreshold bytes); throws value_error on overflow.
template <class T>
std::unique_ptr<T[], AlignedFree> allocate_aligned(std::size_t count) {
  static_assert(std::is_trivially_copyable_v<T>, "allocate_aligned: T must be trivially copyable");
  if (count > std::numeric_limits<std::size_t>::max() / sizeof(T))
    throw value_error(concat("allocate_aligned: ", count, " elements overflow size_t"));
  if (count == 0) return std::unique_ptr<T[], AlignedFree>(nullptr, AlignedFree{});
  std::size_t const bytes = count * sizeof(T);
  std::size_t const alignment = bytes >= kHugePageThreshold ? kHugePageBytes : kAlignment;
  void* p = ::operator new(bytes, std::align_val_t{alignment});
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (alignment == kHugePageBytes) (void)::madvise(p, bytes / kHugePageBytes * kHugePageBytes, MADV_HUGEPAGE);  // advice only
#endif
  std::memset(p, 0, bytes);  // after the advice, so that first touch faults in huge pages
  return std::unique_ptr<T[], AlignedFree>(static_cast<T*>(p), AlignedFree{alignment});
}
}  // namespace detail

/// An owning dense row-major tensor of Rank dimensions, zero-initialized, 64-byte aligned.
/// Copyable (deep copy) and movable. Views of it stay valid while it lives and is not moved from.
template <class T, int Rank>
class Tensor {
 public:
  using value_type = T;
  static constexpr int kRank = Rank;

  Tensor() = default;
  /// Allocates a zero-filled tensor of the given extents.
  /// \throws shape_error for a negative extent; value_error if the product of the non-zero extents overflows
  ///         ptrdiff_t (also for an empty tensor: its views index with that product) or the bytes overflow size_t.
  explicit Tensor(std::array<std::ptrdiff_t, Rank> extents) : extents_(extents) {
    for (auto e : extents_)
      if (e < 0) throw shape_error(detail::concat("Tensor: negative extent ", e));
    std::size_t n = 1;  // product of the non-zero extents
    bool empty = false;
    for (auto e : extents_) {
      if (e == 0) {
        empty = true;
        continue;
      }
      if (n > static_cast<std::size_t>(std::numeric_limits<std::ptrdiff_t>::max()) / static_cast<std::size_t>(e))
        throw value_error("Tensor: element count overflows ptrdiff_t");
      n *= static_cast<std::size_t>(e);
    }
    size_ = empty ? 0 : n;
    data_ = detail::allocate_aligned<T>(size_);
  }
  /// Copies the elements of a view (any strides) into a new dense tensor.
  template <class U, class = std::enable_if_t<std::is_same_v<std::remove_const_t<U>, T>>>
  explicit Tensor(TensorView<U, Rank> const& src) : Tensor(src.extents()) {
    copy_from(src);
  }
  Tensor(Tensor const& other) : Tensor(other.extents_) {
    std::copy(other.data(), other.data() + size_, data());
  }
  Tensor& operator=(Tensor const& other) {
    if (this != &other) {
      Tensor tmp(other);
      *this = std::move(tmp);
    }
    return *this;
  }
  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;

  T* data() noexcept { return data_.get(); }
  T const* data() const noexcept { return data_.get(); }
  std::array<std::ptrdiff_t, Rank> const& extents() const noexcept { return extents_; }
  std::ptrdiff_t extent(int i) const noexcept { return extents_[i]; }
  std::ptrdiff_t size() const noexcept { return static_cast<std::ptrdiff_t>(size_); }
  bool empty() const noexcept { return size_ == 0; }

  TensorView<T, Rank> view() noexcept { return TensorView<T, Rank>(data(), extents_); }
  TensorView<T const, Rank> view() const noexcept { return TensorView<T const, Rank>(data(), extents_); }
  TensorView<T const, Rank> cview() const noexcept { return view(); }

  template <class... Idx>
  T& operator()(Idx... idx) noexcept {
    return view()(idx...);
  }
  template <class... Idx>
  T const& operator()(Idx... idx) const noexcept {
    return view()(idx...);
  }
  T& operator[](std::ptrdiff_t i) noexcept { return data_[i]; }
  T const& operator[](std::ptrdiff_t i) const noexcept { return data_[i]; }

  /// Copies a view of the same extents into this tensor, converting each element to T (convert_element: exact
  /// widening, round-to-nearest-even narrowing, e.g. a float view into a bf16 or f16 tensor).
  template <class U>
  void copy_from(TensorView<U, Rank> const& src) {
    detail::require_shape(src, extents_, "Tensor::copy_from", "src");
    if (size_ == 0) return;  // an empty tensor may still have huge outer extents: do not walk them
    copy_rec(src, 0, 0, 0);
  }

 private:
  template <class U>
  void copy_rec(TensorView<U, Rank> const& src, int dim, std::ptrdiff_t src_off, std::ptrdiff_t dst_off) {
    std::ptrdiff_t dst_stride = 1;
    for (int k = dim + 1; k < Rank; ++k) dst_stride *= extents_[k];
    for (std::ptrdiff_t i = 0; i < extents_[dim]; ++i) {
      if (dim == Rank - 1) {
        data_[dst_off + i] = convert_element<T>(src.data()[src_off + i]);
      } else {
        copy_rec(src, dim + 1, src_off + i * src.stride(dim), dst_off + i * dst_stride);
      }
    }
  }

  std::array<std::ptrdiff_t, Rank> extents_{};
  std::size_t size_ = 0;
  std::unique_ptr<T[], detail::AlignedFree> data_;
};

template <class T>
using Matrix = Tensor<T, 2>;
template <class T>
using Vector = Tensor<T, 1>;

/// Returns an owning copy of `src` in storage type To (e.g. convert<bf16>(float_view)), element by element as
/// convert_element does.
template <class To, class From, int Rank>
Tensor<To, Rank> convert(TensorView<From, Rank> const& src) {
  Tensor<To, Rank> out(src.extents());
  out.copy_from(src);
  return out;
}

}  // namespace factorllm
