// SPDX-License-Identifier: Apache-2.0
// Tests of io/gguf_llama_export.hpp: the llama2.c -> llama.cpp "llama" export (keys, vocabulary, tensors, MoE
// layout, refusals), the expert tensor types (Q8_0, Q4_0, F16, BF16) on a synthetic model whose sizes fit 32-weight
// blocks, and a forward pass that reads only the exported GGUF tensors with ggml's semantics and must match our
// engine.
#include <catch2/catch.hpp>

#include <factorllm/core/error.hpp>
#include <factorllm/core/quant.hpp>
#include <factorllm/io/detail/bytes.hpp>
#include <factorllm/io/gguf.hpp>
#include <factorllm/io/gguf_llama_export.hpp>
#include <factorllm/io/llama2c.hpp>
#include <factorllm/moe/gating.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/moe/router.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../examples/common/llama2c_engine.hpp"
#include "reference/io_fixtures.hpp"
#include "reference/llama_reference.hpp"

namespace {

namespace fl = factorllm;
namespace io = factorllm::io;
using io::GgmlType;
using io::GgufFile;
using Bytes = std::vector<unsigned char>;
using Layers = std::vector<fl::moe::MoeFfn<float, fl::CpuScalar>>;
using fixture::gating;

std::string const kModelPath = std::string(FACTORLLM_SHARED_DIR) + "/models/stories260K.bin";
std::string const kTokenizerPath = std::string(FACTORLLM_SHARED_DIR) + "/models/tok512.bin";

bool have_model() { return fixture::have_shared_data({kModelPath, kTokenizerPath}); }

/// stories260K's FFNs as N-expert MoE layers with random bias-free routers (strong enough to route per token).
Layers stories_moe(io::Llama2cCheckpoint const& ck, std::ptrdiff_t n, fl::moe::Gating const& g) {
  return fixture::stories_moe(ck, n, g, /*partition_seed=*/11, /*router_seed=*/200);
}

}  // namespace

TEST_CASE("gguf export: the llama2.c tokenizer becomes a sentencepiece vocabulary", "[io][gguf][export]") {
  if (!have_model()) return;
  auto const tok = io::Llama2cTokenizer::load(kTokenizerPath, 512);
  auto const v = io::llama_vocab_from_llama2c(tok);
  REQUIRE(v.tokens.size() == 512);
  CHECK(v.tokens[0] == "<unk>");
  CHECK(v.types[0] == 2);
  CHECK(v.tokens[1] == "<s>");
  CHECK(v.types[1] == 3);
  CHECK(v.tokens[2] == "</s>");
  CHECK(v.types[2] == 3);
  for (int b = 0; b < 256; ++b) CHECK(v.types[static_cast<std::size_t>(3 + b)] == 6);
  CHECK(v.tokens[13] == "<0x0A>");
  CHECK(v.tokens[259] == "\xE2\x96\x81t");  // " t": the space is U+2581 again
  CHECK(v.types[259] == 1);
  for (int id = 0; id < 512; ++id) CHECK(v.scores[static_cast<std::size_t>(id)] == tok.score(id));
}

