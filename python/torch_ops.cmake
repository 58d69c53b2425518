# SPDX-License-Identifier: Apache-2.0
# The PyTorch ops of the package factorllm (factorllm.torch): libfactorllm_torch.so with the TORCH_LIBRARY "factorllm"
# operators, built into the package folder next to _core and loaded by factorllm/torch.py through
# torch.ops.load_library. Included by python/CMakeLists.txt only when FACTORLLM_BUILD_TORCH is ON (default: ON when
# libtorch's TorchConfig.cmake is found and the Python module is built).

add_library(factorllm_torch SHARED src/torch_ops.cpp)
target_link_libraries(factorllm_torch PRIVATE factorllm::factorllm ${TORCH_LIBRARIES})
# The ops on CUDA tensors (issue 16 part 7, src/torch_ops_cuda.cpp; docs/python.md "CUDA tensors"): only when the
# CUDA backend is built (FACTORLLM_ENABLE_CUDA) and the torch found is CUDA-enabled (its TorchConfig sets
# TORCH_CUDA_LIBRARIES with libc10_cuda). Debian's torch is CPU-only: the path compiles out, cuda_compiled() is
# False and factorllm.torch.cuda_status says why.
set(FACTORLLM_TORCH_CUDA OFF)
if(FACTORLLM_ENABLE_CUDA AND TARGET factorllm::cuda AND TORCH_CUDA_LIBRARIES)
  set(FACTORLLM_TORCH_CUDA ON)
  target_sources(factorllm_torch PRIVATE src/torch_ops_cuda.cpp)
  target_link_libraries(factorllm_torch PRIVATE factorllm::cuda)  # PUBLIC: cudart, cuBLAS
  target_compile_definitions(factorllm_torch PRIVATE FLLM_TORCH_WITH_CUDA)
  message(STATUS "factorllm: PyTorch ops on CUDA tensors ON (CUDA torch: ${TORCH_CUDA_LIBRARIES})")
elseif(FACTORLLM_ENABLE_CUDA)
  message(STATUS "factorllm: PyTorch ops on CUDA tensors compiled out: the torch found (${Torch_DIR}) is not "
                 "CUDA-enabled (no TORCH_CUDA_LIBRARIES)")
endif()
add_dependencies(factorllm_torch factorllm_python)  # factorllm.torch is imported through the package (its __init__ loads _core)
if(TARGET factorllm::openmp)
  target_link_libraries(factorllm_torch PRIVATE factorllm::openmp)
endif()
# The extension is an application of the headers: it may use ISA flags (never the exported library target).
# Warnings as for the tests (CI adds -Werror): libtorch's headers come in as system headers (/usr/include and the
# imported torch target's -isystem), and are clean with -Wall -Wextra -Wpedantic on Debian 12 (torch 1.13.1, GCC 12).
# -Wno-maybe-uninitialized is not for torch: GCC 12 false positives inside Eigen's AVX-512 packet code once inlined
# (_mm512_unpacklo_ps in gemm_pack_lhs with -march=native), the same exemption tests/ and examples/ carry.
target_compile_options(factorllm_torch PRIVATE -Wall -Wextra -Wpedantic $<$<CXX_COMPILER_ID:GNU>:-Wno-maybe-uninitialized>
                                               ${FACTORLLM_ISA_FLAGS})
set_target_properties(factorllm_torch PROPERTIES CXX_VISIBILITY_PRESET default
                                                 LIBRARY_OUTPUT_DIRECTORY ${FACTORLLM_PYTHON_PACKAGE_DIR})
if(FACTORLLM_PYTHON_INSTALL)
  install(TARGETS factorllm_torch LIBRARY DESTINATION ${FACTORLLM_PYTHON_INSTALL_DIR}/factorllm COMPONENT python)
endif()

