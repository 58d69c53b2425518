// SPDX-License-Identifier: Apache-2.0
// Tests of the llama2.c checkpoint and tokenizer readers: the real stories260K model, generated files, and
// malformed input (which must throw format_error and never crash).
#include <catch2/catch.hpp>

#include <factorllm/core/error.hpp>
#include <factorllm/core/tensor.hpp>
#include <factorllm/ffn/swiglu.hpp>
#include <factorllm/io/llama2c.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "reference/shared_data.hpp"

namespace {

using factorllm::format_error;
using factorllm::value_error;
using factorllm::io::Llama2cCheckpoint;
using factorllm::io::Llama2cConfig;
using factorllm::io::Llama2cTokenizer;
using Bytes = std::vector<unsigned char>;

std::string const kModelPath = std::string(FACTORLLM_SHARED_DIR) + "/models/stories260K.bin";
std::string const kTokenizerPath = std::string(FACTORLLM_SHARED_DIR) + "/models/tok512.bin";

bool have_file(std::string const& path) { return fixture::have_shared_data({path}); }

/// Reads one little-endian float32 at `byte_offset` with plain stdio (independent of the library's reader).
float fread_float(std::string const& path, long byte_offset) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  REQUIRE(f != nullptr);
  REQUIRE(std::fseek(f, byte_offset, SEEK_SET) == 0);
  unsigned char b[4] = {};
  std::size_t const got = std::fread(b, 1, 4, f);
  std::fclose(f);
  REQUIRE(got == 4);
  std::uint32_t const u = std::uint32_t{b[0]} | (std::uint32_t{b[1]} << 8) | (std::uint32_t{b[2]} << 16) |
                          (std::uint32_t{b[3]} << 24);
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

Bytes read_bytes(std::string const& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void put_u32(Bytes& out, std::uint32_t u) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<unsigned char>(u >> (8 * i)));
}
void put_i32(Bytes& out, std::int32_t v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  put_u32(out, u);
}
void put_f32(Bytes& out, float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  put_u32(out, u);
}
/// Overwrites header field `i` (0 = dim ... 6 = seq_len) of a checkpoint image.
void set_field(Bytes& file, int i, std::int32_t v) {
  Bytes b;
  put_i32(b, v);
  std::memcpy(file.data() + 4 * i, b.data(), 4);
}

/// Raw header values (vocab_size signed as in the file).
struct Header {
  std::int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
};

/// Float offsets of every tensor after the header, computed here independently of the library.
struct Layout {
  std::int64_t emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, rope, wcls, total;
};
Layout layout_of(Header const& h) {
  std::int64_t const d = h.dim, f = h.hidden_dim, n_l = h.n_layers, v = std::abs(h.vocab_size);
  std::int64_t const hs = d / h.n_heads, kv = hs * h.n_kv_heads;
  Layout o{};
  o.emb = 0;
  o.rms_att = o.emb + v * d;
  o.wq = o.rms_att + n_l * d;
  o.wk = o.wq + n_l * d * d;
  o.wv = o.wk + n_l * kv * d;
  o.wo = o.wv + n_l * kv * d;
  o.rms_ffn = o.wo + n_l * d * d;
  o.w1 = o.rms_ffn + n_l * d;
  o.w2 = o.w1 + n_l * f * d;
  o.w3 = o.w2 + n_l * d * f;
  o.rms_final = o.w3 + n_l * f * d;
  o.rope = o.rms_final + d;
  o.wcls = o.rope + h.seq_len * hs;
  o.total = o.wcls + (h.vocab_size < 0 ? v * d : 0);
  if (h.vocab_size > 0) o.wcls = o.emb;
  return o;
}

/// The value the generated model stores at float index k (exact in float32 for k < 2^22).
float value_at(std::int64_t k) { return static_cast<float>(k) + 0.25f; }

/// Builds a checkpoint image whose float k (counting after the header) is value_at(k).
Bytes make_checkpoint(Header const& h) {
  Bytes out;
  for (std::int32_t v : {h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len})
    put_i32(out, v);
  std::int64_t const n = layout_of(h).total;
  for (std::int64_t k = 0; k < n; ++k) put_f32(out, value_at(k));
  return out;
}

