// SPDX-License-Identifier: Apache-2.0
// Tests of io/safetensors.hpp: F16 conversion, safetensors round trips, malformed files (every one must throw
// format_error, never crash), factorized-model save/load, and the Mixtral export (names, shapes, config, refusals,
// and an independent Hugging Face-layout forward over the exported tensors that must match our engine).
#include <catch2/catch.hpp>

#include <factorllm/core/error.hpp>
#include <factorllm/ffn/factorize.hpp>
#include <factorllm/ffn/permutation.hpp>
#include <factorllm/io/llama2c.hpp>
#include <factorllm/io/safetensors.hpp>
#include <factorllm/moe/gating.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/moe/router.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../examples/common/llama2c_engine.hpp"
#include "reference/llama_reference.hpp"
#include "reference/shared_data.hpp"

namespace {

namespace fl = factorllm;
namespace io = factorllm::io;
using io::SafetensorsDtype;
using io::SafetensorsFile;
using io::SafetensorsWriter;
using Bytes = std::vector<unsigned char>;

std::string const kModelPath = std::string(FACTORLLM_SHARED_DIR) + "/models/stories260K.bin";

bool have_model() { return fixture::have_shared_data({kModelPath}); }

std::string temp_path(std::string const& name) {
  return (std::filesystem::temp_directory_path() / ("factorllm_test_st_" + name)).string();
}

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

/// A MoE layer with integer-valued weights in [-8, 8] (exact in F16 and BF16) and a chosen gating.
fl::moe::MoeFfn<float, fl::CpuScalar> small_layer(std::uint64_t seed, std::ptrdiff_t d, std::ptrdiff_t d_ff,
                                                  std::ptrdiff_t n, fl::moe::Gating g, bool router_bias) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> v(-8, 8);
  fl::Matrix<float> gate({d_ff, d}), up({d_ff, d}), down({d, d_ff});
  for (auto* m : {&gate, &up, &down})
    for (std::ptrdiff_t i = 0; i < m->size(); ++i) (*m)[i] = static_cast<float>(v(rng)) / 8.f;
  fl::ffn::DenseFfnView<float> dense{gate.cview(), up.cview(), down.cview()};
  auto experts = fl::ffn::factorize(dense, fl::ffn::ExpertPartition::random(d_ff, n, seed));
  fl::Matrix<float> rw({n, d});
  fl::Vector<float> rb({n});
  for (std::ptrdiff_t i = 0; i < rw.size(); ++i) rw[i] = static_cast<float>(v(rng)) * 0.1f;
  if (router_bias)
    for (std::ptrdiff_t i = 0; i < n; ++i) rb[i] = static_cast<float>(v(rng)) * 0.25f;
  return fl::moe::MoeFfn<float, fl::CpuScalar>(std::move(experts), fl::moe::Router<float>(std::move(rw), std::move(rb)),
                                               std::move(g));
}

