// SPDX-License-Identifier: Apache-2.0
// Checks a model saved by finetune_recipe.py --save: load_factorized reads it, and every loaded layer reproduces the
// recipe's own MoE on the saved inputs. The reference (CHECK file, <stem>.check.safetensors, written next to the
// model) is the recipe's plain-torch float64 forward of the layer as stored (router softmax, top-K, renormalize,
// output scale, SwiGLU experts): independent of factorllm's kernels.
//
// Usage: finetune_recipe_check MODEL.safetensors CHECK.safetensors [--tolerance 1e-4]
//
// Per layer l: y = load_factorized(MODEL)[l].forward(layers.{l}.x) (float32, the default CPU backend) against
// layers.{l}.y_ref. Passes when max |y - y_ref| <= tolerance * max |y_ref| over the tokens whose gap between the
// K-th and (K+1)-th router logits (layers.{l}.margin) is at least 1e-4 (below that, float32 rounding of the logits
// may legitimately choose another expert set; at most 5 % of the tokens may be left out). The relative tolerance
// 1e-4 is ~1000 float32 ulps: the two sides differ only in summation order and float32 vs float64 arithmetic
// (measured ~3e-7 for factorllm's op against the same reference inside the recipe).
// Also checked: metadata router_bias "none" means every router bias is exactly 0 (what llama.cpp can run); neurons
// the recipe added to pad d_ff to a multiple of N (permutation entries >= d_ff_dense) are zero in every expert.
// Negative control: each layer's inputs run through ANOTHER layer's weights must fail the same comparison (so the
// comparison can tell one layer from another). Exit status 0 when everything passes, 1 otherwise, 2 on bad usage.
#include <factorllm/io/factorized_checkpoint.hpp>
#include <factorllm/io/safetensors.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

namespace fl = factorllm;
namespace io = factorllm::io;

