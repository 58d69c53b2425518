// SPDX-License-Identifier: Apache-2.0
// Tests of io/factorized_checkpoint.hpp: save and load of factorized MoE layers restore every tensor and gating
// field exactly, and inconsistent files are refused with format_error.
#include <catch2/catch.hpp>

#include <factorllm/core/error.hpp>
#include <factorllm/ffn/factorize.hpp>
#include <factorllm/ffn/permutation.hpp>
#include <factorllm/io/factorized_checkpoint.hpp>
#include <factorllm/io/safetensors.hpp>
#include <factorllm/moe/gating.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/moe/router.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <random>
#include <limits>
#include <string>
#include <vector>

#include "reference/io_fixtures.hpp"

namespace {

namespace fl = factorllm;
namespace io = factorllm::io;
using io::SafetensorsDtype;
using io::SafetensorsFile;
using io::SafetensorsWriter;
using Bytes = std::vector<unsigned char>;
using fixture::gating;
using fixture::temp_path;

/// A MoE layer with integer-valued weights in [-8, 8] (exact in F16 and BF16) and a chosen gating.
fl::moe::MoeFfn<float, fl::CpuScalar> small_layer(std::uint64_t seed, std::ptrdiff_t d, std::ptrdiff_t d_ff,
                                                  std::ptrdiff_t n, fl::moe::Gating g, bool router_bias) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> v(-8, 8);
  fl::Matrix<float> gate({d_ff, d}), up({d_ff, d}), down({d, d_ff});
  for (auto* m : {&gate, &up, &down})
    for (std::ptrdiff_t i = 0; i < m->size(); ++i) (*m)[i] = static_cast<float>(v(rng)) / 8.f;
  fl::ffn::DenseFfnView<float> dense{gate.cview(), up.cview(), down.cview()};
  auto experts = fl::ffn::factorize(dense, fl::ffn::ExpertPartition::random(d_ff, n, seed));
  fl::Matrix<float> rw({n, d});
  fl::Vector<float> rb({n});
  for (std::ptrdiff_t i = 0; i < rw.size(); ++i) rw[i] = static_cast<float>(v(rng)) * 0.1f;
  if (router_bias)
    for (std::ptrdiff_t i = 0; i < n; ++i) rb[i] = static_cast<float>(v(rng)) * 0.25f;
  return fl::moe::MoeFfn<float, fl::CpuScalar>(std::move(experts), fl::moe::Router<float>(std::move(rw), std::move(rb)),
                                               std::move(g));
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Factorized models
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("factorized model: save and load restore permutation, experts, routers and gating exactly", "[io][factorized]") {
  using fl::moe::CombineMode;
  std::vector<fl::moe::MoeFfn<float, fl::CpuScalar>> layers;
  layers.push_back(small_layer(1, 8, 12, 4, gating(CombineMode::softmax_topk_renorm, 2), false));
  auto g = gating(CombineMode::sigmoid_topk, 3);
  g.sigmoid_renormalize = true;
  g.selection_bias = {0.5f, -0.25f, 0.f, 1.f};
  g.output_scale = 0.1f;  // not exact in binary: the text form must still round-trip the bits
  layers.push_back(small_layer(2, 8, 12, 4, g, true));
  layers.push_back(small_layer(3, 8, 12, 3, gating(CombineMode::code_ref, 1), true));

  for (auto const dtype : {SafetensorsDtype::f32, SafetensorsDtype::f16, SafetensorsDtype::bf16}) {
    INFO("expert dtype " << io::to_string(dtype));
    io::FactorizedSaveOptions opts;
    opts.expert_dtype = dtype;
    opts.metadata["source_model"] = "unit test";
    Bytes const bytes = io::factorized_tensors(layers, opts).serialize();
    auto const file = SafetensorsFile::parse(bytes.data(), bytes.size());
    CHECK(file.metadata().at("source_model") == "unit test");
    CHECK(file.metadata().at("layers.1.combine_mode") == "sigmoid_topk");
    CHECK(file.info("layers.0.ffn.experts.gate").dtype == dtype);
    CHECK(file.info("layers.0.ffn.router.weight").dtype == SafetensorsDtype::f32);
    auto const back = io::load_factorized<fl::CpuScalar>(file);
    REQUIRE(back.size() == layers.size());
    for (std::size_t l = 0; l < layers.size(); ++l) {
      auto const& a = layers[l];
      auto const& b = back[l];
      CHECK(b.experts().partition().permutation() == a.experts().partition().permutation());
      CHECK(b.n_experts() == a.n_experts());
      CHECK(b.top_k() == a.top_k());
      CHECK(b.gating().mode == a.gating().mode);
      CHECK(b.gating().sigmoid_renormalize == a.gating().sigmoid_renormalize);
      CHECK(b.gating().selection_bias == a.gating().selection_bias);
      CHECK(b.gating().output_scale == a.gating().output_scale);
      auto same = [](auto const& x, auto const& y) { return std::equal(x.data(), x.data() + x.size(), y.data()); };
      CHECK(same(b.experts().gate_tensor(), a.experts().gate_tensor()));  // integer/8 values: exact in every dtype
      CHECK(same(b.experts().up_tensor(), a.experts().up_tensor()));
      CHECK(same(b.experts().down_tensor(), a.experts().down_tensor()));
      CHECK(std::equal(b.router().weight().data(), b.router().weight().data() + b.router().weight().size(),
                       a.router().weight().data()));
      CHECK(std::equal(b.router().bias().data(), b.router().bias().data() + b.router().bias().size(),
                       a.router().bias().data()));
      // And the rebuilt layer computes the same outputs.
      fl::Matrix<float> x({5, 8}), ya({5, 8}), yb({5, 8});
      for (std::ptrdiff_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7) % 11) / 4.f - 1.f;
      a.forward(x.cview(), ya.view());
      b.forward(x.cview(), yb.view());
      CHECK(std::equal(ya.data(), ya.data() + ya.size(), yb.data()));
    }
  }
  // A file saved in BF16 (or F16) loads back in that format, bit for bit (values like 0.3 are not exact in bf16).
  {
    auto const base = small_layer(4, 8, 12, 4, gating(CombineMode::softmax_topk_renorm, 2), false);
    fl::ffn::ExpertWeights<float> ex = base.experts();
    for (std::ptrdiff_t i = 0; i < ex.gate_tensor().size(); ++i) {
      ex.mutable_gate_tensor()[i] = 0.3f + 0.01f * static_cast<float>(i % 7);
      ex.mutable_up_tensor()[i] = -0.7f + 0.03f * static_cast<float>(i % 5);
    }
    std::vector<fl::moe::MoeFfn<float, fl::CpuScalar>> odd;
    odd.emplace_back(ex, base.router(), base.gating());
    io::FactorizedSaveOptions opts;
    opts.expert_dtype = SafetensorsDtype::bf16;
    Bytes const bytes = io::factorized_tensors(odd, opts).serialize();
    auto const file = SafetensorsFile::parse(bytes.data(), bytes.size());
    auto const back = io::load_factorized<fl::CpuScalar, fl::bf16>(file);
    auto const want = fl::ffn::convert_format<fl::bf16>(odd[0].experts());
    REQUIRE(back.size() == 1);
    for (std::ptrdiff_t i = 0; i < want.gate_tensor().size(); ++i) REQUIRE(back[0].experts().gate_tensor()[i] == want.gate_tensor()[i]);
    opts.expert_dtype = SafetensorsDtype::f16;
    Bytes const bytes16 = io::factorized_tensors(odd, opts).serialize();
    auto const back16 = io::load_factorized<fl::CpuScalar, fl::f16>(SafetensorsFile::parse(bytes16.data(), bytes16.size()));
    auto const want16 = fl::ffn::convert_format<fl::f16>(odd[0].experts());
    for (std::ptrdiff_t i = 0; i < want16.up_tensor().size(); ++i) REQUIRE(back16[0].experts().up_tensor()[i] == want16.up_tensor()[i]);
  }
  std::string const path = temp_path("factorized.safetensors");
  io::save_factorized(path, layers);
  CHECK(io::load_factorized<fl::CpuScalar>(path).size() == 3);
  // Layers held elsewhere are saved by pointer, with the same bytes; a null pointer is named.
  std::vector<fl::moe::MoeFfn<float, fl::CpuScalar> const*> pointers{&layers[0], &layers[1], &layers[2]};
  CHECK(io::factorized_tensors(pointers).serialize() == io::factorized_tensors(layers).serialize());
  io::save_factorized(path, pointers);
  CHECK(io::load_factorized<fl::CpuScalar>(path).size() == 3);
  pointers[1] = nullptr;
  CHECK_THROWS_WITH(io::factorized_tensors(pointers), Catch::Contains("'layers' entry 1 is null"));
  std::filesystem::remove(path);

