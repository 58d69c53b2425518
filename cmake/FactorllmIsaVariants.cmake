# SPDX-License-Identifier: Apache-2.0
# factorllm_add_isa_variants: builds an application's FFN entry point once per x86 ISA as separate shared modules,
# for runtime CPU dispatch with factorllm::IsaModule (include/factorllm/backend/isa_variants.hpp).
#
# Why modules: the same headers compiled with different ISA flags into one executable break the one-definition
# rule (inline functions, Eigen's GEMM templates and std:: templates get one mangled name; the linker keeps one
# copy, maybe the AVX-512 one). Each module here is compiled for one ISA with hidden visibility and linked with
# a version script that makes every symbol local except the ones named in EXPORTS, plus -Bsymbolic: it binds
# its own instantiations and exports nothing else. The host program, compiled for baseline x86-64, dlopens
# only the module the CPU supports (ggml's per-ISA CPU backend variants work the same way).
#
#   factorllm_add_isa_variants(<name>
#     SOURCES <files...>                   the module's sources (compiled once per ISA)
#     ISAS <isa...>                        any of avx512 avx2 sse4_2 generic, best first
#     [EXPORTS <symbol...>]                the extern "C" symbols to export (recommended; else visibility decides)
#     [LINK_LIBRARIES <libs...>]           e.g. factorllm::openmp (factorllm::factorllm is always linked)
#     [COMPILE_DEFINITIONS <defs...>] [COMPILE_OPTIONS <opts...>]
#     [OUTPUT_DIRECTORY <dir>])            default: CMAKE_RUNTIME_OUTPUT_DIRECTORY, else the current binary dir
#
# creates one MODULE library target <name>_<isa> per ISA, written as <dir>/lib<name>_<isa>.so, compiled with
# FLLM_ISA_NAME="<isa>" and the ISA's flags (factorllm_isa_variant_flags), and an INTERFACE target <name> that
# an executable links: it depends on every module (so they are built with it) and adds ${CMAKE_DL_LIBS} and
# factorllm::factorllm. Properties on <name>: FACTORLLM_ISA_VARIANTS (the ISA list), FACTORLLM_ISA_VARIANT_DIR.
#
# The host program should be compiled for the baseline: target_compile_options(app PRIVATE
# ${FACTORLLM_ISA_BASELINE_FLAGS}) overrides a -march=native from CMAKE_CXX_FLAGS.

include_guard(GLOBAL)

# Flags that put a translation unit back on the x86-64 baseline (the host of the modules).
set(FACTORLLM_ISA_BASELINE_FLAGS "-march=x86-64")

# Sets <out_var> to the compile flags of one ISA variant. Each starts with -march=x86-64, so that a global
# -march=native cannot leak a better ISA into a lesser variant.
function(factorllm_isa_variant_flags isa out_var)
  if(isa STREQUAL "avx512")
    set(flags -march=x86-64 -mavx512f -mavx512cd -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma -mf16c)
  elseif(isa STREQUAL "avx2")
    set(flags -march=x86-64 -mavx2 -mfma -mf16c)
  elseif(isa STREQUAL "sse4_2")
    set(flags -march=x86-64 -msse4.2)
  elseif(isa STREQUAL "generic")
    set(flags -march=x86-64)
  else()
    message(FATAL_ERROR "factorllm_isa_variant_flags: unknown ISA '${isa}' (expected avx512, avx2, sse4_2 or generic)")
  endif()
  set(${out_var} "${flags}" PARENT_SCOPE)
endfunction()

function(factorllm_add_isa_variants name)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "OUTPUT_DIRECTORY"
                        "SOURCES;ISAS;EXPORTS;LINK_LIBRARIES;COMPILE_DEFINITIONS;COMPILE_OPTIONS")
  if(arg_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "factorllm_add_isa_variants(${name}): unexpected arguments '${arg_UNPARSED_ARGUMENTS}'")
  endif()
  if(NOT arg_SOURCES)
    message(FATAL_ERROR "factorllm_add_isa_variants(${name}): SOURCES is required")
  endif()
  if(NOT arg_ISAS)
    message(FATAL_ERROR "factorllm_add_isa_variants(${name}): ISAS is required (e.g. ISAS avx512 avx2 generic)")
  endif()
  if(NOT CMAKE_SYSTEM_NAME STREQUAL "Linux" OR NOT CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
    message(FATAL_ERROR "factorllm_add_isa_variants(${name}): x86-64 Linux only "
                        "(this is ${CMAKE_SYSTEM_NAME} on ${CMAKE_SYSTEM_PROCESSOR})")
  endif()
  if(NOT TARGET factorllm::factorllm)
    message(FATAL_ERROR "factorllm_add_isa_variants(${name}): find_package(factorllm) or add factorllm first")
  endif()
  if(arg_OUTPUT_DIRECTORY)
    set(out_dir "${arg_OUTPUT_DIRECTORY}")
  elseif(CMAKE_RUNTIME_OUTPUT_DIRECTORY)
    set(out_dir "${CMAKE_RUNTIME_OUTPUT_DIRECTORY}")
  else()
    set(out_dir "${CMAKE_CURRENT_BINARY_DIR}")
  endif()

  # Version script: only the EXPORTS stay global; everything else (std:: and Eigen instantiations, the unique
  # symbols of inline statics included) becomes local to the module.
  set(link_options LINKER:-Bsymbolic LINKER:--exclude-libs,ALL)
  if(arg_EXPORTS)
    set(script "${CMAKE_CURRENT_BINARY_DIR}/${name}.exports.map")
    list(JOIN arg_EXPORTS "; " syms)
    file(CONFIGURE OUTPUT "${script}" CONTENT "{\n  global: ${syms};\n  local: *;\n};\n")
    list(APPEND link_options "LINKER:--version-script=${script}")
  endif()

  add_library(${name} INTERFACE)
  target_link_libraries(${name} INTERFACE factorllm::factorllm ${CMAKE_DL_LIBS})
  set_target_properties(${name} PROPERTIES FACTORLLM_ISA_VARIANTS "${arg_ISAS}" FACTORLLM_ISA_VARIANT_DIR "${out_dir}")

  set(seen "")
  foreach(isa IN LISTS arg_ISAS)
    if(isa IN_LIST seen)
      message(FATAL_ERROR "factorllm_add_isa_variants(${name}): ISA '${isa}' listed twice")
    endif()
    list(APPEND seen ${isa})
    factorllm_isa_variant_flags(${isa} flags)
    set(target ${name}_${isa})
    add_library(${target} MODULE ${arg_SOURCES})
    set_target_properties(${target} PROPERTIES
      PREFIX "lib" SUFFIX ".so" OUTPUT_NAME "${name}_${isa}"
      LIBRARY_OUTPUT_DIRECTORY "${out_dir}"
      CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON POSITION_INDEPENDENT_CODE ON)
    target_compile_options(${target} PRIVATE ${flags} ${arg_COMPILE_OPTIONS})
    target_compile_definitions(${target} PRIVATE FLLM_ISA_NAME="${isa}" ${arg_COMPILE_DEFINITIONS})
    target_link_libraries(${target} PRIVATE factorllm::factorllm ${arg_LINK_LIBRARIES})
    target_link_options(${target} PRIVATE ${link_options})
    if(arg_EXPORTS)
      set_property(TARGET ${target} APPEND PROPERTY LINK_DEPENDS "${script}")
    endif()
    add_dependencies(${name} ${target})
  endforeach()
endfunction()