constexpr Header kSmallShared{8, 12, 3, 2, 1, 10, 4};     // head_size 4, kv_dim 4
constexpr Header kSmallUnshared{8, 12, 3, 2, 1, -10, 4};  // same, with wcls at the end

/// Checks the first and last element of every view against the generated values.
void check_generated(Llama2cCheckpoint const& c, Header const& h) {
  Layout const o = layout_of(h);
  std::int64_t const d = h.dim, f = h.hidden_dim, v = std::abs(h.vocab_size), kv = d / h.n_heads * h.n_kv_heads;
  auto check_matrix = [](factorllm::MatrixView<float const> m, std::int64_t off, std::int64_t rows, std::int64_t cols) {
    REQUIRE(m.rows() == rows);
    REQUIRE(m.cols() == cols);
    CHECK(m(0, 0) == value_at(off));
    CHECK(m(rows - 1, cols - 1) == value_at(off + rows * cols - 1));
    std::int64_t const c = cols > 1 ? 1 : 0;
    CHECK(m(rows / 2, c) == value_at(off + (rows / 2) * cols + c));
  };
  auto check_vector = [](factorllm::VectorView<float const> x, std::int64_t off, std::int64_t n) {
    REQUIRE(x.size() == n);
    CHECK(x(0) == value_at(off));
    CHECK(x(n - 1) == value_at(off + n - 1));
  };
  check_matrix(c.token_embedding(), o.emb, v, d);
  for (int l = 0; l < h.n_layers; ++l) {
    CAPTURE(l);
    check_vector(c.rms_att(l), o.rms_att + l * d, d);
    check_matrix(c.wq(l), o.wq + l * d * d, d, d);
    check_matrix(c.wk(l), o.wk + l * kv * d, kv, d);
    check_matrix(c.wv(l), o.wv + l * kv * d, kv, d);
    check_matrix(c.wo(l), o.wo + l * d * d, d, d);
    check_vector(c.rms_ffn(l), o.rms_ffn + l * d, d);
    check_matrix(c.w1(l), o.w1 + l * f * d, f, d);
    check_matrix(c.w2(l), o.w2 + l * d * f, d, f);
    check_matrix(c.w3(l), o.w3 + l * f * d, f, d);
    auto const ffn = c.ffn(l);
    CHECK(ffn.gate.data() == c.w1(l).data());
    CHECK(ffn.up.data() == c.w3(l).data());
    CHECK(ffn.down.data() == c.w2(l).data());
  }
  check_vector(c.rms_final(), o.rms_final, d);
  check_matrix(c.classifier(), o.wcls, v, d);
  if (h.vocab_size > 0) CHECK(c.classifier().data() == c.token_embedding().data());
}

/// Parses and requires format_error; any other exception (or success) fails the test.
void require_format_error(Bytes const& file) {
  CHECK_THROWS_AS(Llama2cCheckpoint::parse(file.data(), file.size()), format_error);
}

/// Writes bytes to a fresh temporary file and returns its path; the caller removes it.
std::string write_temp(Bytes const& bytes, char const* tag) {
  std::random_device rd;
  auto const path = std::filesystem::temp_directory_path() /
                    ("factorllm_test_llama2c_" + std::string(tag) + "_" + std::to_string(rd()) + ".bin");
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<char const*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
  return path.string();
}

/// Builds a tokenizer image from (piece, score) pairs.
Bytes make_tokenizer(std::vector<std::pair<std::string, float>> const& vocab, std::int32_t max_len) {
  Bytes out;
  put_i32(out, max_len);
  for (auto const& [piece, score] : vocab) {
    put_f32(out, score);
    put_i32(out, static_cast<std::int32_t>(piece.size()));
    out.insert(out.end(), piece.begin(), piece.end());
  }
  return out;
}

