#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the C++ tests for aarch64 with Debian's cross compiler and runs them under user-mode QEMU, so the library
# is checked on Arm on an x86 machine: x86-only code outside a guard fails the build, and the cpu_simd backend
# (xsimd's neon64 there) must match the scalar oracle as it does on x86.
#
# The toolchain is cmake/toolchains/aarch64-linux-gnu.cmake (how the dependencies are found, and how QEMU runs the
# executables: its header). The build is Release (-O3) with -Werror, like CI's native one. Two passes:
#   1. every test of that build (FLLM_CROSS_TESTS) on QEMU's default CPU ("max": NEON, SVE and SVE2, so code
#      that dispatches at run time, such as Highway's HWY_DYNAMIC_DISPATCH, takes an SVE target);
#   2. the SIMD backend's tests (FLLM_CROSS_NEON_TESTS) again on a NEON-only CPU (QEMU_CPU=cortex-a72), so the
#      NEON target of run-time dispatch runs too.
#
# Needs (Debian 12, amd64): g++-aarch64-linux-gnu, qemu-user-static, and from the arm64 architecture
# (dpkg --add-architecture arm64 && apt-get update): libhwy-dev:arm64 libxsimd-dev:arm64. .ci/run installs them.
#
# Usage: bash tests/cross/run_aarch64.sh [build_dir]   (default: build-aarch64 in the repository holding this script)
# Environment: FLLM_CROSS_JOBS        build jobs (default 2)
#              FLLM_CROSS_TESTS       ctest -R regex of pass 1 (default '.': every test: the C++ test executables,
#                                     install_and_consume, the compile checks with the cross compiler)
#              FLLM_CROSS_NEON_TESTS  ctest -R regex of pass 2 (default: test_simd_backend, test_quant_kernels,
#                                     test_backend_ops; empty skips pass 2)
#              FLLM_CROSS_CMAKE_ARGS  extra configure arguments, split on spaces (CI: -DFACTORLLM_REQUIRE_SHARED_DATA=ON)
# Exit status: 0 when everything builds and passes, 1 on a build or test failure, 2 when a prerequisite is missing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${1:-$root/build-aarch64}"
[ "$#" -le 1 ] || { echo "usage: bash tests/cross/run_aarch64.sh [build_dir]" >&2; exit 2; }
jobs="${FLLM_CROSS_JOBS:-2}"
tests="${FLLM_CROSS_TESTS:-.}"
neon_tests="${FLLM_CROSS_NEON_TESTS-^(test_simd_backend|test_quant_kernels|test_backend_ops):}"
read -r -a extra_args <<<"${FLLM_CROSS_CMAKE_ARGS:-}"
toolchain="$root/cmake/toolchains/aarch64-linux-gnu.cmake"

missing() { echo "run_aarch64: $1 not found ($2)" >&2; exit 2; }
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || missing aarch64-linux-gnu-g++ "apt-get install g++-aarch64-linux-gnu"
command -v qemu-aarch64-static >/dev/null 2>&1 || missing qemu-aarch64-static "apt-get install qemu-user-static"
for pkg in hwy xsimd; do
  ls /usr/lib/aarch64-linux-gnu/cmake/"$pkg"/*onfig.cmake >/dev/null 2>&1 ||
    missing "the arm64 $pkg package" "dpkg --add-architecture arm64; apt-get update; apt-get install lib$pkg-dev:arm64"
done
# An empty QEMU_CPU makes QEMU refuse to start.
[ -n "${QEMU_CPU-unset}" ] || unset QEMU_CPU

start=$SECONDS
lap=$SECONDS
step() { printf 'run_aarch64: %s: %ds\n' "$1" "$((SECONDS - lap))"; lap=$SECONDS; }

# Benchmarks, examples, the command-line tool and the PyTorch extension are not built: the tests cover the library
# (the tool is library calls plus argument parsing; its end-to-end test runs natively), and libtorch has no arm64
# build here. -Werror as in the native CI build: aarch64-only warnings fail too.
cmake -S "$root" -B "$build" -DCMAKE_TOOLCHAIN_FILE="$toolchain" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_FLAGS="-Wall -Wextra -Werror" \
  -DFACTORLLM_BUILD_BENCHMARKS=OFF -DFACTORLLM_BUILD_EXAMPLES=OFF -DFACTORLLM_BUILD_TOOLS=OFF \
  -DFACTORLLM_BUILD_TORCH=OFF "${extra_args[@]}"
step configure

# Building also lists each executable's test cases (catch_discover_tests runs it through QEMU).
cmake --build "$build" -j"$jobs" || exit 1
step build

echo "run_aarch64: pass 1, QEMU's default CPU (${QEMU_CPU:-max}): tests matching '$tests'"
ctest --test-dir "$build" --output-on-failure --no-tests=error -j"$jobs" -R "$tests" || exit 1
step "run (pass 1)"

if [ -n "$neon_tests" ]; then
  echo "run_aarch64: pass 2, NEON-only CPU (cortex-a72): tests matching '$neon_tests'"
  QEMU_CPU=cortex-a72 ctest --test-dir "$build" --output-on-failure --no-tests=error -j"$jobs" -R "$neon_tests" || exit 1
  step "run (pass 2)"
fi
echo "run_aarch64: OK ($((SECONDS - start)) s)"