fl::moe::Gating gating(fl::moe::CombineMode mode, std::ptrdiff_t k) {
  fl::moe::Gating g;
  g.mode = mode;
  g.top_k = k;
  return g;
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

TEST_CASE("float16: rounding is to nearest, ties to even; overflow and underflow as IEEE", "[io][f16]") {
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

// ---------------------------------------------------------------------------------------------------------------
// Factorized models
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("factorized model: save and load restore permutation, experts, routers and gating exactly", "[io][factorized]") {
  using fl::moe::CombineMode;
  std::vector<fl::moe::MoeFfn<float, fl::CpuScalar>> layers;
  layers.push_back(small_layer(1, 8, 12, 4, gating(CombineMode::softmax_topk_renorm, 2), false));
  auto g = gating(CombineMode::sigmoid_topk, 3);
  g.sigmoid_renormalize = true;
  g.selection_bias = {0.5f, -0.25f, 0.f, 1.f};
  g.output_scale = 0.1f;  // not exact in binary: the text form must still round-trip the bits
  layers.push_back(small_layer(2, 8, 12, 4, g, true));
  layers.push_back(small_layer(3, 8, 12, 3, gating(CombineMode::code_ref, 1), true));

  for (auto const dtype : {SafetensorsDtype::f32, SafetensorsDtype::f16, SafetensorsDtype::bf16}) {
    INFO("expert dtype " << io::to_string(dtype));
    io::FactorizedSaveOptions opts;
    opts.expert_dtype = dtype;
    opts.metadata["source_model"] = "unit test";
    Bytes const bytes = io::factorized_tensors(layers, opts).serialize();
    auto const file = SafetensorsFile::parse(bytes.data(), bytes.size());
    CHECK(file.metadata().at("source_model") == "unit test");
    CHECK(file.metadata().at("layers.1.combine_mode") == "sigmoid_topk");
    CHECK(file.info("layers.0.ffn.experts.gate").dtype == dtype);
    CHECK(file.info("layers.0.ffn.router.weight").dtype == SafetensorsDtype::f32);
    auto const back = io::load_factorized(file);
    REQUIRE(back.size() == layers.size());
    for (std::size_t l = 0; l < layers.size(); ++l) {
      auto const& a = layers[l];
      auto const& b = back[l];
      CHECK(b.experts().partition().permutation() == a.experts().partition().permutation());
      CHECK(b.n_experts() == a.n_experts());
      CHECK(b.top_k() == a.top_k());
      CHECK(b.gating().mode == a.gating().mode);
      CHECK(b.gating().sigmoid_renormalize == a.gating().sigmoid_renormalize);
      CHECK(b.gating().selection_bias == a.gating().selection_bias);
      CHECK(b.gating().output_scale == a.gating().output_scale);
      auto same = [](auto const& x, auto const& y) { return std::equal(x.data(), x.data() + x.size(), y.data()); };
      CHECK(same(b.experts().gate_tensor(), a.experts().gate_tensor()));  // integer/8 values: exact in every dtype
      CHECK(same(b.experts().up_tensor(), a.experts().up_tensor()));
      CHECK(same(b.experts().down_tensor(), a.experts().down_tensor()));
      CHECK(std::equal(b.router().weight().data(), b.router().weight().data() + b.router().weight().size(),
                       a.router().weight().data()));
      CHECK(std::equal(b.router().bias().data(), b.router().bias().data() + b.router().bias().size(),
                       a.router().bias().data()));
      // And the rebuilt layer computes the same outputs.
      fl::Matrix<float> x({5, 8}), ya({5, 8}), yb({5, 8});
      for (std::ptrdiff_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7) % 11) / 4.f - 1.f;
      a.forward(x.cview(), ya.view());
      b.forward(x.cview(), yb.view());
      CHECK(std::equal(ya.data(), ya.data() + ya.size(), yb.data()));
    }
  }
  std::string const path = temp_path("factorized.safetensors");
  io::save_factorized(path, layers);
  CHECK(io::load_factorized(path).size() == 3);
  std::filesystem::remove(path);

  io::FactorizedSaveOptions reserved;
  reserved.metadata["n_layers"] = "9";
  CHECK_THROWS_AS(io::factorized_tensors(layers, reserved), fl::value_error);
  CHECK_THROWS_AS(io::factorized_tensors(std::vector<fl::moe::MoeFfn<float, fl::CpuScalar>>{}), fl::value_error);
}

TEST_CASE("factorized model: inconsistent files are refused with format_error", "[io][factorized][malformed]") {
  std::vector<fl::moe::MoeFfn<float, fl::CpuScalar>> layers;
  layers.push_back(small_layer(5, 4, 8, 2, gating(fl::moe::CombineMode::softmax_topk_renorm, 1), false));
  // Rebuilds the file with one metadata entry changed, or one tensor replaced.
  auto variant = [&](std::string const& key, std::string const& value, std::string const& drop = "",
                     std::vector<float> const* replacement = nullptr, std::vector<std::int64_t> const& shape = {}) {
    Bytes const bytes = io::factorized_tensors(layers).serialize();
    auto const f = SafetensorsFile::parse(bytes.data(), bytes.size());
    SafetensorsWriter w;
    for (auto const& [k, v] : f.metadata()) w.set_metadata(k, k == key ? value : v);
    for (auto const& t : f.tensors()) {
      if (t.name == drop) {
        if (replacement != nullptr) w.add(t.name, SafetensorsDtype::f32, shape, replacement->data());
        continue;
      }
      if (t.dtype == SafetensorsDtype::i32) {
        auto const v = f.to_int64(t.name);
        w.add_int(t.name, t.dtype, t.shape, v.data());
      } else {
        auto const v = f.to_float(t.name);
        w.add(t.name, t.dtype, t.shape, v.data());
      }
    }
    Bytes const out = w.serialize();
    return SafetensorsFile::parse(out.data(), out.size());
  };
  auto refused = [](SafetensorsFile const& f, std::string const& fragment) {
    INFO("expecting '" << fragment << "'");
    try {
      (void)io::load_factorized(f);
      FAIL("no exception");
    } catch (fl::format_error const& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(fragment) != std::string::npos);
    }
  };
  CHECK_NOTHROW(io::load_factorized(variant("", "")));
  refused(variant("format", "something.else"), "expected 'factorllm.moe'");
  refused(variant("format_version", "2"), "format_version '2' is not supported");
  refused(variant("n_layers", "2"), "no tensor 'layers.1.ffn.permutation'");
  refused(variant("n_layers", "-1"), "n_layers");
  refused(variant("layers.0.n_experts", "3"), "cannot split equally");
  refused(variant("layers.0.top_k", "3"), "top_k");
  refused(variant("layers.0.top_k", "1x"), "top_k");
  refused(variant("layers.0.combine_mode", "best_mode"), "unknown combine mode");
  refused(variant("layers.0.output_scale", "nan"), "output_scale");
  refused(variant("layers.0.sigmoid_renormalize", "yes"), "sigmoid_renormalize");
  refused(variant("", "", "layers.0.ffn.router.bias"), "no tensor 'layers.0.ffn.router.bias'");
  std::vector<float> const wrong(6, 0.f);
  refused(variant("", "", "layers.0.ffn.router.weight", &wrong, {2, 3}), "has shape [2, 3], expected [2, 4]");
  std::vector<float> const perm_f(8, 0.f);
  refused(variant("", "", "layers.0.ffn.permutation", &perm_f, {8}), "expected an integer type");
  // A permutation that repeats an index.
  {
    Bytes const bytes = io::factorized_tensors(layers).serialize();
    auto const f = SafetensorsFile::parse(bytes.data(), bytes.size());
    SafetensorsWriter w;
    for (auto const& [k, v] : f.metadata()) w.set_metadata(k, v);
    for (auto const& t : f.tensors()) {
      if (t.dtype == SafetensorsDtype::i32) {
        std::vector<std::int64_t> v = f.to_int64(t.name);
        v[1] = v[0];
        w.add_int(t.name, t.dtype, t.shape, v.data());
      } else {
        auto const v = f.to_float(t.name);
        w.add(t.name, t.dtype, t.shape, v.data());
      }
    }
    Bytes const out = w.serialize();
    refused(SafetensorsFile::parse(out.data(), out.size()), "not a permutation");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Mixtral export
// ---------------------------------------------------------------------------------------------------------------

namespace {

/// stories260K's FFNs factorized into N experts with random bias-free routers and the given gating.
std::vector<fl::moe::MoeFfn<float, fl::CpuScalar>> stories_moe(io::Llama2cCheckpoint const& ck, std::ptrdiff_t n,
                                                                fl::moe::Gating const& g) {
  std::vector<fl::moe::MoeFfn<float, fl::CpuScalar>> layers;
  for (int l = 0; l < ck.config().n_layers; ++l) {
    auto ex = fl::ffn::factorize(ck.ffn(l), fl::ffn::ExpertPartition::random(ck.config().hidden_dim, n, 7 + l));
    // A router strong enough that routing differs per token (stddev 1): any mistake in the gate export shows.
    layers.emplace_back(std::move(ex), fl::moe::Router<float>::random(ck.config().dim, n, 100 + l, 1.0), g);
  }
  return layers;
}

using ref::RowMajorF;

/// An independent forward of Hugging Face's MixtralForCausalLM (modeling_mixtral.py semantics, float32) that reads
/// only the exported tensors and config.json: half-split rotary embedding (rotate_half), GQA, and the sparse MoE
/// block (softmax over all experts, TopK, renormalize, experts w2(silu(w1 x) * w3 x)).
/// \returns logits [tokens, vocab]
RowMajorF hf_mixtral_forward(SafetensorsFile const& f, nlohmann::json const& cfg, std::vector<int> const& tokens) {
  int const d = cfg["hidden_size"], n_layers = cfg["num_hidden_layers"], n_heads = cfg["num_attention_heads"],
            n_kv = cfg["num_key_value_heads"], n_exp = cfg["num_local_experts"], top_k = cfg["num_experts_per_tok"],
            vocab = cfg["vocab_size"];
  double const eps = cfg["rms_norm_eps"], theta = cfg["rope_theta"];
  int const hs = d / n_heads, T = static_cast<int>(tokens.size());
  auto mat = [&](std::string const& name) {
    auto const& info = f.info(name);
    std::vector<float> const v = f.to_float(name);
    return RowMajorF(Eigen::Map<RowMajorF const>(v.data(), info.shape[0], info.shape.size() > 1 ? info.shape[1] : 1));
  };
  auto rms = [&](RowMajorF const& x, RowMajorF const& w) {
    RowMajorF o(x.rows(), x.cols());
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
      float const inv = 1.0f / std::sqrt(x.row(t).squaredNorm() / static_cast<float>(x.cols()) + static_cast<float>(eps));
      for (Eigen::Index i = 0; i < x.cols(); ++i) o(t, i) = w(i, 0) * (x(t, i) * inv);
    }
    return o;
  };
  // rotate_half RoPE: dims j and j + hs/2 of each head form a pair, angle pos * theta^(-2j/hs).
  auto rope = [&](RowMajorF& x, int heads) {
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < heads; ++h)
        for (int j = 0; j < hs / 2; ++j) {
          double const freq = std::pow(theta, -2.0 * j / hs), a = t * freq;
          float const c = static_cast<float>(std::cos(a)), s = static_cast<float>(std::sin(a));
          float& x0 = x(t, h * hs + j);
          float& x1 = x(t, h * hs + j + hs / 2);
          float const v0 = x0, v1 = x1;
          x0 = v0 * c - v1 * s;
          x1 = v1 * c + v0 * s;
        }
  };
  RowMajorF const emb = mat("model.embed_tokens.weight");
  RowMajorF x(T, d);
  for (int t = 0; t < T; ++t) x.row(t) = emb.row(tokens[static_cast<std::size_t>(t)]);
  for (int l = 0; l < n_layers; ++l) {
    std::string const p = "model.layers." + std::to_string(l) + ".";
    RowMajorF const h = rms(x, mat(p + "input_layernorm.weight"));
    RowMajorF q = h * mat(p + "self_attn.q_proj.weight").transpose();
    RowMajorF k = h * mat(p + "self_attn.k_proj.weight").transpose();
    RowMajorF const v = h * mat(p + "self_attn.v_proj.weight").transpose();
    rope(q, n_heads);
    rope(k, n_kv);
    RowMajorF const att = ref::causal_gqa_attention(q, k, v, n_heads, n_kv, hs);
    x += att * mat(p + "self_attn.o_proj.weight").transpose();
    RowMajorF const hn = rms(x, mat(p + "post_attention_layernorm.weight"));
    RowMajorF const logits = hn * mat(p + "block_sparse_moe.gate.weight").transpose();  // [T, N]
    REQUIRE(logits.cols() == n_exp);  // config.json and the router agree on the expert count
    RowMajorF moe = RowMajorF::Zero(T, d);
    for (int t = 0; t < T; ++t) {
      RowMajorF const xt = hn.row(t);
      // routing_weights = softmax(router_logits), TopK, renormalized
      for (auto const& [e, w] : ref::softmax_topk_renorm(logits.row(t), top_k)) {
        std::string const ep = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
        RowMajorF const g = xt * mat(ep + "w1.weight").transpose();
        RowMajorF const u = xt * mat(ep + "w3.weight").transpose();
        RowMajorF a(1, g.cols());
        for (Eigen::Index i = 0; i < g.cols(); ++i) a(0, i) = g(0, i) / (1.0f + std::exp(-g(0, i))) * u(0, i);
        moe.row(t) += static_cast<float>(w) * (a * mat(ep + "w2.weight").transpose());
      }
    }
    x += moe;
  }
  RowMajorF const out = rms(x, mat("model.norm.weight"));
  RowMajorF const head = f.find("lm_head.weight") ? mat("lm_head.weight") : emb;
  RowMajorF logits = out * head.transpose();
  REQUIRE(logits.cols() == vocab);
  return logits;
}

}  // namespace

