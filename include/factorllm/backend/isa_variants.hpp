// SPDX-License-Identifier: Apache-2.0
// Host-side loader of per-ISA module variants: pick the best ISA the running CPU supports, dlopen that module.
//
// Why modules and not several translation units in one binary: compiling the same headers with different ISA
// flags (-mavx2 vs -mavx512f ...) into one executable breaks the one-definition rule. Non-template inline
// functions, Eigen's GEMM kernels (prefill) and std:: templates get the same mangled name in every translation
// unit, and the linker keeps one copy: possibly the AVX-512 one, which then faults on an AVX2 machine. Static
// initializers of an AVX-512 object would also run at load time on any CPU. So, like ggml's per-ISA CPU
// backend variants, the application compiles its FFN entry point once per ISA into a separate shared module
// with hidden visibility (cmake/FactorllmIsaVariants.cmake: factorllm_add_isa_variants), each binding its own
// Eigen/xsimd instantiations, exporting only an extern "C" entry. The host (compiled for baseline x86-64)
// asks the CPU what it supports and dlopens only the best module: code for an ISA the CPU lacks is never
// mapped, let alone run.
//
// ISA names (the module file is lib<base>_<isa>.so), best first:
//   avx512   xsimd::avx512bw        AVX-512 F/CD/BW/DQ/VL + AVX2/FMA/F16C, OS saves ZMM state
//   avx2     xsimd::fma3<avx2>      AVX2 + FMA + F16C, OS saves YMM state
//   sse4_2   xsimd::sse4_2          SSE4.2
//   generic  xsimd::sse2 (x86-64)   always supported: the fallback
// The CPU is queried by detail::cpu_supports_level (backend/simd/cpu_features.hpp), the same check behind
// CpuSimd<Arch>::available(): xsimd's cpuid plus our own cpuid/xgetbv, and an ISA is supported only when both agree.
//
// Linux/glibc only (dlopen); needs ${CMAKE_DL_LIBS} on glibc < 2.34 (the CMake function's target adds it).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <dlfcn.h>

#include <xsimd/xsimd.hpp>

#include "../core/error.hpp"
#include "simd/cpu_features.hpp"

namespace factorllm {

namespace detail {

/// The ISA names this header knows, best first.
inline constexpr std::string_view kIsaNames[] = {"avx512", "avx2", "sse4_2", "generic"};

inline std::string known_isa_list() {
  std::string s;
  for (auto n : kIsaNames) {
    if (!s.empty()) s += ", ";
    s += n;
  }
  return s;
}

inline void require_known_isa(std::string_view isa, char const* function) {
  for (auto n : kIsaNames)
    if (n == isa) return;
  throw backend_error(concat(function, ": unknown ISA '", isa, "'; expected one of: ", known_isa_list()));
}

}  // namespace detail

/// Returns the ISA names a module variant can be built for, best first: avx512, avx2, sse4_2, generic.
inline std::vector<std::string> known_isas() { return {std::begin(detail::kIsaNames), std::end(detail::kIsaNames)}; }

/// Returns the name of the xsimd architecture a module built for `isa` compiles CpuSimd<> for
/// ("avx512bw", "fma3+avx2", "sse4.2", "sse2"): what xsimd::default_arch::name() says inside that module.
/// \throws backend_error for an unknown ISA name.
inline char const* isa_xsimd_arch_name(std::string_view isa) {
  detail::require_known_isa(isa, "isa_xsimd_arch_name");
  if (isa == "avx512") return xsimd::avx512bw::name();
  if (isa == "avx2") return xsimd::fma3<xsimd::avx2>::name();
  if (isa == "sse4_2") return xsimd::sse4_2::name();
  return xsimd::sse2::name();
}

/// Returns true when the running CPU and OS support `isa` (cpuid at run time; see the file comment).
/// \throws backend_error for an unknown ISA name.
inline bool cpu_supports_isa(std::string_view isa) {
  detail::require_known_isa(isa, "cpu_supports_isa");
  if (isa == "avx512") return detail::cpu_supports_level(detail::IsaLevel::avx512);
  if (isa == "avx2") return detail::cpu_supports_level(detail::IsaLevel::avx2);
  if (isa == "sse4_2") return detail::cpu_supports_level(detail::IsaLevel::sse4_2);
  return true;  // generic
}

/// Returns the directory holding the running executable (from /proc/self/exe), where
/// factorllm_add_isa_variants puts the modules by default. \throws backend_error if it cannot be read.
inline std::string executable_directory() {
  std::error_code ec;
  auto const exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) throw backend_error("executable_directory: cannot read /proc/self/exe: " + ec.message());
  return exe.parent_path().string();
}