  io::FactorizedSaveOptions reserved;
  reserved.metadata["n_layers"] = "9";
  CHECK_THROWS_AS(io::factorized_tensors(layers, reserved), fl::value_error);
  CHECK_THROWS_AS(io::factorized_tensors(std::vector<fl::moe::MoeFfn<float, fl::CpuScalar>>{}), fl::value_error);
}

TEST_CASE("factorized model: inconsistent files are refused with format_error", "[io][factorized][malformed]") {
  std::vector<fl::moe::MoeFfn<float, fl::CpuScalar>> layers;
  layers.push_back(small_layer(5, 4, 8, 2, gating(fl::moe::CombineMode::softmax_topk_renorm, 1), false));
  // Rebuilds the file with one metadata entry changed, or one tensor replaced.
  auto variant = [&](std::string const& key, std::string const& value, std::string const& drop = "",
                     std::vector<float> const* replacement = nullptr, std::vector<std::int64_t> const& shape = {}) {
    Bytes const bytes = io::factorized_tensors(layers).serialize();
    auto const f = SafetensorsFile::parse(bytes.data(), bytes.size());
    SafetensorsWriter w;
    for (auto const& [k, v] : f.metadata()) w.set_metadata(k, k == key ? value : v);
    for (auto const& t : f.tensors()) {
      if (t.name == drop) {
        if (replacement != nullptr) w.add(t.name, SafetensorsDtype::f32, shape, replacement->data());
        continue;
      }
      if (t.dtype == SafetensorsDtype::i32) {
        auto const v = f.to_int64(t.name);
        w.add_int(t.name, t.dtype, t.shape, v.data());
      } else {
        auto const v = f.to_float(t.name);
        w.add(t.name, t.dtype, t.shape, v.data());
      }
    }
    Bytes const out = w.serialize();
    return SafetensorsFile::parse(out.data(), out.size());
  };
  auto refused = [](SafetensorsFile const& f, std::string const& fragment) {
    INFO("expecting '" << fragment << "'");
    try {
      (void)io::load_factorized<fl::CpuScalar>(f);
      FAIL("no exception");
    } catch (fl::format_error const& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(fragment) != std::string::npos);
    }
  };
  CHECK_NOTHROW(io::load_factorized<fl::CpuScalar>(variant("", "")));
  refused(variant("format", "something.else"), "expected 'factorllm.moe'");
  refused(variant("format_version", "2"), "format_version '2' is not supported");
  refused(variant("n_layers", "2"), "no tensor 'layers.1.ffn.permutation'");
  refused(variant("n_layers", "-1"), "n_layers");
  refused(variant("layers.0.n_experts", "3"), "cannot split equally");
  refused(variant("layers.0.top_k", "3"), "top_k");
  refused(variant("layers.0.top_k", "1x"), "top_k");
  refused(variant("layers.0.combine_mode", "best_mode"), "unknown combine mode");
  refused(variant("layers.0.output_scale", "nan"), "output_scale");
  refused(variant("layers.0.sigmoid_renormalize", "yes"), "sigmoid_renormalize");
  refused(variant("", "", "layers.0.ffn.router.bias"), "no tensor 'layers.0.ffn.router.bias'");
  std::vector<float> const wrong(6, 0.f);
  refused(variant("", "", "layers.0.ffn.router.weight", &wrong, {2, 3}), "has shape [2, 3], expected [2, 4]");
  // Non-finite parameters (one NaN bias turned every output NaN): refused, naming the tensor and element.
  std::vector<float> const nan_bias{0.f, std::numeric_limits<float>::quiet_NaN()};
  refused(variant("", "", "layers.0.ffn.router.bias", &nan_bias, {2}), "'layers.0.ffn.router.bias' element 1 is not finite");
  std::vector<float> inf_gate(32, 0.5f);
  inf_gate[7] = std::numeric_limits<float>::infinity();
  refused(variant("", "", "layers.0.ffn.experts.gate", &inf_gate, {2, 4, 4}), "'layers.0.ffn.experts.gate' element 7 is not finite");
  std::vector<float> nan_weight(8, 0.25f);
  nan_weight[0] = std::numeric_limits<float>::quiet_NaN();
  refused(variant("", "", "layers.0.ffn.router.weight", &nan_weight, {2, 4}), "'layers.0.ffn.router.weight' element 0 is not finite");
  std::vector<float> const perm_f(8, 0.f);
  refused(variant("", "", "layers.0.ffn.permutation", &perm_f, {8}), "expected an integer type");
  // A permutation that repeats an index.
  {
    Bytes const bytes = io::factorized_tensors(layers).serialize();
    auto const f = SafetensorsFile::parse(bytes.data(), bytes.size());
    SafetensorsWriter w;
    for (auto const& [k, v] : f.metadata()) w.set_metadata(k, v);
    for (auto const& t : f.tensors()) {
      if (t.dtype == SafetensorsDtype::i32) {
        std::vector<std::int64_t> v = f.to_int64(t.name);
        v[1] = v[0];
        w.add_int(t.name, t.dtype, t.shape, v.data());
      } else {
        auto const v = f.to_float(t.name);
        w.add(t.name, t.dtype, t.shape, v.data());
      }
    }
    Bytes const out = w.serialize();
    refused(SafetensorsFile::parse(out.data(), out.size()), "not a permutation");
  }
}
