// SPDX-License-Identifier: Apache-2.0
// Tests of the core types: bf16 rounding, views, owning tensors, workspaces, errors.
#include <catch2/catch.hpp>

#include <factorllm/backend/traits.hpp>
#include <factorllm/core/dtype.hpp>
#include <factorllm/core/tensor.hpp>
#include <factorllm/core/workspace.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

using namespace factorllm;

namespace {
float from_bits32(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Reference bf16 rounding written independently: nearest representable bf16 by comparing the two
// candidates' distances in double; ties pick the even mantissa.
std::uint16_t reference_bf16(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  std::uint16_t const lo = static_cast<std::uint16_t>(u >> 16), hi = static_cast<std::uint16_t>(lo + 1);
  double const dlo = std::fabs(static_cast<double>(bf16::from_bits(lo).to_float()) - v);
  double const dhi = std::fabs(static_cast<double>(bf16::from_bits(hi).to_float()) - v);
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1) ? hi : lo;
}
}  // namespace

TEST_CASE("bf16 rounds to nearest even and keeps specials", "[core][bf16]") {
  CHECK(bf16(1.0f).bits == 0x3f80);
  CHECK(bf16(1.0f).to_float() == 1.0f);
  CHECK(bf16(-2.5f).to_float() == -2.5f);
  // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties to even -> 1.
  CHECK(bf16(from_bits32(0x3f808000u)).bits == 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up to even.
  CHECK(bf16(from_bits32(0x3f818000u)).bits == 0x3f82);
  CHECK(bf16(from_bits32(0x3f808001u)).bits == 0x3f81);  // just above halfway rounds up
  CHECK(std::isinf(bf16(std::numeric_limits<float>::infinity()).to_float()));
  CHECK(std::isnan(bf16(std::numeric_limits<float>::quiet_NaN()).to_float()));
  // A NaN whose payload is only in the low 16 bits must stay NaN, not become infinity.
  CHECK(std::isnan(bf16(from_bits32(0x7f800001u)).to_float()));
  CHECK(std::isinf(bf16(std::numeric_limits<float>::max()).to_float()));  // rounds past the largest bf16
  std::uint32_t state = 12345;
  for (int i = 0; i < 100000; ++i) {
    state = state * 1664525u + 1013904223u;
    float const v = from_bits32(state);
    if (std::isnan(v) || std::isinf(v)) continue;
    float const r = bf16(v).to_float();
    if (std::isinf(r)) continue;  // overflow near FLT_MAX: covered above
    INFO("input bits " << state);
    REQUIRE(bf16(v).bits == reference_bf16(v));
  }
}

TEST_CASE("TensorView validates extents, strides and pointers", "[core][view]") {
  float data[12] = {};
  CHECK_NOTHROW(matrix_view(data, 3, 4));
  CHECK_NOTHROW(matrix_view(data, 2, 4, 6));  // padded rows
  CHECK_THROWS_AS(matrix_view(data, 3, 4, 3), shape_error);  // rows overlap
  CHECK_THROWS_AS(matrix_view(data, -1, 4), shape_error);
  CHECK_THROWS_AS(matrix_view<float>(nullptr, 2, 2), shape_error);
  CHECK_NOTHROW(matrix_view<float>(nullptr, 0, 4));  // empty views may be null
  CHECK_THROWS_AS((TensorView<float, 2>(data, {2, 2}, {4, 2})), shape_error);  // last stride must be 1
  auto v = matrix_view(data, 2, 4, 6);
  v(1, 3) = 7.0f;
  CHECK(data[9] == 7.0f);
  CHECK_FALSE(v.is_contiguous());
  CHECK(matrix_view(data, 3, 4).is_contiguous());
  auto s = matrix_view(data, 3, 4).slice_rows(1, 3);
  CHECK(s.rows() == 2);
  CHECK(s.data() == data + 4);
  CHECK_THROWS_AS(matrix_view(data, 3, 4).slice_rows(2, 4), shape_error);
  TensorView<float const, 2> cv = v;  // conversion to const
  CHECK(cv(1, 3) == 7.0f);
}

TEST_CASE("Tensor owns aligned zeroed memory and deep-copies", "[core][tensor]") {
  Tensor<float, 3> t({2, 3, 5});
  CHECK(t.size() == 30);
  CHECK(reinterpret_cast<std::uintptr_t>(t.data()) % kAlignment == 0);
  for (std::ptrdiff_t i = 0; i < t.size(); ++i) REQUIRE(t[i] == 0.0f);
  t(1, 2, 4) = 3.0f;
  Tensor<float, 3> c = t;
  c(1, 2, 4) = 4.0f;
  CHECK(t(1, 2, 4) == 3.0f);
  CHECK(c.view()[1](2, 4) == 4.0f);
  CHECK_THROWS_AS((Tensor<float, 2>({-1, 2})), shape_error);
  float src[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  Matrix<float> m(matrix_view<float const>(src, 2, 3, 4));  // strided source
  CHECK(m(1, 0) == 5.0f);
  CHECK(m(1, 2) == 7.0f);
  CHECK_THROWS_AS(m.copy_from(matrix_view<float const>(src, 2, 4)), shape_error);
}

TEST_CASE("Workspace cursor refuses to overrun", "[core][workspace]") {
  auto const layout = detail::WorkspaceLayout().add(sizeof(float), 10).add(sizeof(double), 3);
  CHECK(layout.bytes() == 2 * kAlignment);
  Workspace ws(layout.bytes());
  detail::WorkspaceCursor cursor(ws, "test");
  float* a = cursor.take<float>(10);
  double* b = cursor.take<double>(3);
  CHECK(reinterpret_cast<std::uintptr_t>(a) % kAlignment == 0);
  CHECK(reinterpret_cast<std::uintptr_t>(b) % kAlignment == 0);
  CHECK_THROWS_AS(cursor.take<float>(1), backend_error);
  Workspace small(8);
  detail::WorkspaceCursor c2(small, "test");
  CHECK_THROWS_AS(c2.take<double>(100), backend_error);
}

TEST_CASE("views of contiguous containers: std::vector and std::array, size checked", "[core][view]") {
  std::vector<float> v(6, 1.f);
  MatrixView<float> m = matrix_view(v, 2, 3);
  CHECK(m.data() == v.data());
  CHECK(m.rows() == 2);
  CHECK(m.cols() == 3);
  std::vector<float> const& cv = v;
  MatrixView<float const> cm = matrix_view(cv, 3, 2);
  CHECK(cm.data() == v.data());
  std::array<double, 4> a{1, 2, 3, 4};
  CHECK(matrix_view(a, 2, 2)(1, 0) == 3.0);
  CHECK(vector_view(v).extent(0) == 6);
  CHECK_THROWS_WITH(matrix_view(v, 2, 2), Catch::Contains("has 6 elements, expected 4"));
  CHECK_THROWS_AS(matrix_view(v, -1, 2), shape_error);
  float raw[4] = {};
  CHECK(matrix_view(raw, 2, 2).data() == raw);  // C arrays still take the pointer overload
}

TEST_CASE("Workspace wraps caller-owned memory of either memory space", "[core][workspace]") {
  alignas(64) static std::byte storage[4 * kAlignment];
  std::byte* const buffer = storage;  // a pointer, so that Catch prints addresses, not the bytes of an array
  std::size_t const size = sizeof storage;
  Workspace ws = Workspace::wrap(buffer, size);
  CHECK(ws.data() == buffer);
  CHECK(ws.bytes() == size);
  CHECK(ws.space() == MemorySpace::host);
  CHECK_FALSE(ws.owns_memory());
  WorkspaceSpan const span = ws.span();
  CHECK(span.data == buffer);
  CHECK(span.bytes == size);
  detail::WorkspaceCursor cursor(span, "test");
  CHECK(reinterpret_cast<std::byte*>(cursor.take<float>(3)) == buffer);
  CHECK(cursor.rest().data == buffer + kAlignment);  // regions are 64-byte aligned
  CHECK(cursor.rest().bytes == 3 * kAlignment);
  CHECK_NOTHROW(ws.reserve(size));  // already large enough
  CHECK_THROWS_WITH(ws.reserve(size + 1), Catch::Contains("cannot grow"));
  CHECK(Workspace::wrap(buffer, 64, MemorySpace::device).space() == MemorySpace::device);
  CHECK_THROWS_WITH(Workspace::wrap(nullptr, 64), Catch::Contains("argument 'data' is null"));
  CHECK_THROWS_WITH(Workspace::wrap(buffer + 1, 64), Catch::Contains("64-byte aligned"));
  CHECK_NOTHROW(Workspace::wrap(nullptr, 0));
  Workspace owned(100);
  CHECK(owned.owns_memory());
  owned.reserve(1000);
  CHECK(owned.bytes() == 1000);
}

TEST_CASE("errors derive from factorllm::error", "[core][errors]") {
  CHECK_THROWS_AS(throw shape_error("x"), error);
  CHECK_THROWS_AS(throw value_error("x"), error);
  CHECK_THROWS_AS(throw format_error("x"), error);
  CHECK_THROWS_AS(throw backend_error("x"), std::runtime_error);
  CHECK_THROWS_WITH(detail::require_shape(matrix_view<float const>(nullptr, 0, 3), {0, 4}, "fn", "arg"),
                    Catch::Contains("fn: argument 'arg' has shape [0, 3], expected [0, 4]"));
}

TEST_CASE("backend trait describes the scalar oracle", "[core][backend]") {
  STATIC_REQUIRE(is_backend_v<CpuScalar>);
  STATIC_REQUIRE(is_backend_v<Cuda<80>>);
  STATIC_REQUIRE_FALSE(is_backend_v<int>);
  CHECK(backend_traits<CpuScalar>::available());
  CHECK(std::string(backend_traits<CpuScalar>::name()) == "cpu_scalar");
  STATIC_REQUIRE_FALSE(backend_traits<CpuScalar>::is_device);
}

TEST_CASE("large tensors are 2 MiB aligned, zero-filled, and copy and move like small ones", "[core][tensor]") {
  // From kHugePageThreshold bytes the allocator aligns to 2 MiB (huge-page advice on Linux); below it, 64 bytes.
  std::ptrdiff_t const big = static_cast<std::ptrdiff_t>(kHugePageThreshold / sizeof(float)) + 17;
  Vector<float> v({big});
  REQUIRE(reinterpret_cast<std::uintptr_t>(v.data()) % kHugePageBytes == 0);
  for (std::ptrdiff_t i = 0; i < big; ++i) REQUIRE(v[i] == 0.0f);
  for (std::ptrdiff_t i = 0; i < big; ++i) v[i] = static_cast<float>(i % 1000);
  Vector<float> copy(v);
  REQUIRE(reinterpret_cast<std::uintptr_t>(copy.data()) % kHugePageBytes == 0);
  REQUIRE(std::memcmp(copy.data(), v.data(), sizeof(float) * static_cast<std::size_t>(big)) == 0);
  Vector<float> moved(std::move(copy));
  REQUIRE(moved[big - 1] == static_cast<float>((big - 1) % 1000));
  Vector<float> small({16});
  REQUIRE(reinterpret_cast<std::uintptr_t>(small.data()) % kAlignment == 0);
  Workspace ws(kHugePageThreshold);
  REQUIRE(reinterpret_cast<std::uintptr_t>(ws.data()) % kHugePageBytes == 0);
}

TEST_CASE("a view whose offsets fit ptrdiff_t in elements but not in bytes is refused", "[core][view]") {
  // Found by fuzz_api: row 1 at PTRDIFF_MAX / 2 floats is a valid ptrdiff_t element offset, but 4x that in bytes
  // wrapped around in slice_rows' pointer arithmetic (undefined behaviour, reported by UBSan).
  float storage[4] = {};
  std::ptrdiff_t const huge = std::numeric_limits<std::ptrdiff_t>::max() / 2;
  CHECK_THROWS_AS((TensorView<float, 2>(storage, {2, 1}, {huge, 1})), shape_error);
  CHECK_THROWS_AS((TensorView<float, 1>(storage, {huge})), shape_error);  // size() * sizeof(float) bytes
  CHECK_NOTHROW((TensorView<std::uint8_t, 2>(reinterpret_cast<std::uint8_t*>(storage), {2, 1}, {huge, 1})));
  // An empty view (0 columns) may have that row stride: its pointer is never offset.
  TensorView<float, 2> empty_rows(storage, {2, 0}, {huge, 1});
  CHECK(empty_rows.slice_rows(1, 2).data() == storage);
  CHECK(empty_rows.row(1) == storage);
  CHECK(empty_rows[1].data() == storage);
}
