// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: Hugging Face config.json parser (io::parse_hf_config) on arbitrary text. A rejected input must
// throw a factorllm::error (never a JSON library exception, a stack overflow from deep nesting, or a signed-overflow
// report); an accepted one must give a config that passes LlamaConfig::validate, with q_dim and kv_dim that do not
// overflow.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include <factorllm/io/hf_llama.hpp>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  std::string const text(reinterpret_cast<char const*>(data), size);
  std::optional<factorllm::model::LlamaConfig> c;
  fuzz::expect_ok_or_error([&] { c.emplace(factorllm::io::parse_hf_config(text, "fuzz")); });
  if (c) {
    c->validate("fuzz");  // must not throw: the parser validated it
    FUZZ_CHECK(c->q_dim() > 0 && c->kv_dim() > 0 && c->kv_dim() <= c->q_dim());
    FUZZ_CHECK(c->architecture == "llama" || c->architecture == "mistral" || c->architecture == "qwen2");
  }
  return 0;
}
