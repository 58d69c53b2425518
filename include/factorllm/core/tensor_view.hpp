// SPDX-License-Identifier: Apache-2.0
// Non-owning views over host (or device) memory: pointer, extents and strides in elements.
#pragma once

#include <algorithm>
#include <array>
#include <sstream>
#include <cstddef>
#include <iterator>
#include <limits>
#include <type_traits>

#include "../config.hpp"
#include "error.hpp"

namespace factorllm {

/// A non-owning, strided view of a Rank-dimensional array. The last dimension is contiguous
/// (stride 1); the others may have any stride at least as large as the dense one, so a view can
/// name a block of a bigger row-major matrix (e.g. W_down[:, I_n] is not such a block: factorize copies).
/// Element type T may be const. A view never allocates and never owns; copying it is cheap.
template <class T, int Rank>
class TensorView {
  static_assert(Rank >= 1 && Rank <= 4, "TensorView: rank must be 1..4");

 public:
  using element_type = T;
  using value_type = std::remove_const_t<T>;
  static constexpr int kRank = Rank;

  TensorView() = default;

  /// Views dense row-major data of the given extents.
  /// \throws shape_error if an extent is negative, the element count overflows ptrdiff_t, or data is null while
  ///         the view is not empty.
  TensorView(T* data, std::array<std::ptrdiff_t, Rank> extents) : data_(data), extents_(extents) {
    check_extents();
    std::ptrdiff_t s = 1;
    for (int i = Rank - 1; i >= 0; --i) {
      strides_[i] = s;
      if (i > 0 && !checked_mul(s, extents_[i], s)) throw_overflow();
    }
    validate();
  }

  /// Views strided data; strides are in elements and the last one must be 1.
  /// \throws shape_error if a stride is negative, the strides would make rows overlap, the last stride is not 1,
  ///         or the element count or the offset of the last element overflows ptrdiff_t.
  TensorView(T* data, std::array<std::ptrdiff_t, Rank> extents, std::array<std::ptrdiff_t, Rank> strides)
      : data_(data), extents_(extents), strides_(strides) {
    validate();
  }

  /// Converts a view of T to a view of const T.
  template <class U, class = std::enable_if_t<std::is_same_v<U const, T> && !std::is_same_v<U, T>>>
  TensorView(TensorView<U, Rank> const& other)  // NOLINT: implicit by design (like a pointer)
      : data_(other.data()), extents_(other.extents()), strides_(other.strides()) {}

  T* data() const noexcept { return data_; }
  std::array<std::ptrdiff_t, Rank> const& extents() const noexcept { return extents_; }
  std::array<std::ptrdiff_t, Rank> const& strides() const noexcept { return strides_; }
  std::ptrdiff_t extent(int i) const noexcept { return extents_[i]; }
  std::ptrdiff_t stride(int i) const noexcept { return strides_[i]; }
  /// Number of elements viewed.
  std::ptrdiff_t size() const noexcept {
    // Zero first: an empty view's other extents may multiply past ptrdiff_t (validate() bounds non-empty ones).
    for (auto e : extents_)
      if (e == 0) return 0;
    std::ptrdiff_t n = 1;
    for (auto e : extents_) n *= e;
    return n;
  }
  bool empty() const noexcept { return size() == 0; }
  /// True when the elements are dense and row-major (no padding between rows); always true for an empty view.
  bool is_contiguous() const noexcept {
    if (empty()) return true;
    std::ptrdiff_t s = 1;
    for (int i = Rank - 1; i >= 0; --i) {
      if (extents_[i] > 1 && strides_[i] != s) return false;
      s *= extents_[i];
    }
    return true;
  }

  // Rank-2 conveniences (the common case: a row-major matrix).
  std::ptrdiff_t rows() const noexcept { return extents_[0]; }
  std::ptrdiff_t cols() const noexcept { return extents_[Rank - 1]; }
  std::ptrdiff_t row_stride() const noexcept { return Rank > 1 ? strides_[0] : extents_[0]; }

  /// Returns a pointer to row i of a rank-2 view (or element i of a rank-1 view); null for an empty view over null.
  T* row(std::ptrdiff_t i) const noexcept {
    FLLM_ASSERT(i >= 0 && i < extents_[0]);
    // No offset for a null pointer (undefined behaviour) or an empty view (its strides bound no element).
    return data_ == nullptr || empty() ? data_ : data_ + i * strides_[0];
  }