TEST_CASE("gguf export: dense llama2.c model as llama-architecture GGUF", "[io][gguf][export]") {
  if (!have_model()) return;
  auto const ck = io::Llama2cCheckpoint::load(kModelPath);
  auto const tok = io::Llama2cTokenizer::load(kTokenizerPath, 512);
  for (auto const type : {GgmlType::f32, GgmlType::f16}) {
    INFO("weights " << io::to_string(type));
    io::GgufExportOptions opts;
    opts.weight_type = type;
    Bytes const bytes = io::llama_gguf(ck, tok, opts).serialize();
    auto const f = GgufFile::parse(bytes.data(), bytes.size());
    CHECK(f.get_string("general.architecture") == "llama");
    CHECK(f.get_int("general.alignment") == 32);
    CHECK(f.get_int("general.file_type") == (type == GgmlType::f32 ? 0 : 1));
    CHECK(f.get_int("llama.context_length") == 512);
    CHECK(f.get_int("llama.embedding_length") == 64);
    CHECK(f.get_int("llama.block_count") == 5);
    CHECK(f.get_int("llama.feed_forward_length") == 172);
    CHECK(f.get_int("llama.attention.head_count") == 8);
    CHECK(f.get_int("llama.attention.head_count_kv") == 4);
    CHECK(f.get_int("llama.rope.dimension_count") == 8);
    CHECK(f.get_float("llama.attention.layer_norm_rms_epsilon") == 1e-5f);
    CHECK(f.find("llama.expert_count") == nullptr);
    CHECK(f.get_string("tokenizer.ggml.model") == "llama");
    CHECK(f.kv("tokenizer.ggml.tokens").array_strings.size() == 512);
    CHECK(f.kv("tokenizer.ggml.token_type").ints()[3] == 6);
    CHECK(f.get_int("tokenizer.ggml.bos_token_id") == 1);
    CHECK(f.get_int("tokenizer.ggml.eos_token_id") == 2);
    CHECK(f.get_int("tokenizer.ggml.unknown_token_id") == 0);
    CHECK(f.tensors().size() == 2 + 5 * 9);  // token_embd, output_norm (tied output), 9 per layer
    CHECK(f.find_tensor("output.weight") == nullptr);
    CHECK(f.tensor("token_embd.weight").ne == std::vector<std::int64_t>{64, 512});
    CHECK(f.tensor("token_embd.weight").type == type);
    CHECK(f.tensor("blk.0.attn_k.weight").ne == std::vector<std::int64_t>{64, 32});
    CHECK(f.tensor("blk.4.ffn_gate.weight").ne == std::vector<std::int64_t>{64, 172});
    CHECK(f.tensor("blk.4.ffn_down.weight").ne == std::vector<std::int64_t>{172, 64});
    CHECK(f.tensor("blk.4.ffn_norm.weight").type == GgmlType::f32);  // norms stay F32
    auto const q = f.to_float("blk.3.attn_q.weight");
    auto const wq = ck.wq(3);
    for (std::ptrdiff_t i = 0; i < wq.size(); ++i) {
      float const want = type == GgmlType::f32 ? wq.data()[i]
                                               : io::detail::half_to_float(io::detail::float_to_half(wq.data()[i]));
      REQUIRE(q[static_cast<std::size_t>(i)] == want);  // copied without reordering (ggml's rope is llama2.c's)
    }
    auto const up = f.to_float("blk.2.ffn_up.weight");
    if (type == GgmlType::f32) CHECK(std::equal(up.begin(), up.end(), ck.w3(2).data()));
    auto const n = f.to_float("blk.1.attn_norm.weight");
    CHECK(std::equal(n.begin(), n.end(), ck.rms_att(1).data()));
  }
}

TEST_CASE("gguf export: MoE layers as llama.cpp's stacked expert tensors", "[io][gguf][export]") {
  if (!have_model()) return;
  auto const ck = io::Llama2cCheckpoint::load(kModelPath);
  auto const tok = io::Llama2cTokenizer::load(kTokenizerPath, 512);
  auto const layers = stories_moe(ck, 4, gating(fl::moe::CombineMode::softmax_topk_renorm, 2));
  Bytes const bytes = io::llama_moe_gguf(ck, tok, layers).serialize();
  auto const f = GgufFile::parse(bytes.data(), bytes.size());
  CHECK(f.get_int("llama.expert_count") == 4);
  CHECK(f.get_int("llama.expert_used_count") == 2);
  CHECK(f.get_int("llama.feed_forward_length") == 43);  // per expert
  CHECK(f.tensors().size() == 2 + 5 * 10);
  for (int l = 0; l < 5; ++l) {
    std::string const p = "blk." + std::to_string(l) + ".";
    CHECK(f.find_tensor(p + "ffn_gate.weight") == nullptr);
    CHECK(f.tensor(p + "ffn_gate_inp.weight").ne == std::vector<std::int64_t>{64, 4});
    CHECK(f.tensor(p + "ffn_gate_exps.weight").ne == std::vector<std::int64_t>{64, 43, 4});
    CHECK(f.tensor(p + "ffn_up_exps.weight").ne == std::vector<std::int64_t>{64, 43, 4});
    CHECK(f.tensor(p + "ffn_down_exps.weight").ne == std::vector<std::int64_t>{43, 64, 4});
    auto const& a = layers[static_cast<std::size_t>(l)];
    auto const gate = f.to_float(p + "ffn_gate_exps.weight");
    auto const up = f.to_float(p + "ffn_up_exps.weight");
    auto const down = f.to_float(p + "ffn_down_exps.weight");
    auto const router = f.to_float(p + "ffn_gate_inp.weight");
    CHECK(std::equal(gate.begin(), gate.end(), a.experts().gate_tensor().data()));
    CHECK(std::equal(up.begin(), up.end(), a.experts().up_tensor().data()));
    CHECK(std::equal(down.begin(), down.end(), a.experts().down_tensor().data()));
    CHECK(std::equal(router.begin(), router.end(), a.router().weight().data()));
  }
  io::GgufExportOptions f16;
  f16.weight_type = GgmlType::f16;
  Bytes const bytes16 = io::llama_moe_gguf(ck, tok, layers, f16).serialize();
  auto const g = GgufFile::parse(bytes16.data(), bytes16.size());
  CHECK(g.tensor("blk.0.ffn_gate_exps.weight").type == GgmlType::f16);
  CHECK(g.tensor("blk.0.ffn_gate_inp.weight").type == GgmlType::f32);  // routers stay F32
}

