#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Compiles (no linking, no running) the umbrella header and the scalar tests for aarch64 with Debian's cross
# compiler, so that x86-only code outside a guard (an unguarded <immintrin.h>, an _mm_* call, an x86 asm
# block) fails CI on an x86 machine.
#
# The dependencies' headers (Eigen, xsimd, xtl, nlohmann-json, Catch2, Highway) are installed under /usr/include,
# which the cross compiler does not search; -I/usr/include would also pull in x86 glibc headers. So the
# dependencies alone are linked into a temporary folder that is passed with -isystem.
#
# Usage: bash tests/cross/compile_aarch64.sh [repo_root]   (default: the repository holding this script)
# Environment: FLLM_CROSS_CXX   the cross compiler (default aarch64-linux-gnu-g++; Debian g++-aarch64-linux-gnu)
#              FLLM_DEPS_INCLUDE where the dependencies' headers live (default /usr/include)
# Exit status: 0 when every file compiles, 1 otherwise (each failing file is listed), 2 on a usage error.
set -euo pipefail

root="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
[ -f "$root/include/factorllm/factorllm.hpp" ] || { echo "compile_aarch64: $root is not a factorllm checkout" >&2; exit 2; }
root="$(cd "$root" && pwd)"
cxx="${FLLM_CROSS_CXX:-aarch64-linux-gnu-g++}"
deps="${FLLM_DEPS_INCLUDE:-/usr/include}"
command -v "$cxx" >/dev/null 2>&1 ||
  { echo "compile_aarch64: $cxx not found (Debian: apt-get install g++-aarch64-linux-gnu)" >&2; exit 2; }

# The scalar tests: they exercise the oracle backend, which must build on every architecture. Files missing
# from the checkout are skipped with a note.
readonly kTests=(test_core.cpp test_factorize.cpp test_gating.cpp test_moe_ffn.cpp test_par_loss.cpp)

work="$(mktemp -d "${TMPDIR:-/tmp}/fllm-aarch64.XXXXXX")"
trap 'rm -rf "$work"' EXIT
sysroot_deps="$work/include"
mkdir "$sysroot_deps"
# <Eigen/...> and <unsupported/...> come from /usr/include/eigen3; the others are folders of /usr/include.
for link in eigen3/Eigen eigen3/unsupported xsimd xtl nlohmann catch2 hwy; do
  [ -e "$deps/$link" ] || { echo "compile_aarch64: $deps/$link not found (a build dependency is missing)" >&2; exit 2; }
  ln -s "$deps/$link" "$sysroot_deps/$(basename "$link")"
done

flags=(-std=c++17 -O1 -c -o /dev/null -Wall -Wextra -Wpedantic -Werror
       -isystem "$sysroot_deps" -I "$root/include" -I "$root/tests"
       -DFLLM_ENABLE_ASSERTS -DFACTORLLM_SHARED_DIR="\"$root/../shared\"")
# OpenMP paths too, when the cross compiler ships omp.h (GCC does; compiling needs no aarch64 libgomp).
if echo '#include <omp.h>' | "$cxx" -fopenmp -fsyntax-only -x c++ - 2>/dev/null; then flags+=(-fopenmp); fi

echo "compile_aarch64: $("$cxx" --version | head -n 1); flags: ${flags[*]}"
failed=()
compile() {  # $1: label, then the compiler's input arguments
  local label="$1" start=$SECONDS
  shift
  if "$cxx" "${flags[@]}" "$@"; then
    echo "  ok    $label ($((SECONDS - start)) s)"
  else
    echo "  FAIL  $label"
    failed+=("$label")
  fi
}

# The umbrella header through a one-line source (compiled as a main file, #pragma once would warn).
echo '#include <factorllm/factorllm.hpp>' >"$work/umbrella.cpp"
compile include/factorllm/factorllm.hpp "$work/umbrella.cpp"
for t in "${kTests[@]}"; do
  if [ -f "$root/tests/$t" ]; then
    compile "tests/$t" "$root/tests/$t"
  else
    echo "  skip  tests/$t (not in this checkout)"
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "compile_aarch64: ${#failed[@]} file(s) do not compile for aarch64: ${failed[*]}"
  exit 1
fi
echo "compile_aarch64: OK"
