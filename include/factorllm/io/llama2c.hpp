// SPDX-License-Identifier: Apache-2.0
// Readers for llama2.c's checkpoint (.bin) and tokenizer (tok*.bin) formats; both treat their input as untrusted.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "../ffn/swiglu.hpp"
#include "../model/llama_model.hpp"
#include "detail/bytes.hpp"
#include "detail/file.hpp"

namespace factorllm {
namespace io {
/// Hyper-parameters from a llama2.c checkpoint header (all strictly positive once validated).
struct Llama2cConfig {
  std::int32_t dim = 0;          // d_model
  std::int32_t hidden_dim = 0;   // d_ff
  std::int32_t n_layers = 0;
  std::int32_t n_heads = 0;
  std::int32_t n_kv_heads = 0;
  std::int32_t vocab_size = 0;   // absolute value of the header field
  std::int32_t seq_len = 0;
  bool shared_classifier = true; // header vocab_size > 0: the classifier is the token embedding

  /// Returns dim / n_heads (0 for an unvalidated config with n_heads <= 0).
  std::ptrdiff_t head_size() const noexcept { return n_heads > 0 ? std::ptrdiff_t{dim} / n_heads : 0; }
  /// Returns dim * n_kv_heads / n_heads, the width of wk and wv (0 for an unvalidated config).
  std::ptrdiff_t kv_dim() const noexcept { return head_size() * n_kv_heads; }
};

/// A llama2.c float32 checkpoint held in memory, with views of every weight.
/// Immutable after construction, so it can be shared across threads. The views point into heap memory owned
/// by the checkpoint; they stay valid while it lives, and moving the checkpoint does not move that memory.
class Llama2cCheckpoint {
 public:
  /// Bytes of the header: 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len).
  static constexpr std::size_t kHeaderBytes = 7 * 4;

  /// Loads a checkpoint file.
  /// \param path  a llama2.c `.bin` checkpoint (float32, little-endian, "legacy" version-0 layout)
  /// \returns the fully built checkpoint
  /// \throws format_error when the file cannot be opened or read (the message names the path), or when its
  ///         header is invalid or disagrees with the file size (see parse()). Nothing is allocated before the
  ///         header has been checked against the file size.
  static Llama2cCheckpoint load(std::string const& path) {
    std::ifstream in;
    std::uint64_t const file_bytes = detail::open_and_measure(in, path, "llama2c checkpoint");
    std::array<unsigned char, kHeaderBytes> header{};
    std::size_t const header_bytes = file_bytes < kHeaderBytes ? static_cast<std::size_t>(file_bytes) : kHeaderBytes;
    detail::read_exact(in, header.data(), header_bytes, path, "llama2c checkpoint");
    Llama2cCheckpoint ckpt(header.data(), file_bytes, path);
    std::size_t const n = static_cast<std::size_t>(ckpt.offsets_.total);
    detail::read_exact(in, ckpt.payload_.data(), std::uint64_t{n} * sizeof(float), path, "llama2c checkpoint");
    detail::floats_from_le(ckpt.payload_.data(), n);
    return ckpt;
  }

  /// Parses a checkpoint held in memory (the bytes are copied; `data` may be freed afterwards).
  /// \param data   the file's bytes; may be null only when bytes == 0
  /// \param bytes  size of the buffer; must equal exactly what the header declares
  /// \throws format_error (before anything is allocated) when: bytes < kHeaderBytes; dim, hidden_dim, n_layers,
  ///         n_heads, n_kv_heads or seq_len <= 0; vocab_size is 0 or INT32_MIN; dim % n_heads != 0;
  ///         n_heads % n_kv_heads != 0; head_size is odd; a tensor size overflows int64; or the declared size
  ///         differs from `bytes` (truncated or trailing bytes).
  static Llama2cCheckpoint parse(void const* data, std::size_t bytes) {
    static std::string const kSource = "<memory buffer>";
    if (data == nullptr && bytes != 0) throw format_error("llama2c checkpoint: null data pointer with a non-zero size");
    auto const* p = static_cast<unsigned char const*>(data);
    Llama2cCheckpoint ckpt(p, bytes, kSource);
    std::size_t const n = static_cast<std::size_t>(ckpt.offsets_.total);
    std::memcpy(ckpt.payload_.data(), p + kHeaderBytes, n * sizeof(float));
    detail::floats_from_le(ckpt.payload_.data(), n);
    return ckpt;
  }

