// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: safetensors reader (io::SafetensorsFile::parse) on arbitrary bytes. A rejected input must throw a
// factorllm::error; an accepted one must have tensors whose byte ranges follow dtype x shape and tile the data
// section, and every tensor must convert: to_float for F32/F16/BF16/F64 and to_int64 for the integer types (ASan
// checks every byte they read), the other conversion refused with a format_error.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include <factorllm/io/safetensors.hpp>

#include "fuzz_common.hpp"

namespace {

namespace io = factorllm::io;
using io::SafetensorsDtype;

void check(io::SafetensorsFile const& f) {
  std::uint64_t at = 0;
  for (auto const& t : f.tensors()) {
    FUZZ_CHECK(t.data_begin == at);  // sorted, no gap, no overlap
    FUZZ_CHECK(t.bytes() == static_cast<std::uint64_t>(t.numel()) * io::element_bytes(t.dtype));
    FUZZ_CHECK(f.find(t.name) == &t);
    at = t.data_end;
    bool const floating = t.dtype == SafetensorsDtype::f32 || t.dtype == SafetensorsDtype::f16 ||
                          t.dtype == SafetensorsDtype::bf16 || t.dtype == SafetensorsDtype::f64;
    bool const integer = t.dtype == SafetensorsDtype::boolean || t.dtype == SafetensorsDtype::u8 ||
                         t.dtype == SafetensorsDtype::i8 || t.dtype == SafetensorsDtype::u16 ||
                         t.dtype == SafetensorsDtype::i16 || t.dtype == SafetensorsDtype::u32 ||
                         t.dtype == SafetensorsDtype::i32 || t.dtype == SafetensorsDtype::i64 ||
                         t.dtype == SafetensorsDtype::u64;
    std::vector<float> values;
    bool const decoded = fuzz::expect_ok_or_error([&] { values = f.to_float(t.name); });
    FUZZ_CHECK(decoded == floating);
    if (decoded) FUZZ_CHECK(static_cast<std::int64_t>(values.size()) == t.numel());
    std::vector<std::int64_t> ints;
    bool const read_ints = fuzz::expect_ok_or_error([&] { ints = f.to_int64(t.name); });
    // Floating and F8 tensors are refused; integer ones convert, except U64 values above INT64_MAX.
    if (!integer) FUZZ_CHECK(!read_ints);
    if (integer && t.dtype != SafetensorsDtype::u64) FUZZ_CHECK(read_ints);
    if (read_ints) FUZZ_CHECK(static_cast<std::int64_t>(ints.size()) == t.numel());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  std::optional<io::SafetensorsFile> f;
  fuzz::expect_ok_or_error([&] { f.emplace(io::SafetensorsFile::parse(data, size)); });
  if (f) check(*f);
  return 0;
}