/// A vocab laid out like llama2.c's: <unk>, BOS, EOS, 256 byte pieces, then the given pieces.
std::vector<std::pair<std::string, float>> llama_like_vocab(std::vector<std::pair<std::string, float>> const& extra) {
  std::vector<std::pair<std::string, float>> v{{"<unk>", 0.f}, {"\n<s>\n", 0.f}, {"\n</s>\n", 0.f}};
  char const* const hex = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) v.push_back({std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">", 0.f});
  v.insert(v.end(), extra.begin(), extra.end());
  return v;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Real model: stories260K.bin
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("llama2c: stories260K header values", "[io][llama2c]") {
  if (!have_file(kModelPath)) return;
  auto const ckpt = Llama2cCheckpoint::load(kModelPath);
  Llama2cConfig const& c = ckpt.config();
  CHECK(c.dim == 64);
  CHECK(c.hidden_dim == 172);
  CHECK(c.n_layers == 5);
  CHECK(c.n_heads == 8);
  CHECK(c.n_kv_heads == 4);
  CHECK(c.vocab_size == 512);
  CHECK(c.seq_len == 512);
  CHECK(c.shared_classifier);
  CHECK(c.head_size() == 8);
  CHECK(c.kv_dim() == 32);
  CHECK(ckpt.token_embedding().extents() == std::array<std::ptrdiff_t, 2>{512, 64});
  CHECK(ckpt.wk(4).extents() == std::array<std::ptrdiff_t, 2>{32, 64});
  CHECK(ckpt.w2(0).extents() == std::array<std::ptrdiff_t, 2>{64, 172});
  CHECK(ckpt.classifier().data() == ckpt.token_embedding().data());
  CHECK_THROWS_AS(ckpt.w1(5), value_error);
  CHECK_THROWS_AS(ckpt.wq(-1), value_error);
  CHECK_THROWS_AS(ckpt.ffn(5), value_error);
}

TEST_CASE("llama2c: stories260K views equal the bytes at the expected file offsets", "[io][llama2c]") {
  if (!have_file(kModelPath)) return;
  auto const ckpt = Llama2cCheckpoint::load(kModelPath);
  Header const h{64, 172, 5, 8, 4, 512, 512};
  Layout const o = layout_of(h);
  auto const at = [&](std::int64_t float_index) {
    return fread_float(kModelPath, static_cast<long>(28 + 4 * float_index));
  };
  // The file must be exactly header + tensors (+ RoPE tables), as the loader insists.
  CHECK(std::filesystem::file_size(kModelPath) == static_cast<std::uintmax_t>(28 + 4 * o.total));
  CHECK(ckpt.w1(2)(0, 0) == at(o.w1 + 2 * 172 * 64));
  CHECK(ckpt.rms_final()(63) == at(o.rms_final + 63));
  CHECK(ckpt.token_embedding()(511, 63) == at(o.emb + 511 * 64 + 63));
  CHECK(ckpt.wk(4)(31, 63) == at(o.wk + 4 * 32 * 64 + 31 * 64 + 63));
  CHECK(ckpt.w2(3)(10, 171) == at(o.w2 + 3 * 64 * 172 + 10 * 172 + 171));
  CHECK(ckpt.w3(4)(171, 63) == at(o.w3 + 4 * 172 * 64 + 171 * 64 + 63));
  CHECK(ckpt.rms_att(1)(0) == at(o.rms_att + 64));
  // RMSNorm weights of a trained model are not zero; a misaligned reader would likely see RoPE cos values of 1.
  CHECK(ckpt.rms_final()(0) != 0.0f);
}