TEST_CASE("gguf export: refuses gating llama.cpp cannot express, with a clear message", "[io][gguf][export]") {
  if (!have_model()) return;
  using fl::moe::CombineMode;
  auto const ck = io::Llama2cCheckpoint::load(kModelPath);
  auto const tok = io::Llama2cTokenizer::load(kTokenizerPath, 512);
  auto refused = [&](Layers const& layers, std::string const& fragment) {
    INFO("expecting '" << fragment << "'");
    try {
      (void)io::llama_moe_gguf(ck, tok, layers);
      FAIL("no exception");
    } catch (fl::value_error const& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(fragment) != std::string::npos);
      CHECK(std::string(e.what()).find("GGUF") != std::string::npos);
    }
  };
  refused(stories_moe(ck, 4, gating(CombineMode::code_ref, 2)), "combine mode code_ref");
  refused(stories_moe(ck, 4, gating(CombineMode::softmax_topk, 1)), "combine mode softmax_topk");
  refused(stories_moe(ck, 4, gating(CombineMode::sigmoid_topk, 2)), "combine mode sigmoid_topk");
  auto g = gating(CombineMode::topk_softmax, 2);
  g.selection_bias = {0.f, 0.f, 0.f, -1.f};
  refused(stories_moe(ck, 4, g), "selection_bias[3]");
  g = gating(CombineMode::topk_softmax, 2);
  g.output_scale = 0.5f;
  refused(stories_moe(ck, 4, g), "output_scale");
  {
    auto layers = stories_moe(ck, 4, gating(CombineMode::softmax_topk_renorm, 2));
    auto const& a = layers[0];
    fl::moe::Router<float> biased(fl::Matrix<float>(a.router().weight()), fl::Vector<float>({4}));
    biased.mutable_bias()[0] = -0.5f;
    layers[0] = fl::moe::MoeFfn<float, fl::CpuScalar>(a.experts(), std::move(biased), a.gating());
    refused(layers, "router bias[0]");
    layers[0] = stories_moe(ck, 4, gating(CombineMode::softmax_topk_renorm, 3))[0];
    CHECK_THROWS_WITH(io::llama_moe_gguf(ck, tok, layers), Catch::Contains("one N and one K"));
  }
  CHECK_NOTHROW(io::llama_moe_gguf(ck, tok, stories_moe(ck, 4, gating(CombineMode::softmax_topk, 4))));
  io::GgufExportOptions bad;
  bad.weight_type = GgmlType::i32;
  CHECK_THROWS_AS(io::llama_gguf(ck, tok, bad), fl::value_error);
}

// ---------------------------------------------------------------------------------------------------------------
// A forward pass over the GGUF tensors with ggml's semantics
// ---------------------------------------------------------------------------------------------------------------

