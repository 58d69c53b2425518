// SPDX-License-Identifier: Apache-2.0
// The reference Llama-family engine: a plain CPU forward (RMSNorm, RoPE on adjacent pairs, grouped-query attention,
// KV cache, tied or separate classifier) of any model::LlamaModel, whose FFN of each layer is a pluggable object
// (docs/model.md §3). It is what calibration, conversion and evaluation run, and what exported files are checked
// against; it is not tuned for speed outside the FFN.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "factorllm/backend/simd/cpu_simd.hpp"
#include "factorllm/core/error.hpp"
#include "factorllm/core/tensor.hpp"
#include "factorllm/core/tensor_view.hpp"
#include "factorllm/core/workspace.hpp"
#include "factorllm/detail/random.hpp"
#include "factorllm/ffn/swiglu.hpp"
#include "factorllm/model/llama_model.hpp"
#include "factorllm/moe/moe_ffn.hpp"

namespace factorllm {
namespace model {

/// The FFN of one decoder layer as the engine sees it: rows in, rows out.
/// Implementations own whatever scratch they need, so `forward` does not allocate once it has seen its largest
/// batch. Not thread safe (the scratch is per object); the engine calls it from one thread.
class FfnLayer {
 public:
  virtual ~FfnLayer() = default;
  /// Computes y = FFN(x) for every row.
  /// \param x  [n_tokens, d_model] the post-attention RMSNorm output
  /// \param y  [n_tokens, d_model] the FFN output (the engine adds it to the residual); does not alias x
  virtual void forward(MatrixView<float const> x, MatrixView<float> y) = 0;
  /// Returns a short human-readable description ("dense", "moe N=4 K=2", ...).
  virtual std::string describe() const = 0;
};

/// The dense SwiGLU FFN through the library's CpuSimd backend (the reference every MoE is measured against).
class DenseFfnLayer final : public FfnLayer {
 public:
  /// \param weights     views of the checkpoint's w1 / w3 / w2 (must outlive this object)
  /// \param max_tokens  rows per call the workspace is sized for (larger calls grow it once)
  explicit DenseFfnLayer(ffn::DenseFfnView<float> weights, std::ptrdiff_t max_tokens = 1)
      : weights_(weights), ws_(workspace_for(std::max<std::ptrdiff_t>(max_tokens, 1))) {
    weights_.validate("DenseFfnLayer");
  }

  void forward(MatrixView<float const> x, MatrixView<float> y) override {
    ws_.reserve(workspace_for(x.rows()));  // no-op once sized for the largest batch
    ffn::swiglu_forward(weights_, x, y, ws_, CpuSimd<>{});
  }
  std::string describe() const override { return "dense"; }

 private:
  std::size_t workspace_for(std::ptrdiff_t rows) const {
    return ffn::swiglu_workspace_bytes(rows, weights_.d_model(), weights_.d_ff(), CpuSimd<>{});
  }

  ffn::DenseFfnView<float> weights_;
  Workspace ws_;
};

/// Adapts any library MoE layer with `forward(x, y, Workspace&)` and `workspace_bytes(n_tokens)` (MoeFfn,
/// SharedExpertMoe) to the engine: it owns the layer and a workspace sized for the largest batch seen.
template <class Moe>
class MoeLayerAdapter final : public FfnLayer {
 public:
  /// \param moe         the converted layer (moved in)
  /// \param max_tokens  rows per call the workspace is sized for (larger calls grow it once)
  /// \param label       text returned by describe()
  explicit MoeLayerAdapter(Moe moe, std::ptrdiff_t max_tokens = 1, std::string label = "moe")
      : moe_(std::move(moe)), ws_(moe_.workspace_bytes(std::max<std::ptrdiff_t>(max_tokens, 1))),
        label_(std::move(label)) {}

  void forward(MatrixView<float const> x, MatrixView<float> y) override {
    ws_.reserve(moe_.workspace_bytes(x.rows()));  // no-op once sized for the largest batch
    moe_.forward(x, y, ws_);
  }
  std::string describe() const override { return label_; }
  /// Returns the wrapped layer (router, experts, gating) for inspection.
  Moe const& layer() const noexcept { return moe_; }

