// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: the llama-architecture GGUF model reader (io::read_gguf_llama) on arbitrary bytes. A rejected
// input must throw a factorllm::error; an accepted one must validate and run one decode step through the reference
// engine (its KV cache capped at 4 positions, so a hostile context_length costs nothing).
#include <cstddef>
#include <cstdint>
#include <optional>

#include <factorllm/io/gguf.hpp>
#include <factorllm/io/gguf_llama.hpp>
#include <factorllm/model/llama_engine.hpp>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  namespace fl = factorllm;
  std::optional<fl::model::LlamaModel> m;
  fuzz::expect_ok_or_error([&] { m.emplace(fl::io::read_gguf_llama(fl::io::GgufFile::parse(data, size))); });
  if (!m) return 0;
  m->validate();  // an accepted model is consistent: no exception here
  fl::model::LlamaEngine engine(*m, 4);
  auto const logits = engine.forward_step(0, 0);
  FUZZ_CHECK(logits.extent(0) == m->config.vocab_size);
  return 0;
}