namespace {

using ref::RowMajorF;

/// llama.cpp's llama-architecture forward (llm_build_llama) over the GGUF file only: every tensor is read by name
/// with ggml's dimension order (ne[0] = row length, so a weight with ne {in, out} is an [out, in] row-major matrix
/// applied as x W^T), RoPE in ggml's "normal" mode (adjacent pairs (2j, 2j+1) of each head, theta = base^(-2j/n_rot)),
/// and, for MoE, build_moe_ffn's softmax gating -> TopK -> renormalized weights over ffn_*_exps.
RowMajorF ggml_llama_forward(GgufFile const& f, std::vector<int> const& tokens) {
  int const d = static_cast<int>(f.get_int("llama.embedding_length"));
  int const n_layers = static_cast<int>(f.get_int("llama.block_count"));
  int const n_heads = static_cast<int>(f.get_int("llama.attention.head_count"));
  int const n_kv = static_cast<int>(f.get_int("llama.attention.head_count_kv"));
  int const n_rot = static_cast<int>(f.get_int("llama.rope.dimension_count"));
  float const eps = static_cast<float>(f.get_float("llama.attention.layer_norm_rms_epsilon"));
  double const base = f.get_float("llama.rope.freq_base");
  int const n_exp = f.find("llama.expert_count") ? static_cast<int>(f.get_int("llama.expert_count")) : 0;
  int const n_used = n_exp ? static_cast<int>(f.get_int("llama.expert_used_count")) : 0;
  int const hs = d / n_heads, T = static_cast<int>(tokens.size());
  // Matrix view of a 2-D tensor, or of slice e of a 3-D one: rows = ne[1], cols = ne[0].
  auto mat = [&](std::string const& name, int e = 0) {
    auto const& t = f.tensor(name);
    std::vector<float> const v = f.to_float(name);
    Eigen::Index const cols = t.ne[0], rows = t.ne.size() > 1 ? t.ne[1] : 1;
    return RowMajorF(Eigen::Map<RowMajorF const>(v.data() + static_cast<std::size_t>(e) * rows * cols, rows, cols));
  };
  auto rms = [&](RowMajorF const& x, RowMajorF const& w) {
    RowMajorF o(x.rows(), x.cols());
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
      float const inv = 1.0f / std::sqrt(x.row(t).squaredNorm() / static_cast<float>(x.cols()) + eps);
      for (Eigen::Index i = 0; i < x.cols(); ++i) o(t, i) = w(0, i) * (x(t, i) * inv);
    }
    return o;
  };
  auto rope = [&](RowMajorF& x, int heads) {
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < heads; ++h)
        for (int j = 0; j < n_rot / 2; ++j) {
          double const a = t * std::pow(base, -2.0 * j / n_rot);
          float const c = static_cast<float>(std::cos(a)), s = static_cast<float>(std::sin(a));
          float& x0 = x(t, h * hs + 2 * j);
          float& x1 = x(t, h * hs + 2 * j + 1);
          float const v0 = x0, v1 = x1;
          x0 = v0 * c - v1 * s;
          x1 = v0 * s + v1 * c;
        }
  };
  auto swiglu = [](RowMajorF const& x, RowMajorF const& gate, RowMajorF const& up, RowMajorF const& down) {
    RowMajorF const g = x * gate.transpose(), u = x * up.transpose();
    RowMajorF a(g.rows(), g.cols());
    for (Eigen::Index i = 0; i < a.size(); ++i) a.data()[i] = g.data()[i] / (1.0f + std::exp(-g.data()[i])) * u.data()[i];
    return RowMajorF(a * down.transpose());
  };
  RowMajorF const emb = mat("token_embd.weight");
  RowMajorF x(T, d);
  for (int t = 0; t < T; ++t) x.row(t) = emb.row(tokens[static_cast<std::size_t>(t)]);
  for (int l = 0; l < n_layers; ++l) {
    std::string const p = "blk." + std::to_string(l) + ".";
    RowMajorF const h = rms(x, mat(p + "attn_norm.weight"));
    RowMajorF q = h * mat(p + "attn_q.weight").transpose();
    RowMajorF k = h * mat(p + "attn_k.weight").transpose();
    RowMajorF const v = h * mat(p + "attn_v.weight").transpose();
    rope(q, n_heads);
    rope(k, n_kv);
    RowMajorF const att = ref::causal_gqa_attention(q, k, v, n_heads, n_kv, hs);
    x += att * mat(p + "attn_output.weight").transpose();
    RowMajorF const hn = rms(x, mat(p + "ffn_norm.weight"));
    if (n_exp == 0) {
      x += swiglu(hn, mat(p + "ffn_gate.weight"), mat(p + "ffn_up.weight"), mat(p + "ffn_down.weight"));
      continue;
    }
    RowMajorF const logits = hn * mat(p + "ffn_gate_inp.weight").transpose();  // [T, n_expert]
    for (int t = 0; t < T; ++t) {
      RowMajorF const xt = hn.row(t);
      for (auto const& [e, w] : ref::softmax_topk_renorm(logits.row(t), n_used)) {
        RowMajorF const o = swiglu(xt, mat(p + "ffn_gate_exps.weight", e), mat(p + "ffn_up_exps.weight", e),
                                   mat(p + "ffn_down_exps.weight", e));
        x.row(t) += static_cast<float>(w) * o;
      }
    }
  }
  RowMajorF const out = rms(x, mat("output_norm.weight"));
  RowMajorF const head = f.find_tensor("output.weight") ? mat("output.weight") : emb;
  return out * head.transpose();
}

double max_abs_diff(RowMajorF const& a, fl::MatrixView<float const> b) {
  double m = 0;
  for (Eigen::Index t = 0; t < a.rows(); ++t)
    for (Eigen::Index v = 0; v < a.cols(); ++v) m = std::max(m, std::abs(static_cast<double>(a(t, v)) - b(t, v)));
  return m;
}

}  // namespace

TEST_CASE("gguf export: a ggml-semantics forward over the exported file matches our engine", "[io][gguf][export]") {
  if (!have_model()) return;
  auto const ck = io::Llama2cCheckpoint::load(kModelPath);
  auto const tok = io::Llama2cTokenizer::load(kTokenizerPath, 512);
  std::vector<int> const tokens{1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426};
  // Float32 in both with different summation orders: logits agree to ~1e-5; any layout error moves them by O(1).
  constexpr double kTol = 2e-3;

  factorllm_examples::Llama2cEngine engine(ck);
  Bytes const dense = io::llama_gguf(ck, tok).serialize();
  RowMajorF const gd = ggml_llama_forward(GgufFile::parse(dense.data(), dense.size()), tokens);
  double const dense_diff = max_abs_diff(gd, engine.forward_sequence(tokens));
  INFO("dense: max |logit difference| = " << dense_diff);
  CHECK(dense_diff < kTol);

  auto const layers = stories_moe(ck, 4, gating(fl::moe::CombineMode::softmax_topk_renorm, 2));
  for (int l = 0; l < ck.config().n_layers; ++l) {
    auto const& a = layers[static_cast<std::size_t>(l)];
    engine.set_ffn(l, std::make_unique<factorllm_examples::MoeFfnLayer>(
                          fl::moe::MoeFfn<float, fl::CpuSimd<>>(a.experts(), a.router(), a.gating()), 32));
  }
  Bytes const moe = io::llama_moe_gguf(ck, tok, layers).serialize();
  RowMajorF const gm = ggml_llama_forward(GgufFile::parse(moe.data(), moe.size()), tokens);
  double const moe_diff = max_abs_diff(gm, engine.forward_sequence(tokens));
  INFO("MoE: max |logit difference| = " << moe_diff);
  CHECK(moe_diff < kTol);
}

