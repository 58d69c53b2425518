// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: argument validation of the public API. The input chooses an operation, shapes (valid, off by
// one, negative or huge), K, N, permutations, and NaN/Inf/huge/subnormal payloads injected into otherwise random
// data. Contract checked: every refusal is a factorllm::error (anything else escapes and is reported as a crash);
// no sanitizer report; accepted calls satisfy the operation's invariants; finite, moderate inputs (|v| <= 8) give
// finite outputs, and a bad value in one token leaves the other tokens finite.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <vector>

#include <fuzzer/FuzzedDataProvider.h>

#include <factorllm/factorllm.hpp>

#include "fuzz_common.hpp"

namespace {

using namespace factorllm;
using Simd = CpuSimd<>;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr std::int64_t kI64Max = std::numeric_limits<std::int64_t>::max();
constexpr std::int64_t kI64Min = std::numeric_limits<std::int64_t>::min();

bool moderate(double v) { return std::isfinite(v) && std::fabs(v) <= 8.0; }

/// The fuzzer's choices (from the input) plus a seeded generator for bulk data.
struct Ctx {
  FuzzedDataProvider& in;
  std::mt19937_64 rng;

  explicit Ctx(FuzzedDataProvider& p) : in(p), rng(p.ConsumeIntegral<std::uint32_t>()) {}

