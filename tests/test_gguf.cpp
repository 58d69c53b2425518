// SPDX-License-Identifier: Apache-2.0
// Tests of io/gguf.hpp: GGUF v3 writer/reader round trips and byte layout, and malformed files (every one must throw
// format_error, never crash).
#include <catch2/catch.hpp>

#include <factorllm/core/error.hpp>
#include <factorllm/core/quant.hpp>
#include <factorllm/core/tensor.hpp>
#include <factorllm/core/tensor_view.hpp>
#include <factorllm/io/gguf.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <filesystem>
#include <string>
#include <vector>

namespace {

namespace fl = factorllm;
namespace io = factorllm::io;
using io::GgmlType;
using io::GgufFile;
using io::GgufValueType;
using io::GgufWriter;
using Bytes = std::vector<unsigned char>;

/// Appends little-endian values, for hand-made files.
struct Raw {
  Bytes b;
  Raw& u32(std::uint32_t v) {
    for (int i = 0; i < 4; ++i) b.push_back(static_cast<unsigned char>(v >> (8 * i)));
    return *this;
  }
  Raw& u64(std::uint64_t v) {
    for (int i = 0; i < 8; ++i) b.push_back(static_cast<unsigned char>(v >> (8 * i)));
    return *this;
  }
  Raw& str(std::string const& s) {
    u64(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Raw& bytes(std::size_t n, unsigned char v = 0) {
    b.insert(b.end(), n, v);
    return *this;
  }
  Raw& pad(std::size_t a) {
    while (b.size() % a) b.push_back(0);
    return *this;
  }
};

/// A header: magic, version, counts.
Raw header(std::uint64_t n_tensors, std::uint64_t n_kv, std::uint32_t version = 3) {
  Raw r;
  r.b = {'G', 'G', 'U', 'F'};
  r.u32(version).u64(n_tensors).u64(n_kv);
  return r;
}

/// One F32 tensor info.
Raw& tensor_info(Raw& r, std::string const& name, std::vector<std::uint64_t> const& ne, std::uint32_t type,
                 std::uint64_t offset) {
  r.str(name).u32(static_cast<std::uint32_t>(ne.size()));
  for (auto e : ne) r.u64(e);
  return r.u32(type).u64(offset);
}

void require_format_error(Bytes const& bytes, std::string const& fragment) {
  INFO("expecting a format_error mentioning '" << fragment << "'");
  try {
    (void)GgufFile::parse(bytes.data(), bytes.size());
    FAIL("no exception");
  } catch (fl::format_error const& e) {
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(fragment) != std::string::npos);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Writer and reader
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("gguf: writer and reader round trip key-values and tensors", "[io][gguf]") {
  for (std::uint32_t const alignment : {32u, 64u}) {
    INFO("alignment " << alignment);
    GgufWriter w(alignment);
    w.set_string("general.architecture", "llama");
    w.set_u32("a.u32", 4000000000u);
    w.set_i32("a.i32", -7);
    w.set_u64("a.u64", std::uint64_t{1} << 40);
    w.set_f32("a.f32", 1e-5f);
    w.set_bool("a.bool", true);
    w.set_string_array("a.strings", {"", "x", "\xE2\x96\x81hi"});
    w.set_f32_array("a.floats", {0.5f, -1.f});
    w.set_i32_array("a.ints", {1, -2, 3});
    CHECK_THROWS_AS(w.set_u32("a.u32", 1), fl::value_error);
    std::vector<float> const v{1, 2, 3, 4, 5, 6};
    w.add_tensor("m", GgmlType::f32, {2, 3}, v.data());   // row-major [2, 3] -> ne {3, 2}
    w.add_tensor("h", GgmlType::f16, {6}, v.data());
    w.add_tensor("b", GgmlType::bf16, {1, 2, 3}, v.data());
    std::vector<float> m{0, 1, 2, 3, 4, 5, 6, 7};
    w.add_tensor("s", GgmlType::f32, fl::TensorView<float const, 2>(m.data(), {2, 2}, {4, 1}));  // strided view
    Bytes const bytes = w.serialize();
    auto const f = GgufFile::parse(bytes.data(), bytes.size());
    CHECK(f.version() == 3);
    CHECK(f.alignment() == alignment);
    REQUIRE(f.kvs().size() == 10);
    CHECK(f.kvs()[0].first == "general.alignment");  // always written, first
    CHECK(f.kvs()[1].first == "general.architecture");
    CHECK(f.get_string("general.architecture") == "llama");
    CHECK(f.get_int("a.u32") == 4000000000LL);
    CHECK(f.kv("a.u32").type == GgufValueType::u32);
    CHECK(f.get_int("a.i32") == -7);
    CHECK(f.get_int("a.u64") == (std::int64_t{1} << 40));
    CHECK(f.get_float("a.f32") == 1e-5f);
    CHECK(f.kv("a.bool").u == 1);
    CHECK(f.kv("a.strings").array_strings == std::vector<std::string>{"", "x", "\xE2\x96\x81hi"});
    CHECK(f.kv("a.floats").floats() == std::vector<double>{0.5, -1.0});
    CHECK(f.kv("a.ints").ints() == std::vector<std::int64_t>{1, -2, 3});
    CHECK_THROWS_AS(f.get_string("a.u32"), fl::format_error);
    CHECK_THROWS_AS(f.kv("missing"), fl::format_error);
    REQUIRE(f.tensors().size() == 4);
    CHECK(f.tensor("m").ne == std::vector<std::int64_t>{3, 2});
    CHECK(f.tensor("m").shape() == std::vector<std::int64_t>{2, 3});
    CHECK(f.tensor("b").ne == std::vector<std::int64_t>{3, 2, 1});
    CHECK(f.tensor("h").type == GgmlType::f16);
    CHECK(f.to_float("m") == v);
    CHECK(f.to_float("h") == v);
    CHECK(f.to_float("b") == v);
    CHECK(f.to_float("s") == std::vector<float>{0, 1, 4, 5});
    for (auto const& t : f.tensors()) CHECK(t.offset % alignment == 0);
  }
}

TEST_CASE("gguf: the byte layout follows the GGUF v3 specification", "[io][gguf]") {
  GgufWriter w;
  w.set_u32("k", 7);
  float const one = 1.f;
  w.add_tensor("t", GgmlType::f32, {1}, &one);
  Bytes const b = w.serialize();
  Raw want = header(1, 2);
  want.str("general.alignment").u32(4).u32(32);  // key, type u32 (4), value
  want.str("k").u32(4).u32(7);
  tensor_info(want, "t", {1}, 0, 0);  // name, n_dims 1, ne {1}, type F32 (0), offset 0
  want.pad(32);
  want.b.insert(want.b.end(), {0x00, 0x00, 0x80, 0x3f});  // 1.0f little-endian
  want.pad(32);
  CHECK(b == want.b);
}

TEST_CASE("gguf: Q8_0 and Q4_0 tensors round trip: blocks bit for bit, floats dequantized", "[io][gguf][quant]") {
  std::mt19937 rng(12);
  std::normal_distribution<float> normal(0.f, 0.3f);
  fl::Tensor<float, 3> x({2, 3, 64});
  for (std::ptrdiff_t i = 0; i < x.size(); ++i) x[i] = normal(rng);
  auto const q8 = fl::convert<fl::q8_0>(x.cview());  // [2, 3, 2] blocks
  auto const q4 = fl::convert<fl::q4_0>(x.cview());
  GgufWriter w;
  w.add_tensor("f8", GgmlType::q8_0, {2, 3, 64}, x.data());  // quantized by the writer from floats
  w.add_tensor("f4", GgmlType::q4_0, x.cview());             // from a float view
  w.add_tensor("b8", GgmlType::q8_0, q8.cview());            // blocks as they are
  w.add_tensor("b4", GgmlType::q4_0, q4.cview());
  w.add_tensor("x4", GgmlType::q4_0, q8.cview());            // q8_0 -> float -> q4_0
  w.add_tensor("h8", GgmlType::f16, q8.cview());             // dequantized, then F16 / BF16 / F32
  w.add_tensor("bf8", GgmlType::bf16, q8.cview());
  w.add_tensor("s8", GgmlType::f32, q8.cview());
  w.add_tensor("from_bf16", GgmlType::q8_0, fl::convert<fl::bf16>(x.cview()).cview());
  Bytes const bytes = w.serialize();
  auto const f = GgufFile::parse(bytes.data(), bytes.size());
  for (char const* name : {"f8", "b8"}) {
    INFO(name);
    auto const& t = f.tensor(name);
    CHECK(t.type == GgmlType::q8_0);
    CHECK(t.ne == std::vector<std::int64_t>{64, 3, 2});
    CHECK(t.bytes == 2 * 3 * 2 * 34);
    auto const blocks = f.to_blocks<fl::q8_0>(name);
    REQUIRE(blocks.size() == 12);
    CHECK(std::memcmp(blocks.data(), q8.data(), 12 * sizeof(fl::q8_0)) == 0);
  }
  for (char const* name : {"f4", "b4"}) {
    INFO(name);
    CHECK(f.tensor(name).type == GgmlType::q4_0);
    CHECK(f.tensor(name).bytes == 2 * 3 * 2 * 18);
    auto const blocks = f.to_blocks<fl::q4_0>(name);
    REQUIRE(blocks.size() == 12);
    CHECK(std::memcmp(blocks.data(), q4.data(), 12 * sizeof(fl::q4_0)) == 0);
  }
  auto const deq8 = fl::convert<float>(q8.cview()), deq4 = fl::convert<float>(q4.cview());
  std::vector<float> const f8 = f.to_float("f8"), f4 = f.to_float("f4"), s8 = f.to_float("s8");
  REQUIRE(f8.size() == 384);
  for (std::size_t k = 0; k < 384; ++k) {
    INFO("weight " << k);
    REQUIRE(f8[k] == deq8[static_cast<std::ptrdiff_t>(k)]);  // exact dequantization
    REQUIRE(s8[k] == deq8[static_cast<std::ptrdiff_t>(k)]);
    REQUIRE(f4[k] == deq4[static_cast<std::ptrdiff_t>(k)]);
  }
  auto const x4 = f.to_blocks<fl::q4_0>("x4");
  auto const want_x4 = fl::convert<fl::q4_0>(deq8.cview());
  CHECK(std::memcmp(x4.data(), want_x4.data(), 12 * sizeof(fl::q4_0)) == 0);
  auto const h8 = f.to_float("h8"), bf8 = f.to_float("bf8");
  for (std::size_t k = 0; k < 384; ++k) {
    CHECK(h8[k] == fl::f16(deq8[static_cast<std::ptrdiff_t>(k)]).to_float());
    CHECK(bf8[k] == fl::bf16(deq8[static_cast<std::ptrdiff_t>(k)]).to_float());
  }
  auto const from_bf16 = f.to_blocks<fl::q8_0>("from_bf16");
  auto const want_bf16 = fl::convert<fl::q8_0>(fl::convert<float>(fl::convert<fl::bf16>(x.cview()).cview()).cview());
  CHECK(std::memcmp(from_bf16.data(), want_bf16.data(), 12 * sizeof(fl::q8_0)) == 0);
  CHECK_THROWS_WITH(f.to_blocks<fl::q4_0>("f8"), Catch::Contains("has type Q8_0, expected Q4_0"));
  CHECK_THROWS_WITH(f.to_blocks<fl::q8_0>("h8"), Catch::Contains("has type F16, expected Q8_0"));
  CHECK(std::string(io::to_string(GgmlType::q8_0)) == "Q8_0");
  CHECK(io::ggml_type_bytes(8) == 34);
  CHECK(io::ggml_type_bytes(2) == 18);
  CHECK(io::ggml_block_weights(GgmlType::q4_0) == 32);
  CHECK(io::ggml_block_weights(GgmlType::bf16) == 1);
}

TEST_CASE("gguf: a Q8_0 and a Q4_0 block's bytes follow ggml's layout", "[io][gguf][quant]") {
  // q8_0 of x_i = i - 16 (amax 16): d = 16 / 127 = 0.12598425 -> f16 0x3008 (2^-3 * (1 + 8.06 / 1024) -> mantissa 8;
  // exponent 12). id = float(1 / d) = 7.9375 exactly, so q_i = roundf(7.9375 (i - 16)): -16 -> -127, -15 ->
  // -119.0625 -> -119, 1 -> 7.9375 -> 8, 15 -> 119.0625 -> 119.
  std::vector<float> x(32);
  for (int i = 0; i < 32; ++i) x[static_cast<std::size_t>(i)] = static_cast<float>(i - 16);
  GgufWriter w;
  w.add_tensor("q", GgmlType::q8_0, {32}, x.data());
  w.add_tensor("p", GgmlType::q4_0, {32}, x.data());
  Bytes const b = w.serialize();
  auto const f = GgufFile::parse(b.data(), b.size());
  // The data section is the file's last 96 bytes: "q" (34 bytes, padded to 64), then "p" (18, padded to 32).
  std::size_t const data_start = b.size() - 96;
  CHECK(f.tensor("q").offset == 0);
  CHECK(f.tensor("p").offset == 64);
  unsigned char const* q8 = b.data() + data_start;
  CHECK(q8[0] == 0x08);  // f16 0x3008, little-endian
  CHECK(q8[1] == 0x30);
  CHECK(static_cast<std::int8_t>(q8[2 + 0]) == -127);
  CHECK(static_cast<std::int8_t>(q8[2 + 1]) == -119);
  CHECK(static_cast<std::int8_t>(q8[2 + 16]) == 0);
  CHECK(static_cast<std::int8_t>(q8[2 + 17]) == 8);
  CHECK(static_cast<std::int8_t>(q8[2 + 31]) == 119);
  // q4_0 of the same x: m = -16 (x[0], the first of the largest magnitude) -> d = 2 (0x4000), id = 0.5,
  // code = min(15, trunc(x / 2 + 8.5)): x_j = j - 16 -> low nibbles trunc(j / 2 + 0.5) = 0 1 1 2 2 3 3 4 4 5 5 6 6 7 7 8,
  // x_{j+16} = j -> high nibbles trunc(j / 2 + 8.5) = 8 9 9 10 10 11 11 12 12 13 13 14 14 15 15 15 (16 clamps).
  unsigned char const* q4 = b.data() + data_start + 64;
  CHECK(q4[0] == 0x00);
  CHECK(q4[1] == 0x40);
  unsigned char const want[16] = {0x80, 0x91, 0x91, 0xA2, 0xA2, 0xB3, 0xB3, 0xC4,
                                  0xC4, 0xD5, 0xD5, 0xE6, 0xE6, 0xF7, 0xF7, 0xF8};
  for (int j = 0; j < 16; ++j) {
    INFO("byte " << j);
    CHECK(q4[2 + j] == want[j]);
  }
}

TEST_CASE("gguf: the writer refuses bad names, shapes, types and alignments", "[io][gguf]") {
  CHECK_THROWS_AS(GgufWriter(24), fl::value_error);
  CHECK_THROWS_AS(GgufWriter(4), fl::value_error);
  GgufWriter w;
  float const x[4] = {0, 0, 0, 0};
  w.add_tensor("a", GgmlType::f32, {1}, x);
  CHECK_THROWS_AS(w.add_tensor("a", GgmlType::f32, {1}, x), fl::value_error);
  CHECK_THROWS_AS(w.add_tensor("", GgmlType::f32, {1}, x), fl::value_error);
  CHECK_THROWS_AS(w.add_tensor(std::string(64, 'n'), GgmlType::f32, {1}, x), fl::value_error);
  CHECK_THROWS_AS(w.add_tensor("r0", GgmlType::f32, {}, x), fl::value_error);
  CHECK_THROWS_AS(w.add_tensor("r5", GgmlType::f32, {1, 1, 1, 1, 1}, x), fl::value_error);
  CHECK_THROWS_AS(w.add_tensor("zero", GgmlType::f32, {0}, x), fl::value_error);
  CHECK_THROWS_AS(w.add_tensor("int", GgmlType::i32, {1}, x), fl::value_error);
  std::vector<float> rows(96, 0.5f);
  CHECK_THROWS_WITH(w.add_tensor("q48", GgmlType::q8_0, {2, 48}, rows.data()),
                    Catch::Contains("tensor 'q48' of type Q8_0 has rows of 48 weights, expected a multiple of 32"));
  rows[70] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(w.add_tensor("qnan", GgmlType::q4_0, {3, 32}, rows.data()),
                    Catch::Contains("tensor 'qnan'") && Catch::Contains("index 70"));
  CHECK(w.serialize().size() > 0);  // the refused tensors were not added
  CHECK_NOTHROW(w.add_tensor("qnan", GgmlType::q4_0, {2, 32}, rows.data()));
  CHECK_THROWS_AS(w.set_u32("general.alignment", 64), fl::value_error);  // already set by the constructor
  CHECK_THROWS_AS(w.set_u32("", 1), fl::value_error);
}

// ---------------------------------------------------------------------------------------------------------------
// Malformed files
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("gguf: malformed files throw format_error naming the problem", "[io][gguf][malformed]") {
  require_format_error({}, "truncated: magic");
  require_format_error({'G', 'G', 'U', 'X', 3, 0, 0, 0}, "bad magic");
  require_format_error(header(0, 0, 1).b, "version 1 is not supported");
  require_format_error(header(0, 0, 4).b, "version 4 is not supported");
  require_format_error(header(0, 1000).b, "key-value count 1000 cannot fit");
  require_format_error(header(std::uint64_t{1} << 62, 0).b, "tensor count");
  {
    Raw r = header(0, 1);
    r.u64(1000).bytes(20);  // key length beyond the file
    require_format_error(r.b, "truncated: key needs 1000 bytes");
  }
  {
    Raw r = header(0, 1);
    r.str("k").u32(13).u32(0);
    require_format_error(r.b, "unknown value type 13");
  }
  {
    Raw r = header(0, 1);
    r.str("k").u32(9).u32(9).u64(0);
    require_format_error(r.b, "array of arrays");
  }
  {
    Raw r = header(0, 1);
    r.str("k").u32(9).u32(4).u64(std::uint64_t{1} << 61).bytes(8);  // 2^61 u32 elements
    require_format_error(r.b, "more than the bytes left");
  }
  {
    Raw r = header(0, 1);
    r.str("k").u32(9).u32(8).u64(1000).bytes(16);  // 1000 strings in 16 bytes
    require_format_error(r.b, "more than the bytes left");
  }
  {
    Raw r = header(0, 1);
    r.str("k").u32(7).bytes(1, 2);
    require_format_error(r.b, "bool value 2");
  }
  {
    Raw r = header(0, 2);
    r.str("k").u32(4).u32(1).str("k").u32(4).u32(2);
    require_format_error(r.b, "key 'k' appears twice");
  }
  {
    Raw r = header(0, 1);
    r.str("general.alignment").u32(4).u32(48);
    require_format_error(r.b, "not a power of two");
  }
  {
    Raw r = header(0, 1);
    r.str("general.alignment").u32(10).u64(32);
    require_format_error(r.b, "general.alignment is not a u32");
  }
  auto one_tensor = [](std::vector<std::uint64_t> const& ne, std::uint32_t type, std::uint64_t offset,
                       std::size_t data_bytes, std::string const& name = "t") {
    Raw r = header(1, 0);
    tensor_info(r, name, ne, type, offset);
    r.pad(32).bytes(data_bytes);
    return r.b;
  };
  CHECK_NOTHROW(GgufFile::parse(one_tensor({4}, 0, 0, 16).data(), one_tensor({4}, 0, 0, 16).size()));
  require_format_error(one_tensor({}, 0, 0, 16), "0 dimensions");
  require_format_error(one_tensor({1, 1, 1, 1, 1}, 0, 0, 16), "5 dimensions");
  require_format_error(one_tensor({std::uint64_t{1} << 63}, 0, 0, 16), "exceeds the int64 range");
  require_format_error(one_tensor({std::uint64_t{1} << 40, std::uint64_t{1} << 40}, 0, 0, 16), "overflows 64 bits");
  require_format_error(one_tensor({std::uint64_t{1} << 62}, 0, 0, 16), "byte size overflows");
  require_format_error(one_tensor({4}, 3, 0, 16), "ggml type 3");  // Q4_1: not supported here
  // Block types: ne[0] a multiple of 32; bytes = ne[0] / 32 blocks per row (18 for Q4_0, 34 for Q8_0).
  CHECK_NOTHROW(GgufFile::parse(one_tensor({64, 3}, 2, 0, 108).data(), one_tensor({64, 3}, 2, 0, 108).size()));
  CHECK_NOTHROW(GgufFile::parse(one_tensor({32, 2}, 8, 0, 68).data(), one_tensor({32, 2}, 8, 0, 68).size()));
  require_format_error(one_tensor({4}, 2, 0, 16), "Q4_0 with ne[0] = 4, not a multiple of its 32-weight block");
  require_format_error(one_tensor({48, 2}, 8, 0, 128), "Q8_0 with ne[0] = 48");
  require_format_error(one_tensor({64, 3}, 2, 0, 107), "with 108 bytes runs past the data section");
  require_format_error(one_tensor({32, 2}, 8, 0, 67), "with 68 bytes runs past the data section");
  require_format_error(one_tensor({(std::uint64_t{1} << 63) - 32}, 8, 0, 16), "byte size overflows");  // 2^58 - 1 blocks x 34
  {
    // An integer tensor is refused by to_float even with no elements (fuzz_gguf found it returned an empty vector).
    Bytes const empty_int = one_tensor({0, 4}, 26, 0, 16);
    auto const f = GgufFile::parse(empty_int.data(), empty_int.size());
    CHECK_THROWS_WITH(f.to_float("t"), Catch::Contains("has type I32, expected a floating type"));
    Bytes const empty_q8 = one_tensor({0, 4}, 8, 0, 16);
    CHECK(GgufFile::parse(empty_q8.data(), empty_q8.size()).to_float("t").empty());
  }
  require_format_error(one_tensor({4}, 0, 8, 48), "not a multiple of the alignment");
  require_format_error(one_tensor({4}, 0, 32, 16), "runs past the data section");
  require_format_error(one_tensor({8}, 0, 0, 16), "runs past the data section");
  require_format_error(one_tensor({4}, 0, 0, 16, std::string(64, 'x')), "expected 1..63");
  require_format_error(one_tensor({4}, 0, 0, 16, ""), "expected 1..63");
  {
    Raw r = header(2, 0);
    tensor_info(r, "a", {8}, 0, 0);
    tensor_info(r, "b", {4}, 0, 0);
    r.pad(32).bytes(64);
    require_format_error(r.b, "overlaps 'a'");
  }
  {
    Raw r = header(2, 0);
    tensor_info(r, "a", {4}, 0, 0);
    tensor_info(r, "a", {4}, 0, 32);
    r.pad(32).bytes(64);
    require_format_error(r.b, "tensor 'a' appears twice");
  }
  {
    Raw r = header(1, 0);
    tensor_info(r, "a", {4}, 0, 0);  // no padding, no data: the data section would start past the end
    require_format_error(r.b, "past the end");
  }
}

TEST_CASE("gguf: every truncation and every single-byte corruption is refused cleanly", "[io][gguf][malformed]") {
  GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.set_string_array("tokenizer.ggml.tokens", {"a", "bc"});
  w.set_f32_array("tokenizer.ggml.scores", {0.f, -1.f});
  std::vector<float> const v{1, 2, 3, 4, 5, 6};
  w.add_tensor("x", GgmlType::f32, {2, 3}, v.data());
  w.add_tensor("y", GgmlType::f16, {3}, v.data());
  std::vector<float> const blocks(64, -0.75f);
  w.add_tensor("q", GgmlType::q8_0, {2, 32}, blocks.data());
  w.add_tensor("p", GgmlType::q4_0, {32}, blocks.data());
  Bytes const good = w.serialize();
  for (std::size_t n = 0; n < good.size(); ++n) {
    // A prefix that ends inside the trailing padding of the last tensor is still a complete, valid file.
    try {
      auto const f = GgufFile::parse(good.data(), n);
      CHECK(f.to_float("y").size() == 3);
    } catch (fl::format_error const&) {
    }
  }
  for (std::size_t i = 0; i < good.size(); ++i) {
    for (unsigned char const b : {0x00, 0x01, 0x09, 0x7f, 0xff}) {
      Bytes bad = good;
      bad[i] = b;
      try {
        auto const f = GgufFile::parse(bad.data(), bad.size());
        for (auto const& t : f.tensors()) (void)f.to_float(t.name);
      } catch (fl::format_error const&) {
      }
    }
  }
  CHECK_THROWS_AS(GgufFile::parse(good.data(), 23), fl::format_error);
  CHECK_THROWS_AS(GgufFile::load((std::filesystem::temp_directory_path() / "factorllm_no_such.gguf").string()),
                  fl::format_error);
}