 private:
  Moe moe_;
  Workspace ws_;
  std::string label_;
};

/// The MoE layer of the library on the CpuSimd backend, as an engine FFN.
using MoeFfnLayer = MoeLayerAdapter<moe::MoeFfn<float, CpuSimd<>>>;

/// Draws tokens from logits: greedy (temperature 0, ties to the lowest id) or from softmax(logits / temperature)
/// with its own seeded generator, so a (seed, temperature) pair gives the same tokens on every platform.
class Sampler {
 public:
  /// \param temperature  0 for greedy (argmax), else > 0
  /// \param seed         seed of the std::mt19937_64 used for non-greedy draws
  /// \throws value_error if temperature is negative or not finite.
  explicit Sampler(float temperature = 0.f, std::uint64_t seed = 0) : temperature_(temperature), rng_(seed) {
    if (!(temperature >= 0.f) || !std::isfinite(temperature))
      throw value_error(factorllm::detail::concat("Sampler: temperature must be finite and >= 0, got ", temperature));
  }

  /// Returns the index of the largest logit (the lowest index on ties).
  static int argmax(float const* logits, std::ptrdiff_t n) noexcept {
    std::ptrdiff_t best = 0;
    for (std::ptrdiff_t i = 1; i < n; ++i)
      if (logits[i] > logits[best]) best = i;
    return static_cast<int>(best);
  }

  /// Returns the next token for one row of logits [vocab].
  int sample(VectorView<float const> logits) {
    std::ptrdiff_t const n = logits.extent(0);
    if (n < 1) throw value_error("Sampler::sample: empty logits");
    if (temperature_ == 0.f) return argmax(logits.data(), n);
    probs_.resize(static_cast<std::size_t>(n));  // grows once to the vocab size
    // Softmax in double, max subtracted first (no overflow); inverse-CDF draw with a 53-bit uniform.
    double const inv_t = 1.0 / static_cast<double>(temperature_);
    double const max_logit = logits(argmax(logits.data(), n));
    double sum = 0;
    for (std::ptrdiff_t i = 0; i < n; ++i) sum += probs_[static_cast<std::size_t>(i)] = std::exp((logits(i) - max_logit) * inv_t);
    double const r = factorllm::detail::uniform01(rng_) * sum;
    double cdf = 0;
    for (std::ptrdiff_t i = 0; i < n; ++i) {
      cdf += probs_[static_cast<std::size_t>(i)];
      if (r < cdf) return static_cast<int>(i);
    }
    return static_cast<int>(n - 1);  // r rounded up to the total: the last token
  }

 private:
  float temperature_;
  std::mt19937_64 rng_;
  std::vector<double> probs_;
};

/// A MoE layer held elsewhere (e.g. in a LlamaModel), run through a pointer: the engine does not copy it.
class MoeViewLayer final : public FfnLayer {
 public:
  /// \param moe  the layer (must outlive this object)
  explicit MoeViewLayer(LlamaMoe const& moe, std::ptrdiff_t max_tokens = 1)
      : moe_(&moe), ws_(moe.workspace_bytes(std::max<std::ptrdiff_t>(max_tokens, 1))) {}

  void forward(MatrixView<float const> x, MatrixView<float> y) override {
    ws_.reserve(moe_->workspace_bytes(x.rows()));
    moe_->forward(x, y, ws_);
  }
  std::string describe() const override {
    return factorllm::detail::concat("moe N=", moe_->n_experts(), " K=", moe_->top_k());
  }