/// One loaded ISA variant of a module: lib<base>_<isa>.so for the best ISA (of an ordered list) that the
/// running CPU supports, held for the object's lifetime (RAII, move-only; the code itself is never unmapped). Loading and symbol lookup
/// are thread safe (dlopen/dlsym are); what the module's functions allow is the module's business.
///
/// Forcing (for tests and for comparing variants): Options::force, or else the environment variable FLLM_ISA
/// (when Options::read_environment), names the one ISA to load, with no fallback; forcing an unknown ISA, one
/// not in the list, or one the CPU lacks throws backend_error. Without forcing, ISAs the CPU lacks are skipped
/// and a module that fails to load (missing file, missing dependency) is skipped too, with the reason kept
/// in log(); backend_error lists every attempt when none loads.
///
/// \code
///   factorllm::IsaModule mod("my_ffn", factorllm::executable_directory(), {"avx512", "avx2", "generic"});
///   auto* api = mod.symbol<MyApi const*()>("my_ffn_api");
///   std::printf("running the %s variant\n", mod.isa().c_str());
/// \endcode
class IsaModule {
 public:
  /// The environment variable that forces an ISA ("avx512", "avx2", "sse4_2" or "generic").
  static constexpr char const* kForceEnvironmentVariable = "FLLM_ISA";

  struct Options {
    /// The ISA to load, no fallback; empty: pick the best one (or FLLM_ISA's when read_environment).
    std::string force;
    /// Honour FLLM_ISA when `force` is empty.
    bool read_environment = true;
    /// Replaces cpu_supports_isa (tests simulate an older CPU with it); null: the real CPU.
    bool (*cpu_supports)(std::string_view isa) = nullptr;
  };

  /// Loads lib<base_name>_<isa>.so from `directory` for the first ISA of `isas` (best first) that the CPU
  /// supports, or the forced one.
  /// \param base_name  module base name, as given to factorllm_add_isa_variants
  /// \param directory  folder holding the modules (e.g. executable_directory())
  /// \param isas       the ISAs built, best first; each one of known_isas()
  /// \throws backend_error if `isas` is empty or names an unknown ISA, the directory does not exist, the forced
  ///         ISA is unknown, not in `isas` or not supported by this CPU, or no module could be loaded.
  IsaModule(std::string base_name, std::string directory, std::vector<std::string> const& isas, Options options)
      : base_(std::move(base_name)), dir_(std::move(directory)) {
    if (isas.empty()) throw backend_error("IsaModule '" + base_ + "': the list of ISAs is empty");
    for (auto const& isa : isas) detail::require_known_isa(isa, "IsaModule");
    auto const supports = options.cpu_supports ? options.cpu_supports : &cpu_supports_isa;

    std::string forced = options.force, forced_by = "Options::force";
    if (forced.empty() && options.read_environment) {
      if (char const* env = std::getenv(kForceEnvironmentVariable); env && *env) {
        forced = env;
        forced_by = std::string(kForceEnvironmentVariable) + " (environment)";
      }
    }

    std::error_code ec;
    if (!std::filesystem::is_directory(dir_, ec))
      throw backend_error("IsaModule '" + base_ + "': module directory '" + dir_ + "' does not exist");

    if (!forced.empty()) {
      detail::require_known_isa(forced, ("IsaModule '" + base_ + "': " + forced_by).c_str());
      bool listed = false;
      for (auto const& isa : isas) listed = listed || isa == forced;
      if (!listed)
        throw backend_error(detail::concat("IsaModule '", base_, "': ", forced_by, " asks for ISA '", forced,
                                           "', which is not among the variants built (", join(isas), ")"));
      if (!supports(forced))
        throw backend_error(detail::concat("IsaModule '", base_, "': ", forced_by, " asks for ISA '", forced,
                                           "', which this CPU does not support"));
      if (!try_load(forced))
        throw backend_error(detail::concat("IsaModule '", base_, "': cannot load the forced ISA '", forced, "': ", log_));
      return;
    }
    for (auto const& isa : isas) {
      if (!supports(isa)) {
        log_ += isa + ": not supported by this CPU; ";
        continue;
      }
      if (try_load(isa)) return;
    }
    throw backend_error(detail::concat("IsaModule '", base_, "': no module could be loaded from '", dir_, "' (", log_, ")"));
  }