  /// Returns the validated header values.
  Llama2cConfig const& config() const noexcept { return config_; }

  // Accessors. Each returns a view into this checkpoint's memory; shapes follow llama2.c's row-major
  // [out_features, in_features] layout. The per-layer ones throw value_error unless 0 <= l < n_layers.

  /// Returns the token embedding table.
  MatrixView<float const> token_embedding() const {  // [vocab_size, dim]
    return matrix(offsets_.token_embedding, vocab(), dim());
  }
  /// Returns the RMSNorm weights applied before attention in layer l.
  VectorView<float const> rms_att(int l) const {  // [dim]
    return vector(layer_offset(offsets_.rms_att, dim(), l, "rms_att"), dim());
  }
  /// Returns the query projection of layer l.
  MatrixView<float const> wq(int l) const {  // [dim, dim]
    return layer_matrix(offsets_.wq, dim(), dim(), l, "wq");
  }
  /// Returns the key projection of layer l.
  MatrixView<float const> wk(int l) const {  // [kv_dim, dim]
    return layer_matrix(offsets_.wk, kv_dim(), dim(), l, "wk");
  }
  /// Returns the value projection of layer l.
  MatrixView<float const> wv(int l) const {  // [kv_dim, dim]
    return layer_matrix(offsets_.wv, kv_dim(), dim(), l, "wv");
  }
  /// Returns the attention output projection of layer l.
  MatrixView<float const> wo(int l) const {  // [dim, dim]
    return layer_matrix(offsets_.wo, dim(), dim(), l, "wo");
  }
  /// Returns the RMSNorm weights applied before the FFN in layer l.
  VectorView<float const> rms_ffn(int l) const {  // [dim]
    return vector(layer_offset(offsets_.rms_ffn, dim(), l, "rms_ffn"), dim());
  }
  /// Returns the FFN gate projection (W_gate) of layer l.
  MatrixView<float const> w1(int l) const {  // [hidden_dim, dim]
    return layer_matrix(offsets_.w1, hidden(), dim(), l, "w1");
  }
  /// Returns the FFN down projection (W_down) of layer l.
  MatrixView<float const> w2(int l) const {  // [dim, hidden_dim]
    return layer_matrix(offsets_.w2, dim(), hidden(), l, "w2");
  }
  /// Returns the FFN up projection (W_up) of layer l.
  MatrixView<float const> w3(int l) const {  // [hidden_dim, dim]
    return layer_matrix(offsets_.w3, hidden(), dim(), l, "w3");
  }
  /// Returns the final RMSNorm weights.
  VectorView<float const> rms_final() const {  // [dim]
    return vector(offsets_.rms_final, dim());
  }
  /// Returns the output classifier: wcls when the file stores one, else the token embedding itself.
  MatrixView<float const> classifier() const {  // [vocab_size, dim]
    return matrix(offsets_.classifier, vocab(), dim());
  }

  /// Returns layer l's FFN as the library's dense SwiGLU view: gate = w1, up = w3, down = w2
  /// (llama2.c computes w2 (silu(w1 x) * (w3 x)), which is docs/math.md §1.1's F(x)).
  /// \throws value_error unless 0 <= l < n_layers.
  ::factorllm::ffn::DenseFfnView<float> ffn(int l) const { return {w1(l), w3(l), w2(l)}; }

 private:
  /// Offsets, in floats from the first float after the header, of each tensor (layer 0 for per-layer ones).
  struct Offsets {
    std::int64_t token_embedding = 0, rms_att = 0, wq = 0, wk = 0, wv = 0, wo = 0, rms_ffn = 0, w1 = 0, w2 = 0,
                 w3 = 0, rms_final = 0, rope = 0, classifier = 0, total = 0;
  };

