// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: llama2.c tokenizer reader and its encode/decode.
//
// Input layout (make_corpus.py writes seeds in it):
//   byte 0: flags. bit 0 clear: mode A, bit 0 set: mode B; bit 1: add BOS; bit 2: add EOS.
//   mode A: bytes 1-2 vocab_size (int16, little-endian, may be <= 0), byte 3 text length L, L bytes of text, then the
//           tokenizer file. Parses it (Llama2cTokenizer::parse and ::load must agree), checks the lookup invariants,
//           encodes the text and decodes the result.
//   mode B: bytes 1.. are text (at most kMaxText bytes), encoded with a fixed llama-like vocab (specials, the 256 byte
//           pieces, characters and merges); decode(encode(text)) must give the text back, and decoding ids taken
//           from the input must either succeed or throw value_error for an id outside the vocab.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include <factorllm/io/llama2c.hpp>

#include "fuzz_common.hpp"

namespace {

using factorllm::io::Llama2cTokenizer;

constexpr std::size_t kMaxText = 256;  // encode is O(n^2 log V): keep one execution in the millisecond range

void put_i32(std::vector<unsigned char>& b, std::int32_t v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  for (int i = 0; i < 4; ++i) b.push_back(static_cast<unsigned char>(u >> (8 * i)));
}

/// The fixed vocab of mode B, serialized in the llama2.c format and parsed by the library itself.
Llama2cTokenizer const& fixed_tokenizer() {
  static Llama2cTokenizer const tok = [] {
    std::vector<std::string> pieces = {"<unk>", "\n<s>\n", "\n</s>\n"};
    char const* hex = "0123456789ABCDEF";
    for (int b = 0; b < 256; ++b) pieces.push_back(std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">");
    // Merges, best first (as in a sentencepiece vocab); a repeated piece ("th") and an empty one are legal in the
    // format and must not confuse find() or the merge loop.
    for (char const* m : {" t", " a", "th", "he", "in", "er", "an", " the", "re", "on", " s", "ed", "nd", "ing", " w",
                          "ou", "at", "en", "is", " h", "it", "es", " b", " o", " c", " f", " m", "or", " to", " and",
                          "ll", "Once", " upon", " time", " was", " little", " girl", "th", "", "\xc3\xa9", "\xc3\xbc",
                          "\xe6\x97\xa5\xe6\x9c\xac", "\xe2\x80\x94", "\xf0\x9f\x98\x80", "  ", "\n\n"})
      pieces.push_back(m);
    std::size_t const n_merges = pieces.size();
    // Single characters: printable ASCII, newline, tab, and a few multi-byte code points.
    for (int c = 32; c < 127; ++c) pieces.push_back(std::string(1, static_cast<char>(c)));
    for (char const* m : {"\n", "\t", "\xc3\xa9", "\xe6\x97\xa5", "\xe6\x9c\xac"}) pieces.push_back(m);
    std::vector<unsigned char> file;
    std::int32_t max_len = 1;
    for (auto const& p : pieces) max_len = std::max<std::int32_t>(max_len, static_cast<std::int32_t>(p.size()));
    put_i32(file, max_len);
    for (std::size_t i = 0; i < pieces.size(); ++i) {
      // Merges score by rank (ties between " a" and "th" exercise the leftmost-pair rule); characters score lowest.
      float score = i < 3 + 256 ? 0.f : i < n_merges ? -static_cast<float>(i) : -1e6f;
      if (pieces[i] == "th") score = -(3.f + 256.f + 1.f);
      std::int32_t bits;
      std::memcpy(&bits, &score, 4);
      put_i32(file, bits);
      put_i32(file, static_cast<std::int32_t>(pieces[i].size()));
      file.insert(file.end(), pieces[i].begin(), pieces[i].end());
    }
    return Llama2cTokenizer::parse(file.data(), file.size(), static_cast<int>(pieces.size()));
  }();
  return tok;
}

/// Lookup invariants of any accepted tokenizer.
void check_lookup(Llama2cTokenizer const& tok, int vocab_size) {
  FUZZ_CHECK(tok.vocab_size() == vocab_size);
  for (int id = 0; id < tok.vocab_size(); ++id) {
    FUZZ_CHECK(static_cast<int>(tok.piece(id).size()) <= tok.max_token_length());
    int const found = tok.find(tok.piece(id));
    FUZZ_CHECK(found >= 0 && found <= id && tok.piece(found) == tok.piece(id));
  }
}

/// Encodes and decodes; ids from encode are always inside the vocab, so decode must not throw.
std::vector<int> encode_decode(Llama2cTokenizer const& tok, std::string const& text, bool bos, bool eos,
                               std::string* decoded) {
  std::vector<int> ids;
  if (!fuzz::expect_ok_or_error([&] { ids = tok.encode(text, bos, eos); })) return {};
  for (int id : ids) FUZZ_CHECK(id >= 0 && id < tok.vocab_size());
  std::string const d = tok.decode(ids);
  if (decoded != nullptr) *decoded = d;
  return ids;
}

int memory_file() {
  static int const fd = memfd_create("fllm_fuzz_tok", 0);
  return fd;
}

void mode_a(std::uint8_t const* data, std::size_t size, bool bos, bool eos) {
  if (size < 4) return;
  std::int16_t vocab16;
  std::memcpy(&vocab16, data + 1, 2);
  int const vocab_size = vocab16;
  std::size_t const text_len = std::min<std::size_t>(data[3], size - 4);
  std::string const text(reinterpret_cast<char const*>(data + 4), text_len);
  std::uint8_t const* file = data + 4 + text_len;
  std::size_t const file_size = size - 4 - text_len;

  bool parsed = false;
  fuzz::expect_ok_or_error([&] {
    auto const tok = Llama2cTokenizer::parse(file, file_size, vocab_size);
    parsed = true;
    check_lookup(tok, vocab_size);
    encode_decode(tok, text, bos, eos, nullptr);
  });
  int const fd = memory_file();
  if (fd >= 0 && ftruncate(fd, 0) == 0 &&
      pwrite(fd, file, file_size, 0) == static_cast<ssize_t>(file_size)) {
    bool loaded = false;
    fuzz::expect_ok_or_error([&] {
      auto const tok = Llama2cTokenizer::load("/proc/self/fd/" + std::to_string(fd), vocab_size);
      loaded = true;
      FUZZ_CHECK(tok.vocab_size() == vocab_size);
    });
    FUZZ_CHECK(loaded == parsed);
  }
}

void mode_b(std::uint8_t const* data, std::size_t size, bool bos, bool eos) {
  auto const& tok = fixed_tokenizer();
  std::string const text(reinterpret_cast<char const*>(data + 1), std::min(size - 1, kMaxText));
  // Every byte has a fallback piece, so encode cannot fail and decode inverts it exactly: with BOS the dummy-prefix
  // space is dropped again, without BOS it stays.
  std::string decoded;
  auto const ids = encode_decode(tok, text, bos, eos, &decoded);
  FUZZ_CHECK(!ids.empty() || (text.empty() && !bos && !eos));
  if (bos) {
    FUZZ_CHECK(decoded == text);
  } else {
    FUZZ_CHECK(decoded == (text.empty() ? std::string() : " " + text));
  }
  // Ids straight from the input: in range they decode, out of range they are refused with value_error.
  for (std::size_t i = 1; i + 2 <= size && i < 64; i += 2) {
    int const id = static_cast<int>(static_cast<std::int16_t>(data[i] | (data[i + 1] << 8)));
    bool ok = false;
    try {
      (void)tok.decode(static_cast<int>(data[i]) - 2, id);
      ok = true;
    } catch (factorllm::value_error const&) {
    }
    FUZZ_CHECK(ok == (id >= 0 && id < tok.vocab_size()));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  if (size == 0) return 0;
  bool const bos = (data[0] & 2) != 0, eos = (data[0] & 4) != 0;
  if ((data[0] & 1) == 0) {
    mode_a(data, size, bos, eos);
  } else {
    mode_b(data, size, bos, eos);
  }
  return 0;
}
