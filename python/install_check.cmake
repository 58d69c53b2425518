# SPDX-License-Identifier: Apache-2.0
# ctest python_install: installs the component "python" of BUILD_DIR into PREFIX, then imports factorllm (and
# factorllm.torch when WITH_TORCH) with only PREFIX/SITE_DIR on PYTHONPATH, and checks that the modules came from
# there and that a forward runs. Any failure fails the test.
file(REMOVE_RECURSE "${PREFIX}")
file(MAKE_DIRECTORY "${PREFIX}")
# From PREFIX: `python -c` puts the working folder first on sys.path, and ctest's (build/python) holds the build
# tree's package.
function(run)
  execute_process(COMMAND ${ARGN} WORKING_DIRECTORY ${PREFIX} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()
run(${CMAKE_COMMAND} --install ${BUILD_DIR} --component python --prefix ${PREFIX})
if(IS_ABSOLUTE "${SITE_DIR}")
  set(_site "${SITE_DIR}")
else()
  set(_site "${PREFIX}/${SITE_DIR}")
endif()
if(WITH_TORCH)
  set(_torch True)
else()
  set(_torch False)
endif()
set(_code "import os, numpy as np, factorllm as fl
site = os.path.realpath('${_site}')
assert os.path.realpath(fl._core.__file__).startswith(site), fl._core.__file__
p = fl.ExpertPartition.contiguous(64, 4)
g = np.ones((4, 16, 8), np.float32) * 0.1
layer = fl.MoeFfn(g, g, np.ones((4, 8, 16), np.float32) * 0.1, np.zeros((4, 8), np.float32), np.zeros(4, np.float32), top_k=2)
y = layer(np.ones((3, 8), np.float32))
assert y.shape == (3, 8) and np.isfinite(y).all()
if ${_torch}:
    import factorllm.torch as ft
    assert os.path.realpath(ft.load_library()).startswith(site), ft.load_library()
print('installed factorllm', fl.__version__, 'imports from', site)")
run(${CMAKE_COMMAND} -E env --unset=FACTORLLM_TORCH_LIB PYTHONPATH=${_site} ${PYTHON} -c "${_code}")
