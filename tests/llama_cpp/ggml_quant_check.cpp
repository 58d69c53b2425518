// SPDX-License-Identifier: Apache-2.0
// Compares core/quant.hpp with ggml itself: loads a ggml build's libggml-base.so (dlopen; node-llama-cpp ships one)
// and checks that quantize_row gives the bytes of ggml's quantize_row_q8_0_ref / quantize_row_q4_0_ref and that
// dequantize_row gives the floats of ggml's dequantize_row_q8_0 / dequantize_row_q4_0, on random blocks of every
// shape the rounding cares about (uniform, quarter and half grids where x * id lands on halves, equal magnitudes of
// both signs, sparse) at scales 2^-140 .. 2^18. Blocks where 1 / d overflows (docs/formats.md: ggml's C is undefined
// there, factorllm's policy gives the zero codes) are counted and skipped; rows whose scale overflows f16 are refused
// by factorllm and skipped.
//
// Usage: ggml_quant_check LIBGGML_BASE_SO [BLOCKS]      exit status 0 when every compared block agrees
// (tests/llama_cpp/run_check.sh builds and runs it against the node-llama-cpp it installs.)
#include <dlfcn.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

#include <factorllm/core/quant.hpp>

namespace {

using namespace factorllm;
using QuantizeFn = void (*)(float const*, void*, std::int64_t);
using DequantizeFn = void (*)(void const*, float*, std::int64_t);

template <class Fn>
Fn symbol(void* lib, char const* name) {
  void* p = dlsym(lib, name);
  if (p == nullptr) {
    std::fprintf(stderr, "ggml_quant_check: the library has no symbol %s\n", name);
    std::exit(2);
  }
  Fn f;
  std::memcpy(&f, &p, sizeof f);
  return f;
}

/// True when factorllm's policy (not ggml's arithmetic) decides this block: 1 / d overflows to infinity.
template <class Block>
bool policy_block(float const* x) {
  float const d = detail::block_scale_float(x, static_cast<Block const*>(nullptr));
  return d != 0.0f && !std::isfinite(1.0f / d);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: ggml_quant_check LIBGGML_BASE_SO [BLOCKS]\n");
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    std::fprintf(stderr, "ggml_quant_check: cannot load %s: %s\n", argv[1], dlerror());
    return 2;
  }
  auto const ggml_q8 = symbol<QuantizeFn>(lib, "quantize_row_q8_0_ref");
  auto const ggml_q4 = symbol<QuantizeFn>(lib, "quantize_row_q4_0_ref");
  auto const ggml_dq8 = symbol<DequantizeFn>(lib, "dequantize_row_q8_0");
  auto const ggml_dq4 = symbol<DequantizeFn>(lib, "dequantize_row_q4_0");
  long const n_rows = argc > 2 ? std::atol(argv[2]) / 2 : 200000;
  std::uint64_t const seed = 2025;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1, 1);
  std::uniform_int_distribution<int> exponent(-140, 18), kind(0, 9), grid(-40, 40);
  long compared8 = 0, compared4 = 0, policy8 = 0, policy4 = 0, refused = 0, bad = 0;
  for (long r = 0; r < n_rows; ++r) {
    float x[64];
    float const scale = std::ldexp(1.0f, exponent(rng));
    int const k = kind(rng);
    for (int i = 0; i < 64; ++i) {
      float v = u(rng) * scale;
      if (k == 0) v = static_cast<float>(grid(rng)) * 0.25f * scale;
      if (k == 1) v = static_cast<float>(grid(rng)) * 0.5f;
      if (k == 2 && i % 5 == 0) v = 0.0f;
      if (k == 3) v = (i % 3 ? 1.0f : -1.0f) * scale;
      x[i] = v;
    }
    q8_0 ours8[2], theirs8[2];
    q4_0 ours4[2], theirs4[2];
    ggml_q8(x, theirs8, 64);
    ggml_q4(x, theirs4, 64);
    bool ok8 = true, ok4 = true;
    try {
      quantize_row(x, 64, ours8);
    } catch (value_error const&) {
      ok8 = false;
      ++refused;
    }
    try {
      quantize_row(x, 64, ours4);
    } catch (value_error const&) {
      ok4 = false;
      ++refused;
    }
    for (int b = 0; b < 2; ++b) {
      if (ok8 && policy_block<q8_0>(x + 32 * b)) {
        ++policy8;
      } else if (ok8) {
        ++compared8;
        if (std::memcmp(&ours8[b], &theirs8[b], sizeof(q8_0)) != 0 && bad++ < 10)
          std::printf("q8_0 bytes differ: row %ld block %d (scale 2^%d, kind %d)\n", r, b, std::ilogb(scale), k);
      }
      if (ok4 && policy_block<q4_0>(x + 32 * b)) {
        ++policy4;
      } else if (ok4) {
        ++compared4;
        if (std::memcmp(&ours4[b], &theirs4[b], sizeof(q4_0)) != 0 && bad++ < 10)
          std::printf("q4_0 bytes differ: row %ld block %d (scale 2^%d, kind %d)\n", r, b, std::ilogb(scale), k);
      }
    }
    // Dequantization of ggml's own blocks (finite scales): the same floats, bit for bit.
    float a[64], c[64];
    if (std::isfinite(theirs8[0].d.to_float()) && std::isfinite(theirs8[1].d.to_float())) {
      dequantize_row(theirs8, 64, a);
      ggml_dq8(theirs8, c, 64);
      if (std::memcmp(a, c, sizeof a) != 0 && bad++ < 10) std::printf("q8_0 dequantization differs: row %ld\n", r);
    }
    if (std::isfinite(theirs4[0].d.to_float()) && std::isfinite(theirs4[1].d.to_float())) {
      dequantize_row(theirs4, 64, a);
      ggml_dq4(theirs4, c, 64);
      if (std::memcmp(a, c, sizeof a) != 0 && bad++ < 10) std::printf("q4_0 dequantization differs: row %ld\n", r);
    }
  }
  std::printf("ggml_quant_check (seed %llu): %ld q8_0 and %ld q4_0 blocks compared with %s, %ld mismatches; "
              "skipped: %ld / %ld blocks under the 1/d-overflow policy, %ld rows refused (scale beyond f16)\n",
              static_cast<unsigned long long>(seed), compared8, compared4, argv[1], bad, policy8, policy4, refused);
  return bad == 0 ? 0 : 1;
}
