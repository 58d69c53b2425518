// SPDX-License-Identifier: Apache-2.0
// Caller-owned scratch memory: sized once by a size query, then carved into aligned regions per call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>

#include "error.hpp"
#include "tensor.hpp"

namespace factorllm {

/// Scratch memory owned by the caller and reused across calls, so that forward passes never allocate.
/// Size it with the op's `workspace_bytes(...)` query. One Workspace per concurrent caller (thread or
/// stream): it is the only mutable state a forward pass touches besides its output.
class Workspace {
 public:
  Workspace() = default;
  /// Allocates `bytes` of 64-byte aligned scratch.
  explicit Workspace(std::size_t bytes) : bytes_(bytes), data_(detail::allocate_aligned<std::byte>(bytes)) {}

  std::size_t bytes() const noexcept { return bytes_; }
  std::byte* data() noexcept { return data_.get(); }

  /// Grows the buffer to at least `bytes` (no-op when already large enough). Not for hot loops.
  void reserve(std::size_t bytes) {
    if (bytes > bytes_) *this = Workspace(bytes);
  }

 private:
  std::size_t bytes_ = 0;
  std::unique_ptr<std::byte[], detail::AlignedFree> data_;
};

namespace detail {

/// Rounds n up to a multiple of kAlignment.
constexpr std::size_t align_up(std::size_t n) noexcept { return (n + kAlignment - 1) / kAlignment * kAlignment; }

/// Computes the bytes a sequence of typed regions needs (each region 64-byte aligned).
class WorkspaceLayout {
 public:
  /// Adds a region of `count` elements of `element_bytes` each.
  /// \throws value_error if the total overflows size_t (callers bound their counts; this is the last guard).
  WorkspaceLayout& add(std::size_t element_bytes, std::size_t count) {
    constexpr std::size_t kMax = std::numeric_limits<std::size_t>::max() - kAlignment;
    if (element_bytes != 0 && count > kMax / element_bytes) throw value_error("WorkspaceLayout: region size overflows size_t");
    std::size_t const region = align_up(count * element_bytes);
    if (region > kMax - bytes_) throw value_error("WorkspaceLayout: workspace size overflows size_t");
    bytes_ += region;
    return *this;
  }
  std::size_t bytes() const noexcept { return bytes_; }

 private:
  std::size_t bytes_ = 0;
};

/// Hands out consecutive aligned regions of a Workspace; throws backend_error when it runs out,
/// naming the call, so that a too-small workspace is an error and never an overrun.
class WorkspaceCursor {
 public:
  WorkspaceCursor(Workspace& ws, char const* function) : base_(ws.data()), bytes_(ws.bytes()), function_(function) {}
  template <class T>
  T* take(std::size_t count) {
    // Compared without overflow: a huge count must fail here, not wrap around to a small region.
    std::size_t const left = bytes_ - used_;
    if (count > left / sizeof(T) || align_up(count * sizeof(T)) > left)
      throw backend_error(concat(function_, ": workspace of ", bytes_, " bytes is too small (", used_,
                                 " bytes used, ", count, " more elements of ", sizeof(T),
                                 " bytes requested); size it with workspace_bytes()"));
    std::size_t const need = align_up(count * sizeof(T));
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += need;
    return p;
  }

 private:
  std::byte* base_;
  std::size_t bytes_;
  std::size_t used_ = 0;
  char const* function_;
};

}  // namespace detail
}  // namespace factorllm
