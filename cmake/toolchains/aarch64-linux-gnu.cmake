# SPDX-License-Identifier: Apache-2.0
# Cross toolchain: Debian 12's aarch64 cross compiler (g++-aarch64-linux-gnu), tests run under user-mode QEMU
# (qemu-user-static). Used by tests/cross/run_aarch64.sh:
#   cmake -S . -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/toolchains/aarch64-linux-gnu.cmake
#
# Where things come from:
#  - the compiler, glibc, libstdc++ and libgomp (OpenMP): the cross toolchain, under /usr/aarch64-linux-gnu
#    (libc6-dev-arm64-cross, libstdc++-12-dev-arm64-cross, libgomp1-arm64-cross; pulled in by g++-aarch64-linux-gnu).
#  - the header-only dependencies (Eigen, xtl, nlohmann-json, Catch2): /usr/include and their CMake packages under
#    /usr/share, /usr/lib/cmake, as for the native build. Debian's cross compiler searches /usr/include last, after
#    its own glibc headers, and CMake drops that implicit directory from the imported targets' include paths, so
#    the x86 glibc headers are never reached before the aarch64 ones.
#  - the architecture-specific packages (Highway's libhwy, whose config lives under lib/<triplet>; xsimd, whose
#    Debian package also installs its config there): Debian multiarch, /usr/lib/aarch64-linux-gnu
#    (dpkg --add-architecture arm64; apt-get install libhwy-dev:arm64 libxsimd-dev:arm64).
#
# Running (CMAKE_CROSSCOMPILING_EMULATOR: catch_discover_tests and ctest run the test executables through it):
# qemu-aarch64-static with -L /usr/aarch64-linux-gnu, so the executables' loader is the cross toolchain's, and
# LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib, so glibc, libstdc++ and libgomp are the ones they were linked
# against; the remaining libraries (libhwy.so.1) come from the multiarch directories, which QEMU reads from the
# host. Without LD_LIBRARY_PATH the loader would pair the cross ld.so with the multiarch libc6:arm64 (another
# Debian revision of glibc) that libhwy1:arm64 depends on.
# QEMU emulates its "max" CPU by default (NEON, SVE and SVE2, 512-bit SVE vectors): Highway 1.0.3's dynamic
# dispatch picks SVE2 there. QEMU reads the CPU model from the environment variable QEMU_CPU, so one build runs on
# another without reconfiguring: QEMU_CPU=cortex-a72 ctest ... is a NEON-only core (Highway picks NEON),
# QEMU_CPU=a64fx an SVE one without SVE2.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(FACTORLLM_CROSS_TRIPLET aarch64-linux-gnu)
set(CMAKE_LIBRARY_ARCHITECTURE ${FACTORLLM_CROSS_TRIPLET})
set(CMAKE_C_COMPILER ${FACTORLLM_CROSS_TRIPLET}-gcc)
set(CMAKE_CXX_COMPILER ${FACTORLLM_CROSS_TRIPLET}-g++)
set(FACTORLLM_CROSS_PREFIX /usr/${FACTORLLM_CROSS_TRIPLET} CACHE PATH "The cross toolchain's target root (glibc, libstdc++, libgomp)")

find_program(FACTORLLM_QEMU_AARCH64 NAMES qemu-aarch64-static qemu-aarch64 REQUIRED
             DOC "User-mode QEMU for aarch64 (Debian: qemu-user-static)")
set(CMAKE_CROSSCOMPILING_EMULATOR ${FACTORLLM_QEMU_AARCH64} -L ${FACTORLLM_CROSS_PREFIX}
    -E LD_LIBRARY_PATH=${FACTORLLM_CROSS_PREFIX}/lib)

# Tests, benchmarks and examples: the aarch64 baseline (the project's default, -march=native, has no meaning for a
# cross compiler).
set(FACTORLLM_ISA_FLAGS "-march=armv8-a" CACHE STRING "ISA flags for tests, benchmarks and examples")