// ---------------------------------------------------------------------------------------------------------------
// Expert tensor types (GgufExportOptions::expert_type): Q8_0, Q4_0, F16, BF16
// ---------------------------------------------------------------------------------------------------------------

namespace {

void put_i32(Bytes& b, std::int32_t v) {
  for (int i = 0; i < 4; ++i) b.push_back(static_cast<unsigned char>(static_cast<std::uint32_t>(v) >> (8 * i)));
}
void put_f32(Bytes& b, float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  put_i32(b, static_cast<std::int32_t>(u));
}

/// A small llama2.c model with random weights whose sizes fit the block formats (stories260K's d_expert = 172 / N
/// never is a multiple of 32): dim 64, the given hidden_dim, 2 layers, 4 heads (2 kv heads), 16 tokens, seq_len 16.
/// Norm weights near 1, matrices N(0, 1/dim) (seeded); llama2.c's legacy layout, shared classifier.
io::Llama2cCheckpoint synthetic_checkpoint(std::int32_t hidden_dim) {
  std::int32_t const dim = 64, layers = 2, heads = 4, kv_heads = 2, vocab = 16, seq = 16, hs = dim / heads,
                     kv = kv_heads * hs;
  Bytes b;
  for (std::int32_t v : {dim, hidden_dim, layers, heads, kv_heads, vocab, seq}) put_i32(b, v);
  std::mt19937 rng(99);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto matrix = [&](std::int64_t n, float scale) {
    for (std::int64_t i = 0; i < n; ++i) put_f32(b, normal(rng) * scale);
  };
  auto norm = [&](std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i) put_f32(b, 1.f + 0.1f * normal(rng));
  };
  float const s = 1.f / std::sqrt(static_cast<float>(dim));
  matrix(vocab * dim, 1.f);                 // token embedding
  norm(layers * dim);                       // rms_att
  matrix(layers * dim * dim, s);            // wq
  matrix(layers * kv * dim, s);             // wk
  matrix(layers * kv * dim, s);             // wv
  matrix(layers * dim * dim, s);            // wo
  norm(layers * dim);                       // rms_ffn
  matrix(layers * hidden_dim * dim, s);     // w1
  matrix(layers * dim * hidden_dim, 1.f / std::sqrt(static_cast<float>(hidden_dim)));  // w2
  matrix(layers * hidden_dim * dim, s);     // w3
  norm(dim);                                // rms_final
  matrix(seq * hs, 0.f);                    // freq_cis_real, freq_cis_imag (unused)
  return io::Llama2cCheckpoint::parse(b.data(), b.size());
}

/// Its tokenizer: <unk>, BOS, EOS and the letters a .. m.
io::Llama2cTokenizer synthetic_tokenizer() {
  std::vector<std::string> pieces{"<unk>", "\n<s>\n", "\n</s>\n"};
  for (char c = 'a'; c <= 'm'; ++c) pieces.emplace_back(1, c);
  Bytes b;
  put_i32(b, 8);
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    put_f32(b, -static_cast<float>(i));
    put_i32(b, static_cast<std::int32_t>(pieces[i].size()));
    b.insert(b.end(), pieces[i].begin(), pieces[i].end());
  }
  return io::Llama2cTokenizer::parse(b.data(), b.size(), 16);
}

/// The synthetic model's FFNs as 4-expert layers (d_expert = hidden_dim / 4), top-2 renormalized, in format T.
template <class T>
std::vector<fl::moe::MoeFfn<T, fl::CpuScalar>> synthetic_moe(io::Llama2cCheckpoint const& ck) {
  std::vector<fl::moe::MoeFfn<T, fl::CpuScalar>> layers;
  for (int l = 0; l < ck.config().n_layers; ++l) {
    auto ex = fl::ffn::factorize(ck.ffn(l), fl::ffn::ExpertPartition::random(ck.config().hidden_dim, 4, 50 + l));
    layers.emplace_back(fl::ffn::convert_format<T>(ex), fl::moe::Router<float>::random(ck.config().dim, 4, 60 + l, 1.0),
                        gating(fl::moe::CombineMode::softmax_topk_renorm, 2));
  }
  return layers;
}

