// SPDX-License-Identifier: Apache-2.0
// Tests of io/hf_llama.hpp: stories260K round trips through Hugging Face checkpoints (f32 exact, f16/bf16 rounded,
// sharded), hand-built checkpoints laid out as transformers lays them out (half-split q/k made by an independent
// loop, shard index, tied embeddings, GQA, Qwen2 biases), and every refusal of bad input.
#include <catch2/catch.hpp>

#include <factorllm/core/dtype.hpp>
#include <factorllm/core/error.hpp>
#include <factorllm/io/hf_llama.hpp>
#include <factorllm/io/llama2c.hpp>
#include <factorllm/io/safetensors.hpp>
#include <factorllm/model/llama_engine.hpp>
#include <factorllm/model/llama_model.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../examples/common/llama2c_engine.hpp"
#include "reference/model_fixtures.hpp"
#include "reference/io_fixtures.hpp"

namespace {

namespace fl = factorllm;
namespace io = factorllm::io;
namespace fs = std::filesystem;
using fl::model::LlamaModel;
using io::SafetensorsDtype;
using io::SafetensorsWriter;
using Catch::Matchers::Contains;

std::string const kModelPath = std::string(FACTORLLM_SHARED_DIR) + "/models/stories260K.bin";

/// stories260K as a LlamaModel. The shared model is required: a missing file fails the test (never a silent skip).
LlamaModel stories() {
  INFO("stories260K is needed at " << kModelPath);
  REQUIRE(std::ifstream(kModelPath, std::ios::binary).good());
  return fl::io::model_from_llama2c(io::Llama2cCheckpoint::load(kModelPath), "llama2c '" + kModelPath + "'");
}

/// A fresh, empty temporary folder.
std::string fresh_dir(std::string const& name) {
  std::string const dir = fixture::temp_path("hf_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

/// Applies `f` to every tensor pair of two models with the same layout, with the tensor's name.
template <class F>
void for_each_tensor_pair(LlamaModel const& a, LlamaModel const& b, F&& f) {
  f("token_embedding", a.token_embedding.data(), b.token_embedding.data(), a.token_embedding.size(),
    b.token_embedding.size());
  f("final_norm", a.final_norm.data(), b.final_norm.data(), a.final_norm.size(), b.final_norm.size());
  f("classifier", a.classifier.data(), b.classifier.data(), a.classifier.size(), b.classifier.size());
  REQUIRE(a.layers.size() == b.layers.size());
  for (std::size_t i = 0; i < a.layers.size(); ++i) {
    auto const &x = a.layers[i], &y = b.layers[i];
    std::string const p = "layers." + std::to_string(i) + ".";
    auto g = [&](char const* n, auto const& s, auto const& t) { f(p + n, s.data(), t.data(), s.size(), t.size()); };
    g("attn_norm", x.attn_norm, y.attn_norm);
    g("wq", x.wq, y.wq);
    g("wk", x.wk, y.wk);
    g("wv", x.wv, y.wv);
    g("wo", x.wo, y.wo);
    g("bq", x.bq, y.bq);
    g("bk", x.bk, y.bk);
    g("bv", x.bv, y.bv);
    g("ffn_norm", x.ffn_norm, y.ffn_norm);
    g("gate", x.ffn.gate, y.ffn.gate);
    g("up", x.ffn.up, y.ffn.up);
    g("down", x.ffn.down, y.ffn.down);
  }
}

/// Checks that two models have the same config and bit-identical tensors.
void require_same_model(LlamaModel const& a, LlamaModel const& b) {
  auto const &x = a.config, &y = b.config;
  CHECK(x.architecture == y.architecture);
  CHECK(x.d_model == y.d_model);
  CHECK(x.d_ff == y.d_ff);
  CHECK(x.n_layers == y.n_layers);
  CHECK(x.n_heads == y.n_heads);
  CHECK(x.n_kv_heads == y.n_kv_heads);
  CHECK(x.head_dim == y.head_dim);
  CHECK(x.vocab_size == y.vocab_size);
  CHECK(x.context_length == y.context_length);
  CHECK(x.rope_theta == y.rope_theta);
  CHECK(x.rms_norm_eps == y.rms_norm_eps);
  CHECK(x.tied_embeddings == y.tied_embeddings);
  for_each_tensor_pair(a, b, [](std::string const& name, float const* p, float const* q, std::ptrdiff_t n,
                                std::ptrdiff_t m) {
    INFO("tensor " << name);
    REQUIRE(n == m);
    if (n > 0) CHECK(std::memcmp(p, q, static_cast<std::size_t>(n) * sizeof(float)) == 0);
  });
}

/// A copy of `m` with every weight rounded through the 16-bit format Half (f16 or bf16).
template <class Half>
LlamaModel rounded(LlamaModel m) {
  LlamaModel const original = m;
  for_each_tensor_pair(m, original, [](std::string const&, float const* p, float const*, std::ptrdiff_t n,
                                       std::ptrdiff_t) {
    auto* w = const_cast<float*>(p);
    for (std::ptrdiff_t i = 0; i < n; ++i) w[i] = Half(w[i]).to_float();
  });
  return m;
}

// ------------------------------------------------------------------------------------ stories260K round trip ----

TEST_CASE("hf_llama: stories260K round trip in f32 is bit-identical", "[io][hf]") {
  LlamaModel const m = stories();
  std::string const dir = fresh_dir("f32");
  io::write_hf_llama(dir, m);
  CHECK(fs::exists(dir + "/model.safetensors"));
  CHECK_FALSE(fs::exists(dir + "/model.safetensors.index.json"));
  LlamaModel const back = io::read_hf_llama(dir);
  CHECK(back.source == "hf '" + dir + "'");
  require_same_model(m, back);
  // The other spellings of the same checkpoint.
  require_same_model(m, io::read_hf_llama(dir + "/config.json"));
  require_same_model(m, io::read_hf_llama(dir + "/model.safetensors"));

  nlohmann::json const cfg = nlohmann::json::parse(std::ifstream(dir + "/config.json"));
  CHECK(cfg["architectures"][0] == "LlamaForCausalLM");
  CHECK(cfg["model_type"] == "llama");
  CHECK(cfg["torch_dtype"] == "float32");
  CHECK(cfg["tie_word_embeddings"] == m.config.tied_embeddings);
  CHECK(cfg["head_dim"] == m.config.head_dim);
  // q is stored half-split: HF row j of head 0 is our row 2j, HF row head_dim/2 + j is our row 2j + 1.
  auto const f = io::SafetensorsFile::load(dir + "/model.safetensors");
  std::vector<float> const q = f.to_float("model.layers.0.self_attn.q_proj.weight");
  std::ptrdiff_t const d = m.config.d_model, hd = m.config.head_dim;
  CHECK(q[static_cast<std::size_t>(1 * d)] == m.layers[0].wq(2, 0));
  CHECK(q[static_cast<std::size_t>((hd / 2) * d)] == m.layers[0].wq(1, 0));
}

TEST_CASE("hf_llama: stories260K in f16 and bf16 reads back the rounded weights", "[io][hf]") {
  LlamaModel const m = stories();
  std::string const dir = fresh_dir("half");
  SECTION("f16") {
    io::write_hf_llama(dir, m, {SafetensorsDtype::f16, 0});
    nlohmann::json const cfg = nlohmann::json::parse(std::ifstream(dir + "/config.json"));
    CHECK(cfg["torch_dtype"] == "float16");
    require_same_model(rounded<fl::f16>(m), io::read_hf_llama(dir));
  }
  SECTION("bf16") {
    io::write_hf_llama(dir, m, {SafetensorsDtype::bf16, 0});
    require_same_model(rounded<fl::bf16>(m), io::read_hf_llama(dir));
  }
}

TEST_CASE("hf_llama: stories260K sharded reads back as the single file does", "[io][hf]") {
  LlamaModel const m = stories();
  std::string const one = fresh_dir("one"), many = fresh_dir("sharded");
  io::write_hf_llama(one, m);
  io::write_hf_llama(many, m, {SafetensorsDtype::f32, 200'000});
  nlohmann::json const index = nlohmann::json::parse(std::ifstream(many + "/model.safetensors.index.json"));
  std::set<std::string> shards;
  for (auto const& e : index["weight_map"]) shards.insert(e.get<std::string>());
  INFO("shards: " << shards.size());
  CHECK(shards.size() >= 3);
  CHECK(shards.count("model-00001-of-" + std::string(5 - std::to_string(shards.size()).size(), '0') +
                     std::to_string(shards.size()) + ".safetensors") == 1);
  std::uint64_t total = 0;
  for (auto const& s : shards) total += fs::file_size(many + "/" + s);
  CHECK(index["metadata"]["total_size"].get<std::uint64_t>() <= total);
  CHECK_FALSE(fs::exists(many + "/model.safetensors"));
  require_same_model(io::read_hf_llama(one), io::read_hf_llama(many));
  require_same_model(m, io::read_hf_llama(many));
}

TEST_CASE("hf_llama: stories260K through HF gives the llama2.c checkpoint's logits", "[io][hf][engine]") {
  LlamaModel const m = stories();
  std::string const dir = fresh_dir("logits");
  io::write_hf_llama(dir, m, {SafetensorsDtype::f32, 200'000});
  LlamaModel const back = io::read_hf_llama(dir);
  io::Llama2cCheckpoint const ckpt = io::Llama2cCheckpoint::load(kModelPath);
  factorllm_examples::Llama2cEngine reference(ckpt);
  fl::model::LlamaEngine engine(back);
  std::vector<int> const tokens = {1, 403, 407, 261, 378, 300, 1, 42, 511, 9};
  fl::Matrix<float> const want(reference.forward_sequence(tokens));
  auto const got = engine.forward_sequence(tokens);
  REQUIRE(got.rows() == want.extent(0));
  REQUIRE(got.cols() == want.extent(1));
  for (std::ptrdiff_t t = 0; t < got.rows(); ++t) {
    INFO("token " << t);
    CHECK(std::memcmp(got.row(t), &want(t, 0), static_cast<std::size_t>(got.cols()) * sizeof(float)) == 0);
  }
  // Decoding step by step continues from the same cache.
  auto const step = engine.forward_step(7, static_cast<int>(tokens.size()));
  auto const ref_step = reference.forward_step(7, static_cast<int>(tokens.size()));
  CHECK(std::memcmp(step.data(), ref_step.data(), static_cast<std::size_t>(step.size()) * sizeof(float)) == 0);
}

TEST_CASE("hf_llama: write_hf_llama refuses what HF Llama cannot hold", "[io][hf]") {
  LlamaModel m = stories();
  std::string const dir = fresh_dir("refuse");
  SECTION("non-float dtype") {
    CHECK_THROWS_AS(io::write_hf_llama(dir, m, {SafetensorsDtype::i32, 0}), fl::value_error);
  }
  SECTION("q/k/v biases on llama") {
    for (auto& L : m.layers) {
      L.bq = fl::Vector<float>({m.config.q_dim()});
      L.bk = fl::Vector<float>({m.config.kv_dim()});
      L.bv = fl::Vector<float>({m.config.kv_dim()});
    }
    CHECK_THROWS_AS(io::write_hf_llama(dir, m), fl::value_error);
  }
  SECTION("unknown architecture") {
    m.config.architecture = "gpt2";
    CHECK_THROWS_AS(io::write_hf_llama(dir, m), fl::value_error);
  }
}

// ---------------------------------------------------------------------- hand-built HF-layout checkpoints ----

/// A small random model in our layout: d_model 64, 4 heads of 16, 2 key/value heads (GQA), d_ff 96, 2 layers.
LlamaModel random_model(bool tied, bool biases, std::uint32_t seed) {
  fixture::RandomModelShape shape;
  shape.d_model = 64;
  shape.vocab_size = 50;
  shape.context_length = 128;
  shape.tied = tied;
  shape.biases = biases;
  return fixture::random_llama_model(shape, seed);
}

/// transformers' layout of a q/k projection, written as a plain loop independent of the library: in each head,
/// HF row j holds our row 2j (the first element of pair j) and HF row head_dim/2 + j our row 2j + 1.
std::vector<float> to_hf_rows(float const* ours, std::ptrdiff_t rows, std::ptrdiff_t cols, std::ptrdiff_t head_dim) {
  std::vector<float> hf(static_cast<std::size_t>(rows * cols));
  for (std::ptrdiff_t r = 0; r < rows; ++r) {
    std::ptrdiff_t const head = r / head_dim, i = r % head_dim;
    std::ptrdiff_t const hf_row = head * head_dim + (i % 2 == 0 ? i / 2 : head_dim / 2 + i / 2);
    for (std::ptrdiff_t k = 0; k < cols; ++k) hf[static_cast<std::size_t>(hf_row * cols + k)] = ours[r * cols + k];
  }
  return hf;
}

/// Writes `m` as transformers would (config.json by hand, half-split q/k by to_hf_rows), split over two shards with
/// an index when `sharded`. `extra` is added to the first file (to test unexpected tensors).
void write_like_transformers(std::string const& dir, LlamaModel const& m, bool sharded,
                             nlohmann::json const& config_overrides = nlohmann::json::object()) {
  auto const& c = m.config;
  bool const qwen2 = c.architecture == "qwen2";
  nlohmann::json cfg{{"architectures", {qwen2 ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
                     {"model_type", c.architecture},
                     {"hidden_size", c.d_model},
                     {"intermediate_size", c.d_ff},
                     {"num_hidden_layers", c.n_layers},
                     {"num_attention_heads", c.n_heads},
                     {"num_key_value_heads", c.n_kv_heads},
                     {"max_position_embeddings", c.context_length},
                     {"rms_norm_eps", c.rms_norm_eps},
                     {"rope_theta", c.rope_theta},
                     {"rope_scaling", nullptr},
                     {"hidden_act", "silu"},
                     {"vocab_size", c.vocab_size},
                     {"tie_word_embeddings", c.tied_embeddings},
                     {"torch_dtype", "float32"},
                     {"transformers_version", "4.44.0"}};
  cfg.update(config_overrides);
  std::ofstream(dir + "/config.json") << cfg.dump(2);
  SafetensorsWriter a, b;
  nlohmann::json map = nlohmann::json::object();
  auto put = [&](SafetensorsWriter& w, std::string const& file, std::string const& name,
                 std::vector<std::int64_t> const& shape, float const* p) {
    w.add(name, SafetensorsDtype::f32, shape, p);
    map[name] = file;
  };
  std::string const fa = sharded ? "model-00001-of-00002.safetensors" : "model.safetensors";
  std::string const fb = sharded ? "model-00002-of-00002.safetensors" : fa;
  put(a, fa, "model.embed_tokens.weight", {c.vocab_size, c.d_model}, m.token_embedding.data());
  for (std::size_t l = 0; l < m.layers.size(); ++l) {
    auto const& L = m.layers[l];
    SafetensorsWriter& w = (sharded && l > 0) ? b : a;
    std::string const& file = (sharded && l > 0) ? fb : fa;
    std::string const p = "model.layers." + std::to_string(l) + ".";
    std::vector<float> const q = to_hf_rows(L.wq.data(), c.q_dim(), c.d_model, c.head_dim);
    std::vector<float> const k = to_hf_rows(L.wk.data(), c.kv_dim(), c.d_model, c.head_dim);
    put(w, file, p + "self_attn.q_proj.weight", {c.q_dim(), c.d_model}, q.data());
    put(w, file, p + "self_attn.k_proj.weight", {c.kv_dim(), c.d_model}, k.data());
    put(w, file, p + "self_attn.v_proj.weight", {c.kv_dim(), c.d_model}, L.wv.data());
    put(w, file, p + "self_attn.o_proj.weight", {c.d_model, c.q_dim()}, L.wo.data());
    if (L.bq.size() != 0) {
      std::vector<float> const bq = to_hf_rows(L.bq.data(), c.q_dim(), 1, c.head_dim);
      std::vector<float> const bk = to_hf_rows(L.bk.data(), c.kv_dim(), 1, c.head_dim);
      put(w, file, p + "self_attn.q_proj.bias", {c.q_dim()}, bq.data());
      put(w, file, p + "self_attn.k_proj.bias", {c.kv_dim()}, bk.data());
      put(w, file, p + "self_attn.v_proj.bias", {c.kv_dim()}, L.bv.data());
    }
    put(w, file, p + "mlp.gate_proj.weight", {c.d_ff, c.d_model}, L.ffn.gate.data());
    put(w, file, p + "mlp.up_proj.weight", {c.d_ff, c.d_model}, L.ffn.up.data());
    put(w, file, p + "mlp.down_proj.weight", {c.d_model, c.d_ff}, L.ffn.down.data());
    put(w, file, p + "input_layernorm.weight", {c.d_model}, L.attn_norm.data());
    put(w, file, p + "post_attention_layernorm.weight", {c.d_model}, L.ffn_norm.data());
  }
  put(sharded ? b : a, fb, "model.norm.weight", {c.d_model}, m.final_norm.data());
  if (!c.tied_embeddings) put(sharded ? b : a, fb, "lm_head.weight", {c.vocab_size, c.d_model}, m.classifier.data());
  a.save(dir + "/" + fa);
  if (sharded) {
    b.save(dir + "/" + fb);
    nlohmann::json const index{{"metadata", {{"total_size", 0}}}, {"weight_map", map}};
    std::ofstream(dir + "/model.safetensors.index.json") << index.dump(2);
  }
}

TEST_CASE("hf_llama: a transformers-layout checkpoint reads back in our RoPE layout", "[io][hf]") {
  SECTION("llama, GQA, tied, sharded") {
    LlamaModel const m = random_model(/*tied=*/true, /*biases=*/false, 2023);
    std::string const dir = fresh_dir("hand_tied");
    write_like_transformers(dir, m, /*sharded=*/true);
    require_same_model(m, io::read_hf_llama(dir));
  }
  SECTION("llama, GQA, untied, single file") {
    LlamaModel const m = random_model(false, false, 2024);
    std::string const dir = fresh_dir("hand_untied");
    write_like_transformers(dir, m, false);
    require_same_model(m, io::read_hf_llama(dir));
  }
  SECTION("qwen2 q/k/v biases, sharded") {
    LlamaModel const m = random_model(false, true, 2025);
    std::string const dir = fresh_dir("hand_qwen2");
    write_like_transformers(dir, m, true);
    LlamaModel const back = io::read_hf_llama(dir);
    CHECK(back.config.architecture == "qwen2");
    require_same_model(m, back);
    // And through our writer and back.
    std::string const again = fresh_dir("hand_qwen2_again");
    io::write_hf_llama(again, back, {SafetensorsDtype::f32, 20'000});
    require_same_model(m, io::read_hf_llama(again));
  }
  SECTION("our writer gives transformers' bytes") {
    LlamaModel const m = random_model(true, false, 2026);
    std::string const ours = fresh_dir("hand_ours"), theirs = fresh_dir("hand_theirs");
    io::write_hf_llama(ours, m);
    write_like_transformers(theirs, m, false);
    auto const a = io::SafetensorsFile::load(ours + "/model.safetensors");
    auto const b = io::SafetensorsFile::load(theirs + "/model.safetensors");
    REQUIRE(a.tensors().size() == b.tensors().size());
    for (auto const& t : b.tensors()) {
      INFO("tensor " << t.name);
      CHECK(a.to_float(t.name) == b.to_float(t.name));
    }
  }
}

TEST_CASE("hf_llama: parse_hf_config reads transformers' fields and defaults", "[io][hf]") {
  std::string const text = R"({"architectures": ["MistralForCausalLM"], "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "rope_theta": 1000000.0, "rms_norm_eps": 1e-05, "sliding_window": null,
    "head_dim": null, "rope_scaling": null})";
  auto const c = io::parse_hf_config(text, "test");
  CHECK(c.architecture == "mistral");
  CHECK(c.head_dim == 128);
  CHECK(c.n_kv_heads == 8);
  CHECK(c.rope_theta == 1e6);
  CHECK(c.rms_norm_eps == 1e-5);
  CHECK(c.context_length == 131072);
  CHECK_FALSE(c.tied_embeddings);
}

// ------------------------------------------------------------------------------------------------ bad input ----

/// Runs read_hf_llama(dir) and checks it throws format_error whose message contains every string in `parts`.
void require_refused(std::string const& dir, std::vector<std::string> const& parts) {
  try {
    (void)io::read_hf_llama(dir);
    FAIL("read_hf_llama accepted " << dir);
  } catch (fl::format_error const& e) {
    std::string const what = e.what();
    INFO("message: " << what);
    for (auto const& p : parts) CHECK_THAT(what, Contains(p));
  }
}

/// Rewrites the JSON file at `path` with `f` applied.
template <class F>
void edit_json(std::string const& path, F&& f) {
  nlohmann::json j = nlohmann::json::parse(std::ifstream(path));
  f(j);
  std::ofstream(path, std::ios::trunc) << j.dump(2);
}

TEST_CASE("hf_llama: bad input is refused with a message naming the file, field and value", "[io][hf][bad_input]") {
  LlamaModel const m = random_model(true, false, 7);
  std::string const dir = fresh_dir("bad");
  write_like_transformers(dir, m, /*sharded=*/true);
  std::string const cfg = dir + "/config.json", index = dir + "/model.safetensors.index.json";

  SECTION("missing config.json") {
    fs::remove(cfg);
    require_refused(dir, {"config.json", dir});
  }
  SECTION("missing folder") { require_refused(dir + "/nope", {"config.json"}); }
  SECTION("wrong architecture") {
    edit_json(cfg, [](auto& j) { j["architectures"] = {"GPT2LMHeadModel"}; });
    require_refused(dir, {"config.json", "architectures", "GPT2LMHeadModel"});
  }
  SECTION("rope_scaling set") {
    edit_json(cfg, [](auto& j) { j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}}; });
    require_refused(dir, {"config.json", "rope_scaling", "linear", "not supported"});
  }
  SECTION("hidden_act other than silu") {
    edit_json(cfg, [](auto& j) { j["hidden_act"] = "gelu"; });
    require_refused(dir, {"hidden_act", "gelu"});
  }
  SECTION("odd head_dim") {
    edit_json(cfg, [](auto& j) { j["head_dim"] = 15; });
    require_refused(dir, {"config.json", "head_dim = 15", "odd"});
  }
  SECTION("field of the wrong type") {
    edit_json(cfg, [](auto& j) { j["hidden_size"] = "64"; });
    require_refused(dir, {"hidden_size", "\"64\""});
  }
  SECTION("not JSON") {
    std::ofstream(cfg, std::ios::trunc) << "{\"architectures\": [";
    require_refused(dir, {"config.json", "not valid JSON"});
  }
  SECTION("tensor in a shard the index does not list") {
    edit_json(index, [](auto& j) { j["weight_map"].erase("model.norm.weight"); });
    // The shard still holds it, but the index does not list it there.
    require_refused(dir, {"model.norm.weight", "not listed"});
  }
  SECTION("missing tensor (single file)") {
    std::string const one = fresh_dir("bad_one");
    write_like_transformers(one, random_model(false, false, 8), false);
    edit_json(one + "/config.json", [](auto& j) { j["num_hidden_layers"] = 3; });
    require_refused(one, {"model.safetensors", "model.layers.2.input_layernorm.weight", "missing"});
  }
  SECTION("wrong shape") {
    edit_json(cfg, [](auto& j) { j["intermediate_size"] = 128; });
    require_refused(dir, {"model-0000", "model.layers.0.mlp.gate_proj.weight", "[96, 64]", "[128, 64]"});
  }
  SECTION("shard name with ../") {
    edit_json(index, [](auto& j) { j["weight_map"]["model.norm.weight"] = "../model-00002-of-00002.safetensors"; });
    require_refused(dir, {"model.safetensors.index.json", "../model-00002-of-00002.safetensors", "plain file name"});
  }
  SECTION("shard name with a folder") {
    edit_json(index, [](auto& j) { j["weight_map"]["model.norm.weight"] = "/etc/passwd"; });
    require_refused(dir, {"/etc/passwd", "plain file name"});
  }
  SECTION("index pointing to a missing shard") {
    edit_json(index, [](auto& j) { j["weight_map"]["model.norm.weight"] = "model-00003-of-00003.safetensors"; });
    require_refused(dir, {"model-00003-of-00003.safetensors", "does not exist"});
  }
  SECTION("index without weight_map") {
    std::ofstream(index, std::ios::trunc) << "{\"metadata\": {}}";
    require_refused(dir, {"model.safetensors.index.json", "weight_map"});
  }
  SECTION("no weights at all") {
    fs::remove(index);
    require_refused(dir, {"neither model.safetensors nor model.safetensors.index.json"});
  }
  SECTION("non-float dtype") {
    std::string const one = fresh_dir("bad_dtype");
    std::ofstream(one + "/config.json") << nlohmann::json::parse(std::ifstream(cfg)).dump();
    auto const src = io::SafetensorsFile::load(dir + "/model-00001-of-00002.safetensors");
    auto const rest = io::SafetensorsFile::load(dir + "/model-00002-of-00002.safetensors");
    SafetensorsWriter w;
    for (auto const* f : {&src, &rest})
      for (auto const& t : f->tensors()) {
        std::vector<float> const v = f->to_float(t.name);
        if (t.name == "model.norm.weight") {
          std::vector<std::int64_t> ints(v.size(), 1);
          w.add_int(t.name, SafetensorsDtype::i32, t.shape, ints.data());
        } else {
          w.add(t.name, SafetensorsDtype::f32, t.shape, v.data());
        }
      }
    w.save(one + "/model.safetensors");
    require_refused(one, {"model.norm.weight", "I32", "F32, F16 or BF16"});
  }
  SECTION("unexpected tensor") {
    std::string const one = fresh_dir("bad_extra");
    write_like_transformers(one, m, false);
    auto const f = io::SafetensorsFile::load(one + "/model.safetensors");
    SafetensorsWriter w;
    for (auto const& t : f.tensors()) w.add(t.name, SafetensorsDtype::f32, t.shape, f.to_float(t.name).data());
    float const x[2] = {1, 2};
    w.add("model.layers.0.self_attn.rotary_emb.inv_freq", SafetensorsDtype::f32, {2}, x);  // ignored
    SECTION("ignored inv_freq") {
      w.save(one + "/model.safetensors");
      require_same_model(m, io::read_hf_llama(one));
    }
    SECTION("o_proj bias") {
      w.add("model.layers.0.self_attn.o_proj.bias", SafetensorsDtype::f32, {2}, x);
      w.save(one + "/model.safetensors");
      require_refused(one, {"model.layers.0.self_attn.o_proj.bias", "not supported"});
    }
    SECTION("anything else") {
      w.add("model.layers.0.mlp.extra", SafetensorsDtype::f32, {2}, x);
      w.save(one + "/model.safetensors");
      require_refused(one, {"unexpected tensor 'model.layers.0.mlp.extra'", "[2]"});
    }
  }
}

}  // namespace
