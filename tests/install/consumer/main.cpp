// SPDX-License-Identifier: Apache-2.0
// Consumer smoke test: factorize a tiny FFN with the installed headers and check K = N exactness.
#include <factorllm/factorllm.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  using namespace factorllm;
  std::ptrdiff_t const d = 4, d_ff = 8, n = 2;
  std::vector<float> g(d_ff * d), u(d_ff * d), dn(d * d_ff), x(d), y_dense(d), y_moe(d);
  // Weights in [-1.5, 1.5] (signed: in size_t, 0 - 5 would wrap to ~1.8e19 and the outputs would be ~1e37, where the
  // two paths' different summation orders differ by far more than the tolerance).
  for (std::size_t i = 0; i < g.size(); ++i) {
    int const k = static_cast<int>(i);
    g[i] = static_cast<float>(k * 7 % 11 - 5) / 4.0f;
    u[i] = static_cast<float>(k * 5 % 13 - 6) / 4.0f;
    dn[i] = static_cast<float>(k * 3 % 7 - 3) / 4.0f;
  }
  for (std::ptrdiff_t k = 0; k < d; ++k) x[k] = 0.25f * static_cast<float>(k - 1);
  ffn::DenseFfnView<float> dense{matrix_view<float const>(g.data(), d_ff, d), matrix_view<float const>(u.data(), d_ff, d),
                                 matrix_view<float const>(dn.data(), d, d_ff)};
  ffn::swiglu_forward(dense, matrix_view<float const>(x.data(), 1, d), matrix_view(y_dense.data(), 1, d));
  moe::Gating gating;
  gating.mode = moe::CombineMode::code_ref;  // all N experts with weight floor(N/N) = 1: the dense FFN
  gating.top_k = n;
  moe::MoeFfn<float> layer(ffn::factorize(dense, ffn::ExpertPartition::contiguous(d_ff, n)),
                           moe::Router<float>::random(d, n, 1), gating);
  layer.forward(matrix_view<float const>(x.data(), 1, d), matrix_view(y_moe.data(), 1, d));
  for (std::ptrdiff_t k = 0; k < d; ++k)
    if (std::fabs(y_dense[k] - y_moe[k]) > 1e-5f) {
      std::printf("mismatch at %td: %g vs %g\n", k, y_dense[k], y_moe[k]);
      return 1;
    }
  std::printf("factorllm %d consumer OK\n", version());
  return 0;
}
