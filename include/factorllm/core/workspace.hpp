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

/// Where a backend's memory lives: host memory (CPU backends) or the memory of an accelerator.
enum class MemorySpace { host, device };

/// Returns "host" or "device".
inline char const* to_string(MemorySpace space) noexcept { return space == MemorySpace::host ? "host" : "device"; }

/// Scratch bytes as kernels see them: a pointer, a size and the memory space they live in. Never owns.
struct WorkspaceSpan {
  std::byte* data = nullptr;
  std::size_t bytes = 0;
  MemorySpace space = MemorySpace::host;
};

/// Scratch memory reused across calls, so that forward passes never allocate. Either owned (allocated by the
/// constructor, host memory) or wrapping memory the caller owns, in any memory space (`wrap`). Size it with the
/// op's `workspace_bytes(...)` query. One Workspace per concurrent caller (thread or stream): it is the only
/// mutable state a forward pass touches besides its output.
class Workspace {
 public:
  Workspace() = default;
  /// Allocates `bytes` of 64-byte aligned host scratch.
  explicit Workspace(std::size_t bytes) : bytes_(bytes), owned_(detail::allocate_aligned<std::byte>(bytes)) {
    data_ = owned_.get();
  }

  /// Wraps `bytes` of caller-owned memory in `space` (not copied, not freed; it must outlive every use).
  /// Kernels carve 64-byte aligned regions from it, so the memory should be 64-byte aligned.
  /// 	hrows value_error if data is null while bytes > 0, or data is not 64-byte aligned.
  static Workspace wrap(void* data, std::size_t bytes, MemorySpace space = MemorySpace::host) {
    if (data == nullptr && bytes > 0) throw value_error("Workspace::wrap: argument 'data' is null for a non-empty span");
    if (reinterpret_cast<std::uintptr_t>(data) % kAlignment != 0)
      throw value_error(detail::concat("Workspace::wrap: argument 'data' must be ", kAlignment, "-byte aligned"));
    Workspace ws;
    ws.data_ = static_cast<std::byte*>(data);
    ws.bytes_ = bytes;
    ws.space_ = space;
    return ws;
  }

  std::size_t bytes() const noexcept { return bytes_; }
  std::byte* data() noexcept { return data_; }
  MemorySpace space() const noexcept { return space_; }
  /// True when this workspace allocated its memory (false for a wrapped span).
  bool owns_memory() const noexcept { return owned_ != nullptr || bytes_ == 0; }
  /// The span kernels receive.
  WorkspaceSpan span() noexcept { return WorkspaceSpan{data_, bytes_, space_}; }

  /// Grows an owned host buffer to at least `bytes` (no-op when already large enough). Not for hot loops.
  /// 	hrows value_error for a wrapped workspace that is too small (the caller owns that memory).
  void reserve(std::size_t bytes) {
    if (bytes <= bytes_) return;
    if (!owns_memory())
      throw value_error(detail::concat("Workspace::reserve: a wrapped workspace of ", bytes_,
                                       " bytes cannot grow to ", bytes, " (the caller owns its memory)"));
    *this = Workspace(bytes);
  }

 private:
  std::byte* data_ = nullptr;
  std::size_t bytes_ = 0;
  MemorySpace space_ = MemorySpace::host;
  std::unique_ptr<std::byte[], detail::AlignedFree> owned_;
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
  WorkspaceCursor(WorkspaceSpan ws, char const* function)
      : base_(ws.data), bytes_(ws.bytes), space_(ws.space), function_(function) {}
  WorkspaceCursor(Workspace& ws, char const* function) : WorkspaceCursor(ws.span(), function) {}
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

  /// The bytes not handed out yet, as a span (for an op that carves its own scratch after the caller's).
  WorkspaceSpan rest() const noexcept { return WorkspaceSpan{base_ + used_, bytes_ - used_, space_}; }

 private:
  std::byte* base_;
  std::size_t bytes_;
  MemorySpace space_;
  std::size_t used_ = 0;
  char const* function_;
};

}  // namespace detail
}  // namespace factorllm