  /// Validates the header at `header` (which holds min(file_bytes, kHeaderBytes) bytes) against the total size
  /// and allocates the payload; the caller then fills it. `source` names the file in messages.
  Llama2cCheckpoint(unsigned char const* header, std::uint64_t file_bytes, std::string const& source)
      : config_(read_config(header, file_bytes, source)),
        offsets_(compute_offsets(config_, file_bytes, source)),
        payload_({static_cast<std::ptrdiff_t>(offsets_.total)}) {}

  static Llama2cConfig read_config(unsigned char const* h, std::uint64_t file_bytes, std::string const& source) {
    if (file_bytes < kHeaderBytes)
      throw format_error(detail::concat("llama2c checkpoint '", source, "': ", file_bytes,
                                        " bytes, shorter than the ", kHeaderBytes, "-byte header"));
    std::int32_t raw[7];
    for (int i = 0; i < 7; ++i) raw[i] = detail::load_le_i32(h + 4 * i);
    static char const* const kNames[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                          "seq_len"};
    for (int i = 0; i < 7; ++i) {
      if (i == 5) continue;  // vocab_size is signed by design
      if (raw[i] <= 0)
        throw format_error(detail::concat("llama2c checkpoint '", source, "': header field '", kNames[i], "' is ",
                                          raw[i], ", expected > 0"));
    }
    // A negative vocab_size flags an unshared classifier (wcls stored at the end); INT32_MIN has no absolute value.
    if (raw[5] == 0 || raw[5] == std::numeric_limits<std::int32_t>::min())
      throw format_error(detail::concat("llama2c checkpoint '", source, "': header field 'vocab_size' is ", raw[5],
                                        ", expected a non-zero value whose absolute value fits int32"));
    Llama2cConfig c;
    c.dim = raw[0];
    c.hidden_dim = raw[1];
    c.n_layers = raw[2];
    c.n_heads = raw[3];
    c.n_kv_heads = raw[4];
    c.vocab_size = raw[5] < 0 ? -raw[5] : raw[5];
    c.shared_classifier = raw[5] > 0;
    c.seq_len = raw[6];
    if (c.dim % c.n_heads != 0)
      throw format_error(detail::concat("llama2c checkpoint '", source, "': dim ", c.dim,
                                        " is not divisible by n_heads ", c.n_heads));
    if (c.n_heads % c.n_kv_heads != 0)
      throw format_error(detail::concat("llama2c checkpoint '", source, "': n_heads ", c.n_heads,
                                        " is not divisible by n_kv_heads ", c.n_kv_heads));
    // RoPE rotates pairs (i, i+1) inside each head, so a head must have an even size.
    if (c.head_size() % 2 != 0)
      throw format_error(detail::concat("llama2c checkpoint '", source, "': head_size dim / n_heads = ",
                                        c.head_size(), " is odd, expected even (RoPE rotates pairs)"));
    return c;
  }

