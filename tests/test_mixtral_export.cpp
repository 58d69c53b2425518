// SPDX-License-Identifier: Apache-2.0
// Tests of io/mixtral_export.hpp: Hugging Face Mixtral tensor names, shapes and config.json, refusals of what
// Mixtral gating cannot express, and an independent Hugging Face-layout forward over the exported tensors that must
// match our engine.
#include <catch2/catch.hpp>

#include <factorllm/core/error.hpp>
#include <factorllm/ffn/factorize.hpp>
#include <factorllm/io/llama2c.hpp>
#include <factorllm/io/mixtral_export.hpp>
#include <factorllm/io/safetensors.hpp>
#include <factorllm/moe/gating.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/moe/router.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../examples/common/llama2c_engine.hpp"
#include "reference/io_fixtures.hpp"
#include "reference/llama_reference.hpp"

namespace {

namespace fl = factorllm;
namespace io = factorllm::io;
using io::SafetensorsDtype;
using io::SafetensorsFile;
using io::SafetensorsWriter;
using Bytes = std::vector<unsigned char>;
using fixture::gating;
using fixture::temp_path;

std::string const kModelPath = std::string(FACTORLLM_SHARED_DIR) + "/models/stories260K.bin";

bool have_model() { return fixture::have_shared_data({kModelPath}); }

/// stories260K's FFNs factorized into N experts with random bias-free routers and the given gating.
std::vector<fl::moe::MoeFfn<float, fl::CpuScalar>> stories_moe(io::Llama2cCheckpoint const& ck, std::ptrdiff_t n,
                                                                fl::moe::Gating const& g) {
  return fixture::stories_moe(ck, n, g, /*partition_seed=*/7, /*router_seed=*/100);
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