  IsaModule(std::string base_name, std::string directory, std::vector<std::string> const& isas)
      : IsaModule(std::move(base_name), std::move(directory), isas, Options{}) {}

  IsaModule(IsaModule const&) = delete;
  IsaModule& operator=(IsaModule const&) = delete;
  IsaModule(IsaModule&& other) noexcept
      : base_(std::move(other.base_)), dir_(std::move(other.dir_)), isa_(std::move(other.isa_)),
        path_(std::move(other.path_)), log_(std::move(other.log_)), handle_(std::exchange(other.handle_, nullptr)) {}
  IsaModule& operator=(IsaModule&& other) noexcept {
    if (this != &other) {
      close();
      base_ = std::move(other.base_);
      dir_ = std::move(other.dir_);
      isa_ = std::move(other.isa_);
      path_ = std::move(other.path_);
      log_ = std::move(other.log_);
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }
  /// Releases the module. Treat every function pointer taken from it as invalid afterwards (the code stays
  /// mapped until exit, see RTLD_NODELETE below, but the module's objects are the caller's to destroy first).
  ~IsaModule() { close(); }

  /// The ISA of the loaded module ("avx512", ...).
  std::string const& isa() const noexcept { return isa_; }
  /// The loaded file's path.
  std::string const& path() const noexcept { return path_; }
  /// Why better ISAs were skipped (empty when the first one loaded).
  std::string const& log() const noexcept { return log_; }

  /// Returns the module's symbol `name` as a pointer to the function type Fn (e.g. `int(float const*, int)`).
  /// The caller asserts that Fn is the symbol's real type (an extern "C" function of the module).
  /// \throws backend_error if the module does not export `name`.
  template <class Fn>
  Fn* symbol(char const* name) const {
    static_assert(std::is_function_v<Fn>, "IsaModule::symbol<Fn>: Fn must be a function type, e.g. int(float)");
    if (!handle_) throw backend_error("IsaModule: symbol lookup on a moved-from module");
    dlerror();  // clear
    void* const p = dlsym(handle_, name);
    if (!p) {
      char const* const why = dlerror();
      throw backend_error(detail::concat("IsaModule: module '", path_, "' has no symbol '", name, "'",
                                         why ? std::string(" (") + why + ")" : std::string()));
    }
    return reinterpret_cast<Fn*>(p);  // POSIX guarantees function pointers round-trip through void*
  }

 private:
  static std::string join(std::vector<std::string> const& v) {
    std::string s;
    for (auto const& e : v) s += (s.empty() ? "" : ", ") + e;
    return s;
  }

  bool try_load(std::string const& isa) {
    std::string const path = (std::filesystem::path(dir_) / ("lib" + base_ + "_" + isa + ".so")).string();
    // RTLD_LOCAL: the module's symbols never join the global scope, so no later library binds to them.
    // (No RTLD_DEEPBIND: the sanitizers do not support it; the module is linked -Bsymbolic instead.)
    // RTLD_NODELETE: dlclose never unmaps the module. Its OpenMP worker threads (libgomp may have come in
    // with it) and its threads' thread_local scratch outlive any handle, and must not find their code gone.
    dlerror();
    void* const h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (!h) {
      char const* const why = dlerror();
      log_ += isa + ": " + (why ? why : ("cannot load " + path)) + "; ";
      return false;
    }
    handle_ = h;
    isa_ = isa;
    path_ = path;
    return true;
  }

  void close() noexcept {
    if (handle_) dlclose(handle_);
    handle_ = nullptr;
  }

  std::string base_, dir_, isa_, path_, log_;
  void* handle_ = nullptr;
};

}  // namespace factorllm