  /// Lays the tensors out in file order with overflow-checked int64 arithmetic and requires the file size to match
  /// the declared size exactly. This is the only cap the allocation needs: it is never larger than the input.
  static Offsets compute_offsets(Llama2cConfig const& c, std::uint64_t file_bytes, std::string const& source) {
    std::int64_t const d = c.dim, h = c.hidden_dim, n_l = c.n_layers, v = c.vocab_size, kv = c.kv_dim(),
                       hs = c.head_size(), s = c.seq_len;
    Offsets o;
    std::int64_t next = 0;
    // Reserves a tensor of a * b * c floats at `next` and returns its offset.
    auto take = [&](std::int64_t a, std::int64_t b, std::int64_t e, char const* name) {
      std::int64_t const ab = detail::mul_nonneg(a, b);
      std::int64_t const count = ab < 0 ? -1 : detail::mul_nonneg(ab, e);
      std::int64_t const end = count < 0 ? -1 : detail::add_nonneg(next, count);
      if (end < 0)
        throw format_error(detail::concat("llama2c checkpoint '", source, "': the size of tensor '", name, "' (",
                                          a, " * ", b, " * ", e, " floats) overflows 64-bit arithmetic; the header ",
                                          "is corrupt or not a llama2.c checkpoint"));
      std::int64_t const at = next;
      next = end;
      return at;
    };
    o.token_embedding = take(v, d, 1, "token_embedding");
    o.rms_att = take(n_l, d, 1, "rms_att");
    o.wq = take(n_l, d, d, "wq");
    o.wk = take(n_l, kv, d, "wk");
    o.wv = take(n_l, kv, d, "wv");
    o.wo = take(n_l, d, d, "wo");
    o.rms_ffn = take(n_l, d, 1, "rms_ffn");
    o.w1 = take(n_l, h, d, "w1");
    o.w2 = take(n_l, d, h, "w2");
    o.w3 = take(n_l, h, d, "w3");
    o.rms_final = take(d, 1, 1, "rms_final");
    o.rope = take(s, hs, 1, "freq_cis (legacy RoPE tables)");  // freq_cis_real + freq_cis_imag, unused
    o.classifier = c.shared_classifier ? o.token_embedding : take(v, d, 1, "wcls");
    o.total = next;

    std::int64_t const payload_bytes = detail::mul_nonneg(o.total, std::int64_t{sizeof(float)});
    std::int64_t const expected =
        payload_bytes < 0 ? -1 : detail::add_nonneg(payload_bytes, static_cast<std::int64_t>(kHeaderBytes));
    constexpr auto kMaxBytes = static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max());
    if (expected < 0 || static_cast<std::uint64_t>(expected) > kMaxBytes)
      throw format_error(detail::concat("llama2c checkpoint '", source, "': the header declares ", o.total,
                                        " floats, more than this platform can address"));
    auto const want = static_cast<std::uint64_t>(expected);
    if (file_bytes < want)
      throw format_error(detail::concat("llama2c checkpoint '", source, "': truncated: the header (dim ", c.dim,
                                        ", hidden_dim ", c.hidden_dim, ", n_layers ", c.n_layers, ", vocab_size ",
                                        c.shared_classifier ? "" : "-", c.vocab_size, ", seq_len ", c.seq_len,
                                        ") declares ", want, " bytes, the input has ", file_bytes));
    if (file_bytes > want)
      throw format_error(detail::concat("llama2c checkpoint '", source, "': ", file_bytes - want,
                                        " trailing bytes after the ", want, " bytes the header declares"));
    return o;
  }

  std::ptrdiff_t dim() const noexcept { return config_.dim; }
  std::ptrdiff_t hidden() const noexcept { return config_.hidden_dim; }
  std::ptrdiff_t vocab() const noexcept { return config_.vocab_size; }
  std::ptrdiff_t kv_dim() const noexcept { return config_.kv_dim(); }

  /// Offset of layer l's slice of a per-layer tensor whose layers hold `per_layer` floats each.
  std::int64_t layer_offset(std::int64_t base, std::ptrdiff_t per_layer, int l, char const* name) const {
    if (l < 0 || l >= config_.n_layers)
      throw value_error(detail::concat("Llama2cCheckpoint::", name, ": layer ", l, " outside [0, ", config_.n_layers,
                                       ")"));
    return base + std::int64_t{l} * per_layer;
  }
  MatrixView<float const> layer_matrix(std::int64_t base, std::ptrdiff_t rows, std::ptrdiff_t cols, int l,
                                       char const* name) const {
    return matrix(layer_offset(base, rows * cols, l, name), rows, cols);
  }
  MatrixView<float const> matrix(std::int64_t offset, std::ptrdiff_t rows, std::ptrdiff_t cols) const {
    return MatrixView<float const>(payload_.data() + offset, {rows, cols});
  }
  VectorView<float const> vector(std::int64_t offset, std::ptrdiff_t n) const {
    return VectorView<float const>(payload_.data() + offset, {n});
  }

