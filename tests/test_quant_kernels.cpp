// SPDX-License-Identifier: Apache-2.0
// CpuSimd kernels for f16, q8_0 and q4_0 experts (backend/simd/quant_dot.hpp, swiglu.hpp) against independent
// double references:
//  * the int8 block dot on quantized activations vs a double loop over the same codes and scales (weight-side math:
//    relative error <= 1e-6);
//  * activation quantization vs the rule written out in the test (codes bit for bit);
//  * the prefill path (dequantized weights, float GEMMs) vs the CpuScalar oracle (relative L2 <= 2e-5, the f32 bound);
//  * the decode path end to end vs a double reference that quantizes the activations by the same rule (<= 1e-5), and
//    vs the unquantized oracle (the activation-quantization error, reported and bounded by 2e-2);
//  * bitwise identical for 1 and 2 threads and a custom executor;
//  * every one of those on each Highway target this CPU runs (target_dispatch.hpp; FLLM_DISPATCH_ALL_TARGETS makes
//    this file compile the lesser targets too), and the native bf16 decode (AVX512-BF16) vs a double reference on
//    bf16-rounded activations (<= 1e-5), its activation rounding reported separately.
#define FLLM_DISPATCH_ALL_TARGETS
#include <catch2/catch.hpp>

#include <factorllm/factorllm.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using Simd = CpuSimd<>;

namespace {

/// The weight of block element i, from the bytes (independent of the library's helpers).
double weight_of(q8_0 const& b, int i) { return static_cast<double>(b.d.to_float()) * b.qs[i]; }
double weight_of(q4_0 const& b, int i) {
  int const code = i < 16 ? (b.qs[i] & 0x0F) : (b.qs[i - 16] >> 4);
  return static_cast<double>(b.d.to_float()) * (code - 8);
}
template <class Block>
double row_weight(Block const* row, std::ptrdiff_t k) {
  if constexpr (std::is_same_v<Block, f16>)
    return static_cast<double>(row[k].to_float());
  else
    return weight_of(row[k / 32], static_cast<int>(k % 32));
}

/// The activation rule of quant_dot.hpp, written out: scale = f16(amax / 127); code = round-half-even(x * 127/amax).
void quantize_ref(float const* x, std::ptrdiff_t n, std::vector<int>& codes, std::vector<double>& scales) {
  codes.assign(static_cast<std::size_t>(n), 0);
  scales.assign(static_cast<std::size_t>(n / 32), 0.0);
  for (std::ptrdiff_t b = 0; b < n / 32; ++b) {
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[b * 32 + i]));
    float const d = amax / 127.f;
    float const id = d != 0.f ? 1.f / d : 0.f;
    scales[static_cast<std::size_t>(b)] = static_cast<double>(f16(d).to_float());
    for (int i = 0; i < 32; ++i) {
      float const v = x[b * 32 + i] * id;
      double r = std::floor(static_cast<double>(v));
      double const frac = static_cast<double>(v) - r;
      if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0.0)) r += 1.0;
      codes[static_cast<std::size_t>(b * 32 + i)] = static_cast<int>(r);
    }
  }
}

/// Runs body() once for every dispatch target the CPU supports (forced), then returns to the best one.
template <class Body>
void for_each_dispatch_target(Body&& body) {
  auto const targets = simd_dispatch_targets();
  REQUIRE(!targets.empty());
  for (auto target : targets) {
    force_simd_dispatch_target(target);
    INFO("dispatch target " << simd_dispatch_target());
    REQUIRE(simd_dispatch_target() == hwy::TargetName(target));
    body();
  }
  force_simd_dispatch_target(0);
}

template <class T>
bool same_bits(Tensor<T, 2> const& a, Tensor<T, 2> const& b) {
  return a.extents() == b.extents() && std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}

/// A layer of d_model 128, d_ff 512, 4 experts of 128 neurons, top-2, in Block format, and its float original.
template <class Block>
struct Layer {
  static constexpr int d = 128, d_ff = 512, n = 4;
  fixture::DenseWeights<float> w{ref::random_ffn(d, d_ff, 91)};
  moe::Router<float> router = moe::Router<float>::random(d, n, 92, 1.0);
  moe::Gating gating;
  ffn::ExpertWeights<Block> experts;
  Layer() {
    gating.top_k = 2;
    experts = ffn::convert_format<Block>(ffn::factorize(w.view(), ffn::ExpertPartition::random(d_ff, n, 93)));
  }
  Matrix<float> x(int n_tokens, std::uint64_t seed) const {
    return fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(n_tokens) * d, seed, 1.0), n_tokens, d);
  }
};

}  // namespace

