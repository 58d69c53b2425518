// SPDX-License-Identifier: Apache-2.0
// What every CUDA op receives besides its views: the caller's stream, the caller's cuBLAS handle and a small
// caller-owned host scratch (docs/design.md §3, backend/README.md "CUDA"). Plain C++: no CUDA header needed.
//
// cudaStream_t is `CUstream_st*` and cublasHandle_t is `cublasContext*` (cuda_runtime_api.h, cublas_api.h); they
// are declared here as incomplete types so that a translation unit compiled by g++ without the CUDA headers can
// hold and pass them. A caller that includes cuda_runtime.h passes its cudaStream_t unchanged (same type).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../../core/error.hpp"
#include "../../core/workspace.hpp"

struct CUstream_st;    // = cudaStream_t's pointee (CUDA runtime)
struct cublasContext;  // = cublasHandle_t's pointee (cuBLAS)

namespace factorllm {
namespace cuda {

/// The stream, cuBLAS handle and host scratch of one caller (one per concurrent caller, like a Workspace).
///   stream        every kernel and cuBLAS call of an op is enqueued on it; null is the legacy default stream
///   cublas        a handle the caller created (cublasCreate); each op calls cublasSetStream(cublas, stream)
///                 before its GEMMs, so the handle must not be shared with another thread at the same time
///   host_scratch  host memory for the ops that read expert counts back (size: the op's host_workspace());
///                 pinned memory (cudaMallocHost) makes that copy faster, pageable memory works
struct CudaContext {
  CUstream_st* stream = nullptr;
  cublasContext* cublas = nullptr;
  WorkspaceSpan host_scratch{};
};

/// Number of CUDA devices the runtime sees; 0 when there is none or the driver is missing (never throws).
/// Defined in the factorllm::cuda library (src/cuda/runtime.cu).
int device_count() noexcept;

/// Compute capability (major * 10 + minor) of the current device, 0 when there is none.
int device_compute_capability() noexcept;

/// Blocks the host until every operation enqueued on `stream` has finished.
/// \throws backend_error with the CUDA error string when the stream reports an error.
void synchronize(CUstream_st* stream);

}  // namespace cuda
}  // namespace factorllm