  Llama2cConfig config_;
  Offsets offsets_;
  Vector<float> payload_;  // every float after the header, in file order  // [offsets_.total]
};

/// llama2.c's sentencepiece-derived BPE tokenizer: pieces with merge scores, byte fallback and a dummy prefix.
/// Immutable after construction.
class Llama2cTokenizer {
 public:
  static constexpr int kBos = 1;         ///< beginning-of-sequence id (fixed by llama2.c)
  static constexpr int kEos = 2;         ///< end-of-sequence id
  static constexpr int kByteOffset = 3;  ///< id of the piece <0x00>; byte b falls back to id b + 3

  /// Loads a tokenizer file.
  /// \param path        a llama2.c tokenizer (`tokenizer.bin`, `tok512.bin`, ...)
  /// \param vocab_size  number of tokens, from the checkpoint's config (the file does not store it)
  /// \throws value_error if vocab_size <= 0; format_error when the file cannot be opened or is malformed (parse()).
  static Llama2cTokenizer load(std::string const& path, int vocab_size) {
    check_vocab_size(vocab_size);
    std::ifstream in;
    std::uint64_t const bytes = detail::open_and_measure(in, path, "llama2c tokenizer");
    // Each token needs at least 8 bytes, so a file too small for vocab_size is rejected before reading it.
    check_min_size(bytes, vocab_size, path);
    std::array<unsigned char, 4> head{};
    detail::read_exact(in, head.data(), head.size(), path, "llama2c tokenizer");
    std::int32_t const max_len = detail::load_le_i32(head.data());
    check_max_token_length(max_len, path);
    // The largest file these vocab_size tokens can fill; anything longer has trailing bytes, so the buffer below is
    // bounded by both the file and the header (vocab_size, max_len < 2^31: no overflow in 64 bits).
    std::uint64_t const most = 4 + static_cast<std::uint64_t>(vocab_size) * (8 + static_cast<std::uint64_t>(max_len));
    if (bytes > most)
      throw format_error(detail::concat("llama2c tokenizer '", path, "': ", bytes, " bytes, more than the ", most,
                                        " that ", vocab_size, " tokens of at most ", max_len,
                                        " bytes can fill (does vocab_size match the checkpoint?)"));
    if (bytes > std::uint64_t{std::numeric_limits<std::ptrdiff_t>::max()})
      throw format_error(
          detail::concat("llama2c tokenizer '", path, "': ", bytes, " bytes, more than this platform can address"));
    std::vector<unsigned char> buffer(static_cast<std::size_t>(bytes));
    std::memcpy(buffer.data(), head.data(), head.size());
    detail::read_exact(in, buffer.data() + head.size(), bytes - head.size(), path, "llama2c tokenizer");
    return Llama2cTokenizer(buffer.data(), buffer.size(), vocab_size, path);
  }

  /// Parses a tokenizer held in memory.
  /// Format: int32 max_token_length, then per token: float32 score, int32 byte length, the bytes (little-endian).
  /// \throws value_error if vocab_size <= 0; format_error if max_token_length <= 0, a length is negative or larger
  ///         than max_token_length, a score is NaN, the data ends before vocab_size tokens, or bytes remain after them.
  static Llama2cTokenizer parse(void const* data, std::size_t bytes, int vocab_size) {
    static std::string const kSource = "<memory buffer>";
    check_vocab_size(vocab_size);
    if (data == nullptr && bytes != 0) throw format_error("llama2c tokenizer: null data pointer with a non-zero size");
    check_min_size(bytes, vocab_size, kSource);
    return Llama2cTokenizer(static_cast<unsigned char const*>(data), bytes, vocab_size, kSource);
  }

  /// Returns the number of tokens.
  int vocab_size() const noexcept { return static_cast<int>(pieces_.size()); }
  /// Returns the longest piece length the file declares (every piece is at most this long).
  int max_token_length() const noexcept { return max_token_length_; }

  /// Returns the bytes of token `id`. \throws value_error unless 0 <= id < vocab_size().
  std::string const& piece(int id) const { return pieces_[index(id, "piece")]; }
  /// Returns the merge score of token `id` (higher merges first). \throws value_error unless 0 <= id < vocab_size().
  float score(int id) const { return scores_[index(id, "score")]; }