# Python tests: they need an interpreter whose torch is the libtorch linked above, and it must be the interpreter the
# module _core was built for (FACTORLLM_PYTHON, python/CMakeLists.txt: /usr/bin/python3 by default, Debian's
# python3-torch, built from the same source as libtorch-dev). If it does not import torch and numpy, the tests are
# skipped with a warning (.ci/run refuses that, so CI cannot pass without running them).
if(FACTORLLM_BUILD_TESTS)
  set(_fllm_py_candidates "${FACTORLLM_PYTHON}")
  set(_fllm_torch_python "")
  set(_fllm_py_tried "")
  foreach(_py IN LISTS _fllm_py_candidates)
    if(NOT EXISTS "${_py}")
      string(APPEND _fllm_py_tried " ${_py} (missing);")
      continue()
    endif()
    execute_process(COMMAND "${_py}" -c "import numpy, torch; print(torch.__version__)"
                    RESULT_VARIABLE _fllm_py_rc OUTPUT_VARIABLE _fllm_py_torch_version ERROR_VARIABLE _fllm_py_err
                    OUTPUT_STRIP_TRAILING_WHITESPACE TIMEOUT 120)
    if(_fllm_py_rc EQUAL 0)
      set(_fllm_torch_python "${_py}")
      break()
    endif()
    string(REGEX MATCH "[A-Za-z]*Error: [^\n]*" _fllm_py_err "${_fllm_py_err}")
    string(APPEND _fllm_py_tried " ${_py} (${_fllm_py_err});")
  endforeach()
  if(_fllm_torch_python)
    message(STATUS "factorllm: torch_ops Python tests use ${_fllm_torch_python} (torch ${_fllm_py_torch_version})")
    # The Python tests run once per BLAS: their tolerances must hold for any BLAS the reference's torch links
    # (tests/python/test_torch_ops.py, "Tolerances"). Debian's torch links libblas.so.3 / liblapack.so.3, which
    # update-alternatives points at one implementation; each run puts its BLAS's folder first on LD_LIBRARY_PATH
    # (the system's choice is left alone), and FACTORLLM_EXPECT_BLAS makes the script refuse to run on another BLAS.
    # torch_ops: Debian's reference BLAS (libblas3, liblapack3); torch_ops_openblas: OpenBLAS (libopenblas0-openmp,
    # else -pthread or -serial), registered only when installed (.ci/run installs it and requires the test).
    set(_fllm_multiarch /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE})
    find_path(FACTORLLM_REFERENCE_BLAS_DIR libblas.so.3 PATHS ${_fllm_multiarch}/blas NO_DEFAULT_PATH
              DOC "Folder of the reference BLAS's libblas.so.3 (Debian: libblas3), for ctest torch_ops")
    find_path(FACTORLLM_REFERENCE_LAPACK_DIR liblapack.so.3 PATHS ${_fllm_multiarch}/lapack NO_DEFAULT_PATH
              DOC "Folder of the reference LAPACK's liblapack.so.3 (Debian: liblapack3), for ctest torch_ops")
    find_path(FACTORLLM_OPENBLAS_DIR libblas.so.3
              PATHS ${_fllm_multiarch}/openblas-openmp ${_fllm_multiarch}/openblas-pthread ${_fllm_multiarch}/openblas-serial
              NO_DEFAULT_PATH DOC "Folder of OpenBLAS's libblas.so.3 (Debian: libopenblas0-openmp), for ctest torch_ops_openblas")
    set(_fllm_torch_test_env PYTHONPATH=${FACTORLLM_PYTHON_PATH} OMP_NUM_THREADS=2)
    add_test(NAME torch_ops
             COMMAND ${_fllm_torch_python} ${PROJECT_SOURCE_DIR}/tests/python/test_torch_ops.py)
    set_tests_properties(torch_ops PROPERTIES ENVIRONMENT "${_fllm_torch_test_env}" TIMEOUT 600 LABELS torch)
    if(FACTORLLM_REFERENCE_BLAS_DIR AND FACTORLLM_REFERENCE_LAPACK_DIR)
      set_tests_properties(torch_ops PROPERTIES ENVIRONMENT "${_fllm_torch_test_env};FACTORLLM_EXPECT_BLAS=reference"
        ENVIRONMENT_MODIFICATION "LD_LIBRARY_PATH=path_list_prepend:${FACTORLLM_REFERENCE_LAPACK_DIR};LD_LIBRARY_PATH=path_list_prepend:${FACTORLLM_REFERENCE_BLAS_DIR}")
    else()
      message(STATUS "factorllm: torch_ops runs on whatever BLAS torch loads (no reference BLAS under ${_fllm_multiarch})")
    endif()
    if(FACTORLLM_OPENBLAS_DIR)
      add_test(NAME torch_ops_openblas
               COMMAND ${_fllm_torch_python} ${PROJECT_SOURCE_DIR}/tests/python/test_torch_ops.py)
      set_tests_properties(torch_ops_openblas PROPERTIES
        ENVIRONMENT "${_fllm_torch_test_env};FACTORLLM_EXPECT_BLAS=openblas"
        ENVIRONMENT_MODIFICATION "LD_LIBRARY_PATH=path_list_prepend:${FACTORLLM_OPENBLAS_DIR}" TIMEOUT 600 LABELS torch)
    else()
      message(STATUS "factorllm: torch_ops_openblas skipped: no OpenBLAS under ${_fllm_multiarch} "
                     "(Debian: apt-get install libopenblas0-openmp)")
    endif()
    # Smoke run of the two-stage recipe on stories260K (examples/03_finetune_recipe): builds, trains 40 steps,
    # evaluates; exit 77 (skipped) when ../shared/models is absent. Label "recipe" (ctest -LE recipe leaves it out).
    # N=4 K=2 and N=8 K=1 (d_ff 172 zero-padded to 176) with the bias-free router, each saved in the factorized
    # schema; finetune_recipe_checkpoint_* then load them with load_factorized and compare every layer with the
    # recipe's float64 reference (examples/03_finetune_recipe/check_checkpoint.cpp).
    set(_fllm_recipe_out ${CMAKE_BINARY_DIR}/finetune_recipe_quick)
    add_test(NAME finetune_recipe_quick
             COMMAND ${_fllm_torch_python} ${PROJECT_SOURCE_DIR}/examples/03_finetune_recipe/finetune_recipe.py --quick
                     --model ${FACTORLLM_SHARED_DIR}/models/stories260K.bin
                     --tokenizer ${FACTORLLM_SHARED_DIR}/models/tok512.bin
                     --configs 4:2 8:1 --router-bias none --save ${_fllm_recipe_out}/moe-{config}.safetensors
                     --save-heldout ${_fllm_recipe_out}/heldout.json)
    set_tests_properties(finetune_recipe_quick PROPERTIES
      ENVIRONMENT "PYTHONPATH=${FACTORLLM_PYTHON_PATH};OMP_NUM_THREADS=1"
      SKIP_RETURN_CODE 77 TIMEOUT 900 LABELS recipe FIXTURES_SETUP finetune_recipe_saved)
    foreach(_cfg N4K2 N8K1)  # only where the recipe can run (it exits 77 without the model; so would these)
      if(NOT EXISTS ${FACTORLLM_SHARED_DIR}/models/stories260K.bin)
        break()
      endif()
      add_test(NAME finetune_recipe_checkpoint_${_cfg}
               COMMAND finetune_recipe_check ${_fllm_recipe_out}/moe-${_cfg}.safetensors
                       ${_fllm_recipe_out}/moe-${_cfg}.check.safetensors)
      set_tests_properties(finetune_recipe_checkpoint_${_cfg} PROPERTIES LABELS recipe
                           FIXTURES_REQUIRED finetune_recipe_saved)
    endforeach()
    # The README's convert -> fine-tune -> export -> eval path, small: factorllm convert, the recipe --quick --init from
    # that file, finetune_recipe_check, factorllm export to GGUF, factorllm eval of the GGUF and the --init file
    # (examples/03_finetune_recipe/init_chain_check.sh says what fails it). Needs the CLI (FACTORLLM_BUILD_TOOLS,
    # added before this folder) and the examples' finetune_recipe_check (FACTORLLM_BUILD_EXAMPLES).
    if(TARGET factorllm_cli AND TARGET finetune_recipe_check)
      cmake_path(ABSOLUTE_PATH FACTORLLM_SHARED_DIR BASE_DIRECTORY "${PROJECT_SOURCE_DIR}" NORMALIZE
                 OUTPUT_VARIABLE _fllm_shared_abs)
      add_test(NAME finetune_recipe_init_chain
               COMMAND bash ${PROJECT_SOURCE_DIR}/examples/03_finetune_recipe/init_chain_check.sh
                       $<TARGET_FILE:factorllm_cli> $<TARGET_FILE:finetune_recipe_check> ${_fllm_torch_python}
                       ${_fllm_shared_abs} ${CMAKE_BINARY_DIR}/finetune_recipe_init_chain)
      set_tests_properties(finetune_recipe_init_chain PROPERTIES
        ENVIRONMENT "PYTHONPATH=${FACTORLLM_PYTHON_PATH};OMP_NUM_THREADS=1"
        SKIP_RETURN_CODE 77 TIMEOUT 900 LABELS recipe)
    else()
      message(STATUS "factorllm: finetune_recipe_init_chain skipped (needs FACTORLLM_BUILD_TOOLS and FACTORLLM_BUILD_EXAMPLES)")
    endif()
  else()
    message(WARNING "factorllm: torch_ops Python tests skipped: no candidate python imports torch and numpy "
                    "(tried:${_fllm_py_tried}). Debian: apt-get install python3-torch python3-numpy, or set "
                    "FACTORLLM_PYTHON to an interpreter whose torch matches ${TORCH_LIBRARY}")
  endif()
endif()
