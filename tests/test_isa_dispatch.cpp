// SPDX-License-Identifier: Apache-2.0
// Tests of runtime CPU dispatch through per-ISA modules (backend/isa_variants.hpp, cmake/FactorllmIsaVariants.cmake):
// each module the CPU supports, forced in turn, matches the scalar oracle and repeats bit for bit; the automatic
// choice is the best supported ISA; bad requests fail with backend_error naming the culprit; and this test
// binary (the host, compiled for baseline x86-64) contains no AVX/AVX-512 instruction of its own.
//
// The modules are lib factorllm_test_moe_variant_<isa>.so, built from examples/05_isa_dispatch/moe_variant.cpp.
#include <catch2/catch.hpp>

#include <factorllm/backend/isa_variants.hpp>
#include <factorllm/moe/moe_ffn.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "moe_variant_api.h"
#include "moe_variant_desc.hpp"
#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define FLLM_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(undefined_behavior_sanitizer)
#define FLLM_TEST_SANITIZED 1
#endif
#endif

using namespace factorllm;

namespace {

// Tolerance (written down, as in test_simd_backend.cpp): float accumulation in the module against the
// double-accumulating oracle, relative L2 < 2e-5 for d up to 300.
constexpr double kTol = 2e-5;
char const* const kBase = "factorllm_test_moe_variant";
std::vector<std::string> const kBuilt = {"avx512", "avx2", "generic"};  // tests/CMakeLists.txt, best first

IsaModule::Options no_environment(std::string force = {}) {
  IsaModule::Options o;
  o.force = std::move(force);
  o.read_environment = false;
  return o;
}

/// Restores (or removes) FLLM_ISA when it goes out of scope.
struct EnvGuard {
  std::string saved;
  bool had = false;
  EnvGuard() {
    if (char const* v = std::getenv(IsaModule::kForceEnvironmentVariable)) {
      had = true;
      saved = v;
    }
  }
  ~EnvGuard() {
    if (had)
      setenv(IsaModule::kForceEnvironmentVariable, saved.c_str(), 1);
    else
      unsetenv(IsaModule::kForceEnvironmentVariable);
  }
};

FllmMoeVariantApi const* api_of(IsaModule const& m) {
  auto const* api = m.symbol<FllmMoeVariantApiFn>(FLLM_MOE_VARIANT_API_SYMBOL)();
  REQUIRE(api != nullptr);
  REQUIRE(api->abi_version == FLLM_MOE_VARIANT_ABI_VERSION);
  return api;
}

/// Runs the module and the CpuScalar oracle (in this baseline binary) on the same layer and tokens.
template <class W>
void check_module(FllmMoeVariantApi const* api, int d, int d_ff, int n, int k, moe::CombineMode mode, int n_tokens,
                  std::uint64_t seed) {
  fixture::DenseWeights<W> w(ref::random_ffn(d, d_ff, seed));
  auto experts = ffn::factorize(w.view(), ffn::ExpertPartition::random(d_ff, n, seed + 1));
  auto const router = moe::Router<float>::random(d, n, seed + 2, 1.0);
  moe::Gating g;
  g.mode = mode;
  g.top_k = k;
  FllmMoeDesc const desc = factorllm_examples::moe_variant_desc(experts, router, g);
  char err[512] = {};
  void* layer = api->create(&desc, err, sizeof err);
  INFO("create: " << err);
  REQUIRE(layer != nullptr);
  moe::MoeFfn<W, CpuScalar> oracle(std::move(experts), router, g);

  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(n_tokens * d), seed + 3, 1.0), n_tokens, d);
  Matrix<float> y_ref({n_tokens, d}), y1({n_tokens, d}), y2({n_tokens, d});
  oracle.forward(x.cview(), y_ref.view());
  int const rc1 = api->forward(layer, x.data(), y1.data(), n_tokens, err, sizeof err);
  int const rc2 = api->forward(layer, x.data(), y2.data(), n_tokens, err, sizeof err);
  api->destroy(layer);
  INFO(api->isa << " " << dtype_traits<W>::name() << " d=" << d << " d_ff=" << d_ff << " n=" << n << " k=" << k
                << " T=" << n_tokens << " mode=" << moe::to_string(mode) << " forward: " << err);
  REQUIRE(rc1 == 0);
  REQUIRE(rc2 == 0);
  auto const size = static_cast<std::size_t>(y1.size());
  REQUIRE(ref::rel_l2(y1.data(), y_ref.data(), size) < fixture::simd_oracle_tolerance<W>(kTol));
  if (size > 0) REQUIRE(std::memcmp(y1.data(), y2.data(), sizeof(float) * size) == 0);  // bitwise identical run to run
}

bool pretend_no_avx512(std::string_view isa) { return isa != "avx512" && cpu_supports_isa(isa); }

}  // namespace