  /// Returns the id of the piece equal to `text`, or -1 when there is none (the lowest id if the file repeats it).
  int find(std::string_view text) const noexcept {
    auto const it = std::lower_bound(sorted_ids_.begin(), sorted_ids_.end(), text,
                                     [this](int id, std::string_view t) {
                                       return std::string_view(pieces_[static_cast<std::size_t>(id)]) < t;
                                     });
    if (it == sorted_ids_.end() || pieces_[static_cast<std::size_t>(*it)] != text) return -1;
    return *it;
  }

  /// Returns the text of `token` as llama2.c prints it after `prev_token`: the leading space of a piece that
  /// follows BOS is dropped (sentencepiece's dummy prefix), and a byte piece `<0xHH>` becomes that raw byte.
  /// \throws value_error unless 0 <= token < vocab_size(); prev_token is only compared with kBos.
  std::string decode(int prev_token, int token) const {
    std::string_view p = pieces_[index(token, "decode")];
    if (prev_token == kBos && !p.empty() && p.front() == ' ') p.remove_prefix(1);
    unsigned char byte = 0;
    if (parse_byte_piece(p, byte)) return std::string(1, static_cast<char>(byte));
    return std::string(p);
  }

  /// Returns the concatenated decode(previous, token) of a sequence; BOS and EOS themselves produce no text.
  /// \throws value_error for an id outside [0, vocab_size()).
  std::string decode(std::vector<int> const& tokens) const {
    std::string out;
    int prev = -1;
    for (int const t : tokens) {
      if (t != kBos && t != kEos) out += decode(prev, t);
      prev = t;
    }
    return out;
  }

  /// Encodes UTF-8 text as llama2.c does.
  /// Steps: optional BOS; the dummy-prefix piece " " when text is non-empty; one token per UTF-8 code point
  /// (a lead byte plus at most 3 continuation bytes), or one byte-fallback token (byte + 3) per byte when the
  /// code point is not a piece; then, repeatedly, the adjacent pair whose concatenation is the piece with the
  /// highest score is merged (leftmost pair on equal scores) until no pair forms a piece; optional EOS.
  /// Differences from llama2.c, all on inputs where llama2.c misbehaves: BOS does not take part in merges; a
  /// vocab without " " falls back to the byte token of ' ' (llama2.c emits id -1); merges with scores <= -1e10
  /// are allowed (llama2.c's sentinel skips them); text is a std::string, so an embedded NUL is encoded as a byte.
  /// Cost: O(n^2 log V) for n initial tokens (a reference implementation, not a fast one).
  /// \throws value_error when a required id (BOS, EOS or a byte-fallback id) is outside the vocab.
  std::vector<int> encode(std::string const& text, bool bos, bool eos) const {
    std::vector<int> out;
    if (bos) out.push_back(require_id(kBos, "BOS"));
    std::vector<int> ids;
    if (!text.empty()) push_piece_or_bytes(" ", ids);
    std::size_t i = 0;
    while (i < text.size()) {
      std::size_t len = 1;
      while (len < 4 && i + len < text.size() && is_utf8_continuation(text[i + len])) ++len;
      push_piece_or_bytes(std::string_view(text).substr(i, len), ids);
      i += len;
    }
    merge_pairs(ids);
    out.insert(out.end(), ids.begin(), ids.end());
    if (eos) out.push_back(require_id(kEos, "EOS"));
    return out;
  }

