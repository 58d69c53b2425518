// SPDX-License-Identifier: Apache-2.0
// Tests of io/safetensors.hpp: F16 conversion, safetensors round trips, and malformed files (every one must throw
// format_error, never crash).
#include <catch2/catch.hpp>

#include <factorllm/core/error.hpp>
#include <factorllm/core/tensor_view.hpp>
#include <factorllm/io/safetensors.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "reference/io_fixtures.hpp"

namespace {

namespace fl = factorllm;
namespace io = factorllm::io;
using io::SafetensorsDtype;
using io::SafetensorsFile;
using io::SafetensorsWriter;
using Bytes = std::vector<unsigned char>;
using fixture::temp_path;

/// A safetensors file from a header text and a data section; `declared` overrides the header length field.
Bytes make_file(std::string const& header, Bytes const& data = {}, std::optional<std::uint64_t> declared = {}) {
  // push_back rather than insert: GCC 12 reports a false -Warray-bounds on vector::insert of a string range.
  Bytes out;
  out.reserve(8 + header.size() + data.size());
  std::uint64_t const n = declared ? *declared : header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<unsigned char>(n >> (8 * i)));
  for (char const c : header) out.push_back(static_cast<unsigned char>(c));
  for (unsigned char const b : data) out.push_back(b);
  return out;
}

/// Requires that parsing `bytes` throws format_error whose message contains `fragment`.
void require_format_error(Bytes const& bytes, std::string const& fragment) {
  INFO("expecting a format_error mentioning '" << fragment << "'");
  try {
    (void)SafetensorsFile::parse(bytes.data(), bytes.size());
    FAIL("no exception");
  } catch (fl::format_error const& e) {
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(fragment) != std::string::npos);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// F16 conversion
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("float16: every half converts to float and back unchanged", "[io][f16]") {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    float const f = io::detail::half_to_float(static_cast<std::uint16_t>(h));
    if (std::isnan(f)) {
      CHECK((io::detail::float_to_half(f) & 0x7c00u) == 0x7c00u);
      CHECK((io::detail::float_to_half(f) & 0x03ffu) != 0);
      continue;
    }
    INFO("half bits " << h);
    REQUIRE(io::detail::float_to_half(f) == h);
  }
}

