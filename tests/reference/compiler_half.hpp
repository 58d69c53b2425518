// SPDX-License-Identifier: Apache-2.0
// The compiler's own IEEE binary16 type, an oracle for the library's f16 conversions that shares no code with it.
// FLLM_TEST_COMPILER_HALF names it when there is one:
//  - _Float16 where C++ has it: clang, GCC 13+, and GCC 12 on x86 (GCC 12 for aarch64 defines __FLT16_MAX__ but
//    knows _Float16 in C only);
//  - __fp16 on aarch64, IEEE binary16 there (the Arm "alternative" format exists only on 32-bit Arm); float to
//    __fp16 rounds to nearest even, as _Float16 does.
#pragma once

#if defined(__FLT16_MAX__) && (defined(__clang__) || !defined(__GNUC__) || __GNUC__ >= 13 || defined(__x86_64__) || defined(__i386__))
#define FLLM_TEST_COMPILER_HALF _Float16
#elif defined(__aarch64__)
#define FLLM_TEST_COMPILER_HALF __fp16
#endif