 private:
  Llama2cTokenizer(unsigned char const* p, std::size_t bytes, int vocab_size, std::string const& source) {
    auto const fail = [&](auto const&... what) {
      throw format_error(detail::concat("llama2c tokenizer '", source, "': ", what...));
    };
    max_token_length_ = detail::load_le_i32(p);
    check_max_token_length(max_token_length_, source);
    // check_min_size guaranteed vocab_size * 8 + 4 <= bytes, so these reservations are bounded by the input.
    pieces_.reserve(static_cast<std::size_t>(vocab_size));
    scores_.reserve(static_cast<std::size_t>(vocab_size));
    std::size_t at = 4;
    for (int id = 0; id < vocab_size; ++id) {
      if (bytes - at < 8)
        fail("truncated: token ", id, " of ", vocab_size, " needs 8 header bytes at offset ", at, ", the input has ",
             bytes);
      float const s = detail::load_le_f32(p + at);
      std::int32_t const len = detail::load_le_i32(p + at + 4);
      at += 8;
      if (std::isnan(s)) fail("token ", id, " has a NaN score");
      if (len < 0) fail("token ", id, " has length ", len, ", expected >= 0");
      if (len > max_token_length_)
        fail("token ", id, " has length ", len, ", more than max_token_length ", max_token_length_);
      if (bytes - at < static_cast<std::size_t>(len))
        fail("truncated: token ", id, " declares ", len, " bytes at offset ", at, ", the input has ", bytes);
      scores_.push_back(s);
      pieces_.emplace_back(reinterpret_cast<char const*>(p + at), static_cast<std::size_t>(len));
      at += static_cast<std::size_t>(len);
    }
    // The vocab size comes from the checkpoint; leftover bytes mean the two do not belong together.
    if (at != bytes)
      fail(bytes - at, " trailing bytes after ", vocab_size, " tokens (does vocab_size match the checkpoint?)");
    sorted_ids_.resize(pieces_.size());
    for (std::size_t i = 0; i < sorted_ids_.size(); ++i) sorted_ids_[i] = static_cast<int>(i);
    // Sorted by (piece, id) so that find() returns the lowest id of a repeated piece, deterministically.
    std::sort(sorted_ids_.begin(), sorted_ids_.end(), [this](int a, int b) {
      int const c = pieces_[static_cast<std::size_t>(a)].compare(pieces_[static_cast<std::size_t>(b)]);
      return c != 0 ? c < 0 : a < b;
    });
  }

  static void check_vocab_size(int vocab_size) {
    if (vocab_size <= 0)
      throw value_error(detail::concat("llama2c tokenizer: vocab_size is ", vocab_size, ", expected > 0"));
  }

  /// Rejects an input that cannot hold max_token_length plus vocab_size tokens of at least 8 bytes each.
  static void check_min_size(std::uint64_t bytes, int vocab_size, std::string const& source) {
    std::uint64_t const need = 4 + 8 * static_cast<std::uint64_t>(vocab_size);
    if (bytes < need)
      throw format_error(detail::concat("llama2c tokenizer '", source, "': truncated: ", vocab_size,
                                        " tokens need at least ", need, " bytes, the input has ", bytes));
  }

  static void check_max_token_length(std::int32_t max_len, std::string const& source) {
    if (max_len <= 0)
      throw format_error(detail::concat("llama2c tokenizer '", source, "': max_token_length is ", max_len,
                                        ", expected > 0"));
  }

  std::size_t index(int id, char const* function) const {
    if (id < 0 || id >= vocab_size())
      throw value_error(detail::concat("Llama2cTokenizer::", function, ": token id ", id, " outside [0, ",
                                       vocab_size(), ")"));
    return static_cast<std::size_t>(id);
  }

  int require_id(int id, char const* what) const {
    if (id >= vocab_size())
      throw value_error(detail::concat("Llama2cTokenizer::encode: ", what, " id ", id, " is outside the vocab of ",
                                       vocab_size(), " tokens"));
    return id;
  }

  static bool is_utf8_continuation(char c) noexcept { return (static_cast<unsigned char>(c) & 0xC0u) == 0x80u; }

  /// Recognizes the byte pieces "<0xHH>" (either hex case) and returns their byte in `out`.
  static bool parse_byte_piece(std::string_view p, unsigned char& out) noexcept {
    if (p.size() != 6 || p[0] != '<' || p[1] != '0' || p[2] != 'x' || p[5] != '>') return false;
    auto const hex = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      return -1;
    };
    int const hi = hex(p[3]), lo = hex(p[4]);
    if (hi < 0 || lo < 0) return false;
    out = static_cast<unsigned char>(hi * 16 + lo);
    return true;
  }

