// SPDX-License-Identifier: Apache-2.0
// Stand-in for the header a CUDA build of PyTorch generates (c10/cuda/impl/cuda_cmake_macros.h.in: it defines only
// C10_CUDA_BUILD_SHARED_LIBS). Debian's CPU-only libtorch ships c10/cuda/*.h without it, so the compile check of
// python/src/torch_ops_cuda.cpp (ctest torch_ops_cuda_compile) puts this folder on its include path. Never used by a
// real build: a CUDA torch has its own.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