 private:
  LlamaMoe const* moe_;
  Workspace ws_;
};

/// Called with each layer's FFN input (the rows of the current forward call) before the FFN runs.
using FfnInputHook = std::function<void(int layer, std::ptrdiff_t pos0, MatrixView<float const> x)>;

/// The forward of a LlamaModel with a KV cache and pluggable FFNs. Layers whose `moe` is set run it; the others
/// run their dense FFN. The model must outlive the engine. Not thread safe: one engine per thread (they may share
/// the model).
class LlamaEngine {
 public:
  /// Builds the engine for min(config.context_length, max_context) positions: the KV cache ([n_layers, positions,
  /// kv_dim] twice), the activations and the logits ([positions, vocab_size]) are allocated for that many, so pass
  /// what the sequences need (a model's context_length of 128k positions would cost tens of GiB of logits alone).
  /// \throws format_error if the model does not validate; value_error if max_context < 1.
  explicit LlamaEngine(LlamaModel const& model, std::int64_t max_context = 4096)
      : model_(&model), cfg_(model.config) {
    model.validate();
    if (max_context < 1) throw value_error(factorllm::detail::concat("LlamaEngine: max_context must be >= 1, got ", max_context));
    seq_len_ = static_cast<std::ptrdiff_t>(std::min(cfg_.context_length, max_context));
    std::ptrdiff_t const d = cfg_.d_model, kv = cfg_.kv_dim(), q = cfg_.q_dim(), t = seq_len_, hs = cfg_.head_dim;
    key_cache_ = Tensor<float, 3>({cfg_.n_layers, t, kv});
    value_cache_ = Tensor<float, 3>({cfg_.n_layers, t, kv});
    x_ = Matrix<float>({t, d});
    xb_ = Matrix<float>({t, d});
    xb2_ = Matrix<float>({t, d});
    q_ = Matrix<float>({t, q});
    attn_ = Matrix<float>({t, q});
    att_ = Vector<float>({t});
    logits_ = Matrix<float>({t, cfg_.vocab_size});
    // RoPE table computed in float as llama2.c does (powf / cosf / sinf), so greedy text matches its output.
    rope_cos_ = Matrix<float>({t, hs / 2});
    rope_sin_ = Matrix<float>({t, hs / 2});
    float const theta = static_cast<float>(cfg_.rope_theta);
    for (std::ptrdiff_t p = 0; p < t; ++p)
      for (std::ptrdiff_t i = 0; i < hs; i += 2) {
        float const freq = 1.0f / std::pow(theta, static_cast<float>(i) / static_cast<float>(hs));
        float const val = static_cast<float>(p) * freq;
        rope_cos_(p, i / 2) = std::cos(val);
        rope_sin_(p, i / 2) = std::sin(val);
      }
    ffn_.resize(static_cast<std::size_t>(cfg_.n_layers));
    for (int l = 0; l < n_layers(); ++l) reset_ffn(l);
  }

  LlamaEngine(LlamaEngine const&) = delete;
  LlamaEngine& operator=(LlamaEngine const&) = delete;
  LlamaEngine(LlamaEngine&&) noexcept = default;
  LlamaEngine& operator=(LlamaEngine&&) noexcept = default;

  LlamaConfig const& config() const noexcept { return cfg_; }
  LlamaModel const& model() const noexcept { return *model_; }
  int n_layers() const noexcept { return static_cast<int>(cfg_.n_layers); }
  int vocab_size() const noexcept { return static_cast<int>(cfg_.vocab_size); }
  /// Positions the KV cache holds.
  int max_seq_len() const noexcept { return static_cast<int>(seq_len_); }
  /// The beginning-of-sequence token: the vocabulary's, else 1 (llama2.c and sentencepiece Llama models).
  int bos_token() const noexcept {
    return model_->vocab && model_->vocab->bos_id >= 0 ? static_cast<int>(model_->vocab->bos_id) : 1;
  }

  /// Replaces layer l's FFN (the engine takes ownership). \throws value_error for a bad l or a null ffn.
  void set_ffn(int l, std::unique_ptr<FfnLayer> ffn) {
    check_layer(l, "set_ffn");
    if (!ffn) throw value_error("LlamaEngine::set_ffn: null FFN");
    ffn_[static_cast<std::size_t>(l)] = std::move(ffn);
  }
  /// Puts the model's own FFN of layer l back (its MoE when it has one, else its dense FFN).
  void reset_ffn(int l) {
    check_layer(l, "reset_ffn");
    auto const& layer = model_->layers[static_cast<std::size_t>(l)];
    if (layer.moe)
      ffn_[static_cast<std::size_t>(l)] = std::make_unique<MoeViewLayer>(*layer.moe, seq_len_);
    else
      ffn_[static_cast<std::size_t>(l)] = std::make_unique<DenseFfnLayer>(layer.ffn.view(), seq_len_);
  }
  /// Returns layer l's FFN.
  FfnLayer const& ffn(int l) const {
    check_layer(l, "ffn");
    return *ffn_[static_cast<std::size_t>(l)];
  }