char const* const kExpertTensors[] = {"ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"};

template <class T>
fl::Tensor<T, 3> const& expert_tensor(fl::ffn::ExpertWeights<T> const& e, int which) {
  return which == 0 ? e.gate_tensor() : which == 1 ? e.up_tensor() : e.down_tensor();
}

}  // namespace

TEST_CASE("gguf export: expert_type writes the expert tensors as Q8_0, Q4_0, F16 or BF16, the rest as before",
          "[io][gguf][export][quant]") {
  auto const ck = synthetic_checkpoint(128);
  auto const tok = synthetic_tokenizer();
  auto const layers = synthetic_moe<float>(ck);
  struct Case {
    GgmlType expert, weight;
    std::int64_t file_type;
  };
  for (Case const c : {Case{GgmlType::q8_0, GgmlType::f32, 7}, Case{GgmlType::q4_0, GgmlType::f16, 2},
                       Case{GgmlType::f16, GgmlType::f32, 1}, Case{GgmlType::bf16, GgmlType::f32, 32}}) {
    INFO("experts " << io::to_string(c.expert) << ", other weights " << io::to_string(c.weight));
    io::GgufExportOptions o;
    o.expert_type = c.expert;
    o.weight_type = c.weight;
    Bytes const bytes = io::llama_moe_gguf(ck, tok, layers, o).serialize();
    auto const f = GgufFile::parse(bytes.data(), bytes.size());
    CHECK(f.get_int("general.file_type") == c.file_type);
    CHECK(f.tensor("token_embd.weight").type == c.weight);
    for (int l = 0; l < 2; ++l) {
      std::string const p = "blk." + std::to_string(l) + ".";
      CHECK(f.tensor(p + "attn_q.weight").type == c.weight);
      CHECK(f.tensor(p + "ffn_norm.weight").type == GgmlType::f32);
      CHECK(f.tensor(p + "ffn_gate_inp.weight").type == GgmlType::f32);  // routers stay F32
      CHECK(f.tensor(p + "ffn_gate_exps.weight").ne == std::vector<std::int64_t>{64, 32, 4});
      CHECK(f.tensor(p + "ffn_down_exps.weight").ne == std::vector<std::int64_t>{32, 64, 4});
      auto const& e = layers[static_cast<std::size_t>(l)].experts();
      for (int which = 0; which < 3; ++which) {
        std::string const name = p + kExpertTensors[which];
        INFO(name);
        auto const& t = f.tensor(name);
        CHECK(t.type == c.expert);
        auto const& src = expert_tensor(e, which);
        if (c.expert == GgmlType::q8_0) {
          CHECK(t.bytes == static_cast<std::uint64_t>(src.size() / 32 * 34));
          auto const want = fl::convert<fl::q8_0>(src.cview());  // ggml's row layout: rows of ne[0] / 32 blocks
          auto const got = f.to_blocks<fl::q8_0>(name);
          CHECK(std::memcmp(got.data(), want.data(), got.size() * sizeof(fl::q8_0)) == 0);
        } else if (c.expert == GgmlType::q4_0) {
          CHECK(t.bytes == static_cast<std::uint64_t>(src.size() / 32 * 18));
          auto const want = fl::convert<fl::q4_0>(src.cview());
          auto const got = f.to_blocks<fl::q4_0>(name);
          CHECK(std::memcmp(got.data(), want.data(), got.size() * sizeof(fl::q4_0)) == 0);
        } else {
          auto const got = f.to_float(name);
          for (std::ptrdiff_t k = 0; k < src.size(); ++k) {
            float const want = c.expert == GgmlType::f16 ? fl::f16(src[k]).to_float() : fl::bf16(src[k]).to_float();
            REQUIRE(got[static_cast<std::size_t>(k)] == want);
          }
        }
      }
    }
  }
}