TEST_CASE("Mixtral export: HF tensor names, shapes and config.json", "[io][mixtral]") {
  if (!have_model()) return;
  auto const ck = io::Llama2cCheckpoint::load(kModelPath);
  auto const layers = stories_moe(ck, 4, gating(fl::moe::CombineMode::softmax_topk_renorm, 2));
  Bytes const bytes = io::mixtral_tensors(ck, layers).serialize();
  auto const f = SafetensorsFile::parse(bytes.data(), bytes.size());
  CHECK(f.metadata().at("format") == "pt");
  std::size_t expected = 1 + 1;  // embed_tokens, norm (classifier shared: no lm_head)
  CHECK(f.info("model.embed_tokens.weight").shape == std::vector<std::int64_t>{512, 64});
  CHECK(f.info("model.norm.weight").shape == std::vector<std::int64_t>{64});
  CHECK(f.find("lm_head.weight") == nullptr);
  for (int l = 0; l < 5; ++l) {
    std::string const p = "model.layers." + std::to_string(l) + ".";
    CHECK(f.info(p + "input_layernorm.weight").shape == std::vector<std::int64_t>{64});
    CHECK(f.info(p + "post_attention_layernorm.weight").shape == std::vector<std::int64_t>{64});
    CHECK(f.info(p + "self_attn.q_proj.weight").shape == std::vector<std::int64_t>{64, 64});
    CHECK(f.info(p + "self_attn.k_proj.weight").shape == std::vector<std::int64_t>{32, 64});
    CHECK(f.info(p + "self_attn.v_proj.weight").shape == std::vector<std::int64_t>{32, 64});
    CHECK(f.info(p + "self_attn.o_proj.weight").shape == std::vector<std::int64_t>{64, 64});
    CHECK(f.info(p + "block_sparse_moe.gate.weight").shape == std::vector<std::int64_t>{4, 64});
    expected += 7;
    for (int e = 0; e < 4; ++e) {
      std::string const ep = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
      CHECK(f.info(ep + "w1.weight").shape == std::vector<std::int64_t>{43, 64});
      CHECK(f.info(ep + "w2.weight").shape == std::vector<std::int64_t>{64, 43});
      CHECK(f.info(ep + "w3.weight").shape == std::vector<std::int64_t>{43, 64});
      expected += 3;
    }
    // w1/w3/w2 are expert e's gate/up/down exactly; v and o are copied as they are.
    auto const w1 = f.to_float(p + "block_sparse_moe.experts.2.w1.weight");
    auto const w2 = f.to_float(p + "block_sparse_moe.experts.2.w2.weight");
    auto const gate = layers[static_cast<std::size_t>(l)].experts().gate(2);
    auto const down = layers[static_cast<std::size_t>(l)].experts().down(2);
    CHECK(std::equal(w1.begin(), w1.end(), gate.data()));
    CHECK(std::equal(w2.begin(), w2.end(), down.data()));
    auto const v = f.to_float(p + "self_attn.v_proj.weight");
    CHECK(std::equal(v.begin(), v.end(), ck.wv(l).data()));
  }
  CHECK(f.tensors().size() == expected);

  auto const cfg = io::mixtral_config(ck, layers);
  CHECK(cfg["architectures"][0] == "MixtralForCausalLM");
  CHECK(cfg["model_type"] == "mixtral");
  CHECK(cfg["num_local_experts"] == 4);
  CHECK(cfg["num_experts_per_tok"] == 2);
  CHECK(cfg["intermediate_size"] == 43);  // per expert
  CHECK(cfg["hidden_size"] == 64);
  CHECK(cfg["num_key_value_heads"] == 4);
  CHECK(cfg["tie_word_embeddings"] == true);
  CHECK(cfg["rms_norm_eps"] == 1e-5);

  std::string const dir = temp_path("mixtral");
  io::export_mixtral(dir, ck, layers);
  CHECK(SafetensorsFile::load(dir + "/model.safetensors").tensors().size() == expected);
  std::ifstream cfg_file(dir + "/config.json");
  CHECK(nlohmann::json::parse(cfg_file) == cfg);
  std::filesystem::remove_all(dir);
}

