// SPDX-License-Identifier: Apache-2.0
// The examples' names for the library's calibration helpers (model/calibration.hpp).
#pragma once

#include "factorllm/model/calibration.hpp"
#include "llama2c_engine.hpp"

namespace factorllm_examples {

using fl::model::collect_ffn_inputs;
using fl::model::convert_layers_in_order;
using fl::model::DataSplit;
using fl::model::DataSplitConfig;
using fl::model::make_data_split;
using fl::model::sample_sequences;
using fl::model::TokenSequence;

}  // namespace factorllm_examples