namespace {

struct Compare {
  double rel_err = 0;      // max |y - y_ref| / max |y_ref| over the checked tokens
  std::ptrdiff_t checked = 0, skipped = 0;
};

template <class Layer>
Compare compare(Layer const& layer, fl::Matrix<float> const& x, std::vector<float> const& y_ref,
                std::vector<float> const& margin) {
  std::ptrdiff_t const t = x.extent(0), d = x.extent(1);
  fl::Matrix<float> y({t, d});
  layer.forward(x.cview(), y.view());
  Compare c;
  double max_ref = 0, max_diff = 0;
  for (std::ptrdiff_t i = 0; i < t; ++i) {
    if (!(margin[static_cast<std::size_t>(i)] >= 1e-4f)) {
      ++c.skipped;
      continue;
    }
    ++c.checked;
    for (std::ptrdiff_t j = 0; j < d; ++j) {
      double const r = y_ref[static_cast<std::size_t>(i * d + j)];
      max_ref = std::max(max_ref, std::abs(r));
      max_diff = std::max(max_diff, std::abs(static_cast<double>(y.data()[i * d + j]) - r));
    }
  }
  c.rel_err = max_diff / std::max(max_ref, 1e-30);
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && !(argc == 5 && std::string(argv[3]) == "--tolerance")) {
    std::fprintf(stderr, "usage: %s MODEL.safetensors CHECK.safetensors [--tolerance 1e-4]\n", argv[0]);
    return 2;
  }
  double const tol = argc == 5 ? std::atof(argv[4]) : 1e-4;
  int failures = 0;
  auto fail = [&](std::string const& what) {
    std::printf("  FAIL: %s\n", what.c_str());
    ++failures;
  };
  try {
    auto const file = io::SafetensorsFile::load(argv[1]);
    auto const layers = io::load_factorized(file);  // float experts, DefaultCpu: what an engine would run
    auto const check = io::SafetensorsFile::load(argv[2]);
    auto const& md = file.metadata();
    auto meta = [&](char const* key) { return md.count(key) ? md.at(key) : std::string("?"); };
    std::printf("%s: %zu layers, config %s, router_bias %s, experts %s\n", argv[1], layers.size(),
                meta("config").c_str(), meta("router_bias").c_str(),
                io::to_string(file.info("layers.0.ffn.experts.gate").dtype));
    long const d_ff_dense = md.count("d_ff_dense") ? std::atol(md.at("d_ff_dense").c_str()) : -1;
    std::vector<fl::Matrix<float>> xs;
    std::vector<std::vector<float>> ys, margins;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      std::string const p = "layers." + std::to_string(l) + ".";
      auto const& info = check.info(p + "x");
      if (info.shape.size() != 2 || info.shape[1] != layers[l].d_model())
        throw fl::format_error(std::string(argv[2]) + ": " + p + "x has the wrong shape");
      std::ptrdiff_t const t = info.shape[0];
      auto xt = check.read_float<2>(p + "x", {t, layers[l].d_model()});
      fl::Matrix<float> x({t, layers[l].d_model()});
      std::copy(xt.data(), xt.data() + xt.size(), x.data());
      xs.push_back(std::move(x));
      check.require_shape(p + "y_ref", {t, layers[l].d_model()});
      check.require_shape(p + "margin", {t});
      ys.push_back(check.to_float(p + "y_ref"));
      margins.push_back(check.to_float(p + "margin"));
    }
    for (std::size_t l = 0; l < layers.size(); ++l) {
      auto const& layer = layers[l];
      auto const& perm = layer.experts().partition().permutation();
      std::ptrdiff_t const n = layer.n_experts(), m = layer.experts().d_expert(), d = layer.d_model();
      // The bias-free router llama.cpp runs.
      if (meta("router_bias") == "none") {
        auto const& b = layer.router().bias();
        for (std::ptrdiff_t e = 0; e < n; ++e)
          if (b.data()[e] != 0.f) fail("layer " + std::to_string(l) + ": router_bias none but bias " +
                                       std::to_string(e) + " = " + std::to_string(b.data()[e]));
      }
      // Padded neurons: zero rows of gate / up and zero columns of down, wherever the permutation put them.
      std::ptrdiff_t padded = 0;
      if (d_ff_dense > 0) {
        auto const& g = layer.experts().gate_tensor();
        auto const& u = layer.experts().up_tensor();
        auto const& dn = layer.experts().down_tensor();
        for (std::ptrdiff_t pos = 0; pos < n * m; ++pos) {
          if (perm[static_cast<std::size_t>(pos)] < d_ff_dense) continue;
          ++padded;
          std::ptrdiff_t const e = pos / m, i = pos % m;
          for (std::ptrdiff_t j = 0; j < d; ++j)
            if (g.data()[(e * m + i) * d + j] != 0.f || u.data()[(e * m + i) * d + j] != 0.f ||
                dn.data()[(e * d + j) * m + i] != 0.f) {
              fail("layer " + std::to_string(l) + ": padded neuron " + std::to_string(perm[static_cast<std::size_t>(pos)]) +
                   " is not zero");
              break;
            }
        }
        if (n * m - padded != d_ff_dense)
          fail("layer " + std::to_string(l) + ": " + std::to_string(n * m - padded) + " real neurons, expected d_ff_dense " +
               std::to_string(d_ff_dense));
      }
      Compare const c = compare(layer, xs[l], ys[l], margins[l]);
      std::printf("  layer %zu: N %td, K %td, d_ff %td (%td padded), output_scale %g: max |y - y_ref| / max |y_ref| = "
                  "%.2e on %td tokens (%td near-ties left out)\n",
                  l, n, layer.top_k(), n * m, padded, static_cast<double>(layer.gating().output_scale), c.rel_err,
                  c.checked, c.skipped);
      if (c.checked == 0 || c.skipped * 20 > c.checked + c.skipped)
        fail("layer " + std::to_string(l) + ": too many near-tie tokens left out");
      if (!(c.rel_err <= tol)) fail("layer " + std::to_string(l) + ": relative error above the tolerance " + std::to_string(tol));
      // Negative control: another layer's weights on these inputs must not pass.
      if (layers.size() > 1) {
        std::size_t const o = (l + 1) % layers.size();
        Compare const wrong = compare(layers[o], xs[l], ys[l], margins[l]);
        if (wrong.rel_err <= tol)
          fail("negative control: layer " + std::to_string(o) + "'s weights also pass layer " + std::to_string(l) +
               "'s check (" + std::to_string(wrong.rel_err) + ")");
      }
    }
  } catch (std::exception const& e) {
    fail(e.what());
  }
  std::printf(failures == 0 ? "recipe checkpoint check: PASSED (tolerance %g)\n"
                            : "recipe checkpoint check: FAILED (tolerance %g)\n", tol);
  return failures == 0 ? 0 : 1;
}