  template <class... Idx>
  T& operator()(Idx... idx) const noexcept {
    static_assert(sizeof...(Idx) == Rank, "TensorView: wrong number of indices");
    std::array<std::ptrdiff_t, Rank> const i{static_cast<std::ptrdiff_t>(idx)...};
    std::ptrdiff_t off = 0;
    for (int k = 0; k < Rank; ++k) {
      FLLM_ASSERT(i[k] >= 0 && i[k] < extents_[k]);
      off += i[k] * strides_[k];
    }
    return data_[off];
  }

  /// Returns the sub-view at index i of the first dimension (rank decreases by one).
  template <int R = Rank, class = std::enable_if_t<(R > 1)>>
  TensorView<T, Rank - 1> operator[](std::ptrdiff_t i) const {
    FLLM_ASSERT(i >= 0 && i < extents_[0]);
    std::array<std::ptrdiff_t, Rank - 1> e{}, s{};
    for (int k = 1; k < Rank; ++k) {
      e[k - 1] = extents_[k];
      s[k - 1] = strides_[k];
    }
    return TensorView<T, Rank - 1>(data_ == nullptr || empty() ? data_ : data_ + i * strides_[0], e, s);
  }

  /// Returns rows [begin, end) of the first dimension as a view of the same rank.
  TensorView slice_rows(std::ptrdiff_t begin, std::ptrdiff_t end) const {
    if (begin < 0 || end < begin || end > extents_[0])
      throw shape_error(detail::concat("slice_rows: range [", begin, ", ", end, ") outside [0, ", extents_[0], ")"));
    auto e = extents_;
    e[0] = end - begin;
    // No offset when the result is empty (begin may equal the row count, or another extent is 0: an empty view's
    // strides bound no element, so begin * stride may not fit a pointer offset) or the pointer is null (an empty
    // view's may be, and offsetting null is undefined behaviour).
    return TensorView(begin == end || data_ == nullptr || empty() ? data_ : data_ + begin * strides_[0], e, strides_);
  }

 private:
  void check_extents() const {
    for (int i = 0; i < Rank; ++i)
      if (extents_[i] < 0)
        throw shape_error(detail::concat("TensorView: negative extent ", extents_[i], " in dimension ", i));
  }
  /// out = a * b for non-negative a, b; false (out untouched) when the product overflows ptrdiff_t.
  static bool checked_mul(std::ptrdiff_t a, std::ptrdiff_t b, std::ptrdiff_t& out) noexcept {
    if (b != 0 && a > std::numeric_limits<std::ptrdiff_t>::max() / b) return false;
    out = a * b;
    return true;
  }
  [[noreturn]] void throw_overflow() const {
    std::ostringstream os;
    os << "TensorView: extents [";
    for (int i = 0; i < Rank; ++i) os << (i ? ", " : "") << extents_[i];
    os << "] and strides [";
    for (int i = 0; i < Rank; ++i) os << (i ? ", " : "") << strides_[i];
    os << "] address more bytes than a pointer offset (ptrdiff_t) can hold";
    throw shape_error(os.str());
  }
  void validate() const {
    check_extents();
    for (int i = 0; i < Rank; ++i)
      if (strides_[i] < 0)
        throw shape_error(detail::concat("TensorView: negative stride ", strides_[i], " in dimension ", i));
    if (strides_[Rank - 1] != 1) throw shape_error("TensorView: the last dimension must be contiguous (stride 1)");
    for (int i = Rank - 2; i >= 0; --i) {
      // Rows must not overlap: the outer stride spans at least one whole inner block.
      if (extents_[i] <= 1) continue;
      std::ptrdiff_t inner_span = 0;
      if (!checked_mul(strides_[i + 1], extents_[i + 1], inner_span)) throw_overflow();
      if (strides_[i] < inner_span)
        throw shape_error(detail::concat("TensorView: stride ", strides_[i], " of dimension ", i,
                                         " is smaller than the ", inner_span, " elements one step must span"));
    }
    // Offsets and size() are ptrdiff_t: the offset of every in-range index (row(), operator[], operator() compute
    // them, empty views included) and the product of the non-zero extents must fit. A non-empty view's offsets
    // become pointer offsets, so they must also fit in bytes (an element offset below PTRDIFF_MAX can overflow the
    // pointer arithmetic once scaled by sizeof(T): found by fuzz_api through slice_rows); an empty view's pointer
    // is never offset (row, operator[], slice_rows return it as is).
    bool const has_elements = std::all_of(extents_.begin(), extents_.end(), [](std::ptrdiff_t e) { return e > 0; });
    std::ptrdiff_t const max_elements =
        std::numeric_limits<std::ptrdiff_t>::max() / (has_elements ? static_cast<std::ptrdiff_t>(sizeof(T)) : 1);
    std::ptrdiff_t count = 1, last = 0;
    for (int i = 0; i < Rank; ++i) {
      if (extents_[i] == 0) continue;
      std::ptrdiff_t step = 0;
      if (!checked_mul(count, extents_[i], count) || count > max_elements ||
          !checked_mul(extents_[i] - 1, strides_[i], step) || step > max_elements - last)
        throw_overflow();
      last += step;
    }
    if (data_ == nullptr && size() != 0) throw shape_error("TensorView: null data pointer for a non-empty view");
  }