TEST_CASE("Mixtral export: an independent HF-layout forward of the export matches our engine", "[io][mixtral]") {
  if (!have_model()) return;
  auto const ck = io::Llama2cCheckpoint::load(kModelPath);
  auto const layers = stories_moe(ck, 4, gating(fl::moe::CombineMode::softmax_topk_renorm, 2));
  Bytes const bytes = io::mixtral_tensors(ck, layers).serialize();
  auto const f = SafetensorsFile::parse(bytes.data(), bytes.size());
  std::vector<int> const tokens{1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401};
  RowMajorF const hf = hf_mixtral_forward(f, io::mixtral_config(ck, layers), tokens);

  factorllm_examples::Llama2cEngine engine(ck);
  for (int l = 0; l < ck.config().n_layers; ++l) {
    auto const& a = layers[static_cast<std::size_t>(l)];
    fl::moe::MoeFfn<float, fl::CpuSimd<>> simd(a.experts(), a.router(), a.gating());
    engine.set_ffn(l, std::make_unique<factorllm_examples::MoeFfnLayer>(std::move(simd), 32));
  }
  auto const ours = engine.forward_sequence(tokens);
  // Float32 in both, different summation orders: logits of magnitude ~10 agree to ~1e-5; 2e-3 leaves room while
  // any layout error (q/k order, expert or router mix-up) moves them by O(1).
  double max_diff = 0;
  for (int t = 0; t < static_cast<int>(tokens.size()); ++t)
    for (int v = 0; v < ck.config().vocab_size; ++v) max_diff = std::max(max_diff, std::abs(static_cast<double>(hf(t, v)) - ours(t, v)));
  INFO("max |logit difference| = " << max_diff);
  CHECK(max_diff < 2e-3);

  // Without the q/k reordering the same forward is far off: the check above does test the RoPE layout.
  SafetensorsWriter w;
  for (auto const& t : f.tensors()) {
    std::string name = t.name;
    auto v = f.to_float(name);
    bool const is_q = name.find("q_proj") != std::string::npos, is_k = name.find("k_proj") != std::string::npos;
    if (is_q || is_k) {
      int const l = std::stoi(name.substr(std::string("model.layers.").size()));
      auto const src = is_q ? ck.wq(l) : ck.wk(l);
      v.assign(src.data(), src.data() + src.size());
    }
    w.add(name, SafetensorsDtype::f32, t.shape, v.data());
  }
  Bytes const raw = w.serialize();
  RowMajorF const wrong = hf_mixtral_forward(SafetensorsFile::parse(raw.data(), raw.size()), io::mixtral_config(ck, layers), tokens);
  double wrong_diff = 0;
  for (int t = 0; t < static_cast<int>(tokens.size()); ++t)
    for (int v = 0; v < ck.config().vocab_size; ++v) wrong_diff = std::max(wrong_diff, std::abs(static_cast<double>(wrong(t, v)) - ours(t, v)));
  INFO("without the q/k reordering: max |logit difference| = " << wrong_diff);
  CHECK(wrong_diff > 0.1);
}