TEST_CASE("llama2c: layer-0 FFN of stories260K matches a plain double loop", "[io][llama2c][ffn]") {
  if (!have_file(kModelPath)) return;
  auto const ckpt = Llama2cCheckpoint::load(kModelPath);
  // Weights read independently: the whole file as floats, indexed with this test's own layout.
  Bytes const raw = read_bytes(kModelPath);
  Layout const o = layout_of(Header{64, 172, 5, 8, 4, 512, 512});
  REQUIRE(raw.size() == static_cast<std::size_t>(28 + 4 * o.total));
  auto const w = [&](std::int64_t k) {
    float v;
    std::memcpy(&v, raw.data() + 28 + 4 * k, 4);  // the test host is little-endian (x86/ARM Linux)
    return static_cast<double>(v);
  };
  std::int64_t const d = 64, f = 172;
  std::vector<int> const tokens{1, 100, 403};
  auto const n_tokens = static_cast<std::ptrdiff_t>(tokens.size());
  factorllm::Matrix<float> x({n_tokens, d}), y({n_tokens, d});
  for (std::size_t t = 0; t < tokens.size(); ++t)
    for (std::int64_t k = 0; k < d; ++k) x(t, k) = ckpt.token_embedding()(tokens[t], k);
  factorllm::ffn::swiglu_forward(ckpt.ffn(0), x.cview(), y.view());
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    std::vector<double> hidden(static_cast<std::size_t>(f));
    for (std::int64_t i = 0; i < f; ++i) {
      double g = 0, u = 0;
      for (std::int64_t k = 0; k < d; ++k) {
        double const xk = w(o.emb + tokens[t] * d + k);
        g += w(o.w1 + i * d + k) * xk;
        u += w(o.w3 + i * d + k) * xk;
      }
      hidden[static_cast<std::size_t>(i)] = g / (1.0 + std::exp(-g)) * u;
    }
    for (std::int64_t r = 0; r < d; ++r) {
      double ref = 0;
      for (std::int64_t i = 0; i < f; ++i) ref += w(o.w2 + r * f + i) * hidden[static_cast<std::size_t>(i)];
      CAPTURE(tokens[t], r, ref);
      // Tolerance: relative 1e-5 (float32 output of a double-accumulated oracle), absolute floor 1e-7 near zero.
      CHECK_THAT(static_cast<double>(y(t, r)),
                 Catch::Matchers::WithinRel(ref, 1e-5) || Catch::Matchers::WithinAbs(ref, 1e-7));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Generated checkpoints
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("llama2c: generated checkpoints round-trip through parse and load", "[io][llama2c]") {
  for (Header const& h : {kSmallShared, kSmallUnshared, Header{16, 5, 1, 4, 4, 7, 1}, Header{2, 1, 1, 1, 1, -1, 1}}) {
    CAPTURE(h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len);
    Bytes const file = make_checkpoint(h);
    auto const parsed = Llama2cCheckpoint::parse(file.data(), file.size());
    CHECK(parsed.config().vocab_size == std::abs(h.vocab_size));
    CHECK(parsed.config().shared_classifier == (h.vocab_size > 0));
    check_generated(parsed, h);

    std::string const path = write_temp(file, "ckpt");
    auto const loaded = Llama2cCheckpoint::load(path);
    std::filesystem::remove(path);
    check_generated(loaded, h);
    CHECK(loaded.classifier()(0, 0) == parsed.classifier()(0, 0));
  }
}

TEST_CASE("llama2c: the views survive a move of the checkpoint", "[io][llama2c]") {
  Bytes const file = make_checkpoint(kSmallUnshared);
  auto a = Llama2cCheckpoint::parse(file.data(), file.size());
  auto const b = std::move(a);
  check_generated(b, kSmallUnshared);
}

// ---------------------------------------------------------------------------------------------------------------
// Malformed checkpoints: every one throws format_error
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("llama2c: truncated and over-long checkpoints are rejected", "[io][llama2c][untrusted]") {
  Bytes const good = make_checkpoint(kSmallUnshared);
  SECTION("one byte short") {
    Bytes f(good.begin(), good.end() - 1);
    CHECK_THROWS_WITH(Llama2cCheckpoint::parse(f.data(), f.size()), Catch::Contains("truncated"));
  }
  SECTION("one float short (the unshared classifier missing)") {
    Bytes f(good.begin(), good.end() - 4);
    require_format_error(f);
  }
  SECTION("every shorter length, header included") {
    for (std::size_t n = 0; n < good.size(); ++n) {
      CAPTURE(n);
      require_format_error(Bytes(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n)));
    }
    CHECK_THROWS_AS(Llama2cCheckpoint::parse(nullptr, 0), format_error);
  }
  SECTION("trailing bytes") {
    for (std::size_t extra : {1u, 3u, 4u, 4096u}) {
      Bytes f = good;
      f.resize(f.size() + extra, 0);
      CAPTURE(extra);
      CHECK_THROWS_WITH(Llama2cCheckpoint::parse(f.data(), f.size()), Catch::Contains("trailing"));
    }
  }
  SECTION("a shared-classifier header on an unshared file") {
    Bytes f = good;
    set_field(f, 5, 10);
    CHECK_THROWS_WITH(Llama2cCheckpoint::parse(f.data(), f.size()), Catch::Contains("trailing"));
  }
}

TEST_CASE("llama2c: zero or negative header fields are rejected", "[io][llama2c][untrusted]") {
  Bytes const good = make_checkpoint(kSmallShared);
  char const* const names[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
  for (int i = 0; i < 7; ++i) {
    for (std::int32_t v : {0, -1, -8, std::numeric_limits<std::int32_t>::min()}) {
      CAPTURE(names[i], v);
      Bytes f = good;
      set_field(f, i, v);
      // vocab_size -1 / -8 are legal values (unshared classifier) but the sizes then disagree with the file.
      if (i != 5 || v == 0 || v == std::numeric_limits<std::int32_t>::min())
        CHECK_THROWS_WITH(Llama2cCheckpoint::parse(f.data(), f.size()), Catch::Contains(names[i]));
      else
        require_format_error(f);
    }
  }
}

TEST_CASE("llama2c: inconsistent head counts are rejected", "[io][llama2c][untrusted]") {
  Bytes good = make_checkpoint(kSmallShared);
  SECTION("n_heads does not divide dim") {
    set_field(good, 3, 3);  // dim 8
    CHECK_THROWS_WITH(Llama2cCheckpoint::parse(good.data(), good.size()), Catch::Contains("n_heads"));
  }
  SECTION("n_heads larger than dim") {
    set_field(good, 3, 16);
    require_format_error(good);
  }
  SECTION("n_kv_heads does not divide n_heads") {
    set_field(good, 3, 4);  // head_size 2
    set_field(good, 4, 3);
    CHECK_THROWS_WITH(Llama2cCheckpoint::parse(good.data(), good.size()), Catch::Contains("n_kv_heads"));
  }
  SECTION("n_kv_heads larger than n_heads") {
    set_field(good, 4, 4);  // n_heads 2
    require_format_error(good);
  }
  SECTION("odd head size") {
    set_field(good, 3, 8);  // head_size 1
    set_field(good, 4, 8);
    CHECK_THROWS_WITH(Llama2cCheckpoint::parse(good.data(), good.size()), Catch::Contains("odd"));
  }
}

TEST_CASE("llama2c: lying headers are rejected before any allocation", "[io][llama2c][untrusted]") {
  Bytes good = make_checkpoint(kSmallShared);
  SECTION("sizes that overflow int64") {
    set_field(good, 0, 1 << 30);  // dim
    set_field(good, 1, std::numeric_limits<std::int32_t>::max());
    set_field(good, 2, std::numeric_limits<std::int32_t>::max());
    set_field(good, 3, 2);
    set_field(good, 4, 1);
    CHECK_THROWS_WITH(Llama2cCheckpoint::parse(good.data(), good.size()), Catch::Contains("overflow"));
  }
  SECTION("every field at its largest value") {
    for (int i = 0; i < 7; ++i) set_field(good, i, std::numeric_limits<std::int32_t>::max());
    require_format_error(good);  // odd head size 1, or an overflow: either way no allocation
  }
  SECTION("plausible sizes that exceed the file") {
    // A Llama-2-7B-like header on a 6 KB buffer: ~27 GB declared; must not try to allocate it.
    for (auto [i, v] : {std::pair{0, 4096}, {1, 11008}, {2, 32}, {3, 32}, {4, 32}, {5, 32000}, {6, 2048}})
      set_field(good, i, v);
    CHECK_THROWS_WITH(Llama2cCheckpoint::parse(good.data(), good.size()), Catch::Contains("truncated"));
  }
  SECTION("random header corruption (seed 2023)") {
    std::mt19937 rng(2023);
    std::uniform_int_distribution<int> field(0, 6), byte(0, 255), small(-4, 40);
    std::uniform_int_distribution<int> len(0, static_cast<int>(good.size()) + 8);
    int accepted = 0;
    for (int rep = 0; rep < 3000; ++rep) {
      Bytes f = make_checkpoint(kSmallShared);
      switch (rep % 3) {
        case 0: set_field(f, field(rng), small(rng)); break;
        case 1: f[static_cast<std::size_t>(byte(rng) % 28)] = static_cast<unsigned char>(byte(rng)); break;
        default: f.resize(static_cast<std::size_t>(len(rng)), 0); break;
      }
      try {
        auto const c = Llama2cCheckpoint::parse(f.data(), f.size());
        ++accepted;  // only a header that declares exactly this size can be accepted
        Llama2cConfig const& k = c.config();
        Header const back{k.dim,        k.hidden_dim, k.n_layers, k.n_heads, k.n_kv_heads,
                          k.shared_classifier ? k.vocab_size : -k.vocab_size, k.seq_len};
        CHECK(static_cast<std::size_t>(28 + 4 * layout_of(back).total) == f.size());
      } catch (format_error const&) {
      }
    }
    INFO("seed 2023, accepted " << accepted << " of 3000");
    CHECK(accepted < 3000);
  }
}

TEST_CASE("llama2c: files that cannot be read throw format_error naming the path", "[io][llama2c][untrusted]") {
  std::string const missing = std::string(FACTORLLM_SHARED_DIR) + "/models/no_such_model.bin";
  CHECK_THROWS_AS(Llama2cCheckpoint::load(missing), format_error);
  CHECK_THROWS_WITH(Llama2cCheckpoint::load(missing), Catch::Contains(missing));
  CHECK_THROWS_WITH(Llama2cCheckpoint::load(std::filesystem::temp_directory_path().string()),
                    Catch::Contains("not a regular file"));
  Bytes const good = make_checkpoint(kSmallShared);
  std::string const path = write_temp(Bytes(good.begin(), good.end() - 1), "truncated");
  CHECK_THROWS_WITH(Llama2cCheckpoint::load(path), Catch::Contains(path) && Catch::Contains("truncated"));
  std::filesystem::remove(path);
  CHECK_THROWS_AS(Llama2cTokenizer::load(missing, 512), format_error);
  // A directory reports a meaningless size; it must be refused before anything is sized from it.
  CHECK_THROWS_WITH(Llama2cTokenizer::load(std::filesystem::temp_directory_path().string(), 512),
                    Catch::Contains("not a regular file"));
  // Swapped arguments: the checkpoint is far larger than 512 tokens of at most max_token_length bytes can fill.
  if (have_file(kModelPath)) CHECK_THROWS_AS(Llama2cTokenizer::load(kModelPath, 512), format_error);
  if (have_file(kTokenizerPath)) CHECK_THROWS_AS(Llama2cCheckpoint::load(kTokenizerPath), format_error);
}

// ---------------------------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("llama2c tokenizer: tok512 pieces, scores and decode", "[io][llama2c][tokenizer]") {
  if (!have_file(kTokenizerPath)) return;
  auto const tok = Llama2cTokenizer::load(kTokenizerPath, 512);
  CHECK(tok.vocab_size() == 512);
  CHECK(tok.max_token_length() == 7);
  CHECK(tok.piece(0) == "<unk>");
  CHECK(tok.piece(1) == "\n<s>\n");
  CHECK(tok.piece(2) == "\n</s>\n");
  CHECK(tok.piece(3) == "<0x00>");
  CHECK(tok.piece(13) == "<0x0A>");
  CHECK(tok.piece(258) == "<0xFF>");
  CHECK(tok.piece(259) == " t");
  CHECK(tok.score(260) == -1.0f);
  CHECK(tok.piece(403) == " Once");
  CHECK(tok.find(" ") == 410);
  CHECK(tok.find("no such piece") == -1);
  CHECK_THROWS_AS(tok.piece(512), value_error);
  CHECK_THROWS_AS(tok.score(-1), value_error);
  CHECK_THROWS_AS(tok.decode(0, 512), value_error);

  CHECK(tok.decode(1, 403) == "Once");   // leading space dropped after BOS
  CHECK(tok.decode(5, 403) == " Once");
  CHECK(tok.decode(1, 13) == "\n");
  for (int b = 0; b < 256; ++b) {
    CAPTURE(b);
    CHECK(tok.decode(0, b + Llama2cTokenizer::kByteOffset) == std::string(1, static_cast<char>(b)));
  }
}

TEST_CASE("llama2c tokenizer: tok512 encode and decode round trip", "[io][llama2c][tokenizer]") {
  if (!have_file(kTokenizerPath)) return;
  auto const tok = Llama2cTokenizer::load(kTokenizerPath, 512);
  // Pinned ids from a separate Python transcription of llama2.c's encode run on tok512.bin.
  auto const ids = tok.encode("Once upon a time", true, false);
  CHECK(ids == std::vector<int>{1, 403, 407, 261, 378});
  CHECK(tok.decode(ids) == "Once upon a time");
  CHECK(tok.encode("Once upon a time", false, true) == std::vector<int>{403, 407, 261, 378, 2});

  auto const story = tok.encode("Lily saw a big dog.\nThe end \xC3\xA9", true, true);
  CHECK(story == std::vector<int>{1, 317, 394, 261, 370, 400, 428, 426, 13, 434, 260, 344, 264, 410, 485, 2});
  CHECK(tok.decode(story) == "Lily saw a big dog.\nThe end \xC3\xA9");

  CHECK(tok.encode("", true, false) == std::vector<int>{1});
  CHECK(tok.encode("", false, false).empty());

  // Byte fallback: an emoji (F0 9F 98 80) is not a piece, so it becomes 4 byte tokens that decode to raw bytes.
  std::string const emoji = "\xF0\x9F\x98\x80";
  auto const e = tok.encode(emoji, false, false);
  REQUIRE(e.size() == 5);
  CHECK(e[0] == 410);  // the dummy prefix " "
  CHECK(e[1] == 0xF0 + 3);
  CHECK(e[4] == 0x80 + 3);
  CHECK(tok.decode(e) == " " + emoji);
  CHECK(tok.decode(tok.encode("a\tb\x01" + emoji + "\n", true, false)) == "a\tb\x01" + emoji + "\n");
}

TEST_CASE("llama2c tokenizer: greedy merges follow the scores (hand-made vocab)", "[io][llama2c][tokenizer]") {
  // ids 259.. : " " "a" "b" "ab" " a" " ab" "ba"
  auto const vocab = llama_like_vocab(
      {{" ", -10.f}, {"a", -1.f}, {"b", -2.f}, {"ab", 1.f}, {" a", 2.f}, {" ab", 3.f}, {"ba", 1.f}});
  Bytes const file = make_tokenizer(vocab, 6);
  auto const tok = Llama2cTokenizer::parse(file.data(), file.size(), static_cast<int>(vocab.size()));
  CHECK(tok.encode("ab", false, false) == std::vector<int>{264});          // " a" (2) first, then " ab" (3)
  CHECK(tok.encode("aba", false, false) == std::vector<int>{264, 260});    // " ab" + "a"
  // "bab": " b" is no piece; "ba" (1) and "ab" (1) tie: the leftmost pair wins -> " " "ba" "b".
  CHECK(tok.encode("bab", false, false) == std::vector<int>{259, 265, 261});
  CHECK(tok.encode("c", true, true) == std::vector<int>{1, 259, 'c' + 3, 2});
  CHECK(tok.decode(tok.encode("ab c", true, false)) == "ab c");

  // Without " " in the vocab the dummy prefix falls back to the byte token of ' '.
  auto const no_space = llama_like_vocab({{"a", 0.f}});
  Bytes const f2 = make_tokenizer(no_space, 6);
  auto const tok2 = Llama2cTokenizer::parse(f2.data(), f2.size(), static_cast<int>(no_space.size()));
  CHECK(tok2.encode("a", false, false) == std::vector<int>{' ' + 3, 259});

  // A vocab too small for byte fallback or BOS/EOS reports it instead of emitting invalid ids.
  Bytes const f3 = make_tokenizer({{"<unk>", 0.f}}, 5);
  auto const tiny = Llama2cTokenizer::parse(f3.data(), f3.size(), 1);
  CHECK_THROWS_AS(tiny.encode("y", false, false), value_error);
  CHECK_THROWS_AS(tiny.encode("", true, false), value_error);
  CHECK_THROWS_AS(tiny.encode("", false, true), value_error);
}

TEST_CASE("llama2c tokenizer: malformed files throw format_error", "[io][llama2c][tokenizer][untrusted]") {
  auto const vocab = llama_like_vocab({{" ", 0.f}, {"ab", 1.f}});
  int const n = static_cast<int>(vocab.size());
  Bytes const good = make_tokenizer(vocab, 6);
  REQUIRE_NOTHROW(Llama2cTokenizer::parse(good.data(), good.size(), n));

  SECTION("every truncation") {
    for (std::size_t len = 0; len < good.size(); ++len) {
      CAPTURE(len);
      Bytes const f(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(len));
      CHECK_THROWS_AS(Llama2cTokenizer::parse(f.data(), f.size(), n), format_error);
    }
  }
  SECTION("trailing bytes, or a vocab_size that does not match") {
    Bytes f = good;
    f.push_back(0);
    CHECK_THROWS_WITH(Llama2cTokenizer::parse(f.data(), f.size(), n), Catch::Contains("trailing"));
    CHECK_THROWS_AS(Llama2cTokenizer::parse(good.data(), good.size(), n - 1), format_error);
    CHECK_THROWS_AS(Llama2cTokenizer::parse(good.data(), good.size(), n + 1), format_error);
    CHECK_THROWS_AS(Llama2cTokenizer::parse(good.data(), good.size(), std::numeric_limits<int>::max()), format_error);
  }
  SECTION("bad lengths and scores") {
    auto const long_vocab = llama_like_vocab({{"abcdefg", 0.f}});  // 7 bytes > max_token_length 6
    Bytes const longer = make_tokenizer(long_vocab, 6);
    CHECK_THROWS_WITH(Llama2cTokenizer::parse(longer.data(), longer.size(), static_cast<int>(long_vocab.size())),
                      Catch::Contains("max_token_length"));
    Bytes zero_max = good;
    std::memset(zero_max.data(), 0, 4);
    CHECK_THROWS_WITH(Llama2cTokenizer::parse(zero_max.data(), zero_max.size(), n),
                      Catch::Contains("max_token_length"));
    Bytes negative = make_tokenizer({{"<unk>", 0.f}}, 6);
    std::memset(negative.data() + 8, 0xFF, 4);  // length -1
    CHECK_THROWS_WITH(Llama2cTokenizer::parse(negative.data(), negative.size(), 1), Catch::Contains("length -1"));
    Bytes huge = make_tokenizer({{"<unk>", 0.f}}, std::numeric_limits<std::int32_t>::max());
    std::memset(huge.data() + 8, 0xFF, 3);  // length 0x00FFFFFF: within max_token_length, beyond the data
    CHECK_THROWS_WITH(Llama2cTokenizer::parse(huge.data(), huge.size(), 1), Catch::Contains("truncated"));
    Bytes nan = make_tokenizer({{"<unk>", std::numeric_limits<float>::quiet_NaN()}}, 6);
    CHECK_THROWS_WITH(Llama2cTokenizer::parse(nan.data(), nan.size(), 1), Catch::Contains("NaN"));
  }
  SECTION("arguments") {
    CHECK_THROWS_AS(Llama2cTokenizer::parse(good.data(), good.size(), 0), value_error);
    CHECK_THROWS_AS(Llama2cTokenizer::parse(good.data(), good.size(), -5), value_error);
    CHECK_THROWS_AS(Llama2cTokenizer::parse(nullptr, 0, 1), format_error);
  }
  SECTION("tok512.bin truncated at every length") {
    if (!have_file(kTokenizerPath)) return;
    Bytes const real = read_bytes(kTokenizerPath);
    for (std::size_t len = 0; len < real.size(); ++len) {
      CAPTURE(len);
      CHECK_THROWS_AS(Llama2cTokenizer::parse(real.data(), len, 512), format_error);
    }
    std::string const path = write_temp(Bytes(real.begin(), real.end() - 3), "tok");
    CHECK_THROWS_WITH(Llama2cTokenizer::load(path, 512), Catch::Contains(path));
    std::filesystem::remove(path);
  }
}
