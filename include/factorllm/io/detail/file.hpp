// SPDX-License-Identifier: Apache-2.0
// Internal file helpers of the readers and writers: open and measure a regular file, read exactly n bytes or a whole
// file, and write a file that replaces its target only once every byte has been written.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <ios>
#include <limits>
#include <string>
#include <system_error>
#include <vector>

#include "../../core/error.hpp"

namespace factorllm {
namespace io {
namespace detail {

/// Opens the regular file `path` in binary mode and returns its size in bytes; throws format_error naming `what`
/// and the path. Directories, FIFOs and devices are refused: their reported sizes mean nothing.
inline std::uint64_t open_and_measure(std::ifstream& in, std::string const& path, char const* what) {
  std::error_code ec;
  auto const status = std::filesystem::status(path, ec);
  if (!ec && std::filesystem::exists(status) && !std::filesystem::is_regular_file(status))
    throw format_error(::factorllm::detail::concat(what, " '", path, "': not a regular file"));
  in.open(path, std::ios::binary);
  if (!in) throw format_error(::factorllm::detail::concat(what, " '", path, "': cannot open the file for reading"));
  in.seekg(0, std::ios::end);
  std::streamoff const end = in.tellg();
  in.seekg(0, std::ios::beg);
  if (!in || end < 0)
    throw format_error(::factorllm::detail::concat(what, " '", path, "': cannot determine the file size"));
  return static_cast<std::uint64_t>(end);
}

/// Reads exactly `bytes` bytes into `dst`, in chunks that fit std::streamsize; throws format_error on a short read.
inline void read_exact(std::ifstream& in, void* dst, std::uint64_t bytes, std::string const& path, char const* what) {
  char* out = static_cast<char*>(dst);
  constexpr std::uint64_t kChunk = std::uint64_t{1} << 26;
  while (bytes > 0) {
    std::uint64_t const n = std::min(bytes, kChunk);
    in.read(out, static_cast<std::streamsize>(n));
    if (static_cast<std::uint64_t>(in.gcount()) != n)
      throw format_error(::factorllm::detail::concat(what, " '", path,
                                                     "': read failed or the file shrank while it was being read"));
    out += n;
    bytes -= n;
  }
}

/// Writes `bytes` to `path` through a temporary file in the same folder that is renamed over `path` only after a
/// complete write, so a failed save never leaves a truncated file behind (and never clobbers the old one).
/// \throws format_error naming the path when the file cannot be written or renamed.
inline void write_file_atomically(std::string const& path, unsigned char const* bytes, std::size_t n,
                                  char const* what) {
  std::string const tmp = path + ".partial";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out)
      throw format_error(::factorllm::detail::concat(what, " '", path, "': cannot open '", tmp, "' for writing"));
    constexpr std::size_t kChunk = std::size_t{1} << 26;
    for (std::size_t at = 0; at < n && out; at += kChunk)
      out.write(reinterpret_cast<char const*>(bytes + at), static_cast<std::streamsize>(std::min(kChunk, n - at)));
    out.flush();
    if (!out) {
      out.close();
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      throw format_error(::factorllm::detail::concat(what, " '", path, "': write failed (disk full?)"));
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw format_error(::factorllm::detail::concat(what, " '", path, "': cannot move the written file into place: ",
                                                   ec.message()));
  }
}

/// Reads a whole regular file; the buffer is sized by the file itself, never by a field inside it.
inline std::vector<unsigned char> read_whole_file(std::string const& path, char const* what) {
  std::ifstream in;
  std::uint64_t const bytes = open_and_measure(in, path, what);
  if (bytes > static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max()))
    throw format_error(::factorllm::detail::concat(what, " '", path, "': ", bytes,
                                                   " bytes, more than this platform can address"));
  std::vector<unsigned char> buffer(static_cast<std::size_t>(bytes));
  read_exact(in, buffer.data(), bytes, path, what);
  return buffer;
}

}  // namespace detail
}  // namespace io
}  // namespace factorllm
