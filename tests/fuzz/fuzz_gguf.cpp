// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: GGUF reader (io::GgufFile::parse) on arbitrary bytes, every tensor type it accepts included (F32,
// F16, BF16, F64, the integer types, and the block-quantized Q8_0 and Q4_0). A rejected input must throw a
// factorllm::error; an accepted one must have tensors whose byte sizes follow their types (numel / block weights x
// block bytes, ne[0] a multiple of the block), lie inside the file (ASan checks every byte to_float and to_blocks
// read), and decode consistently: to_float gives numel values, and for Q8_0 / Q4_0 it is dequantize_row of to_blocks
// bit for bit.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include <factorllm/core/quant.hpp>
#include <factorllm/io/gguf.hpp>

#include "fuzz_common.hpp"

namespace {

namespace io = factorllm::io;
using io::GgmlType;

template <class Block>
void check_blocks(io::GgufFile const& f, io::GgufTensorInfo const& t, std::vector<float> const& values) {
  std::vector<Block> const blocks = f.to_blocks<Block>(t.name);
  FUZZ_CHECK(static_cast<std::int64_t>(blocks.size()) * factorllm::kQuantBlock == t.numel());
  if (values.empty()) return;  // a tensor with an extent 0
  std::vector<float> again(values.size());
  factorllm::dequantize_row(blocks.data(), static_cast<std::ptrdiff_t>(again.size()), again.data());
  FUZZ_CHECK(std::memcmp(again.data(), values.data(), values.size() * sizeof(float)) == 0);
}

void check(io::GgufFile const& f) {
  for (auto const& t : f.tensors()) {
    auto const type = static_cast<std::uint32_t>(t.type);
    std::int64_t const bw = io::ggml_block_weights(type);
    FUZZ_CHECK(!t.ne.empty() && t.ne.size() <= 4 && t.ne[0] % bw == 0);
    FUZZ_CHECK(t.bytes == static_cast<std::uint64_t>(t.numel() / bw) * io::ggml_type_bytes(type));
    FUZZ_CHECK(t.offset % f.alignment() == 0);
    FUZZ_CHECK(f.find_tensor(t.name) == &t);
    bool const floating = t.type == GgmlType::f32 || t.type == GgmlType::f16 || t.type == GgmlType::bf16 ||
                          t.type == GgmlType::f64 || t.type == GgmlType::q8_0 || t.type == GgmlType::q4_0;
    std::vector<float> values;
    bool const decoded = fuzz::expect_ok_or_error([&] { values = f.to_float(t.name); });
    FUZZ_CHECK(decoded == floating);  // integer tensors are refused (format_error), floating ones never
    if (!decoded) continue;
    FUZZ_CHECK(static_cast<std::int64_t>(values.size()) == t.numel());
    if (t.type == GgmlType::q8_0) check_blocks<factorllm::q8_0>(f, t, values);
    if (t.type == GgmlType::q4_0) check_blocks<factorllm::q4_0>(f, t, values);
    // The wrong block type is refused, never reinterpreted.
    if (t.type != GgmlType::q8_0) FUZZ_CHECK(!fuzz::expect_ok_or_error([&] { (void)f.to_blocks<factorllm::q8_0>(t.name); }));
    if (t.type != GgmlType::q4_0) FUZZ_CHECK(!fuzz::expect_ok_or_error([&] { (void)f.to_blocks<factorllm::q4_0>(t.name); }));
  }
  for (auto const& [key, value] : f.kvs()) FUZZ_CHECK(f.find(key) == &value);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  std::optional<io::GgufFile> f;
  fuzz::expect_ok_or_error([&] { f.emplace(io::GgufFile::parse(data, size)); });
  if (f) check(*f);  // outside the handler: an accepted file must decode without any exception but the documented one
  return 0;
}
