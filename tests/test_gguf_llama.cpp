// SPDX-License-Identifier: Apache-2.0
// Tests of io/gguf_llama.hpp (llama-architecture GGUF in) and of the model-level GGUF writer: stories260K written as
// the GGUF llama.cpp runs and read back gives the same tensors and the same engine outputs, dense and MoE; quantized
// experts read back as their exact dequantization; bad files are refused with the key or tensor named.
#include <catch2/catch.hpp>

#include <factorllm/core/error.hpp>
#include <factorllm/core/quant.hpp>
#include <factorllm/io/gguf.hpp>
#include <factorllm/io/gguf_llama.hpp>
#include <factorllm/io/gguf_llama_export.hpp>
#include <factorllm/io/llama2c.hpp>
#include <factorllm/model/llama_engine.hpp>
#include <factorllm/model/llama_model.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "reference/io_fixtures.hpp"
#include "reference/shared_data.hpp"

namespace {

namespace fl = factorllm;
namespace io = factorllm::io;
using Bytes = std::vector<unsigned char>;

std::string const kModelPath = std::string(FACTORLLM_SHARED_DIR) + "/models/stories260K.bin";
std::string const kTokenizerPath = std::string(FACTORLLM_SHARED_DIR) + "/models/tok512.bin";

bool have_model() { return fixture::have_shared_data({kModelPath, kTokenizerPath}); }

template <class A, class B>
bool same_values(A const& a, B const& b) {
  if (a.size() != b.size()) return false;
  for (std::ptrdiff_t i = 0; i < a.size(); ++i)
    if (!(a.data()[i] == b.data()[i])) return false;
  return true;
}

/// Logits of the engine over `m` for one fixed token sequence, as a flat vector.
std::vector<float> logits_of(fl::model::LlamaModel const& m, std::vector<int> const& tokens) {
  fl::model::LlamaEngine engine(m);
  auto const z = engine.forward_sequence(tokens);
  return std::vector<float>(z.data(), z.data() + z.rows() * z.cols());
}

std::vector<int> const kTokens = {1, 403, 407, 261, 378, 268, 395, 271, 280, 362, 13, 300, 412, 301, 260, 290};

fl::model::LlamaModel stories_with_vocab() {
  auto const ck = io::Llama2cCheckpoint::load(kModelPath);
  auto const tok = io::Llama2cTokenizer::load(kTokenizerPath, 512);
  return io::detail::llama2c_model_with_vocab(ck, tok);
}

io::GgufFile parse(Bytes const& b) { return io::GgufFile::parse(b.data(), b.size()); }

/// Overwrites the value of the u32 key `key` in a serialized GGUF (key string, then the u32 type tag, then the value).
Bytes patch_u32(Bytes b, std::string const& key, std::uint32_t value) {
  auto const it = std::search(b.begin(), b.end(), key.begin(), key.end());
  REQUIRE(it != b.end());
  auto const at = static_cast<std::size_t>(it - b.begin()) + key.size();
  REQUIRE(b[at] == 4);  // GGUF_TYPE_UINT32
  for (int i = 0; i < 4; ++i) b[at + 4 + static_cast<std::size_t>(i)] = static_cast<unsigned char>(value >> (8 * i));
  return b;
}

}  // namespace

TEST_CASE("gguf model: dense stories260K written as llama GGUF reads back bit for bit", "[io][gguf][model]") {
  if (!have_model()) return;
  auto const m = stories_with_vocab();
  Bytes const bytes = io::llama_gguf(m).serialize();
  auto const back = io::read_gguf_llama(parse(bytes));
  CHECK(back.config.d_model == m.config.d_model);
  CHECK(back.config.d_ff == m.config.d_ff);
  CHECK(back.config.n_kv_heads == m.config.n_kv_heads);
  CHECK(back.config.tied_embeddings == m.config.tied_embeddings);
  CHECK(back.config.rms_norm_eps == Approx(1e-5).epsilon(1e-6));
  CHECK(back.config.rope_theta == 10000.0);
  CHECK(same_values(back.token_embedding, m.token_embedding));
  for (std::size_t l = 0; l < m.layers.size(); ++l) {
    INFO("layer " << l);
    auto const &a = back.layers[l], &b = m.layers[l];
    CHECK(same_values(a.wq, b.wq));
    CHECK(same_values(a.wk, b.wk));
    CHECK(same_values(a.wo, b.wo));
    CHECK(same_values(a.ffn.gate, b.ffn.gate));
    CHECK(same_values(a.ffn.down, b.ffn.down));
    CHECK(same_values(a.ffn_norm, b.ffn_norm));
  }
  REQUIRE(back.vocab.has_value());
  CHECK(back.vocab->tokens == m.vocab->tokens);
  CHECK(back.vocab->scores == m.vocab->scores);
  CHECK(back.vocab->bos_id == 1);
  CHECK(logits_of(back, kTokens) == logits_of(m, kTokens));
  // The F16 file reads back as the F16 rounding of every 2-D weight.
  io::GgufExportOptions f16;
  f16.weight_type = io::GgmlType::f16;
  auto const half = io::read_gguf_llama(parse(io::llama_gguf(m, f16).serialize()));
  for (std::ptrdiff_t i = 0; i < m.layers[2].wv.size(); ++i)
    CHECK(half.layers[2].wv.data()[i] == fl::f16(m.layers[2].wv.data()[i]).to_float());
}