TEMPLATE_TEST_CASE("int8 block dot on quantized activations matches a double loop over the same codes, on every target",
                   "[quant][simd][kernel]", q8_0, q4_0) {
  // 7 rows (not a multiple of the 4-row passes), up to 8 vectors, and codes at the format's extremes: q8_0 blocks
  // from a file may hold -128, which ggml's rounding never writes.
  int const n = 256, rows = 7;
  auto const wv = ref::randn(static_cast<std::size_t>(n * rows), 7, 0.05);
  std::vector<float> wf(wv.begin(), wv.end());
  std::vector<TestType> w(static_cast<std::size_t>(n / 32 * rows));
  quantize_row(wf.data(), n * rows, w.data());
  if constexpr (std::is_same_v<TestType, q8_0>) {
    w[3].qs[5] = -128;
    w[3].qs[6] = 127;
    w[10].qs[0] = -128;
  } else {
    w[3].qs[5] = 0x0F;  // codes 15 - 8 = 7 and 0 - 8 = -8
    w[3].qs[6] = 0xF0;
  }
  for (int n_vec : {1, 2, 3, 4, 8}) {
    auto const xv = ref::randn(static_cast<std::size_t>(n * n_vec), 8 + static_cast<std::uint64_t>(n_vec), 1.0);
    std::vector<float> x(xv.begin(), xv.end());
    std::vector<std::int8_t> q(static_cast<std::size_t>(n * n_vec));
    std::vector<float> s(static_cast<std::size_t>(n / 32 * n_vec));
    std::vector<std::int32_t> sums(s.size());
    for (int t = 0; t < n_vec; ++t)
      detail::quantize_act_q8(x.data() + t * n, n, q.data() + t * n, s.data() + t * (n / 32), sums.data() + t * (n / 32));
    std::vector<double> want(static_cast<std::size_t>(rows * n_vec)), mag(want.size());
    for (int t = 0; t < n_vec; ++t) {
      std::vector<int> codes;
      std::vector<double> scales;
      quantize_ref(x.data() + t * n, n, codes, scales);
      for (int i = 0; i < n; ++i) REQUIRE(q[static_cast<std::size_t>(t * n + i)] == codes[static_cast<std::size_t>(i)]);
      for (int b = 0; b < n / 32; ++b) {
        REQUIRE(static_cast<double>(s[static_cast<std::size_t>(t * (n / 32) + b)]) == scales[static_cast<std::size_t>(b)]);
        int code_sum = 0;
        for (int i = 0; i < 32; ++i) code_sum += codes[static_cast<std::size_t>(b * 32 + i)];
        REQUIRE(sums[static_cast<std::size_t>(t * (n / 32) + b)] == code_sum);
      }
      for (int r = 0; r < rows; ++r)
        for (int i = 0; i < n; ++i) {
          double const p = row_weight(w.data() + r * (n / 32), i) * codes[static_cast<std::size_t>(i)] * scales[static_cast<std::size_t>(i / 32)];
          want[static_cast<std::size_t>(r * n_vec + t)] += p;
          mag[static_cast<std::size_t>(r * n_vec + t)] += std::fabs(p);
        }
    }
    for_each_dispatch_target([&] {
      std::vector<float> out(want.size());
      detail::QDotArgs args;
      args.w = w.data();
      args.row_blocks = n / 32;
      args.rows = rows;
      args.xq = q.data();
      args.xs = s.data();
      args.xsum = sums.data();
      args.n_vec = n_vec;
      args.out = out.data();
      args.out_stride = n_vec;
      args.format = std::is_same_v<TestType, q8_0> ? detail::QDotFormat::q8_0 : detail::QDotFormat::q4_0;
      detail::qdot_rows_dispatch(args);
      float one[detail::kQDotMaxVectors];
      detail::q8_multi_dot(w.data() + 2 * (n / 32), q.data(), s.data(), sums.data(), n_vec, n, one);
      for (int r = 0; r < rows; ++r)
        for (int t = 0; t < n_vec; ++t) {
          auto const i = static_cast<std::size_t>(r * n_vec + t);
          INFO("n_vec " << n_vec << " row " << r << " t " << t);
          // Weight-side math is exact per block (integer sums); only the float accumulation of n/32 block terms rounds.
          CHECK(std::fabs(static_cast<double>(out[i]) - want[i]) <= 1e-6 * mag[i]);
          if (r == 2) CHECK(one[t] == out[i]);  // the single-row entry is the same kernel
        }
    });
  }
}