TEST_CASE("isa_variants: the CPU query knows the ISA names", "[isa]") {
  REQUIRE(known_isas() == std::vector<std::string>{"avx512", "avx2", "sse4_2", "generic"});
  REQUIRE(cpu_supports_isa("generic"));
  // A CPU with AVX-512 has AVX2; one with AVX2 has SSE4.2.
  if (cpu_supports_isa("avx512")) REQUIRE(cpu_supports_isa("avx2"));
  if (cpu_supports_isa("avx2")) REQUIRE(cpu_supports_isa("sse4_2"));
  REQUIRE(std::string(isa_xsimd_arch_name("avx2")) == "fma3+avx2");
  REQUIRE_THROWS_AS(cpu_supports_isa("avx1024"), backend_error);
  REQUIRE_THROWS_WITH(cpu_supports_isa("avx1024"), Catch::Contains("avx1024"));
}

TEST_CASE("isa_variants: each module the CPU supports matches the scalar oracle, bit-repeatably", "[isa]") {
  int tested = 0;
  for (auto const& isa : kBuilt) {
    if (!cpu_supports_isa(isa)) {
      WARN("this CPU lacks " << isa << ": its module is not tested here");
      continue;
    }
    IsaModule const m(kBase, FLLM_TEST_MODULE_DIR, kBuilt, no_environment(isa));
    REQUIRE(m.isa() == isa);
    auto const* api = api_of(m);
    REQUIRE(std::string(api->isa) == isa);
    // The module really was compiled for that ISA: CpuSimd<> inside it is the matching xsimd arch.
    REQUIRE(std::string(api->xsimd_arch) == isa_xsimd_arch_name(isa));
    std::uint64_t seed = 100;
    // Decode (T = 1) and prefill (T = 64) paths, d not a multiple of any SIMD width, f32 and bf16 weights.
    for (int t : {0, 1, 3, 64}) {
      check_module<float>(api, 64, 256, 4, 2, moe::CombineMode::softmax_topk_renorm, t, seed += 5);
      check_module<bf16>(api, 64, 256, 4, 2, moe::CombineMode::softmax_topk_renorm, t, seed += 5);
      check_module<float>(api, 100, 300, 3, 1, moe::CombineMode::code_ref, t, seed += 5);
      check_module<bf16>(api, 33, 40, 8, 3, moe::CombineMode::sigmoid_topk, t, seed += 5);
    }
    ++tested;
  }
  REQUIRE(tested >= 1);  // generic always runs
}

TEST_CASE("isa_variants: without forcing, the best supported ISA is loaded", "[isa]") {
  std::string best;
  for (auto const& isa : kBuilt)
    if (best.empty() && cpu_supports_isa(isa)) best = isa;
  IsaModule const m(kBase, FLLM_TEST_MODULE_DIR, kBuilt, no_environment());
  REQUIRE(m.isa() == best);
  // Every better ISA was skipped as unsupported (none on a CPU that has the first one), and nothing else was logged.
  std::string skipped;
  for (auto const& isa : kBuilt) {
    if (isa == best) break;
    skipped += isa + ": not supported by this CPU; ";
  }
  REQUIRE(m.log() == skipped);
  REQUIRE(m.path() == std::string(FLLM_TEST_MODULE_DIR) + "/lib" + kBase + "_" + best + ".so");

  // A CPU without AVX-512 (simulated) gets the next one, and refuses a forced avx512.
  auto o = no_environment();
  o.cpu_supports = &pretend_no_avx512;
  IsaModule older(kBase, FLLM_TEST_MODULE_DIR, kBuilt, o);
  REQUIRE(older.isa() != "avx512");
  REQUIRE_THAT(older.log(), Catch::Contains("avx512: not supported"));
  o.force = "avx512";
  REQUIRE_THROWS_AS(IsaModule(kBase, FLLM_TEST_MODULE_DIR, kBuilt, o), backend_error);
  REQUIRE_THROWS_WITH(IsaModule(kBase, FLLM_TEST_MODULE_DIR, kBuilt, o),
                      Catch::Contains("'avx512'") && Catch::Contains("does not support"));

  // Moving keeps the module loaded.
  IsaModule moved(std::move(older));
  REQUIRE(api_of(moved)->isa == moved.isa());
}

TEST_CASE("isa_variants: FLLM_ISA forces an ISA", "[isa]") {
  EnvGuard const guard;
  setenv(IsaModule::kForceEnvironmentVariable, "generic", 1);
  IsaModule const m(kBase, FLLM_TEST_MODULE_DIR, kBuilt);
  REQUIRE(m.isa() == "generic");
  REQUIRE(std::string(api_of(m)->isa) == "generic");
  // Options::force wins over the environment.
  IsaModule::Options o;
  o.force = "avx2";
  if (cpu_supports_isa("avx2")) REQUIRE(IsaModule(kBase, FLLM_TEST_MODULE_DIR, kBuilt, o).isa() == "avx2");
  setenv(IsaModule::kForceEnvironmentVariable, "avx9000", 1);
  REQUIRE_THROWS_AS(IsaModule(kBase, FLLM_TEST_MODULE_DIR, kBuilt), backend_error);
  REQUIRE_THROWS_WITH(IsaModule(kBase, FLLM_TEST_MODULE_DIR, kBuilt),
                      Catch::Contains("avx9000") && Catch::Contains("FLLM_ISA"));
}

