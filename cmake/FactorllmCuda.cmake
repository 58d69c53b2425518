# SPDX-License-Identifier: Apache-2.0
# The CUDA backend (issue 16; backend/README.md "CUDA"), included by the top-level CMakeLists.txt when
# FACTORLLM_ENABLE_CUDA is ON. Needs the CUDA toolkit (nvcc, cudart, cuBLAS, CUB): not a Debian package here; CI
# machines have it in /usr/local/cuda. A missing toolkit stops the configuration (never a silent skip).

# nvcc is often not on PATH (/usr/local/cuda/bin): use the standard location unless the caller chose a compiler.
if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
  find_program(FACTORLLM_NVCC nvcc)
  if(NOT FACTORLLM_NVCC AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc CACHE FILEPATH "CUDA compiler")
  endif()
endif()
# A100 (sm_80) and H100/H200 (sm_90) by default; -DCMAKE_CUDA_ARCHITECTURES=native builds for the local GPU only.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES "80;90" CACHE STRING "CUDA architectures of the factorllm::cuda kernels")
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
if(CUDAToolkit_VERSION VERSION_LESS 12.5)
  message(FATAL_ERROR "factorllm: the CUDA backend needs CUDA >= 12.5 (cublasGemmGroupedBatchedEx); found ${CUDAToolkit_VERSION}")
endif()
message(STATUS "factorllm: CUDA backend ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES})")

add_subdirectory(${PROJECT_SOURCE_DIR}/src/cuda ${PROJECT_BINARY_DIR}/src/cuda)
if(FACTORLLM_BUILD_TESTS)
  add_subdirectory(${PROJECT_SOURCE_DIR}/tests/cuda ${PROJECT_BINARY_DIR}/tests/cuda)
endif()
if(FACTORLLM_BUILD_BENCHMARKS)
  add_subdirectory(${PROJECT_SOURCE_DIR}/benchmarks/cuda ${PROJECT_BINARY_DIR}/benchmarks/cuda)
endif()