TEMPLATE_TEST_CASE("CpuSimd f16 / q8_0 / q4_0 experts: prefill matches the oracle, decode matches the quantized-"
                   "activation reference, and the activation error is reported",
                   "[quant][simd][moe]", f16, q8_0, q4_0) {
  Layer<TestType> L;
  moe::MoeFfn<TestType, CpuScalar> oracle(L.experts, L.router, L.gating);
  moe::MoeFfn<TestType, Simd> fast(L.experts, L.router, L.gating);
  for_each_dispatch_target([&] {
  for (int t : {1, 3, 16, 64}) {
    auto const x = L.x(t, 100 + static_cast<std::uint64_t>(t));
    Matrix<float> y_ref({t, L.d}), y({t, L.d});
    moe::RoutingRecord<float> rec_ref, rec;
    Workspace ws_ref(oracle.workspace_bytes(t)), ws(fast.workspace_bytes(t));
    oracle.forward(x.cview(), y_ref.view(), ws_ref, &rec_ref);
    fast.forward(x.cview(), y.view(), ws, &rec);
    for (std::ptrdiff_t i = 0; i < rec.ids.size(); ++i) REQUIRE(rec.ids[i] == rec_ref.ids[i]);
    double const err = ref::rel_l2(y.data(), y_ref.data(), static_cast<std::size_t>(y.size()));
    INFO(dtype_traits<TestType>::name() << " T=" << t << " rel L2 vs unquantized-activation oracle " << err);
    if constexpr (std::is_same_v<TestType, f16>) {
      CHECK(err < 2e-5);  // f16 widens exactly: only float accumulation differs
      continue;
    }
    // Which path each expert ran: decode (<= 8 rows, int8 activations) or prefill (dequantized float GEMMs).
    bool any_decode = false;
    for (std::ptrdiff_t e = 0; e < L.n; ++e) any_decode |= (rec.offsets[e + 1] - rec.offsets[e]) > 0 && (rec.offsets[e + 1] - rec.offsets[e]) <= 8;
    bool all_prefill = true;
    for (std::ptrdiff_t e = 0; e < L.n; ++e) all_prefill &= (rec.offsets[e + 1] - rec.offsets[e]) == 0 || (rec.offsets[e + 1] - rec.offsets[e]) > 8;
    if (all_prefill) {
      CHECK(err < 2e-5);
    } else {
      REQUIRE(any_decode);
      CHECK(err < 2e-2);  // 8-bit activations (gate/up inputs and h): the error ggml's path has as well
      std::printf("activation quantization error (%s, T=%d): relative L2 %.3g vs the unquantized oracle\n",
                  dtype_traits<TestType>::name(), t, err);
    }
    // Decode experts against a double reference that quantizes x and h by the stated rule.
    std::vector<double> want(static_cast<std::size_t>(t * L.d), 0.0);
    bool checked = false;
    for (std::ptrdiff_t s = 0; s < t * 2; ++s) {
      std::ptrdiff_t const tok = s / 2, e = rec.ids(tok, s % 2);
      std::ptrdiff_t const rows = rec.offsets[e + 1] - rec.offsets[e];
      if (rows > 8) continue;
      checked = true;
      std::ptrdiff_t const m = L.experts.d_expert();
      std::vector<int> xc;
      std::vector<double> xs;
      quantize_ref(x.data() + tok * L.d, L.d, xc, xs);
      auto const gate = L.experts.gate(e), up = L.experts.up(e), down = L.experts.down(e);
      std::vector<float> h(static_cast<std::size_t>(m));
      for (std::ptrdiff_t i = 0; i < m; ++i) {
        double g = 0, u = 0;
        for (std::ptrdiff_t k = 0; k < L.d; ++k) {
          double const xk = xc[static_cast<std::size_t>(k)] * xs[static_cast<std::size_t>(k / 32)];
          g += row_weight(gate.row(i), k) * xk;
          u += row_weight(up.row(i), k) * xk;
        }
        h[static_cast<std::size_t>(i)] = static_cast<float>(g / (1 + std::exp(-g)) * u);
      }
      std::vector<int> hc;
      std::vector<double> hs;
      quantize_ref(h.data(), m, hc, hs);
      for (std::ptrdiff_t o = 0; o < L.d; ++o) {
        double acc = 0;
        for (std::ptrdiff_t i = 0; i < m; ++i)
          acc += row_weight(down.row(o), i) * hc[static_cast<std::size_t>(i)] * hs[static_cast<std::size_t>(i / 32)];
        want[static_cast<std::size_t>(tok * L.d + o)] += static_cast<double>(rec.weights(tok, s % 2)) * acc;
      }
    }
    if (checked && any_decode && t <= 3) {
      // Every expert of these tokens ran the decode path: the whole output is comparable. h is computed in float by
      // the kernel and in double here, so a code may differ by one at a rounding boundary: 1e-5 covers it.
      CHECK(ref::rel_l2(y.data(), want.data(), want.size()) < 1e-5);
    }
  }
  });
}