  /// Installs (or, with an empty function, removes) the hook that sees every layer's FFN input.
  void set_ffn_input_hook(FfnInputHook hook) { hook_ = std::move(hook); }

  /// Runs one token at position pos, reading positions < pos from the KV cache and writing position pos.
  /// \returns the logits [vocab_size]; valid until the next forward call
  /// \throws value_error if the token is outside the vocab, pos is outside [0, max_seq_len) or the cache does not
  ///         hold positions 0..pos-1 (every earlier position must have been run first).
  VectorView<float const> forward_step(int token, int pos) {
    run(&token, 1, pos, n_layers(), "forward_step");
    return VectorView<float const>(logits_.data(), {cfg_.vocab_size});
  }

  /// Runs a whole sequence from position 0 in one pass (every FFN sees all T rows at once) and fills the KV cache,
  /// so that decoding may continue at position T with forward_step.
  /// \returns the logits [T, vocab_size] (row t predicts token t + 1); valid until the next forward call
  /// \throws value_error for an empty sequence, one longer than max_seq_len, or a token outside the vocab.
  MatrixView<float const> forward_sequence(std::vector<int> const& tokens) {
    auto const n = static_cast<std::ptrdiff_t>(tokens.size());
    run(tokens.data(), n, 0, n_layers(), "forward_sequence");
    return logits_.cview().slice_rows(0, n);
  }

  /// Runs a sequence from position 0 only as far as layer l's FFN input and returns it, skipping everything above.
  /// \returns [T, d_model] layer l's FFN inputs (post-attention RMSNorm); valid until the next forward call
  /// \throws value_error as forward_sequence, or for a bad l.
  MatrixView<float const> ffn_inputs(std::vector<int> const& tokens, int l) {
    check_layer(l, "ffn_inputs");
    auto const n = static_cast<std::ptrdiff_t>(tokens.size());
    run(tokens.data(), n, 0, l, "ffn_inputs");
    return xb_.cview().slice_rows(0, n);
  }

  /// Generates after `prompt` as llama2.c's generate() does: the prompt tokens are forced, then `steps` minus the
  /// prompt's forced positions are sampled; stops early if BOS is drawn (llama2.c's story delimiter) or at the end
  /// of the cache.
  /// \param prompt  at least one token (usually just BOS)
  /// \param steps   total forward calls, as llama2.c's -n
  /// \returns the tokens after the first prompt token (forced and sampled)
  std::vector<int> generate(std::vector<int> const& prompt, int steps, Sampler& sampler, bool stop_at_bos = true) {
    if (prompt.empty()) throw value_error("LlamaEngine::generate: empty prompt (start with BOS)");
    std::vector<int> out;
    int token = prompt.front();
    int const last = std::min(steps, max_seq_len());
    for (int pos = 0; pos < last; ++pos) {
      auto const logits = forward_step(token, pos);
      int const next = pos + 1 < static_cast<int>(prompt.size()) ? prompt[static_cast<std::size_t>(pos) + 1]
                                                                  : sampler.sample(logits);
      if (stop_at_bos && next == bos_token()) break;
      out.push_back(next);
      token = next;
    }
    return out;
  }

 private:
  using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using ConstMap = Eigen::Map<RowMajor const>;
  using Map = Eigen::Map<RowMajor>;

  void check_layer(int l, char const* function) const {
    if (l < 0 || l >= n_layers())
      throw value_error(factorllm::detail::concat("LlamaEngine::", function, ": layer ", l, " outside [0, ", n_layers(), ")"));
  }

  /// out [n, rows(w)] = x [n, cols(w)] w^T + bias (nn.Linear; no bias when `bias` is empty).
  static void linear(float const* x, std::ptrdiff_t n, MatrixView<float const> w, Vector<float> const& bias,
                     float* out) {
    ConstMap xm(x, n, w.cols());
    ConstMap wm(w.data(), w.rows(), w.cols());
    Map om(out, n, w.rows());
    om.noalias() = xm * wm.transpose();
    if (bias.size() != 0)
      om.rowwise() += Eigen::Map<Eigen::Matrix<float, 1, Eigen::Dynamic> const>(bias.data(), w.rows());
  }