  int pick(int lo, int hi) { return in.ConsumeIntegralInRange<int>(lo, hi); }
  bool flag() { return in.ConsumeBool(); }
  /// A size near `usual`: mostly in [lo, hi], sometimes a value no buffer could hold.
  std::int64_t size(std::int64_t lo, std::int64_t hi) {
    switch (pick(0, 15)) {
      case 0: return in.PickValueInArray<std::int64_t>({-1, kI64Min, kI64Max, kI64Max / 2, std::int64_t{1} << 31,
                                                        std::int64_t{1} << 40, (std::int64_t{1} << 31) - 1});
      default: return in.ConsumeIntegralInRange<std::int64_t>(lo, hi);
    }
  }
  float special() {
    return in.PickValueInArray<float>({kNaN, kInf, -kInf, 1e30f, -1e30f, std::numeric_limits<float>::max(),
                                       -std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min(),
                                       1e-30f, -0.0f, 0.0f, 8.0f, -8.0f});
  }
  /// n values uniform in [-1, 1], then up to 3 of them replaced by special values.
  template <class T>
  void fill(T* p, std::ptrdiff_t n) {
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (std::ptrdiff_t i = 0; i < n; ++i) p[i] = from_double<T>(u(rng));
    int const inject = n > 0 ? pick(0, 3) : 0;
    for (int i = 0; i < inject; ++i) p[pick(0, static_cast<int>(std::min<std::ptrdiff_t>(n, 1 << 20) - 1))] = from_double<T>(special());
  }
  template <class T, int R>
  Tensor<T, R> tensor(std::array<std::ptrdiff_t, R> extents) {
    Tensor<T, R> t(extents);
    fill(t.data(), t.size());
    return t;
  }
};

template <class T>
bool all_moderate(T const* p, std::ptrdiff_t n) {
  for (std::ptrdiff_t i = 0; i < n; ++i)
    if (!moderate(to_double(p[i]))) return false;
  return true;
}
template <class T, int R>
bool all_moderate(Tensor<T, R> const& t) {
  return all_moderate(t.data(), t.size());
}
bool row_finite(MatrixView<float const> y, std::ptrdiff_t t) {
  for (std::ptrdiff_t c = 0; c < y.cols(); ++c)
    if (!std::isfinite(y(t, c))) return false;
  return true;
}

/// Larger first, lower index on ties, NaN last: the library's documented TopK order, written independently.
bool ranks_before(double va, std::ptrdiff_t a, double vb, std::ptrdiff_t b) {
  if (std::isnan(va) || std::isnan(vb)) return std::isnan(va) == std::isnan(vb) ? a < b : std::isnan(vb);
  return va != vb ? va > vb : a < b;
}

/// ids[t, :] are the top_k entries of score(t, .) in rank order.
template <class Score>
void check_topk(MatrixView<std::int32_t const> ids, std::ptrdiff_t n, Score const& score) {
  std::ptrdiff_t const k = ids.cols();
  for (std::ptrdiff_t t = 0; t < ids.rows(); ++t) {
    std::vector<char> chosen(static_cast<std::size_t>(n), 0);
    for (std::ptrdiff_t j = 0; j < k; ++j) {
      std::int32_t const id = ids(t, j);
      FUZZ_CHECK(id >= 0 && id < n && !chosen[static_cast<std::size_t>(id)]);
      chosen[static_cast<std::size_t>(id)] = 1;
      if (j > 0) FUZZ_CHECK(ranks_before(score(t, ids(t, j - 1)), ids(t, j - 1), score(t, id), id));
    }
    std::int32_t const last = ids(t, k - 1);
    for (std::ptrdiff_t i = 0; i < n; ++i)
      if (!chosen[static_cast<std::size_t>(i)]) FUZZ_CHECK(ranks_before(score(t, last), last, score(t, i), i));
  }
}

moe::Gating fuzz_gating(Ctx& c, std::ptrdiff_t n_experts, bool* finite_scale) {
  moe::Gating g;
  g.mode = static_cast<moe::CombineMode>(c.pick(0, 9) < 9 ? c.pick(0, 4) : c.pick(-3, 12));
  g.top_k = c.pick(0, 7) == 0 ? c.size(-2, 12) : c.pick(1, static_cast<int>(std::max<std::ptrdiff_t>(n_experts, 1)));
  g.sigmoid_renormalize = c.flag();
  if (c.flag()) {
    std::ptrdiff_t const len = c.pick(0, 7) == 0 ? c.pick(0, 12) : n_experts;
    g.selection_bias.resize(static_cast<std::size_t>(std::max<std::ptrdiff_t>(len, 0)));
    c.fill(g.selection_bias.data(), static_cast<std::ptrdiff_t>(g.selection_bias.size()));
    if (c.flag())
      for (auto& b : g.selection_bias) b *= 1e30f;  // huge but finite: must still give finite weights
  }
  g.output_scale = c.pick(0, 5) == 0 ? c.special() : c.in.ConsumeFloatingPointInRange<float>(-8.f, 8.f);
  *finite_scale = moderate(g.output_scale);
  return g;
}

// -------------------------------------------------------------------------------------------- operations ----

void op_partition(Ctx& c) {
  std::optional<ffn::ExpertPartition> p;
  std::int64_t const n = c.size(-2, 20);
  switch (c.pick(0, 3)) {
    case 0:
    case 1: {
      // Valid sizes stay small (the builders allocate d_ff entries); invalid ones may be anything.
      std::int64_t d_ff = c.size(-3, 300);
      if (d_ff > 4096 && d_ff <= std::numeric_limits<std::int32_t>::max() && n >= 1 && d_ff % n == 0) d_ff = 4096 + 1;
      fuzz::expect_ok_or_error([&] {
        p = c.flag() ? ffn::ExpertPartition::contiguous(d_ff, n) : ffn::ExpertPartition::random(d_ff, n, c.rng());
      });
      break;
    }
    case 2: {
      std::vector<std::int32_t> perm(static_cast<std::size_t>(c.pick(0, 64)));
      for (std::size_t i = 0; i < perm.size(); ++i) perm[i] = static_cast<std::int32_t>(i);
      std::shuffle(perm.begin(), perm.end(), c.rng);
      for (int e = c.pick(0, 3); e > 0 && !perm.empty(); --e)
        perm[static_cast<std::size_t>(c.pick(0, static_cast<int>(perm.size()) - 1))] =
            c.pick(-2, static_cast<int>(perm.size()) + 1);
      fuzz::expect_ok_or_error([&] { p = ffn::ExpertPartition::from_permutation(perm, n); });
      break;
    }
    default: {
      std::vector<std::int32_t> assign(static_cast<std::size_t>(c.pick(0, 64)));
      int const hi = static_cast<int>(std::clamp<std::int64_t>(n, 0, 20));
      for (auto& a : assign) a = c.pick(0, 9) == 0 ? c.pick(-1, hi + 1) : c.pick(0, std::max(hi - 1, 0));
      fuzz::expect_ok_or_error([&] { p = ffn::ExpertPartition::from_assignment(assign, n); });
      break;
    }
  }
  if (!p) return;
  auto const& perm = p->permutation();
  FUZZ_CHECK(p->n_experts() >= 1 && p->d_ff() >= 1 && p->d_expert() * p->n_experts() == p->d_ff());
  auto const inv = p->inverse();
  auto const assign = p->assignment();
  for (std::size_t i = 0; i < perm.size(); ++i) {
    FUZZ_CHECK(perm[i] >= 0 && perm[i] < p->d_ff());
    FUZZ_CHECK(inv[static_cast<std::size_t>(perm[i])] == static_cast<std::int32_t>(i));
    FUZZ_CHECK(assign[static_cast<std::size_t>(perm[i])] == static_cast<std::int32_t>(static_cast<std::int64_t>(i) / p->d_expert()));
  }
}

/// a * b for a >= 0, saturated at kSat (|b| < 2^63, so the product of two operands below 2^64 fits in 128 bits).
constexpr __int128 kSat = static_cast<__int128>(1) << 64;
__int128 sat_mul(__int128 a, std::int64_t b) {
  if (a == 0 || b == 0) return 0;
  __int128 const p = std::min(a, kSat) * b;
  return p > kSat ? kSat : p < -kSat ? -kSat : p;
}

template <int R>
void view_rank(Ctx& c) {
  static float buffer[64];
  std::array<std::ptrdiff_t, R> e{}, s{};
  for (int i = 0; i < R; ++i) e[i] = c.pick(0, 3) == 0 ? c.size(-2, 8) : c.pick(0, 4);
  for (int i = 0; i < R; ++i) s[i] = c.pick(0, 3) == 0 ? c.size(-2, 70) : c.pick(0, 20);
  if (c.flag()) s[R - 1] = 1;
  float* data = c.pick(0, 7) == 0 ? nullptr : buffer;
  auto check = [&](TensorView<float, R> const& v) {
    // An accepted view (empty or not): the offset of every in-range index and the product of the non-zero
    // extents fit ptrdiff_t (checked here in saturating 128 bits).
    __int128 count = 1, nonzero = 1, last = 0;
    for (int i = 0; i < R; ++i) {
      FUZZ_CHECK(v.extent(i) >= 0 && (v.extent(i) <= 1 || v.stride(i) >= 0));
      count = sat_mul(count, v.extent(i));
      if (v.extent(i) > 0) {
        nonzero = sat_mul(nonzero, v.extent(i));
        last = std::min<__int128>(last + sat_mul(v.extent(i) - 1, v.stride(i)), kSat);
      }
    }
    FUZZ_CHECK(v.size() == (count == 0 ? 0 : static_cast<std::ptrdiff_t>(count)));
    FUZZ_CHECK(last >= 0 && last <= std::numeric_limits<std::ptrdiff_t>::max());
    FUZZ_CHECK(nonzero <= std::numeric_limits<std::ptrdiff_t>::max());
    FUZZ_CHECK(v.data() != nullptr || count == 0);
    (void)v.is_contiguous();
    // A dense copy of any accepted view that is empty or lies inside the buffer (never refused: same extents).
    if (count == 0 || (last < 64 && v.data() == buffer)) {
      Tensor<float, R> const copy(v);
      FUZZ_CHECK(copy.size() == v.size());
      (void)copy.view();
    }
    // Views inside the buffer can be read element by element (ASan checks the bounds).
    if (count != 0 && last < 64 && v.data() == buffer) {
      volatile float sink = 0;
      for (std::ptrdiff_t r = 0; r < v.extent(0); ++r) sink = sink + *v.row(r);
    }
    if constexpr (R >= 1) {
      std::ptrdiff_t const b = c.size(-1, 6), en = c.size(-1, 6);
      bool const ok = fuzz::expect_ok_or_error([&] { (void)v.slice_rows(b, en); });
      FUZZ_CHECK(ok == (b >= 0 && b <= en && en <= v.extent(0)));
    }
  };
  fuzz::expect_ok_or_error([&] { check(TensorView<float, R>(data, e)); });
  fuzz::expect_ok_or_error([&] { check(TensorView<float, R>(data, e, s)); });
  // Tensor: refuse negative extents (shape_error) and sizes that overflow (value_error) before allocating; the
  // product of the non-zero extents must fit ptrdiff_t even when a zero extent makes the tensor empty.
  __int128 count = 1, nonzero = 1;
  bool negative = false;
  for (int i = 0; i < R; ++i) negative |= e[i] < 0;
  for (int i = 0; i < R && !negative; ++i) {
    count = sat_mul(count, e[i]);
    if (e[i] != 0) nonzero = sat_mul(nonzero, e[i]);
  }
  if (!negative && nonzero > std::numeric_limits<std::ptrdiff_t>::max()) count = kSat;  // refused below
  if (negative) {
    bool threw = false;
    try {
      Tensor<float, R> t(e);
    } catch (shape_error const&) {
      threw = true;
    }
    FUZZ_CHECK(threw);
  } else if (count > static_cast<__int128>(std::numeric_limits<std::size_t>::max() / sizeof(float))) {
    bool threw = false;
    try {
      Tensor<float, R> t(e);
    } catch (value_error const&) {
      threw = true;
    }
    FUZZ_CHECK(threw);
  } else if (count <= 4096) {
    Tensor<float, R> t(e);
    FUZZ_CHECK(t.size() == static_cast<std::ptrdiff_t>(count));
    check(t.view());
  }
}

void op_views(Ctx& c) {
  switch (c.pick(1, 4)) {
    case 1: view_rank<1>(c); break;
    case 2: view_rank<2>(c); break;
    case 3: view_rank<3>(c); break;
    default: view_rank<4>(c); break;
  }
}

/// Dense weights with (usually) consistent shapes: d_model d, d_ff f; `skew` perturbs one of them.
template <class W>
struct Dense {
  Matrix<W> gate, up, down;
  ffn::DenseFfnView<W> view() const { return {gate.cview(), up.cview(), down.cview()}; }
  bool moderate() const { return all_moderate(gate) && all_moderate(up) && all_moderate(down); }
};
template <class W>
Dense<W> dense(Ctx& c, std::ptrdiff_t d, std::ptrdiff_t f) {
  std::ptrdiff_t dims[6] = {f, d, f, d, d, f};
  if (c.pick(0, 7) == 0) dims[c.pick(0, 5)] += c.pick(-1, 1);
  for (auto& v : dims) v = std::max<std::ptrdiff_t>(v, 0);
  return {c.tensor<W, 2>({dims[0], dims[1]}), c.tensor<W, 2>({dims[2], dims[3]}), c.tensor<W, 2>({dims[4], dims[5]})};
}

template <class W>
void op_factorize(Ctx& c) {
  std::ptrdiff_t const d = c.pick(0, 12), n = c.pick(1, 6), m = c.pick(0, 8);
  auto const w = dense<W>(c, d, n * m);
  std::int64_t const pf = c.pick(0, 7) == 0 ? c.pick(0, 60) : n * m;
  std::optional<ffn::ExpertWeights<W>> experts;
  fuzz::expect_ok_or_error([&] {
    auto const p = c.flag() ? ffn::ExpertPartition::contiguous(pf, n) : ffn::ExpertPartition::random(pf, n, c.rng());
    experts = ffn::factorize(w.view(), p);
  });
  if (!experts) return;
  FUZZ_CHECK(experts->n_experts() == n && experts->d_model() == d && experts->d_ff() == n * m);
  // unfactorize restores the dense weights bit for bit (NaN payloads included).
  auto const back = ffn::unfactorize(*experts);
  FUZZ_CHECK(std::memcmp(back.gate.data(), w.gate.data(), sizeof(W) * static_cast<std::size_t>(w.gate.size())) == 0);
  FUZZ_CHECK(std::memcmp(back.up.data(), w.up.data(), sizeof(W) * static_cast<std::size_t>(w.up.size())) == 0);
  FUZZ_CHECK(std::memcmp(back.down.data(), w.down.data(), sizeof(W) * static_cast<std::size_t>(w.down.size())) == 0);
  // Direct construction from (possibly) mis-shaped stacked tensors.
  std::ptrdiff_t sh[9] = {n, m, d, n, m, d, n, d, m};
  if (c.flag()) sh[c.pick(0, 8)] += c.pick(-1, 1);
  for (auto& v : sh) v = std::max<std::ptrdiff_t>(v, 0);
  fuzz::expect_ok_or_error([&] {
    ffn::ExpertWeights<W> const ew(Tensor<W, 3>({sh[0], sh[1], sh[2]}), Tensor<W, 3>({sh[3], sh[4], sh[5]}),
                                   Tensor<W, 3>({sh[6], sh[7], sh[8]}), experts->partition());
    (void)ew.expert(c.pick(-1, static_cast<int>(n)));
  });
}

template <class W, class Backend>
void op_swiglu(Ctx& c) {
  std::ptrdiff_t const d = c.pick(0, 12), f = c.pick(0, 40), t = c.pick(0, 12);
  auto const w = dense<W>(c, d, f);
  auto x = c.tensor<float, 2>({t, c.pick(0, 7) == 0 ? std::max<std::ptrdiff_t>(d + c.pick(-1, 1), 0) : d});
  Matrix<float> y({c.pick(0, 7) == 0 ? t + 1 : t, d});
  std::size_t bytes = 0;
  if (!fuzz::expect_ok_or_error([&] { bytes = ffn::swiglu_workspace_bytes(t, d, f, Backend{}); })) bytes = 64;
  if (c.pick(0, 5) == 0) bytes = static_cast<std::size_t>(c.pick(0, 256));
  Workspace ws(bytes);
  if (!fuzz::expect_ok_or_error([&] { ffn::swiglu_forward(w.view(), x.cview(), y.view(), ws, Backend{}); })) return;
  if (!w.moderate()) return;
  for (std::ptrdiff_t r = 0; r < t; ++r)
    if (all_moderate(x.view().row(r), d)) FUZZ_CHECK(row_finite(y.cview(), r));
}

template <class Backend>
void op_router(Ctx& c) {
  std::ptrdiff_t const d = c.pick(0, 12), n = c.pick(0, 9), t = c.pick(0, 10);
  std::optional<moe::Router<float>> r;
  switch (c.pick(0, 2)) {
    case 0: {
      auto w = c.tensor<float, 2>({n, d});
      auto b = c.tensor<float, 1>({c.pick(0, 7) == 0 ? c.pick(0, 10) : n});
      fuzz::expect_ok_or_error([&] { r.emplace(std::move(w), std::move(b)); });
      break;
    }
    case 1: {
      // Valid sizes stay small (random() allocates them); invalid ones include the extremes.
      auto dim = [&](int hi) -> std::int64_t {
        return c.pick(0, 7) == 0 ? c.in.PickValueInArray<std::int64_t>({-1, 0, kI64Min}) : c.pick(1, hi);
      };
      std::int64_t const rd = dim(12), rn = dim(9);
      double const stddev = c.pick(0, 3) == 0 ? static_cast<double>(c.special()) : 1.0;
      fuzz::expect_ok_or_error([&] { r = moe::Router<float>::random(rd, rn, c.rng(), stddev); });
      if (r) {  // accepted: a finite stddev; up to 1e30 the weights (|z| < 9 sigma) are finite floats; zero bias
        FUZZ_CHECK(std::isfinite(stddev) && stddev >= 0);
        for (std::ptrdiff_t i = 0; i < r->weight().size(); ++i)
          FUZZ_CHECK(stddev > 1e30 || std::isfinite(r->weight().data()[i]));
        for (std::ptrdiff_t i = 0; i < r->n_experts(); ++i) FUZZ_CHECK(r->bias()(i) == 0.f);
      }
      break;
    }
    default: {
      auto const w = c.tensor<float, 2>({n, d});
      auto const b = c.tensor<float, 1>({n});
      fuzz::expect_ok_or_error([&] { r = moe::Router<float>::from_views(w.cview(), b.cview()); });
      break;
    }
  }
  if (!r) return;
  FUZZ_CHECK(r->n_experts() >= 1 && r->d_model() >= 1);
  if (r->n_experts() * r->d_model() > 4096) return;
  auto const x = c.tensor<float, 2>({t, c.pick(0, 7) == 0 ? c.pick(0, 13) : r->d_model()});
  Matrix<float> logits({t, c.pick(0, 7) == 0 ? c.pick(0, 10) : r->n_experts()});
  if (!fuzz::expect_ok_or_error([&] { moe::router_logits(*r, x.cview(), logits.view(), Backend{}); })) return;
  bool const params_ok = all_moderate(r->weight().data(), r->weight().size()) && all_moderate(r->bias().data(), r->n_experts());
  for (std::ptrdiff_t i = 0; i < t && params_ok; ++i)
    if (all_moderate(x.view().row(i), x.extent(1))) FUZZ_CHECK(row_finite(logits.cview(), i));
}

void op_select(Ctx& c) {
  std::ptrdiff_t const n = c.pick(0, 10), t = c.pick(0, 8);
  auto logits = c.tensor<float, 2>({t, n});
  if (c.flag())
    for (std::ptrdiff_t i = 0; i < logits.size(); ++i) logits[i] *= c.in.PickValueInArray<float>({1e3f, 1e30f, -1e30f, 1e-30f});
  bool scale_ok = false;
  auto const g = fuzz_gating(c, n, &scale_ok);
  std::ptrdiff_t const k = g.top_k;
  bool const kv = k >= 0 && k <= 12;
  Matrix<std::int32_t> ids({t, kv ? (c.pick(0, 7) == 0 ? k + 1 : k) : 1});
  Matrix<float> w({c.pick(0, 7) == 0 ? t + 1 : t, kv ? k : 1});
  if (c.flag()) {
    if (!fuzz::expect_ok_or_error([&] { moe::topk(logits.cview(), k, ids.view()); })) return;
    check_topk(ids.cview(), n, [&](std::ptrdiff_t r, std::ptrdiff_t i) { return static_cast<double>(logits(r, i)); });
    return;
  }
  if (!fuzz::expect_ok_or_error([&] { moe::select_experts(logits.cview(), g, ids.view(), w.view()); })) return;
  auto score = [&](std::ptrdiff_t r, std::ptrdiff_t i) {
    return static_cast<double>(logits(r, i)) + (g.selection_bias.empty() ? 0.0 : g.selection_bias[static_cast<std::size_t>(i)]);
  };
  check_topk(ids.cview(), n, score);
  bool const renorm = g.mode == moe::CombineMode::softmax_topk_renorm || g.mode == moe::CombineMode::topk_softmax ||
                      (g.mode == moe::CombineMode::sigmoid_topk && g.sigmoid_renormalize);
  for (std::ptrdiff_t r = 0; r < t; ++r) {
    bool finite_row = true, nan_row = false;
    for (std::ptrdiff_t i = 0; i < n; ++i) {
      finite_row &= std::isfinite(logits(r, i));
      nan_row |= std::isnan(logits(r, i));
    }
    if (nan_row) {
      for (std::ptrdiff_t j = 0; j < k; ++j) FUZZ_CHECK(std::isnan(w(r, j)));
      continue;
    }
    if (!finite_row || !scale_ok) continue;
    // Finite logits (any magnitude) and a moderate scale give finite weights; renormalized ones sum to the scale.
    double sum = 0;
    for (std::ptrdiff_t j = 0; j < k; ++j) {
      FUZZ_CHECK(std::isfinite(w(r, j)));
      FUZZ_CHECK(g.output_scale < 0 || w(r, j) >= 0);
      sum += w(r, j);
    }
    if (renorm) FUZZ_CHECK(std::fabs(sum - g.output_scale) <= 1e-5 * std::fabs(g.output_scale) + 1e-30);
  }
}

void op_group_combine(Ctx& c) {
  std::ptrdiff_t const n = c.size(-1, 8), t = c.pick(0, 10), k = c.pick(0, 5);
  if (n > 64 || n < -1) {  // extreme n: only the validation runs (and must not overflow computing n + 1)
    Matrix<std::int32_t> ids({t, k});
    Vector<std::int64_t> offsets({1});
    Vector<std::int32_t> slots({t * k});
    fuzz::expect_ok_or_error([&] { moe::group_by_expert(ids.cview(), n, offsets.view(), slots.view()); });
    return;
  }
  Matrix<std::int32_t> ids({t, k});
  for (std::ptrdiff_t i = 0; i < ids.size(); ++i)
    ids[i] = c.pick(0, 15) == 0 ? c.pick(-2, static_cast<int>(n) + 1) : c.pick(0, static_cast<int>(std::max<std::ptrdiff_t>(n - 1, 0)));
  Vector<std::int64_t> offsets({std::max<std::ptrdiff_t>(c.pick(0, 7) == 0 ? n : n + 1, 0)});
  Vector<std::int32_t> slots({c.pick(0, 7) == 0 ? t * k + 1 : t * k});
  if (fuzz::expect_ok_or_error([&] { moe::group_by_expert(ids.cview(), n, offsets.view(), slots.view()); })) {
    FUZZ_CHECK(offsets[0] == 0 && offsets[n] == t * k);
    std::vector<char> seen(static_cast<std::size_t>(t * k), 0);
    for (std::ptrdiff_t e = 0; e < n; ++e) {
      FUZZ_CHECK(offsets[e] <= offsets[e + 1]);
      for (std::int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
        std::int32_t const s = slots[static_cast<std::ptrdiff_t>(r)];
        FUZZ_CHECK(s >= 0 && s < t * k && !seen[static_cast<std::size_t>(s)] && ids[s] == e);
        seen[static_cast<std::size_t>(s)] = 1;
        if (r > offsets[e]) FUZZ_CHECK(slots[static_cast<std::ptrdiff_t>(r - 1)] < s);  // stable
      }
    }
  }
  std::ptrdiff_t const d = c.pick(0, 9);
  auto const w = c.tensor<float, 2>({t, k});
  auto const out = c.tensor<float, 2>({c.pick(0, 7) == 0 ? t * k + 1 : t * k, c.pick(0, 7) == 0 ? d + 1 : d});
  Matrix<float> y({c.pick(0, 7) == 0 ? t + 1 : t, d});
  if (!fuzz::expect_ok_or_error([&] { moe::combine(w.cview(), out.cview(), y.view()); })) return;
  if (all_moderate(w) && all_moderate(out))
    for (std::ptrdiff_t r = 0; r < t; ++r) FUZZ_CHECK(row_finite(y.cview(), r));
}

template <class W, class Backend>
void op_moe(Ctx& c) {
  std::ptrdiff_t const d = c.pick(1, 12), n = c.pick(1, 6), m = c.pick(1, 8), t = c.pick(0, 12);
  auto const w = dense<W>(c, d, n * m);
  std::optional<ffn::ExpertWeights<W>> experts;
  if (!fuzz::expect_ok_or_error([&] { experts = ffn::factorize(w.view(), ffn::ExpertPartition::random(n * m, n, c.rng())); }))
    return;
  std::ptrdiff_t const rn = c.pick(0, 7) == 0 ? c.pick(1, 7) : n, rd = c.pick(0, 7) == 0 ? c.pick(1, 13) : d;
  moe::Router<float> router(c.tensor<float, 2>({rn, rd}), c.tensor<float, 1>({rn}));
  if (c.flag())
    for (std::ptrdiff_t i = 0; i < router.mutable_weight().size(); ++i) router.mutable_weight()[i] *= 100.f;  // near-saturated
  bool scale_ok = false;
  auto const g = fuzz_gating(c, n, &scale_ok);
  bool const params_ok = w.moderate() && all_moderate(router.weight().data(), router.weight().size()) &&
                         all_moderate(router.bias().data(), rn) && scale_ok;
  std::optional<moe::MoeFfn<W, Backend>> layer;
  if (!fuzz::expect_ok_or_error([&] { layer.emplace(*experts, router, g); })) return;
  std::size_t bytes = 0;
  std::ptrdiff_t const query = c.pick(0, 9) == 0 ? c.size(-1, 20) : t;
  if (!fuzz::expect_ok_or_error([&] { bytes = layer->workspace_bytes(query); })) return;
  if (bytes > (std::size_t{1} << 26)) return;  // a valid size for a huge batch: nothing to learn from allocating it
  Workspace ws(bytes);
  auto const x = c.tensor<float, 2>({t, c.pick(0, 9) == 0 ? d + 1 : d});
  Matrix<float> y({c.pick(0, 9) == 0 ? t + 1 : t, d});
  moe::RoutingRecord<float> record;
  bool const want_record = c.flag();
  if (!fuzz::expect_ok_or_error([&] { layer->forward(x.cview(), y.view(), ws, want_record ? &record : nullptr); })) return;
  if (want_record) {
    FUZZ_CHECK(record.ids.extent(0) == t && record.ids.extent(1) == g.top_k && record.offsets[n] == t * g.top_k);
    for (std::ptrdiff_t i = 0; i < record.ids.size(); ++i) FUZZ_CHECK(record.ids[i] >= 0 && record.ids[i] < n);
  }
  if (!params_ok) return;
  for (std::ptrdiff_t r = 0; r < t; ++r)
    if (all_moderate(x.view().row(r), d)) FUZZ_CHECK(row_finite(y.cview(), r));
}

template <class A>
void op_par(Ctx& c) {
  std::ptrdiff_t const d = c.pick(1, 8), n = c.pick(1, 5), m = c.pick(1, 6), t = c.pick(0, 5);
  auto const w = dense<A>(c, d, n * m);
  std::optional<ffn::ExpertWeights<A>> experts;
  if (!fuzz::expect_ok_or_error([&] {
        auto other = dense<A>(c, d, n * m);  // experts usually from the teacher; sometimes from other weights
        experts = ffn::factorize(c.flag() ? w.view() : other.view(), ffn::ExpertPartition::random(n * m, n, c.rng()));
      }))
    return;
  std::ptrdiff_t const rn = c.pick(0, 7) == 0 ? c.pick(1, 6) : n;
  moe::Router<A> router(c.tensor<A, 2>({rn, d}), c.tensor<A, 1>({rn}));
  if (c.flag())
    for (std::ptrdiff_t i = 0; i < router.mutable_weight().size(); ++i) router.mutable_weight()[i] *= A(1e4);  // saturate
  std::ptrdiff_t const k = c.pick(0, 9) == 0 ? c.size(-1, 7) : c.pick(1, static_cast<int>(n));
  train::ParLossConfig cfg;
  if (c.pick(0, 3) == 0) cfg.clip = c.in.PickValueInArray<double>({0.0, 0.5, 0.4999, 1e-300, -1e-7, std::nan(""), 1e-3});
  if (c.pick(0, 7) == 0) cfg.par_weight = c.special();
  auto const x = c.tensor<A, 2>({t, c.pick(0, 9) == 0 ? d + 1 : d});
  train::ParLossResult<A> r;
  bool ok;
  if (c.flag()) {
    ok = fuzz::expect_ok_or_error([&] { r = train::par_loss(x.cview(), w.view(), *experts, router, k, cfg); });
  } else {
    std::size_t bytes = 0;
    if (!fuzz::expect_ok_or_error([&] { bytes = train::par_loss_workspace_bytes(d, n * m, n, k); })) bytes = 8;
    Workspace ws(c.pick(0, 5) == 0 ? static_cast<std::size_t>(c.pick(0, 512)) : bytes);
    ok = fuzz::expect_ok_or_error([&] { train::par_loss(x.cview(), w.view(), *experts, router, k, cfg, r, ws); });
  }
  if (!ok) return;
  FUZZ_CHECK(t >= 1 && k >= 1 && k <= n);
  for (std::ptrdiff_t i = 0; i < r.pseudo_label.size(); ++i) FUZZ_CHECK(r.pseudo_label[i] >= 0 && r.pseudo_label[i] < n);
  for (std::ptrdiff_t i = 0; i < r.router_topk.size(); ++i) FUZZ_CHECK(r.router_topk[i] >= 0 && r.router_topk[i] < n);
  FUZZ_CHECK(r.label_accuracy >= 0 && r.label_accuracy <= 1);
  bool const inputs_ok = w.moderate() && all_moderate(experts->gate_tensor()) && all_moderate(experts->up_tensor()) &&
                         all_moderate(experts->down_tensor()) && all_moderate(x) &&
                         all_moderate(router.bias().data(), n) && moderate(cfg.par_weight);
  bool router_finite = true;
  for (std::ptrdiff_t i = 0; i < router.weight().size(); ++i) router_finite &= std::isfinite(to_double(router.weight().data()[i]));
  // Finite inputs, even a saturated router (logits ~1e5): the clip keeps the loss and its gradients finite.
  if (inputs_ok && router_finite) {
    FUZZ_CHECK(std::isfinite(r.total_loss) && std::isfinite(r.par_loss) && std::isfinite(r.balance_loss));
    for (std::ptrdiff_t i = 0; i < r.grad_weight.size(); ++i) FUZZ_CHECK(std::isfinite(to_double(r.grad_weight[i])));
    for (std::ptrdiff_t i = 0; i < r.grad_bias.size(); ++i) FUZZ_CHECK(std::isfinite(to_double(r.grad_bias[i])));
  }
}

void op_sizes(Ctx& c) {
  auto q = [&] { return c.size(-3, 1 << 20); };
  fuzz::expect_ok_or_error([&] { (void)ffn::swiglu_workspace_bytes(q(), q(), q()); });
  fuzz::expect_ok_or_error([&] { (void)ffn::swiglu_workspace_bytes(q(), q(), q(), Simd{}); });
  fuzz::expect_ok_or_error([&] { (void)train::par_loss_workspace_bytes(q(), q(), q(), q()); });
  Workspace ws(static_cast<std::size_t>(c.pick(0, 512)));
  detail::WorkspaceCursor cursor(ws, "fuzz");
  for (int i = c.pick(0, 4); i > 0; --i) {
    std::size_t const count = c.flag() ? static_cast<std::size_t>(c.pick(0, 200)) : c.in.ConsumeIntegral<std::size_t>();
    std::byte* base = ws.data();
    fuzz::expect_ok_or_error([&] {
      double* p = cursor.take<double>(count);
      // The region handed out lies inside the workspace.
      FUZZ_CHECK(reinterpret_cast<std::byte*>(p) >= base &&
                 reinterpret_cast<std::byte*>(p + count) <= base + ws.bytes());
    });
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  Ctx c(in);
  switch (c.pick(0, 15)) {
    case 0: op_partition(c); break;
    case 1: op_views(c); break;
    case 2: op_factorize<float>(c); break;
    case 3: op_factorize<bf16>(c); break;
    case 4: op_swiglu<float, CpuScalar>(c); break;
    case 5: op_swiglu<bf16, Simd>(c); break;
    case 6: op_swiglu<float, Simd>(c); break;
    case 7: op_router<CpuScalar>(c); break;
    case 8: op_router<Simd>(c); break;
    case 9: op_select(c); break;
    case 10: op_group_combine(c); break;
    case 11: op_moe<float, CpuScalar>(c); break;
    case 12: op_moe<float, Simd>(c); break;
    case 13: op_moe<bf16, Simd>(c); break;
    case 14: c.flag() ? op_par<float>(c) : op_par<double>(c); break;
    default: op_sizes(c); break;
  }
  return 0;
}