  T* data_ = nullptr;
  std::array<std::ptrdiff_t, Rank> extents_{};
  std::array<std::ptrdiff_t, Rank> strides_{};
};

template <class T>
using MatrixView = TensorView<T, 2>;
template <class T>
using VectorView = TensorView<T, 1>;

/// Views a row-major matrix given by a raw pointer, its rows, cols and row stride (elements).
template <class T>
MatrixView<T> matrix_view(T* data, std::ptrdiff_t rows, std::ptrdiff_t cols, std::ptrdiff_t row_stride) {
  return MatrixView<T>(data, {rows, cols}, {row_stride, 1});
}
/// Views a dense row-major matrix given by a raw pointer.
template <class T>
MatrixView<T> matrix_view(T* data, std::ptrdiff_t rows, std::ptrdiff_t cols) {
  return MatrixView<T>(data, {rows, cols});
}
/// Views a dense vector.
template <class T>
VectorView<T> vector_view(T* data, std::ptrdiff_t n) {
  return VectorView<T>(data, {n});
}

namespace detail {
/// The element type a contiguous container (std::vector, std::array, a span) exposes through std::data.
/// (C arrays are excluded: they already decay to the pointer overloads.)
template <class C, class = std::enable_if_t<!std::is_array_v<C>>>
using container_element_t = std::remove_pointer_t<decltype(std::data(std::declval<C&>()))>;

template <class C>
void require_container_size(C const& c, std::ptrdiff_t count, char const* function) {
  if (static_cast<std::ptrdiff_t>(std::size(c)) != count)
    throw shape_error(concat(function, ": argument 'container' has ", std::size(c), " elements, expected ", count));
}
}  // namespace detail

/// Views the elements of a contiguous container (std::vector, std::array, ...) as a dense row-major matrix; a
/// const container gives a read-only view. The view does not own: the container must outlive it and keep its size.
/// \throws shape_error unless the container holds exactly rows * cols elements.
template <class C, class E = detail::container_element_t<C>, class = decltype(std::size(std::declval<C&>()))>
MatrixView<E> matrix_view(C& container, std::ptrdiff_t rows, std::ptrdiff_t cols) {
  if (rows < 0 || cols < 0)
    throw shape_error(detail::concat("matrix_view: negative shape [", rows, ", ", cols, "]"));
  if (cols != 0 && rows > std::numeric_limits<std::ptrdiff_t>::max() / cols)
    throw shape_error(detail::concat("matrix_view: shape [", rows, ", ", cols, "] overflows"));
  detail::require_container_size(container, rows * cols, "matrix_view");
  return MatrixView<E>(std::data(container), {rows, cols});
}

/// Views all elements of a contiguous container as a vector.
template <class C, class E = detail::container_element_t<C>, class = decltype(std::size(std::declval<C&>()))>
VectorView<E> vector_view(C& container) {
  return VectorView<E>(std::data(container), {static_cast<std::ptrdiff_t>(std::size(container))});
}

namespace detail {
/// Throws shape_error unless `view` has exactly the expected extents; names the argument.
template <class T, int Rank>
void require_shape(TensorView<T, Rank> const& view, std::common_type_t<std::array<std::ptrdiff_t, Rank>> const& expected,
                   char const* function, char const* argument) {
  if (view.extents() != expected) {
    std::ostringstream os;
    os << function << ": argument '" << argument << "' has shape [";
    for (int i = 0; i < Rank; ++i) os << (i ? ", " : "") << view.extent(i);
    os << "], expected [";
    for (int i = 0; i < Rank; ++i) os << (i ? ", " : "") << expected[i];
    os << "]";
    throw shape_error(os.str());
  }
}
}  // namespace detail

}  // namespace factorllm