  /// o = w * x / sqrt(mean(x^2) + eps), per row, float accumulation as llama2.c.
  void rmsnorm(float const* x, std::ptrdiff_t n, Vector<float> const& w, float* o) const {
    std::ptrdiff_t const d = cfg_.d_model;
    float const eps = static_cast<float>(cfg_.rms_norm_eps);
    for (std::ptrdiff_t t = 0; t < n; ++t) {
      float const* xr = x + t * d;
      float ss = 0.f;
      for (std::ptrdiff_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
      float const inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
      for (std::ptrdiff_t i = 0; i < d; ++i) o[t * d + i] = w[i] * (inv * xr[i]);
    }
  }

  /// Rotates pairs (i, i+1) of every head of `v` ([n, width] rows at positions pos0..) by the RoPE angles.
  void rope(float* v, std::ptrdiff_t n, std::ptrdiff_t width, std::ptrdiff_t pos0) const {
    std::ptrdiff_t const hs = cfg_.head_dim;
    for (std::ptrdiff_t t = 0; t < n; ++t) {
      float* r = v + t * width;
      for (std::ptrdiff_t i = 0; i < width; i += 2) {
        std::ptrdiff_t const f = (i % hs) / 2;
        float const c = rope_cos_(pos0 + t, f), s = rope_sin_(pos0 + t, f);
        float const v0 = r[i], v1 = r[i + 1];
        r[i] = v0 * c - v1 * s;
        r[i + 1] = v0 * s + v1 * c;
      }
    }
  }

  /// Runs tokens[0..n) at positions pos0.. through layers [0, stop_layer) completely; when stop_layer < n_layers,
  /// also through the attention of layer stop_layer and its FFN norm, leaving that layer's FFN input in xb_.
  void run(int const* tokens, std::ptrdiff_t n, std::ptrdiff_t pos0, int stop_layer, char const* function) {
    validate_call(tokens, n, pos0, function);
    // Positions from pos0 on are being overwritten: until this call completes only [0, pos0) is valid.
    cached_ = pos0;
    std::ptrdiff_t const d = cfg_.d_model, kv = cfg_.kv_dim(), qd = cfg_.q_dim(), hs = cfg_.head_dim;
    std::ptrdiff_t const kv_mul = cfg_.n_heads / cfg_.n_kv_heads;
    float const inv_sqrt_hs = 1.0f / std::sqrt(static_cast<float>(hs));
    auto const emb = model_->token_embedding.cview();
    for (std::ptrdiff_t t = 0; t < n; ++t) std::copy(emb.row(tokens[t]), emb.row(tokens[t]) + d, x_.data() + t * d);

    for (int l = 0; l < n_layers(); ++l) {
      auto const& L = model_->layers[static_cast<std::size_t>(l)];
      // Attention block: x += Wo attn(RoPE(Wq xn + bq), RoPE(Wk xn + bk), Wv xn + bv), keys and values cached.
      rmsnorm(x_.data(), n, L.attn_norm, xb_.data());
      float* k_rows = &key_cache_(l, pos0, 0);
      float* v_rows = &value_cache_(l, pos0, 0);
      linear(xb_.data(), n, L.wq.cview(), L.bq, q_.data());
      linear(xb_.data(), n, L.wk.cview(), L.bk, k_rows);
      linear(xb_.data(), n, L.wv.cview(), L.bv, v_rows);
      rope(q_.data(), n, qd, pos0);
      rope(k_rows, n, kv, pos0);
      float const* keys = &key_cache_(l, 0, 0);
      float const* values = &value_cache_(l, 0, 0);
      for (std::ptrdiff_t t = 0; t < n; ++t) {
        std::ptrdiff_t const pos = pos0 + t;
        for (std::ptrdiff_t h = 0; h < cfg_.n_heads; ++h) {
          float const* qh = q_.data() + t * qd + h * hs;
          std::ptrdiff_t const kv_off = (h / kv_mul) * hs;  // GQA: kv_mul query heads share one kv head
          float* att = att_.data();
          float max_score = -INFINITY;
          for (std::ptrdiff_t s = 0; s <= pos; ++s) {
            float const* kh = keys + s * kv + kv_off;
            float score = 0.f;
            for (std::ptrdiff_t i = 0; i < hs; ++i) score += qh[i] * kh[i];
            att[s] = score * inv_sqrt_hs;
            max_score = std::max(max_score, att[s]);
          }
          float sum = 0.f;
          for (std::ptrdiff_t s = 0; s <= pos; ++s) sum += att[s] = std::exp(att[s] - max_score);
          float* out = attn_.data() + t * qd + h * hs;
          std::fill(out, out + hs, 0.f);
          for (std::ptrdiff_t s = 0; s <= pos; ++s) {
            float const a = att[s] / sum;
            float const* vh = values + s * kv + kv_off;
            for (std::ptrdiff_t i = 0; i < hs; ++i) out[i] += a * vh[i];
          }
        }
      }
      linear(attn_.data(), n, L.wo.cview(), no_bias_, xb2_.data());
      for (std::ptrdiff_t i = 0; i < n * d; ++i) x_[i] += xb2_[i];

      // FFN block: x += FFN(rmsnorm(x)), the FFN being whatever the library layer in this slot computes.
      rmsnorm(x_.data(), n, L.ffn_norm, xb_.data());
      MatrixView<float const> const xin(xb_.data(), {n, d});
      if (hook_) hook_(l, pos0, xin);
      if (l == stop_layer) return;  // layers above l keep stale keys: cached_ stays at pos0
      ffn_[static_cast<std::size_t>(l)]->forward(xin, MatrixView<float>(xb2_.data(), {n, d}));
      for (std::ptrdiff_t i = 0; i < n * d; ++i) x_[i] += xb2_[i];
    }
    rmsnorm(x_.data(), n, model_->final_norm, xb_.data());
    linear(xb_.data(), n, model_->output(), no_bias_, logits_.data());
    cached_ = pos0 + n;
  }

  void validate_call(int const* tokens, std::ptrdiff_t n, std::ptrdiff_t pos0, char const* function) const {
    if (n < 1) throw value_error(factorllm::detail::concat("LlamaEngine::", function, ": no tokens"));
    if (pos0 < 0 || pos0 + n > seq_len_)
      throw value_error(factorllm::detail::concat("LlamaEngine::", function, ": positions [", pos0, ", ", pos0 + n,
                                       ") outside the engine's context [0, ", seq_len_, ")"));
    if (pos0 > cached_)
      throw value_error(factorllm::detail::concat("LlamaEngine::", function, ": position ", pos0,
                                       " needs the KV cache of positions 0..", pos0 - 1, " but only ", cached_,
                                       " are filled (run the earlier positions first)"));
    for (std::ptrdiff_t t = 0; t < n; ++t)
      if (tokens[t] < 0 || tokens[t] >= cfg_.vocab_size)
        throw value_error(factorllm::detail::concat("LlamaEngine::", function, ": token ", tokens[t], " at index ", t,
                                         " outside the vocab [0, ", cfg_.vocab_size, ")"));
  }

  LlamaModel const* model_;
  LlamaConfig cfg_;
  std::ptrdiff_t seq_len_ = 0;
  std::vector<std::unique_ptr<FfnLayer>> ffn_;  // [n_layers]
  FfnInputHook hook_;
  Tensor<float, 3> key_cache_, value_cache_;  // [n_layers, seq_len, kv_dim]
  Matrix<float> x_, xb_, xb2_;                // [seq_len, d_model] activations of the rows in flight
  Matrix<float> q_, attn_;                    // [seq_len, q_dim] queries and attention outputs
  Vector<float> att_;                         // [seq_len] attention scores of one head
  Matrix<float> logits_;                      // [seq_len, vocab_size]
  Matrix<float> rope_cos_, rope_sin_;         // [seq_len, head_dim / 2]
  Vector<float> no_bias_;                     // empty
  std::ptrdiff_t cached_ = 0;                 // positions [0, cached_) of the KV cache are valid
};

}  // namespace model
}  // namespace factorllm