TEMPLATE_TEST_CASE("CpuSimd block-format experts: same bits for 1 and 2 threads and a custom executor",
                   "[quant][simd][determinism]", q8_0, q4_0) {
  Layer<TestType> L;
  moe::MoeFfn<TestType, Simd> fast(L.experts, L.router, L.gating);
  for_each_dispatch_target([&] {
  for (int t : {1, 5, 40}) {
    auto const x = L.x(t, 200 + static_cast<std::uint64_t>(t));
    Matrix<float> y1({t, L.d}), y2({t, L.d}), ys({t, L.d});
    Workspace ws(fast.workspace_bytes(t, 2));
    fast.forward(x.cview(), y1.view(), ws, Executor::openmp(1));
    fast.forward(x.cview(), y2.view(), ws, Executor::openmp(2));
    fast.forward(x.cview(), ys.view(), ws, Executor::serial());
    INFO("T=" << t);
    CHECK(same_bits(y1, y2));
    CHECK(same_bits(y1, ys));
  }
  });
}

TEST_CASE("CpuSimd bf16 experts, decode: native bf16 dot on bf16-rounded activations where the CPU has AVX512-BF16, "
          "widening elsewhere; same bits for 1 and 2 threads",
          "[quant][simd][bf16]") {
  Layer<bf16> L;  // L.experts is unused: bf16 experts are the float ones rounded
  ffn::ExpertWeights<bf16> const experts =
      ffn::convert_format<bf16>(ffn::factorize(L.w.view(), ffn::ExpertPartition::random(L.d_ff, L.n, 93)));
  moe::MoeFfn<bf16, CpuScalar> oracle(experts, L.router, L.gating);
  moe::MoeFfn<bf16, Simd> fast(experts, L.router, L.gating);
  bool saw_native = false;
  for_each_dispatch_target([&] {
    bool const native = detail::bf16_native_dot_dispatch();
    saw_native |= native;
    for (int t : {1, 3}) {
      auto const x = L.x(t, 300 + static_cast<std::uint64_t>(t));
      Matrix<float> y_ref({t, L.d}), y({t, L.d}), y2({t, L.d});
      moe::RoutingRecord<float> rec;
      Workspace ws_ref(oracle.workspace_bytes(t)), ws(fast.workspace_bytes(t, 2));
      oracle.forward(x.cview(), y_ref.view(), ws_ref);
      fast.forward(x.cview(), y.view(), ws, &rec);
      fast.forward(x.cview(), y2.view(), ws, Executor::openmp(2));
      CHECK(same_bits(y, y2));
      double const err_oracle = ref::rel_l2(y.data(), y_ref.data(), static_cast<std::size_t>(y.size()));
      INFO("T=" << t << " native " << native << " rel L2 vs the oracle " << err_oracle);
      if (!native) {
        CHECK(err_oracle < 2e-5);  // widening is exact: only float accumulation differs
        continue;
      }
      // Native: the inputs and h are rounded to bf16 (round to nearest even) before the dot products. A double
      // reference that rounds them the same way, on every expert these tokens chose (all decode: T <= 3).
      std::printf("bf16 activation rounding error (T=%d): relative L2 %.3g vs the oracle\n", t, err_oracle);
      CHECK(err_oracle < 1e-2);
      std::vector<double> want(static_cast<std::size_t>(t * L.d), 0.0);
      std::ptrdiff_t const m = experts.d_expert();
      for (std::ptrdiff_t s = 0; s < t * 2; ++s) {
        std::ptrdiff_t const tok = s / 2, e = rec.ids(tok, s % 2);
        auto const gate = experts.gate(e), up = experts.up(e), down = experts.down(e);
        std::vector<double> hb(static_cast<std::size_t>(m));
        for (std::ptrdiff_t i = 0; i < m; ++i) {
          double g = 0, u = 0;
          for (std::ptrdiff_t k = 0; k < L.d; ++k) {
            double const xk = static_cast<double>(bf16(x(tok, k)).to_float());
            g += static_cast<double>(gate(i, k).to_float()) * xk;
            u += static_cast<double>(up(i, k).to_float()) * xk;
          }
          auto const h = static_cast<float>(g / (1 + std::exp(-g)) * u);
          hb[static_cast<std::size_t>(i)] = static_cast<double>(bf16(h).to_float());
        }
        for (std::ptrdiff_t o = 0; o < L.d; ++o) {
          double acc = 0;
          for (std::ptrdiff_t i = 0; i < m; ++i) acc += static_cast<double>(down(o, i).to_float()) * hb[static_cast<std::size_t>(i)];
          want[static_cast<std::size_t>(tok * L.d + o)] += static_cast<double>(rec.weights(tok, s % 2)) * acc;
        }
      }
      // h is computed in float by the kernel and in double here, so an h value may round to the neighbouring bf16:
      // 1e-5 covers the rare such element.
      CHECK(ref::rel_l2(y.data(), want.data(), want.size()) < 1e-5);
    }
  });
  if (detail::cpu_has_avx512_bf16()) CHECK(saw_native);
}