TEST_CASE("gguf model: a MoE GGUF (the file llama.cpp runs) gives the same engine outputs", "[io][gguf][model]") {
  if (!have_model()) return;
  auto const ck = io::Llama2cCheckpoint::load(kModelPath);
  auto const layers = fixture::stories_moe(ck, 4, fixture::gating(fl::moe::CombineMode::softmax_topk_renorm, 2), 11, 200);
  auto m = stories_with_vocab();
  auto const back = io::read_gguf_llama(parse(io::llama_moe_gguf(m, layers).serialize()));
  REQUIRE(back.has_moe());
  for (std::size_t l = 0; l < layers.size(); ++l) {
    auto const& e = *back.layers[l].moe;
    CHECK(e.n_experts() == 4);
    CHECK(e.top_k() == 2);
    CHECK(same_values(e.experts().gate_tensor(), layers[l].experts().gate_tensor()));
    CHECK(same_values(e.experts().down_tensor(), layers[l].experts().down_tensor()));
    CHECK(same_values(e.router().weight(), layers[l].router().weight()));
    m.layers[l].moe.emplace(fl::moe::MoeFfn<float, fl::CpuScalar>(layers[l]).to_backend<fl::DefaultCpu>());
  }
  CHECK(logits_of(back, kTokens) == logits_of(m, kTokens));

  // Q8_0 experts read back as their exact dequantization: same blocks when quantized again.
  auto padded = layers;
  for (auto& layer : padded)
    layer = fl::moe::MoeFfn<float, fl::CpuScalar>(fl::ffn::pad_experts(layer.experts(), 32), layer.router(), layer.gating());
  io::GgufExportOptions q8;
  q8.expert_type = io::GgmlType::q8_0;
  Bytes const qbytes = io::llama_moe_gguf(stories_with_vocab(), padded, q8).serialize();
  auto const qf = parse(qbytes);
  auto const qback = io::read_gguf_llama(qf);
  auto const blocks = qf.to_blocks<fl::q8_0>("blk.1.ffn_up_exps.weight");
  auto const& up = qback.layers[1].moe->experts().up_tensor();
  REQUIRE(static_cast<std::ptrdiff_t>(blocks.size()) * 32 == up.size());
  std::vector<float> deq(32);
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    fl::dequantize_row(&blocks[b], 32, deq.data());
    for (int i = 0; i < 32; ++i) REQUIRE(up.data()[b * 32 + static_cast<std::size_t>(i)] == deq[static_cast<std::size_t>(i)]);
  }
}

TEST_CASE("gguf model: bad files are refused naming the key or tensor", "[io][gguf][model][bad_input]") {
  if (!have_model()) return;
  auto const m = stories_with_vocab();
  auto rewrite = [&](auto&& edit) {
    io::GgufWriter w = io::llama_gguf(m);
    edit(w);
    return w.serialize();
  };
  Bytes const good = io::llama_gguf(m).serialize();
  SECTION("another architecture") {
    Bytes b = good;
    std::string const key = "general.architecture", value = "llama";
    auto const k = std::search(b.begin(), b.end(), key.begin(), key.end());
    auto const v = std::search(k, b.end(), value.begin(), value.end());  // the value follows its key
    REQUIRE(v != b.end());
    std::copy_n("mamba", 5, v);
    CHECK_THROWS_WITH(io::read_gguf_llama(parse(b)), Catch::Contains("general.architecture is 'mamba'"));
  }
  SECTION("a size out of range") {
    Bytes const b = patch_u32(good, "llama.attention.head_count_kv", 9);
    CHECK_THROWS_WITH(io::read_gguf_llama(parse(b)), Catch::Contains("llama.attention.head_count_kv' = 9 outside [1, 8]"));
  }
  SECTION("a tensor of another shape") {
    Bytes const b = patch_u32(good, "llama.feed_forward_length", 128);
    CHECK_THROWS_WITH(io::read_gguf_llama(parse(b)),
                      Catch::Contains("'blk.0.ffn_gate.weight' has shape [172, 64], expected [128, 64]"));
  }
  SECTION("a tensor the architecture does not use") {
    std::vector<float> const x(64, 1.f);
    Bytes const b = rewrite([&](io::GgufWriter& w) { w.add_tensor("rope_freqs.weight", io::GgmlType::f32, {64}, x.data()); });
    CHECK_THROWS_WITH(io::read_gguf_llama(parse(b)), Catch::Contains("rope_freqs.weight"));
  }
  SECTION("rope scaling") {
    Bytes const b = rewrite([](io::GgufWriter& w) { w.set_string("llama.rope.scaling.type", "linear"); });
    CHECK_THROWS_WITH(io::read_gguf_llama(parse(b)), Catch::Contains("rope.scaling.type"));
  }
  SECTION("a token id outside the vocabulary") {
    Bytes const b = patch_u32(good, "tokenizer.ggml.bos_token_id", 9999);
    CHECK_THROWS_WITH(io::read_gguf_llama(parse(b)), Catch::Contains("tokenizer.ggml.bos_token_id' = 9999 outside"));
  }
  SECTION("a model without a vocabulary cannot be written as GGUF") {
    auto bare = m;
    bare.vocab.reset();
    CHECK_THROWS_WITH(io::llama_gguf(bare), Catch::Contains("has no vocabulary"));
  }
}