TEST_CASE("float16: rounding is to nearest, ties to even, overflow and underflow as IEEE", "[io][f16]") {
  auto const h = [](float f) { return io::detail::float_to_half(f); };
  CHECK(h(1.0f) == 0x3c00);
  CHECK(h(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);       // tie between 1 and 1+2^-10: even (1)
  CHECK(h(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);   // tie between 1+2^-10 and 1+2^-9: even (1+2^-9)
  CHECK(h(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)) == 0x3c01);  // just above the tie
  CHECK(h(65504.f) == 0x7bff);
  CHECK(h(65519.f) == 0x7bff);
  CHECK(h(65520.f) == 0x7c00);                            // halfway to 65536 rounds to even: infinity
  CHECK(h(-1e30f) == 0xfc00);
  CHECK(h(std::ldexp(1.0f, -24)) == 0x0001);              // smallest subnormal
  CHECK(h(std::ldexp(1.0f, -25)) == 0x0000);              // tie between 0 and 2^-24: even (0)
  CHECK(h(3 * std::ldexp(1.0f, -25)) == 0x0002);          // tie between 2^-24 and 2^-23: even
  CHECK(h(std::ldexp(1.0f, -14) - std::ldexp(1.0f, -30)) == 0x0400);  // rounds up into the smallest normal
  CHECK(h(-0.0f) == 0x8000);
  CHECK(io::detail::half_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(io::detail::half_to_float(0x03ff) == std::ldexp(1023.0f, -24));
  CHECK(std::isinf(io::detail::half_to_float(0x7c00)));
}

// ---------------------------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("safetensors: writer and reader round trip every dtype, metadata and edge shapes", "[io][safetensors]") {
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  w.set_metadata("note", "unicode \xE2\x96\x81 ok");
  std::vector<float> const a{1.5f, -2.25f, 3.f, 0.f, -0.f, 61440.f};  // all exact in F16 and BF16
  w.add("f32", SafetensorsDtype::f32, {2, 3}, a.data());
  w.add("f16", SafetensorsDtype::f16, {3, 2}, a.data());
  w.add("bf16", SafetensorsDtype::bf16, {6}, a.data());
  w.add("f64", SafetensorsDtype::f64, {1, 6}, a.data());
  std::vector<std::int64_t> const ints{-3, 0, 7, 2147483647};
  w.add_int("i32", SafetensorsDtype::i32, {4}, ints.data());
  w.add_int("i64", SafetensorsDtype::i64, {2, 2}, ints.data());
  float const scalar = 42.f;
  w.add("scalar", SafetensorsDtype::f32, {}, &scalar);           // rank 0: one element
  w.add("empty", SafetensorsDtype::f32, {0, 5}, nullptr);        // zero elements, zero bytes
  // A strided view: every other column of a 3x4 matrix.
  std::vector<float> m{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  fl::TensorView<float const, 2> strided(m.data(), {3, 2}, {4, 1});
  w.add("strided", SafetensorsDtype::f32, strided);

  Bytes const bytes = w.serialize();
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[static_cast<std::size_t>(i)];
  CHECK((8 + n) % 8 == 0);  // the data section is 8-byte aligned

  auto const f = SafetensorsFile::parse(bytes.data(), bytes.size());
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("note") == "unicode \xE2\x96\x81 ok");
  CHECK(f.tensors().size() == 9);
  CHECK(f.to_float("f32") == a);
  CHECK(f.to_float("f16") == a);  // every value is exact in F16 and BF16
  CHECK(f.to_float("bf16") == a);
  CHECK(f.to_float("f64") == a);
  CHECK(f.info("f16").shape == std::vector<std::int64_t>{3, 2});
  CHECK(f.info("f16").dtype == SafetensorsDtype::f16);
  CHECK(f.to_int64("i32") == ints);
  CHECK(f.to_int64("i64") == ints);
  CHECK(f.to_float("scalar") == std::vector<float>{42.f});
  CHECK(f.info("scalar").shape.empty());
  CHECK(f.to_float("empty").empty());
  CHECK(f.to_float("strided") == std::vector<float>{0, 1, 4, 5, 8, 9});
  auto const t = f.read_float<2>("f32", {2, 3});
  CHECK(t(1, 2) == 61440.f);
  CHECK_THROWS_AS(f.read_float<2>("f32", {3, 2}), fl::format_error);   // shape mismatch
  CHECK_THROWS_AS(f.to_float("i32"), fl::format_error);                // not a floating type
  CHECK_THROWS_AS(f.to_int64("f32"), fl::format_error);                // not an integer type
  CHECK_THROWS_AS(f.to_int64("empty"), fl::format_error);              // not an integer type, even with no elements
  CHECK_THROWS_AS(f.info("missing"), fl::format_error);
  CHECK(f.find("missing") == nullptr);

  std::string const path = temp_path("roundtrip.safetensors");
  w.save(path);
  auto const g = SafetensorsFile::load(path);
  CHECK(g.to_float("f16") == a);
  CHECK_FALSE(std::filesystem::exists(path + ".partial"));
  std::filesystem::remove(path);
}

TEST_CASE("safetensors: the writer refuses bad names, shapes, dtypes and values", "[io][safetensors]") {
  SafetensorsWriter w;
  float const x = 1.f;
  std::int64_t const big = std::int64_t{1} << 40;
  w.add("a", SafetensorsDtype::f32, {1}, &x);
  CHECK_THROWS_AS(w.add("a", SafetensorsDtype::f32, {1}, &x), fl::value_error);
  CHECK_THROWS_AS(w.add("", SafetensorsDtype::f32, {1}, &x), fl::value_error);
  CHECK_THROWS_AS(w.add("__metadata__", SafetensorsDtype::f32, {1}, &x), fl::value_error);
  CHECK_THROWS_AS(w.add("neg", SafetensorsDtype::f32, {-1}, &x), fl::value_error);
  CHECK_THROWS_AS(w.add("huge", SafetensorsDtype::f32, {big, big}, &x), fl::value_error);
  CHECK_THROWS_AS(w.add("u8", SafetensorsDtype::u8, {1}, &x), fl::value_error);
  CHECK_THROWS_AS(w.add_int("i32", SafetensorsDtype::i32, {1}, &big), fl::value_error);
  w.add("bad\xff", SafetensorsDtype::f32, {1}, &x);
  CHECK_THROWS_AS(w.serialize(), fl::value_error);  // JSON needs UTF-8
}

// ---------------------------------------------------------------------------------------------------------------
// Malformed files: format_error, never a crash
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("safetensors: malformed files throw format_error naming the problem", "[io][safetensors][malformed]") {
  Bytes const four(4, 0);
  std::string const ok_entry = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  Bytes const eight(8, 0);
  require_format_error({}, "shorter than the 8-byte header length");
  require_format_error({1, 2, 3}, "shorter than the 8-byte header length");
  require_format_error(make_file("{}", {}, 100), "exceeds the 2 bytes");                       // lying length
  require_format_error(make_file("{}", {}, std::uint64_t{1} << 63), "exceeds");                // absurd length
  require_format_error(make_file("{}", {}, 0), "cannot hold a JSON object");
  require_format_error(make_file("{\"t\":"), "not valid JSON");
  require_format_error(make_file("{,}"), "not valid JSON");
  require_format_error(make_file("[1,2]"), "not a JSON object");
  require_format_error(make_file("{\"t\":\"\xff\"}"), "not valid JSON");                       // invalid UTF-8
  require_format_error(make_file("{" + ok_entry + "," + ok_entry + "}", eight), "repeats the key 't'");
  require_format_error(make_file(std::string(40, '[') + std::string(40, ']')), "nests JSON 40 levels");
  require_format_error(make_file(R"({"__metadata__":{"a":1}})"), "is not a string");
  require_format_error(make_file(R"({"__metadata__":[]})"), "__metadata__ is not an object");
  require_format_error(make_file(R"({"t":5})"), "is not an object");
  require_format_error(make_file(R"({"t":{"dtype":"F32","shape":[2]}})", eight), "lacks one of the fields");
  require_format_error(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", eight),
                       "unknown field 'x'");
  require_format_error(make_file(R"({"t":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}})", eight), "unknown dtype");
  require_format_error(make_file(R"({"t":{"dtype":7,"shape":[2],"data_offsets":[0,8]}})", eight), "unknown dtype");
  require_format_error(make_file(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight),
                       "expected a non-negative integer");
  require_format_error(make_file(R"({"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", eight),
                       "expected a non-negative integer");
  require_format_error(make_file(R"({"t":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", eight),
                       "shape that is not an array");
  require_format_error(
      make_file(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", eight),
      "overflows 64 bits");
  require_format_error(
      make_file(R"({"t":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,8]}})", eight),
      "below 2^63");
  require_format_error(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", eight),
                       "needs data_offsets [begin, end]");
  require_format_error(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", eight), "begin > end");
  require_format_error(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", eight),
                       "beyond the data section");
  require_format_error(make_file(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight),
                       "needs 12");  // dtype x shape disagrees with the offsets
  require_format_error(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                 R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                 eight),
                       "overlaps");
  require_format_error(make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight),
                       "belong to no tensor");
  require_format_error(make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", eight),
                       "trailing bytes");
  require_format_error(make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", four, 200),
                       "header length 200");
  // Files that are fine apart from the above: the parser accepts them.
  CHECK_NOTHROW(SafetensorsFile::parse(make_file("{" + ok_entry + "}  ", eight).data(), 8 + ok_entry.size() + 4 + 8));
  CHECK_NOTHROW(SafetensorsFile::parse(make_file("{}").data(), 10));
}

TEST_CASE("safetensors: every truncation and every single-byte corruption is refused cleanly", "[io][safetensors][malformed]") {
  SafetensorsWriter w;
  std::vector<float> const a{1, 2, 3, 4, 5, 6};
  w.add("x", SafetensorsDtype::f32, {2, 3}, a.data());
  w.add("y", SafetensorsDtype::bf16, {3}, a.data());
  w.set_metadata("k", "v");
  Bytes const good = w.serialize();
  for (std::size_t n = 0; n < good.size(); ++n) {
    INFO("prefix of " << n << " bytes");
    CHECK_THROWS_AS(SafetensorsFile::parse(good.data(), n), fl::format_error);
  }
  // Every byte of the length field and header replaced by a few hostile values: either a valid file or a
  // format_error (any other exception, or a crash under the sanitizers, fails the test).
  std::uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = (header << 8) | good[static_cast<std::size_t>(i)];
  for (std::size_t i = 0; i < 8 + header; ++i) {
    for (unsigned char const b : {0x00, 0x22, 0x5b, 0x7d, 0x39, 0xff}) {
      Bytes bad = good;
      bad[i] = b;
      try {
        (void)SafetensorsFile::parse(bad.data(), bad.size());
      } catch (fl::format_error const&) {
      }
    }
  }
}

TEST_CASE("safetensors: load() refuses missing files and directories", "[io][safetensors][malformed]") {
  CHECK_THROWS_AS(SafetensorsFile::load(temp_path("does_not_exist.safetensors")), fl::format_error);
  CHECK_THROWS_AS(SafetensorsFile::load(std::filesystem::temp_directory_path().string()), fl::format_error);
  std::string const path = temp_path("truncated.safetensors");
  Bytes const bytes = make_file("{}", {}, 1000);
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<char const*>(bytes.data()),
                                              static_cast<std::streamsize>(bytes.size()));
  CHECK_THROWS_WITH(SafetensorsFile::load(path), Catch::Contains("header length 1000"));
  std::filesystem::remove(path);
}
