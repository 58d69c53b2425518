// SPDX-License-Identifier: Apache-2.0
// The CUDA backend's ops (backend/README.md "CUDA"): include this to give Cuda<kSm> its kernels. Plain C++; link
// factorllm::cuda (the kernels, compiled by nvcc into a static library, plus cudart and cuBLAS).
#pragma once

#include "combine.hpp"
#include "context.hpp"
#include "grouping.hpp"
#include "launch.hpp"
#include "moe_forward.hpp"
#include "moe_backward.hpp"
#include "par_loss.hpp"
#include "router.hpp"
#include "swiglu.hpp"
#include "topk.hpp"
