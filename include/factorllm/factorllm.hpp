// SPDX-License-Identifier: Apache-2.0
// Umbrella header: the whole CPU API of factorllm. Never pulls CUDA headers.
#pragma once

#include "config.hpp"
#include "version.hpp"

#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/quant.hpp"
#include "core/tensor.hpp"
#include "core/tensor_view.hpp"
#include "core/workspace.hpp"

#include "backend/tags.hpp"
#include "backend/traits.hpp"

#include "ffn/clustering.hpp"
#include "ffn/factorize.hpp"
#include "ffn/permutation.hpp"
#include "ffn/swiglu.hpp"

#include "moe/combine.hpp"
#include "moe/grouping.hpp"
#include "moe/gating.hpp"
#include "moe/moe_ffn.hpp"
#include "moe/router.hpp"
#include "moe/routing.hpp"
#include "moe/shared_moe.hpp"
#include "moe/topk.hpp"

#include "train/adam.hpp"
#include "train/diagnostics.hpp"
#include "train/distillation.hpp"
#include "train/fixed_routing.hpp"
#include "train/moe_backward.hpp"
#include "train/oracle_labels.hpp"
#include "train/par_loss.hpp"
#include "train/par_loss_from_labels.hpp"
#include "train/recovery.hpp"
#include "train/refit.hpp"
#include "train/router_training.hpp"
#include "train/swiglu_backward.hpp"

#include "io/factorized_checkpoint.hpp"
#include "io/gguf.hpp"
#include "io/gguf_llama_export.hpp"
#include "io/llama2c.hpp"
#include "io/mixtral_export.hpp"
#include "io/moe_export.hpp"
#include "io/safetensors.hpp"
