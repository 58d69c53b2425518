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
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "dtype.hpp"
#include "error.hpp"
#include "quant.hpp"
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

  /// Copies a view into this tensor, converting each element to T (convert_element: exact widening,
  /// round-to-nearest-even narrowing, e.g. a float view into a bf16 or f16 tensor). With a block-quantized format
  /// (q8_0, q4_0: core/quant.hpp) on either side, the last extent counts blocks of 32 weights on that side and
  /// rows convert whole: a plain view into a block tensor quantizes each row (ggml's reference rounding), a block
  /// view into a plain tensor dequantizes each row (exact into float or double), and two different block formats
  /// go through float. Every other extent must be equal.
  /// \throws shape_error naming 'src' unless its extents are this tensor's (the last one scaled by the block sizes,
  ///         which must divide the weights per row); value_error when quantizing a non-finite weight or a block whose
  ///         scale overflows f16 (naming the weight's row-major index), with nothing written.
  template <class U>
  void copy_from(TensorView<U, Rank> const& src) {
    using S = std::remove_const_t<U>;
    constexpr std::ptrdiff_t kSrcBlock = block_weights_v<S>, kDstBlock = block_weights_v<T>;
    if constexpr ((kSrcBlock == 1 && kDstBlock == 1) || std::is_same_v<S, T>) {  // element by element
      detail::require_shape(src, extents_, "Tensor::copy_from", "src");
      if (size_ == 0) return;  // an empty tensor may still have huge outer extents: do not walk them
      for_each_row(src, 0, 0, 0, [](auto const* from, T* to, std::ptrdiff_t n) {
        for (std::ptrdiff_t i = 0; i < n; ++i) to[i] = convert_element<T>(from[i]);
      });
    } else {
      std::ptrdiff_t const row_weights = weights_per_row(src);
      if (size_ == 0) return;
      std::vector<float> scratch(kSrcBlock > 1 ? static_cast<std::size_t>(row_weights) : 0);  // one dequantized row
      if constexpr (kDstBlock > 1) {  // quantizing: check every row before the first is written
        std::ptrdiff_t row = 0;
        for_each_row(src, 0, 0, 0, [&](auto const* from, T*, std::ptrdiff_t) {
          with_float_row(from, row_weights, scratch, [&](auto const* x) {
            detail::check_quantizable<T>(x, row_weights, "Tensor::copy_from", "src", row * row_weights);
          });
          ++row;
        });
      }
      for_each_row(src, 0, 0, 0, [&](auto const* from, T* to, std::ptrdiff_t) {
        with_float_row(from, row_weights, scratch, [&](auto const* x) {
          using X = std::remove_const_t<std::remove_pointer_t<decltype(x)>>;
          if constexpr (kDstBlock > 1) {
            quantize_row(x, row_weights, to);
          } else {
            static_assert(std::is_same_v<X, float>, "dequantized rows are float");
            for (std::ptrdiff_t i = 0; i < row_weights; ++i) to[i] = convert_element<T>(x[i]);
          }
        });
      });
    }
  }

 private:
  /// Checks src's extents against this tensor's for a conversion with a block format on one side or both, and
  /// returns the weights per row.
  template <class U>
  std::ptrdiff_t weights_per_row(TensorView<U, Rank> const& src) const {
    constexpr std::ptrdiff_t kSrcBlock = block_weights_v<std::remove_const_t<U>>, kDstBlock = block_weights_v<T>;
    std::ptrdiff_t const last = extents_[Rank - 1];
    if (last > std::numeric_limits<std::ptrdiff_t>::max() / kDstBlock)
      throw shape_error(detail::concat("Tensor::copy_from: rows of ", last, " blocks overflow the weight count"));
    std::ptrdiff_t const row_weights = last * kDstBlock;
    if (row_weights % kSrcBlock != 0)
      throw shape_error(detail::concat("Tensor::copy_from: this tensor's rows hold ", row_weights,
                                       " weights, not a multiple of ", kSrcBlock, " (the ",
                                       dtype_traits<std::remove_const_t<U>>::name(), " blocks of argument 'src')"));
    auto expected = extents_;
    expected[Rank - 1] = row_weights / kSrcBlock;
    if (kSrcBlock == 1 && src.extent(Rank - 1) % kDstBlock != 0)
      throw shape_error(detail::concat("Tensor::copy_from: argument 'src' has rows of ", src.extent(Rank - 1),
                                       " weights, expected a multiple of ", kDstBlock, " (the ", dtype_traits<T>::name(),
                                       " block size)"));
    detail::require_shape(src, expected, "Tensor::copy_from", "src");
    return row_weights;
  }

  /// Calls f(x) with the row's weights: as floats dequantized into `scratch` (row_weights of them) for a block
  /// format, as they are for a plain one.
  template <class S, class F>
  static void with_float_row(S const* from, std::ptrdiff_t row_weights, std::vector<float>& scratch, F&& f) {
    if constexpr (is_block_format_v<S>) {
      dequantize_row(from, row_weights, scratch.data());
      f(static_cast<float const*>(scratch.data()));
    } else {
      (void)row_weights;
      (void)scratch;
      f(from);
    }
  }

  /// Calls row(src_row, dst_row, n) for every row of the last dimension (n = extents_[Rank - 1] elements of T).
  template <class U, class F>
  void for_each_row(TensorView<U, Rank> const& src, int dim, std::ptrdiff_t src_off, std::ptrdiff_t dst_off, F&& row) {
    if (dim == Rank - 1) {
      row(src.data() + src_off, data_.get() + dst_off, extents_[Rank - 1]);
      return;
    }
    std::ptrdiff_t dst_stride = 1;
    for (int k = dim + 1; k < Rank; ++k) dst_stride *= extents_[k];
    for (std::ptrdiff_t i = 0; i < extents_[dim]; ++i)
      for_each_row(src, dim + 1, src_off + i * src.stride(dim), dst_off + i * dst_stride, row);
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
/// convert_element does, or row by row when To or From is a block format (Tensor::copy_from): convert<q8_0>(x) of
/// x [..., n] is [..., n / 32] blocks, convert<float>(b) of blocks b [..., n / 32] is [..., n] floats.
/// \throws shape_error naming 'src' when To is a block format and src's rows are not a multiple of 32 weights;
///         value_error as Tensor::copy_from (a non-finite weight, a block scale beyond f16).
template <class To, class From, int Rank>
Tensor<To, Rank> convert(TensorView<From, Rank> const& src) {
  constexpr std::ptrdiff_t kSrcBlock = block_weights_v<std::remove_const_t<From>>, kDstBlock = block_weights_v<To>;
  auto extents = src.extents();
  if constexpr (kSrcBlock != kDstBlock) {
    std::ptrdiff_t const last = src.extent(Rank - 1);
    if (last > std::numeric_limits<std::ptrdiff_t>::max() / kSrcBlock)
      throw shape_error(detail::concat("convert: argument 'src' has rows of ", last, " blocks: the weight count overflows"));
    std::ptrdiff_t const row_weights = last * kSrcBlock;
    if (row_weights % kDstBlock != 0)
      throw shape_error(detail::concat("convert: argument 'src' has rows of ", row_weights, " weights, expected a multiple of ",
                                       kDstBlock, " (the ", dtype_traits<To>::name(), " block size)"));
    extents[Rank - 1] = row_weights / kDstBlock;
  }
  Tensor<To, Rank> out(extents);
  out.copy_from(src);
  return out;
}

}  // namespace factorllm