  /// Appends the id of `text` when it is a piece, else one byte-fallback id per byte.
  void push_piece_or_bytes(std::string_view text, std::vector<int>& ids) const {
    int const id = find(text);
    if (id >= 0) {
      ids.push_back(id);
      return;
    }
    for (char const c : text) {
      int const b = static_cast<unsigned char>(c);
      if (kByteOffset + b >= vocab_size())
        throw value_error(detail::concat("Llama2cTokenizer::encode: byte ", b, " is not a piece and its fallback id ",
                                         kByteOffset + b, " is outside the vocab of ", vocab_size(), " tokens"));
      ids.push_back(kByteOffset + b);
    }
  }

  /// Greedy BPE: merges the best-scoring adjacent pair (leftmost on ties) until no pair is a piece.
  void merge_pairs(std::vector<int>& ids) const {
    std::string pair;
    while (ids.size() >= 2) {
      std::size_t best_at = 0;
      int best_id = -1;
      float best_score = 0;
      for (std::size_t i = 0; i + 1 < ids.size(); ++i) {
        pair.assign(pieces_[static_cast<std::size_t>(ids[i])]);
        pair += pieces_[static_cast<std::size_t>(ids[i + 1])];
        int const id = find(pair);
        if (id >= 0 && (best_id < 0 || scores_[static_cast<std::size_t>(id)] > best_score)) {
          best_at = i;
          best_id = id;
          best_score = scores_[static_cast<std::size_t>(id)];
        }
      }
      if (best_id < 0) break;
      ids[best_at] = best_id;
      ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
    }
  }

  int max_token_length_ = 0;
  std::vector<std::string> pieces_;  // [vocab_size]
  std::vector<float> scores_;        // [vocab_size]
  std::vector<int> sorted_ids_;      // [vocab_size] ids ordered by (piece, id), for find()
};

/// Copies a llama2.c checkpoint into the one in-memory model type (model/llama_model.hpp), without a vocabulary:
/// rope_theta 10000, rms_norm_eps 1e-5, RoPE pairs adjacent (llama2.c's own layout).
inline model::LlamaModel model_from_llama2c(Llama2cCheckpoint const& ckpt, std::string source = "llama2c checkpoint") {
  auto const& c = ckpt.config();
  model::LlamaModel m;
  m.source = std::move(source);
  m.config.architecture = "llama";
  m.config.d_model = c.dim;
  m.config.d_ff = c.hidden_dim;
  m.config.n_layers = c.n_layers;
  m.config.n_heads = c.n_heads;
  m.config.n_kv_heads = c.n_kv_heads;
  m.config.head_dim = c.head_size();
  m.config.vocab_size = c.vocab_size;
  m.config.context_length = c.seq_len;
  m.config.tied_embeddings = c.shared_classifier;
  m.token_embedding = Matrix<float>(ckpt.token_embedding());
  for (int l = 0; l < c.n_layers; ++l) {
    model::LlamaLayer L;
    L.attn_norm = Vector<float>(ckpt.rms_att(l));
    L.wq = Matrix<float>(ckpt.wq(l));
    L.wk = Matrix<float>(ckpt.wk(l));
    L.wv = Matrix<float>(ckpt.wv(l));
    L.wo = Matrix<float>(ckpt.wo(l));
    L.ffn_norm = Vector<float>(ckpt.rms_ffn(l));
    L.ffn = ffn::DenseFfn<float>{Matrix<float>(ckpt.w1(l)), Matrix<float>(ckpt.w3(l)), Matrix<float>(ckpt.w2(l))};
    m.layers.push_back(std::move(L));
  }
  m.final_norm = Vector<float>(ckpt.rms_final());
  if (!c.shared_classifier) m.classifier = Matrix<float>(ckpt.classifier());
  m.validate();
  return m;
}

}  // namespace io
}  // namespace factorllm