TEST_CASE("isa_variants: bad requests throw backend_error naming the culprit", "[isa][bad]") {
  using Catch::Contains;
  // Unknown forced ISA.
  REQUIRE_THROWS_AS(IsaModule(kBase, FLLM_TEST_MODULE_DIR, kBuilt, no_environment("avx1024")), backend_error);
  REQUIRE_THROWS_WITH(IsaModule(kBase, FLLM_TEST_MODULE_DIR, kBuilt, no_environment("avx1024")),
                      Contains("unknown ISA 'avx1024'"));
  // Unknown name in the list of ISAs built.
  REQUIRE_THROWS_WITH(IsaModule(kBase, FLLM_TEST_MODULE_DIR, {"avx2", "neon"}, no_environment()), Contains("'neon'"));
  REQUIRE_THROWS_AS(IsaModule(kBase, FLLM_TEST_MODULE_DIR, {}, no_environment()), backend_error);
  // A known ISA that was not built.
  REQUIRE_THROWS_WITH(IsaModule(kBase, FLLM_TEST_MODULE_DIR, kBuilt, no_environment("sse4_2")),
                      Contains("'sse4_2'") && Contains("not among the variants built"));
  // Missing module directory.
  std::string const missing = std::string(FLLM_TEST_MODULE_DIR) + "/no_such_folder";
  REQUIRE_THROWS_AS(IsaModule(kBase, missing, kBuilt, no_environment()), backend_error);
  REQUIRE_THROWS_WITH(IsaModule(kBase, missing, kBuilt, no_environment()), Contains(missing));
  // A directory without the modules: every attempt is listed.
  REQUIRE_THROWS_WITH(IsaModule("no_such_module", FLLM_TEST_MODULE_DIR, kBuilt, no_environment()),
                      Contains("no module could be loaded") && Contains("libno_such_module_generic.so"));
  REQUIRE_THROWS_WITH(IsaModule("no_such_module", FLLM_TEST_MODULE_DIR, kBuilt, no_environment("generic")),
                      Contains("libno_such_module_generic.so"));
  // A symbol the module does not export (the version script hides everything but the entry point).
  IsaModule const m(kBase, FLLM_TEST_MODULE_DIR, kBuilt, no_environment("generic"));
  REQUIRE_THROWS_AS(m.symbol<void()>("fllm_no_such_symbol"), backend_error);
  REQUIRE_THROWS_WITH(m.symbol<void()>("fllm_no_such_symbol"), Contains("fllm_no_such_symbol"));
  REQUIRE_THROWS_WITH(m.symbol<void()>("_ZN9factorllm9Workspace7reserveEm"), Contains("has no symbol"));
  // The module's own errors come back as messages, not exceptions across the C ABI.
  auto const* api = api_of(m);
  FllmMoeDesc desc{};
  char err[256] = {};
  REQUIRE(api->create(&desc, err, sizeof err) == nullptr);
  REQUIRE_THAT(std::string(err), Contains("must be >= 1"));
  REQUIRE(api->forward(nullptr, nullptr, nullptr, 1, err, sizeof err) == -1);
  REQUIRE_THAT(std::string(err), Contains("layer is NULL"));
}

TEST_CASE("isa_variants: the baseline host binary has no AVX or AVX-512 instruction", "[isa][objdump]") {
#if defined(FLLM_TEST_SANITIZED)
  WARN("skipped under sanitizers: the statically linked sanitizer runtime is not part of the host's own code");
  return;
#else
  std::string const objdump = FLLM_OBJDUMP;
  if (objdump.empty() || std::system((objdump + " --version > /dev/null 2>&1").c_str()) != 0) {
    WARN("skipped: objdump not found (CMAKE_OBJDUMP='" << objdump << "')");
    return;
  }
  std::string const exe = std::filesystem::read_symlink("/proc/self/exe").string();
  // Instructions naming a ymm or zmm register (AVX/AVX2/AVX-512) or an opmask register {%k..} (AVX-512).
  std::string const cmd = objdump + " -d --no-show-raw-insn '" + exe + "' | grep -cE '%[yz]mm[0-9]|\\{%k[0-7]\\}'";
  FILE* pipe = popen(cmd.c_str(), "r");
  REQUIRE(pipe != nullptr);
  char line[64] = {};
  std::string count = std::fgets(line, sizeof line, pipe) ? line : "";
  int const status = pclose(pipe);
  INFO(cmd << " -> " << count);
  REQUIRE(status != -1);
  REQUIRE(std::atoi(count.c_str()) == 0);
  // Sanity: the modules themselves do use AVX-512 / AVX2 registers (so the grep finds what it looks for).
  {
    std::string const mod = std::string(FLLM_TEST_MODULE_DIR) + "/lib" + kBase + "_avx512.so";
    FILE* p2 = popen((objdump + " -d --no-show-raw-insn '" + mod + "' | grep -cE '%zmm[0-9]'").c_str(), "r");
    REQUIRE(p2 != nullptr);
    std::string c2 = std::fgets(line, sizeof line, p2) ? line : "";
    pclose(p2);
    REQUIRE(std::atoi(c2.c_str()) > 0);
  }
#endif
}
