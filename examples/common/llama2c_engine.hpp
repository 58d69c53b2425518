// SPDX-License-Identifier: Apache-2.0
// The examples' llama2.c engine: the library's reference engine (model/llama_engine.hpp) over a llama2.c checkpoint.
//
// Everything except the FFN is a plain Llama forward; the FFN of each layer is an `FfnLayer` object, and swapping a
// layer's dense FFN for a factorllm MoE is one `set_ffn` call, which is the integration an engine author writes.
#pragma once

#include <utility>

#include "factorllm/io/llama2c.hpp"
#include "factorllm/model/llama_engine.hpp"
#include "factorllm/model/llama_model.hpp"

namespace factorllm_examples {

namespace fl = ::factorllm;

using fl::model::DenseFfnLayer;
using fl::model::FfnInputHook;
using fl::model::FfnLayer;
using fl::model::MoeFfnLayer;
using fl::model::MoeLayerAdapter;
using fl::model::Sampler;

namespace detail {
/// Holds the model a Llama2cEngine runs, constructed before the engine base (base-from-member).
struct ModelHolder {
  fl::model::LlamaModel held_model;
};
}  // namespace detail

/// LlamaEngine over a copy of a llama2.c checkpoint (the copy lives as long as the engine). The checkpoint must
/// outlive the engine too (checkpoint() returns it).
class Llama2cEngine : private detail::ModelHolder, public fl::model::LlamaEngine {
 public:
  /// \throws fl::format_error if the checkpoint does not make a valid model.
  explicit Llama2cEngine(fl::io::Llama2cCheckpoint const& checkpoint)
      : detail::ModelHolder{fl::io::model_from_llama2c(checkpoint)}, fl::model::LlamaEngine(held_model), ckpt_(&checkpoint) {}

  Llama2cEngine(Llama2cEngine const&) = delete;
  Llama2cEngine& operator=(Llama2cEngine const&) = delete;

  /// Returns the checkpoint the engine was built from.
  fl::io::Llama2cCheckpoint const& checkpoint() const noexcept { return *ckpt_; }

 private:
  fl::io::Llama2cCheckpoint const* ckpt_;
};

}  // namespace factorllm_examples