TEST_CASE("gguf export: q8_0 and q4_0 layers keep their blocks bit for bit", "[io][gguf][export][quant]") {
  auto const ck = synthetic_checkpoint(128);
  auto const tok = synthetic_tokenizer();
  auto const q8 = synthetic_moe<fl::q8_0>(ck);
  auto const q4 = synthetic_moe<fl::q4_0>(ck);
  Bytes const b8 = io::llama_moe_gguf(ck, tok, q8).serialize();  // expert_type unset: the layers' own format
  Bytes const b4 = io::llama_moe_gguf(ck, tok, q4).serialize();
  io::GgufExportOptions as_f32;
  as_f32.expert_type = GgmlType::f32;
  Bytes const b8f = io::llama_moe_gguf(ck, tok, q8, as_f32).serialize();
  auto const f8 = GgufFile::parse(b8.data(), b8.size()), f4 = GgufFile::parse(b4.data(), b4.size()),
             f8f = GgufFile::parse(b8f.data(), b8f.size());
  CHECK(f8.get_int("general.file_type") == 7);
  CHECK(f4.get_int("general.file_type") == 2);
  for (int l = 0; l < 2; ++l)
    for (int which = 0; which < 3; ++which) {
      std::string const name = "blk." + std::to_string(l) + "." + kExpertTensors[which];
      INFO(name);
      auto const& s8 = expert_tensor(q8[static_cast<std::size_t>(l)].experts(), which);
      auto const& s4 = expert_tensor(q4[static_cast<std::size_t>(l)].experts(), which);
      auto const g8 = f8.to_blocks<fl::q8_0>(name);
      auto const g4 = f4.to_blocks<fl::q4_0>(name);
      REQUIRE(static_cast<std::ptrdiff_t>(g8.size()) == s8.size());
      CHECK(std::memcmp(g8.data(), s8.data(), g8.size() * sizeof(fl::q8_0)) == 0);
      CHECK(std::memcmp(g4.data(), s4.data(), g4.size() * sizeof(fl::q4_0)) == 0);
      // As F32: the exact dequantization.
      CHECK(f8f.tensor(name).type == GgmlType::f32);
      auto const deq = f8f.to_float(name);
      auto const want = fl::convert<float>(s8.cview());
      CHECK(std::equal(deq.begin(), deq.end(), want.data()));
    }
}

TEST_CASE("gguf export: a ggml-semantics forward over Q8_0 and Q4_0 experts matches our engine on those layers",
          "[io][gguf][export][quant]") {
  auto const ck = synthetic_checkpoint(128);
  auto const tok = synthetic_tokenizer();
  std::vector<int> const tokens{1, 5, 9, 3, 14, 7, 7, 12, 4, 10};
  // ggml's forward reads the dequantized weights (to_float) and computes in float; our engine runs the q8_0 / q4_0
  // layers on the oracle (double sums of the same exact weights). Float summation order only: ~1e-5 here; a layout
  // error in a block or row moves the logits by O(1).
  constexpr double kTol = 2e-3;
  auto check = [&](auto const& layers, char const* what) {
    using Layer = typename std::decay_t<decltype(layers)>::value_type;
    factorllm_examples::Llama2cEngine engine(ck);
    for (int l = 0; l < ck.config().n_layers; ++l)
      engine.set_ffn(l, std::make_unique<factorllm_examples::MoeLayerAdapter<Layer>>(layers[static_cast<std::size_t>(l)], 16));
    Bytes const bytes = io::llama_moe_gguf(ck, tok, layers).serialize();
    RowMajorF const g = ggml_llama_forward(GgufFile::parse(bytes.data(), bytes.size()), tokens);
    double const diff = max_abs_diff(g, engine.forward_sequence(tokens));
    INFO(what << ": max |logit difference| = " << diff);
    CHECK(diff < kTol);
  };
  check(synthetic_moe<fl::q8_0>(ck), "Q8_0");
  check(synthetic_moe<fl::q4_0>(ck), "Q4_0");
}

TEST_CASE("gguf export: expert_type refusals name the reason", "[io][gguf][export][quant]") {
  auto const tok = synthetic_tokenizer();
  auto const ck = synthetic_checkpoint(128);
  io::GgufExportOptions o;
  o.expert_type = GgmlType::q8_0;
  CHECK_THROWS_WITH(io::llama_gguf(ck, tok, o), Catch::Contains("expert_type Q8_0 is set but the export is dense"));
  o.expert_type = GgmlType::i32;
  CHECK_THROWS_WITH(io::llama_moe_gguf(ck, tok, synthetic_moe<float>(ck), o),
                    Catch::Contains("expert_type I32 is not F32, F16, BF16, Q8_0 or Q4_0"));
  auto const ck192 = synthetic_checkpoint(192);  // d_expert = 48
  o.expert_type = GgmlType::q4_0;
  CHECK_THROWS_WITH(io::llama_moe_gguf(ck192, tok, synthetic_moe<float>(ck192), o),
                    Catch::Contains("multiples of 32; the layers have d_model 64 and d_expert 48"));
  o.expert_type = GgmlType::f16;
  CHECK_NOTHROW(io::llama_moe_gguf(ck192, tok, synthetic_moe<float>(ck192), o));
}

