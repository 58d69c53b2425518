# SPDX-License-Identifier: Apache-2.0
# Configures and installs factorllm into WORK_DIR/prefix, then configures, builds and runs the consumer
# project next to this script against that prefix. Any failure fails the test.
# Cross builds: TOOLCHAIN (a CMake toolchain file) configures both projects, and the consumer runs through EMULATOR
# (the command's words separated by '|'; empty: run it directly). WITH_TOOLS=ON also builds, installs and runs the
# factorllm command-line tool. WITH_C_API=ON also builds and installs the C API shim (factorllm::c) and builds and
# runs the C consumer (tests/install/c_consumer) against it; OFF configures the library without it.
file(REMOVE_RECURSE "${WORK_DIR}")
set(_toolchain_arg "")
if(TOOLCHAIN)
  set(_toolchain_arg "-DCMAKE_TOOLCHAIN_FILE=${TOOLCHAIN}")
endif()
string(REPLACE "|" ";" _emulator "${EMULATOR}")
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
endfunction()
run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/lib -DCMAKE_CXX_COMPILER=${CXX} ${_toolchain_arg}
    -DFACTORLLM_BUILD_TESTS=OFF -DFACTORLLM_BUILD_EXAMPLES=OFF -DFACTORLLM_BUILD_BENCHMARKS=OFF
    -DFACTORLLM_BUILD_TOOLS=${WITH_TOOLS} -DFACTORLLM_BUILD_C_API=${WITH_C_API} -DFACTORLLM_INSTALL=ON -DCMAKE_INSTALL_PREFIX=${WORK_DIR}/prefix
    -DFACTORLLM_BUILD_PYTHON=OFF)  # the C++ package only: the Python module would need a build first (docs/python.md)
if(WITH_TOOLS)
  # The command-line tool is built by default and installed with the headers (bin/factorllm).
  run(${CMAKE_COMMAND} --build ${WORK_DIR}/lib --target factorllm_cli)
endif()
# >>> C API: the shim is the one compiled library target; it must be built before it can be installed.
if(WITH_C_API)
  run(${CMAKE_COMMAND} --build ${WORK_DIR}/lib --target factorllm_c)
endif()
# <<< C API <<<
run(${CMAKE_COMMAND} --install ${WORK_DIR}/lib)
if(WITH_TOOLS)
  run(${_emulator} ${WORK_DIR}/prefix/bin/factorllm --version)
endif()
run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/install/consumer -B ${WORK_DIR}/consumer -DCMAKE_CXX_COMPILER=${CXX} ${_toolchain_arg}
    -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
run(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer)
run(${_emulator} ${WORK_DIR}/consumer/consumer)

# Plain factorllm::factorllm must not need OpenMP: the consumer configures with OpenMP made unfindable ...
run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/install/consumer -B ${WORK_DIR}/consumer_no_omp -DCMAKE_CXX_COMPILER=${CXX} ${_toolchain_arg}
    -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix -DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=TRUE)
# ... while asking for the openmp component then fails, naming it.
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/install/consumer -B ${WORK_DIR}/consumer_omp_required
                        -DCMAKE_CXX_COMPILER=${CXX} ${_toolchain_arg} -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix
                        -DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=TRUE -DCONSUMER_REQUIRE_OPENMP=ON
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "find_package(factorllm COMPONENTS openmp) succeeded without OpenMP:\n${out}\n${err}")
endif()

# >>> C API: a C project finds the optional component "c" and runs a layer through the installed shim.
if(WITH_C_API)
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/install/c_consumer -B ${WORK_DIR}/c_consumer ${_toolchain_arg}
      -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
  run(${CMAKE_COMMAND} --build ${WORK_DIR}/c_consumer)
  run(${_emulator} ${WORK_DIR}/c_consumer/c_consumer)
endif()
# <<< C API <<<