TEST_CASE("Mixtral export: refuses what Mixtral gating cannot express, with a clear message", "[io][mixtral]") {
  if (!have_model()) return;
  using fl::moe::CombineMode;
  auto const ck = io::Llama2cCheckpoint::load(kModelPath);
  auto refused = [&](std::vector<fl::moe::MoeFfn<float, fl::CpuScalar>> const& layers, std::string const& fragment) {
    INFO("expecting '" << fragment << "'");
    try {
      (void)io::mixtral_tensors(ck, layers);
      FAIL("no exception");
    } catch (fl::value_error const& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(fragment) != std::string::npos);
      CHECK(std::string(e.what()).find("Mixtral") != std::string::npos);
    }
    CHECK_THROWS_AS(io::mixtral_config(ck, layers), fl::value_error);
  };
  refused(stories_moe(ck, 4, gating(CombineMode::code_ref, 2)), "combine mode code_ref");
  refused(stories_moe(ck, 4, gating(CombineMode::softmax_topk, 2)), "combine mode softmax_topk");
  refused(stories_moe(ck, 4, gating(CombineMode::sigmoid_topk, 2)), "combine mode sigmoid_topk");
  auto g = gating(CombineMode::softmax_topk_renorm, 2);
  g.selection_bias = {0.f, 0.5f, 0.f, 0.f};
  refused(stories_moe(ck, 4, g), "selection_bias[1]");
  g = gating(CombineMode::softmax_topk_renorm, 2);
  g.output_scale = 2.f;
  refused(stories_moe(ck, 4, g), "output_scale");
  // A router bias (the paper's routers have one): Mixtral's gate has none.
  {
    auto layers = stories_moe(ck, 4, gating(CombineMode::softmax_topk_renorm, 2));
    auto const& a = layers[3];
    fl::moe::Router<float> biased(fl::Matrix<float>(a.router().weight()), fl::Vector<float>({4}));
    biased.mutable_bias()[2] = 0.125f;
    layers[3] = fl::moe::MoeFfn<float, fl::CpuScalar>(a.experts(), std::move(biased), a.gating());
    refused(layers, "router bias[2]");
  }
  // N or K differing between layers, and a layer count that does not match the checkpoint.
  {
    auto layers = stories_moe(ck, 4, gating(CombineMode::softmax_topk_renorm, 2));
    layers[1] = stories_moe(ck, 4, gating(CombineMode::softmax_topk_renorm, 1))[1];
    CHECK_THROWS_WITH(io::mixtral_tensors(ck, layers), Catch::Contains("one N and one K"));
    layers.pop_back();
    CHECK_THROWS_WITH(io::mixtral_tensors(ck, layers), Catch::Contains("4 MoE layers for a checkpoint of 5"));
  }
  // Equivalent forms are accepted: topk_softmax, and softmax_topk with K = N (no renormalization needed).
  CHECK_NOTHROW(io::mixtral_tensors(ck, stories_moe(ck, 4, gating(CombineMode::topk_softmax, 2))));
  CHECK_NOTHROW(io::mixtral_tensors(ck, stories_moe(ck, 4, gating(CombineMode::softmax_topk, 4))));
  auto zero_bias = gating(CombineMode::softmax_topk_renorm, 2);
  zero_bias.selection_bias = {0.f, 0.f, 0.f, 0.f};
  CHECK_NOTHROW(io::mixtral_tensors(ck, stories_moe(ck, 4, zero_bias)));
}
