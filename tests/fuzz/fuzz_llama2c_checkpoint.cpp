// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: llama2.c checkpoint reader (Llama2cCheckpoint::parse and ::load) on arbitrary bytes.
// A rejected input must throw a factorllm::error; an accepted one must give views that lie inside the payload
// (ASan checks every element is read) and the sizes its header declares.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include <sys/mman.h>
#include <unistd.h>

#include <factorllm/io/llama2c.hpp>

#include "fuzz_common.hpp"

namespace {

using factorllm::io::Llama2cCheckpoint;

/// Reads every element of a view (so ASan sees any view that points outside the payload).
template <class View>
float touch(View const& v) {
  float s = 0;
  if constexpr (View::kRank == 1) {
    for (std::ptrdiff_t i = 0; i < v.extent(0); ++i) s += v(i);
  } else {
    for (std::ptrdiff_t r = 0; r < v.rows(); ++r)
      for (std::ptrdiff_t c = 0; c < v.cols(); ++c) s += v(r, c);
  }
  return s;
}

void check(Llama2cCheckpoint const& c) {
  auto const& cfg = c.config();
  FUZZ_CHECK(cfg.dim > 0 && cfg.hidden_dim > 0 && cfg.n_layers > 0 && cfg.n_heads > 0 && cfg.n_kv_heads > 0 &&
             cfg.vocab_size > 0 && cfg.seq_len > 0);
  FUZZ_CHECK(cfg.dim % cfg.n_heads == 0 && cfg.n_heads % cfg.n_kv_heads == 0 && cfg.head_size() % 2 == 0);
  volatile float sink = 0;
  sink = sink + touch(c.token_embedding()) + touch(c.rms_final()) + touch(c.classifier());
  FUZZ_CHECK(c.token_embedding().rows() == cfg.vocab_size && c.token_embedding().cols() == cfg.dim);
  FUZZ_CHECK(c.classifier().rows() == cfg.vocab_size);
  for (int l = 0; l < cfg.n_layers; ++l) {
    sink = sink + touch(c.rms_att(l)) + touch(c.wq(l)) + touch(c.wk(l)) + touch(c.wv(l)) + touch(c.wo(l)) +
           touch(c.rms_ffn(l)) + touch(c.w1(l)) + touch(c.w2(l)) + touch(c.w3(l));
    FUZZ_CHECK(c.wk(l).rows() == c.config().kv_dim() && c.w1(l).rows() == cfg.hidden_dim);
    auto const ffn = c.ffn(l);
    ffn.validate("fuzz");  // must not throw: the checkpoint's FFN views are consistent
  }
  // Out-of-range layers are refused with value_error, never read.
  for (int l : {-1, cfg.n_layers}) {
    bool threw = false;
    try {
      (void)c.w2(l);
    } catch (factorllm::value_error const&) {
      threw = true;
    }
    FUZZ_CHECK(threw);
  }
}

/// An in-memory file (memfd) that load() reads through /proc/self/fd: exercises the streaming reader without disk.
int memory_file() {
  static int const fd = memfd_create("fllm_fuzz_ckpt", 0);
  return fd;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  bool parsed = false;
  fuzz::expect_ok_or_error([&] {
    auto const c = Llama2cCheckpoint::parse(data, size);
    parsed = true;
    check(c);
    // The parsed floats are the file's bytes, in order.
    float first = 0;
    if (size >= Llama2cCheckpoint::kHeaderBytes + 4) std::memcpy(&first, data + Llama2cCheckpoint::kHeaderBytes, 4);
    std::uint32_t a, b;
    float const got = c.token_embedding()(0, 0);
    std::memcpy(&a, &got, 4);
    std::memcpy(&b, &first, 4);
    FUZZ_CHECK(a == b);
  });
  // load() must agree with parse() on every input.
  int const fd = memory_file();
  if (fd >= 0 && ftruncate(fd, 0) == 0 && pwrite(fd, data, size, 0) == static_cast<ssize_t>(size)) {
    bool loaded = false;
    fuzz::expect_ok_or_error([&] {
      auto const c = Llama2cCheckpoint::load("/proc/self/fd/" + std::to_string(fd));
      loaded = true;
      check(c);
    });
    FUZZ_CHECK(loaded == parsed);
  }
  return 0;
}