TEST_CASE("gguf export: d_expert 43 padded to 64 with zero neurons exports as Q8_0 / Q4_0 and computes the same",
          "[io][gguf][export][quant][pad]") {
  auto const ck = synthetic_checkpoint(172);  // stories260K's hidden_dim: 4 experts of 43 neurons
  auto const tok = synthetic_tokenizer();
  std::vector<int> const tokens{1, 5, 9, 3, 14, 7, 7, 12, 4, 10};
  using ScalarMoe = fl::moe::MoeFfn<float, fl::CpuScalar>;
  std::vector<ScalarMoe> plain, padded;
  std::vector<fl::moe::MoeFfn<fl::q8_0, fl::CpuScalar>> q8;
  std::vector<fl::moe::MoeFfn<fl::q4_0, fl::CpuScalar>> q4;
  for (int l = 0; l < ck.config().n_layers; ++l) {
    auto const ex = fl::ffn::factorize(ck.ffn(l), fl::ffn::ExpertPartition::random(172, 4, 70 + l));
    auto const router = fl::moe::Router<float>::random(ck.config().dim, 4, 80 + l, 1.0);
    auto const g = gating(fl::moe::CombineMode::softmax_topk_renorm, 2);
    auto const ex64 = fl::ffn::pad_experts(ex, 32);
    REQUIRE(ex64.d_expert() == 64);
    plain.emplace_back(ex, router, g);
    padded.emplace_back(ex64, router, g);
    q8.emplace_back(fl::ffn::convert_format<fl::q8_0>(ex64), router, g);
    q4.emplace_back(fl::ffn::convert_format<fl::q4_0>(ex64), router, g);
  }
  io::GgufExportOptions as_q8;
  as_q8.expert_type = GgmlType::q8_0;
  CHECK_THROWS_WITH(io::llama_moe_gguf(ck, tok, plain, as_q8),
                    Catch::Contains("d_expert 43 (ffn::pad_experts pads d_expert with zero neurons)"));
  // Our engine: padding changes no logit beyond float rounding (the zero neurons add exact zeros to the sums).
  auto logits_of = [&](auto const& layers) {
    using Layer = typename std::decay_t<decltype(layers)>::value_type;
    factorllm_examples::Llama2cEngine engine(ck);
    for (int l = 0; l < ck.config().n_layers; ++l)
      engine.set_ffn(l, std::make_unique<factorllm_examples::MoeLayerAdapter<Layer>>(layers[static_cast<std::size_t>(l)], 16));
    auto const v = engine.forward_sequence(tokens);
    RowMajorF out(v.rows(), v.cols());
    for (Eigen::Index t = 0; t < out.rows(); ++t)
      for (Eigen::Index k = 0; k < out.cols(); ++k) out(t, k) = v(t, k);
    return out;
  };
  RowMajorF const lp = logits_of(plain), l64 = logits_of(padded);
  double const pad_diff = (lp - l64).cwiseAbs().maxCoeff();
  INFO("padded vs unpadded: max |logit difference| = " << pad_diff);
  CHECK(pad_diff < 1e-5);
  // The files: feed_forward_length 64, experts [4, 64, 64] in blocks, and a ggml-semantics forward over them (float
  // sums of the dequantized weights) matches our engine on the same quantized layers (oracle: double sums).
  auto check = [&](auto const& layers, GgmlType type, char const* what) {
    Bytes const bytes = io::llama_moe_gguf(ck, tok, layers).serialize();
    auto const f = GgufFile::parse(bytes.data(), bytes.size());
    CHECK(f.get_int("llama.feed_forward_length") == 64);
    CHECK(f.tensor("blk.0.ffn_gate_exps.weight").type == type);
    CHECK(f.tensor("blk.0.ffn_gate_exps.weight").ne == std::vector<std::int64_t>{64, 64, 4});
    CHECK(f.tensor("blk.1.ffn_down_exps.weight").ne == std::vector<std::int64_t>{64, 64, 4});
    // Every padded down column (neurons 43..63 of each expert) dequantizes to exactly 0.
    auto const down = f.to_float("blk.1.ffn_down_exps.weight");  // [4][64 rows of d_model][64 neurons]
    for (std::size_t e = 0; e < 4; ++e)
      for (std::size_t o = 0; o < 64; ++o)
        for (std::size_t i = 43; i < 64; ++i) REQUIRE(down[(e * 64 + o) * 64 + i] == 0.f);
    double const diff = (ggml_llama_forward(f, tokens) - logits_of(layers)).cwiseAbs().maxCoeff();
    INFO(what << ": max |logit difference| = " << diff);
    CHECK(diff < 2e-3);  // float vs double summation only, as in the unpadded Q8_0 / Q4_0 test above
  };
  check(q8, GgmlType::q8_0, "Q8_0");
  check(q4, GgmlType::q4_0, "Q4_0");
  // The layers may have more neurons than the checkpoint's hidden_dim (padding), never fewer.
  auto const ck128 = synthetic_checkpoint(128);
  CHECK_THROWS_WITH(io::llama_moe_gguf(ck, tok, synthetic_moe<float>(ck128)),
                    Catch::Contains("d_ff may exceed hidden_dim only by zero-neuron padding"));
}
