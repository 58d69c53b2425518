// SPDX-License-Identifier: Apache-2.0
// factorllm: the command-line tool. Converts a Llama-family model's dense FFNs into a mixture of experts, exports
// factorized models to the formats engines run, evaluates a converted model against its dense original and
// describes model files (docs/cli.md).
//
// Exit status: 0 on success, 1 when the work fails (bad file, refused export), 2 on bad usage.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <unistd.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "factorllm/core/error.hpp"
#include "factorllm/io/factorized_checkpoint.hpp"
#include "factorllm/io/gguf.hpp"
#include "factorllm/io/gguf_llama_export.hpp"
#include "factorllm/io/hf_llama.hpp"
#include "factorllm/io/mixtral_export.hpp"
#include "factorllm/io/model_file.hpp"
#include "factorllm/io/moe_export.hpp"
#include "factorllm/io/safetensors.hpp"
#include "factorllm/model/calibration.hpp"
#include "factorllm/model/convert.hpp"
#include "factorllm/model/evaluate.hpp"
#include "factorllm/model/llama_engine.hpp"
#include "factorllm/model/llama_model.hpp"
#include "factorllm/version.hpp"

namespace {

namespace fl = factorllm;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

/// Bad command-line usage: printed with the command's help hint, exit status 2.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

/// A parsed command line: positional arguments and --name value / --flag options.
struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> values;
  std::map<std::string, bool> flags;

  bool flag(std::string const& name) const { return flags.count(name) != 0; }
  std::optional<std::string> get(std::string const& name) const {
    auto const it = values.find(name);
    return it == values.end() ? std::nullopt : std::optional<std::string>(it->second);
  }
  std::string get_or(std::string const& name, std::string fallback) const { return get(name).value_or(std::move(fallback)); }
  std::int64_t integer(std::string const& name, std::int64_t fallback, std::int64_t lo, std::int64_t hi) const {
    auto const v = get(name);
    if (!v) return fallback;
    char* end = nullptr;
    long long const x = std::strtoll(v->c_str(), &end, 10);
    if (end == v->c_str() || *end != '\0' || x < lo || x > hi)
      throw usage_error(fl::detail::concat("--", name, " '", *v, "': expected an integer in [", lo, ", ", hi, "]"));
    return x;
  }
};

/// Parses argv[first..]: `value_options` take one value, `flag_options` none; anything else starting with "-" is
/// an error naming it.
Args parse(int argc, char** argv, int first, std::vector<std::string> const& value_options,
           std::vector<std::string> const& flag_options) {
  Args a;
  auto is = [](std::vector<std::string> const& v, std::string const& s) {
    for (auto const& x : v)
      if (x == s) return true;
    return false;
  };
  for (int i = first; i < argc; ++i) {
    std::string s = argv[i];
    if (s == "-o") s = "--out";
    if (s.size() > 2 && s.compare(0, 2, "--") == 0) {
      std::string const name = s.substr(2);
      if (is(value_options, name)) {
        if (i + 1 >= argc) throw usage_error("--" + name + " needs a value");
        a.values[name] = argv[++i];
      } else if (is(flag_options, name)) {
        a.flags[name] = true;
      } else {
        throw usage_error("unknown option '" + s + "'");
      }
    } else if (s.size() > 1 && s[0] == '-') {
      throw usage_error("unknown option '" + s + "'");
    } else {
      a.positional.push_back(s);
    }
  }
  return a;
}

/// A one-line progress bar on stderr: "label [#####.....] 3/5 text", redrawn in place on a terminal; elsewhere (a
/// log file) one line per step that carries text, else per quarter.
void progress_bar(char const* label, std::int64_t done, std::int64_t total, std::string const& text = "") {
  if (!isatty(fileno(stderr))) {
    bool const quarter = total > 0 && (4 * done / total) != (4 * (done - 1) / total);
    if (!text.empty() || quarter || done >= total)
      std::fprintf(stderr, "%s %lld/%lld %s\n", label, static_cast<long long>(done), static_cast<long long>(total),
                   text.c_str());
    return;
  }
  int const width = 30;
  int const filled = total > 0 ? static_cast<int>(width * done / total) : width;
  std::fprintf(stderr, "\r%-10s [%s%s] %lld/%lld %s", label, std::string(static_cast<std::size_t>(filled), '#').c_str(),
               std::string(static_cast<std::size_t>(width - filled), '.').c_str(), static_cast<long long>(done),
               static_cast<long long>(total), text.c_str());
  if (done >= total) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

// ---------------------------------------------------------------------------------------------------------------
// Token sequences: a file, or sampled from the dense model
// ---------------------------------------------------------------------------------------------------------------

/// Reads token sequences: a JSON array of arrays of ints, or one sequence per line of whitespace-separated ids.
/// \throws fl::format_error naming the file, the sequence and the value for a bad id or an empty file.
std::vector<fl::model::TokenSequence> read_sequences(std::string const& path, std::int64_t vocab) {
  std::ifstream in(path);
  if (!in) throw fl::format_error("cannot open the token file '" + path + "'");
  std::stringstream ss;
  ss << in.rdbuf();
  std::string const text = ss.str();
  std::vector<fl::model::TokenSequence> out;
  std::size_t const first = text.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && text[first] == '[') {
    json j;
    try {
      j = json::parse(text);
    } catch (json::exception const& e) {
      throw fl::format_error("token file '" + path + "': not valid JSON: " + e.what());
    }
    if (!j.is_array()) throw fl::format_error("token file '" + path + "': expected an array of arrays of token ids");
    for (std::size_t i = 0; i < j.size(); ++i) {
      if (!j[i].is_array())
        throw fl::format_error(fl::detail::concat("token file '", path, "': sequence ", i, " is not an array"));
      fl::model::TokenSequence s;
      for (auto const& t : j[i]) {
        if (!t.is_number_integer())
          throw fl::format_error(fl::detail::concat("token file '", path, "': sequence ", i, " holds a non-integer"));
        s.push_back(t.get<int>());
      }
      out.push_back(std::move(s));
    }
  } else {
    std::istringstream lines(text);
    std::string line;
    while (std::getline(lines, line)) {
      std::istringstream ids(line);
      fl::model::TokenSequence s;
      std::string tok;
      while (ids >> tok) {
        char* end = nullptr;
        long const v = std::strtol(tok.c_str(), &end, 10);
        if (end == tok.c_str() || *end != '\0' || v < 0 || v > INT32_MAX)
          throw fl::format_error(fl::detail::concat("token file '", path, "': sequence ", out.size(), ": '", tok,
                                                    "' is not a token id"));
        s.push_back(static_cast<int>(v));
      }
      if (!s.empty()) out.push_back(std::move(s));
    }
  }
  if (out.empty()) throw fl::format_error("token file '" + path + "' holds no sequence");
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (out[i].size() < 2)
      throw fl::format_error(fl::detail::concat("token file '", path, "': sequence ", i, " has fewer than 2 tokens"));
    for (int t : out[i])
      if (t < 0 || t >= vocab)
        throw fl::format_error(fl::detail::concat("token file '", path, "': sequence ", i, ": token ", t,
                                                  " outside the vocabulary [0, ", vocab, ")"));
  }
  return out;
}

/// Samples `n` sequences of BOS + `length` tokens from the dense model (temperature 1, sequence i from seed
/// first_seed + i: the fidelity report's and the recipe's data), with a progress bar.
std::vector<fl::model::TokenSequence> sample_with_progress(fl::model::LlamaEngine& engine, int n, int length,
                                                           std::uint64_t first_seed, char const* label) {
  std::vector<fl::model::TokenSequence> out;
  for (int i = 0; i < n; ++i) {
    auto s = fl::model::sample_sequences(engine, 1, length, first_seed + static_cast<std::uint64_t>(i));
    out.push_back(std::move(s[0]));
    progress_bar(label, i + 1, n);
  }
  return out;
}

/// Tokens per sampled sequence after BOS: --length, default 128, at most the model's context - 1.
int sample_length(fl::model::LlamaConfig const& c, Args const& a) {
  std::int64_t const most = std::max<std::int64_t>(1, std::min<std::int64_t>(c.context_length - 1, 1 << 20));
  return static_cast<int>(a.integer("length", std::min<std::int64_t>(128, most), 1, most));
}

/// The sequences a command works on: read from the file of option `file_option` when given, else `count_option`
/// (default `default_count`) sequences of --length tokens sampled from `m` with seeds first_seed + i.
std::vector<fl::model::TokenSequence> token_sequences(fl::model::LlamaModel const& m, Args const& a,
                                                      char const* file_option, char const* count_option,
                                                      int default_count, std::uint64_t first_seed) {
  if (auto const file = a.get(file_option)) return read_sequences(*file, m.config.vocab_size);
  int const n = static_cast<int>(a.integer(count_option, default_count, 1, 1000000));
  int const length = sample_length(m.config, a);
  fl::model::LlamaEngine dense(m, length + 1);
  return sample_with_progress(dense, n, length, first_seed, "sampling");
}

/// The longest sequence of a set (what an engine must hold).
std::int64_t longest(std::vector<fl::model::TokenSequence> const& seqs) {
  std::size_t n = 1;
  for (auto const& s : seqs) n = std::max(n, s.size());
  return static_cast<std::int64_t>(n);
}

// ---------------------------------------------------------------------------------------------------------------
// Writing a model
// ---------------------------------------------------------------------------------------------------------------

fl::io::GgmlType ggml_type(std::string const& s, char const* option) {
  if (s == "f32") return fl::io::GgmlType::f32;
  if (s == "f16") return fl::io::GgmlType::f16;
  if (s == "bf16") return fl::io::GgmlType::bf16;
  if (s == "q8_0") return fl::io::GgmlType::q8_0;
  if (s == "q4_0") return fl::io::GgmlType::q4_0;
  throw usage_error(fl::detail::concat("--", option, " '", s, "': expected f32, f16, bf16, q8_0 or q4_0"));
}

fl::io::SafetensorsDtype st_dtype(std::string const& s) {
  if (s == "f32") return fl::io::SafetensorsDtype::f32;
  if (s == "f16") return fl::io::SafetensorsDtype::f16;
  if (s == "bf16") return fl::io::SafetensorsDtype::bf16;
  throw usage_error("--type '" + s + "': expected f32, f16 or bf16 for this format");
}

/// The MoE layers of a model with their output scales folded into the experts (what GGUF and Mixtral express).
std::vector<fl::model::LlamaMoe> folded_layers(fl::model::LlamaModel const& m) {
  std::vector<fl::model::LlamaMoe> out;
  for (auto const* layer : fl::io::model_moe_layers(m, "export")) out.push_back(fl::io::fold_output_scale(*layer));
  return out;
}

/// Writes a converted model in `format`: factorized (the MoE layers only, the library's schema; alias
/// safetensors), gguf (the whole model for llama.cpp), mixtral (a Hugging Face MixtralForCausalLM folder), or hf (a
/// dense model as a Hugging Face Llama folder).
void write_model(fl::model::LlamaModel const& m, std::string const& out, std::string const& format, Args const& a) {
  std::string const type = a.get_or("type", "f32");
  if (format == "factorized" || format == "safetensors") {
    auto const layers = fl::io::model_moe_layers(m, "factorized export");
    if (layers.empty()) throw fl::value_error("the model has no MoE layers to save in the factorized format");
    fl::io::FactorizedSaveOptions o;
    o.expert_dtype = st_dtype(type);
    o.metadata["source"] = m.source;
    fl::io::save_factorized(out, layers, o);
  } else if (format == "gguf") {
    fl::io::GgufExportOptions o;
    o.weight_type = ggml_type(type, "type");
    if (auto const et = a.get("expert-type")) o.expert_type = ggml_type(*et, "expert-type");
    o.name = fs::path(out).stem().string();
    if (m.has_moe()) {
      auto layers = folded_layers(m);
      if (o.expert_type && fl::io::ggml_block_weights(*o.expert_type) > 1)
        for (auto& l : layers)
          l = fl::model::LlamaMoe(fl::ffn::pad_experts(l.experts(), 32), l.router(), l.gating());
      fl::io::llama_moe_gguf(m, layers, o).save(out);
    } else {
      fl::io::llama_gguf(m, o).save(out);
    }
  } else if (format == "mixtral") {
    fl::io::MixtralExportOptions o;
    o.dtype = st_dtype(type);
    auto const layers = folded_layers(m);
    if (layers.empty()) throw fl::value_error("the model has no MoE layers: the Mixtral layout needs experts");
    fl::io::export_mixtral(out, m, fl::io::layer_pointers(layers), o);
  } else if (format == "hf") {
    fl::io::HfWriteOptions o;
    o.dtype = st_dtype(type);
    fl::io::write_hf_llama(out, m, o);
  } else {
    throw usage_error("--format '" + format + "': expected factorized, safetensors, gguf, mixtral or hf");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------------------------

char const* const kConvertHelp =
    "usage: factorllm convert MODEL -o OUT --experts N --top-k K [options]\n"
    "Converts every dense FFN of MODEL (llama2.c .bin, GGUF, or a Hugging Face folder) into a K-of-N mixture of\n"
    "experts, layer by layer bottom-up, each layer calibrated on what the converted layers below it produce.\n"
    "  --experts N            experts per layer (N that does not divide d_ff zero-pads it: the same function)\n"
    "  --top-k K              experts per token\n"
    "  --partition P          contiguous | random | cluster_weights | cluster_activations (default cluster_activations)\n"
    "  --router R             random | par | par_subset (default par_subset: Adam on the PAR loss, best K-subset labels)\n"
    "  --recover M            none | refit | distill | refit+distill (default refit+distill)\n"
    "  --gating G             plain_sum | softmax_renorm (default softmax_renorm for gguf / mixtral, else plain_sum);\n"
    "                         softmax_renorm trains a bias-free router, which llama.cpp and Mixtral can run\n"
    "  --calib FILE           calibration token ids (JSON [[ids...]...] or one sequence per line)\n"
    "  --self-sample N        else: N sequences sampled from the dense model itself (default 256, seeds 1000 + i)\n"
    "  --length T             tokens per sampled sequence after BOS (default 128)\n"
    "  --format F             factorized (= safetensors, default) | gguf | mixtral\n"
    "  --type T               f32 | f16 | bf16 storage of the weights (default f32)\n"
    "  --expert-type T        gguf only: f32 | f16 | bf16 | q8_0 | q4_0 experts (block types pad d_expert to 32)\n"
    "  --tokenizer FILE       a llama2.c checkpoint's tokenizer (needed for --format gguf)\n"
    "  --epochs E, --router-steps S, --seed S   distillation epochs (30), router Adam steps (300), seed (2024)\n";

int cmd_convert(int argc, char** argv) {
  Args const a = parse(argc, argv, 2,
                       {"out", "experts", "top-k", "partition", "router", "recover", "gating", "calib", "self-sample",
                        "length", "format", "type", "expert-type", "tokenizer", "epochs", "router-steps", "seed"},
                       {"help"});
  if (a.flag("help")) {
    std::printf("%s", kConvertHelp);
    return 0;
  }
  if (a.positional.size() != 1) throw usage_error("convert takes one MODEL");
  auto const out = a.get("out");
  if (!out) throw usage_error("convert needs -o OUT");
  if (!a.get("experts") || !a.get("top-k")) throw usage_error("convert needs --experts N and --top-k K");
  std::string const format = a.get_or("format", "factorized");
  fl::model::ConvertConfig cfg;
  cfg.n_experts = a.integer("experts", 4, 1, 1 << 16);
  cfg.top_k = a.integer("top-k", 2, 1, 1 << 16);
  std::string const partition = a.get_or("partition", "cluster_activations");
  if (partition == "contiguous") cfg.partition = fl::model::PartitionKind::contiguous;
  else if (partition == "random") cfg.partition = fl::model::PartitionKind::random;
  else if (partition == "cluster_weights") cfg.partition = fl::model::PartitionKind::cluster_weights;
  else if (partition == "cluster_activations") cfg.partition = fl::model::PartitionKind::cluster_activations;
  else throw usage_error("--partition '" + partition + "': expected contiguous, random, cluster_weights or cluster_activations");
  std::string const router = a.get_or("router", "par_subset");
  if (router == "random") cfg.router = fl::model::RouterKind::random;
  else if (router == "par") cfg.router = fl::model::RouterKind::par;
  else if (router == "par_subset") cfg.router = fl::model::RouterKind::par_subset;
  else throw usage_error("--router '" + router + "': expected random, par or par_subset");
  std::string const recover = a.get_or("recover", "refit+distill");
  if (recover == "none") cfg.recovery = fl::model::RecoveryKind::none;
  else if (recover == "refit") cfg.recovery = fl::model::RecoveryKind::refit;
  else if (recover == "distill") cfg.recovery = fl::model::RecoveryKind::distill;
  else if (recover == "refit+distill") cfg.recovery = fl::model::RecoveryKind::refit_distill;
  else throw usage_error("--recover '" + recover + "': expected none, refit, distill or refit+distill");
  bool const exported = format == "gguf" || format == "mixtral";
  std::string const gating = a.get_or("gating", exported ? "softmax_renorm" : "plain_sum");
  if (gating == "plain_sum") cfg.gating = fl::model::GatingKind::plain_sum;
  else if (gating == "softmax_renorm") cfg.gating = fl::model::GatingKind::softmax_renorm;
  else throw usage_error("--gating '" + gating + "': expected plain_sum or softmax_renorm");
  if (exported && cfg.gating != fl::model::GatingKind::softmax_renorm)
    throw usage_error("--format " + format + " runs softmax -> TopK -> renormalize gating: use --gating softmax_renorm");
  fl::model::MethodConfig mc;
  mc.distill_epochs = static_cast<int>(a.integer("epochs", mc.distill_epochs, 0, 100000));
  mc.router_steps = static_cast<int>(a.integer("router-steps", mc.router_steps, 0, 10000000));
  mc.seed = static_cast<std::uint64_t>(a.integer("seed", static_cast<std::int64_t>(mc.seed), 0, INT64_MAX));

  auto const t0 = Clock::now();
  fl::model::LlamaModel m = fl::io::load_model(a.positional[0], a.get_or("tokenizer", ""));
  cfg.validate(m.config.d_ff);
  std::fprintf(stderr, "loaded %s: %s, d_model %lld, d_ff %lld, %lld layers (%.1f s)\n", m.source.c_str(),
               m.config.architecture.c_str(), static_cast<long long>(m.config.d_model),
               static_cast<long long>(m.config.d_ff), static_cast<long long>(m.config.n_layers), seconds_since(t0));
  std::vector<fl::model::TokenSequence> const calib = token_sequences(m, a, "calib", "self-sample", 256, 1000);
  std::fprintf(stderr, "converting: %s\n", cfg.label().c_str());
  auto const t1 = Clock::now();
  fl::model::LayerStats const mean = fl::model::convert_model(
      m, calib, cfg, mc, [&](int l, int n, fl::model::LayerStats const& s) {
        char text[160];
        std::snprintf(text, sizeof text, "layer %d: label %.3f, rel. error %.3f -> %.3f (%.0f s)", l, s.label_accuracy,
                      s.rel_err_routed, s.rel_err_final, seconds_since(t1));
        progress_bar("layers", l + 1, n, text);
      });
  write_model(m, *out, format, a);
  std::printf("wrote %s (%s): %s, mean rel. error %.4f, %.1f s\n", out->c_str(), format.c_str(), cfg.label().c_str(),
              mean.rel_err_final, seconds_since(t0));
  return 0;
}

char const* const kExportHelp =
    "usage: factorllm export BASE [--moe FACTORIZED] -o OUT [--format gguf|mixtral|factorized|hf] [options]\n"
    "Writes BASE (llama2.c .bin, GGUF or Hugging Face folder) with its FFNs replaced by the MoE layers of FACTORIZED\n"
    "(the library's factorized safetensors, e.g. saved by examples/03_finetune_recipe). Output scales are folded\n"
    "into the expert down projections; a router bias cannot be exported to gguf or mixtral and is refused.\n"
    "Without --moe, BASE itself is written in the format (dense: gguf or hf).\n"
    "  --format F        gguf (default) | mixtral | factorized | hf (a dense Hugging Face Llama folder)\n"
    "  --type T          f32 | f16 | bf16 storage of the weights (default f32)\n"
    "  --expert-type T   gguf only: f32 | f16 | bf16 | q8_0 | q4_0 experts\n"
    "  --tokenizer FILE  the llama2.c tokenizer of a .bin BASE (GGUF carries the vocabulary)\n";

int cmd_export(int argc, char** argv) {
  Args const a = parse(argc, argv, 2, {"out", "moe", "format", "type", "expert-type", "tokenizer"}, {"help"});
  if (a.flag("help")) {
    std::printf("%s", kExportHelp);
    return 0;
  }
  if (a.positional.size() != 1) throw usage_error("export takes one BASE model");
  auto const out = a.get("out");
  auto const moe = a.get("moe");
  if (!out) throw usage_error("export needs -o OUT");
  fl::model::LlamaModel base = fl::io::load_model(a.positional[0], a.get_or("tokenizer", ""));
  fl::model::LlamaModel const m = moe ? fl::io::apply_factorized(std::move(base), *moe) : std::move(base);
  std::string const format = a.get_or("format", "gguf");
  write_model(m, *out, format, a);
  std::printf("wrote %s (%s) from %s\n", out->c_str(), format.c_str(), m.source.c_str());
  return 0;
}

char const* const kEvalHelp =
    "usage: factorllm eval DENSE MOE [options]\n"
    "Measures MOE against DENSE on held-out text: next-token accuracy and its retention (MoE / dense), top-1\n"
    "agreement with the dense model, perplexity and KL(dense || MoE). MOE is any model file, or a factorized\n"
    "safetensors file applied to DENSE.\n"
    "  --heldout FILE     token ids (JSON [[ids...]...] or one sequence per line)\n"
    "  --sequences N      else: N sequences sampled from DENSE (default 32, seeds 1000000 + i)\n"
    "  --length T         tokens per sampled sequence after BOS (default 128)\n"
    "  --tokenizer FILE   the llama2.c tokenizer of .bin models (not needed to evaluate)\n"
    "  --json             print JSON instead of text\n";

json metrics_json(fl::model::Metrics const& m, double dense_acc) {
  return json{{"next_token_acc", m.next_token_acc},
              {"acc_retention", dense_acc > 0 ? m.next_token_acc / dense_acc : 0.0},
              {"top1_agreement", m.top1_agreement},
              {"ppl", m.ppl},
              {"kl_to_dense", m.kl_to_dense},
              {"positions", m.positions}};
}

int cmd_eval(int argc, char** argv) {
  Args const a = parse(argc, argv, 2, {"heldout", "sequences", "length", "tokenizer"}, {"help", "json"});
  if (a.flag("help")) {
    std::printf("%s", kEvalHelp);
    return 0;
  }
  if (a.positional.size() != 2) throw usage_error("eval takes DENSE and MOE");
  fl::model::LlamaModel const dense = fl::io::load_model(a.positional[0], a.get_or("tokenizer", ""));
  fl::model::LlamaModel const moe =
      fl::io::detect_model_file(a.positional[1]) == fl::io::ModelFileKind::factorized
          ? fl::io::apply_factorized(dense, a.positional[1])
          : fl::io::load_model(a.positional[1], a.get_or("tokenizer", ""));
  if (moe.config.vocab_size != dense.config.vocab_size || moe.config.d_model != dense.config.d_model)
    throw fl::value_error(fl::detail::concat("eval: ", moe.source, " (vocab ", moe.config.vocab_size, ", d_model ",
                                             moe.config.d_model, ") is not a conversion of ", dense.source, " (vocab ",
                                             dense.config.vocab_size, ", d_model ", dense.config.d_model, ")"));
  std::vector<fl::model::TokenSequence> const heldout =
      token_sequences(dense, a, "heldout", "sequences", 32, 1000000);
  if (longest(heldout) > dense.config.context_length)
    throw fl::value_error(fl::detail::concat("eval: a held-out sequence of ", longest(heldout),
                                             " tokens exceeds the model's context of ", dense.config.context_length));
  fl::model::LlamaEngine dense_engine(dense, longest(heldout));
  fl::model::DenseReference ref;
  fl::model::Metrics const d = fl::model::evaluate(dense_engine, heldout, &ref, nullptr);
  fl::model::LlamaEngine moe_engine(moe, longest(heldout));
  fl::model::Metrics const m = fl::model::evaluate(moe_engine, heldout, nullptr, &ref);
  if (a.flag("json")) {
    json j{{"dense", dense.source}, {"moe", moe.source}, {"sequences", heldout.size()},
           {"dense_metrics", metrics_json(d, d.next_token_acc)}, {"moe_metrics", metrics_json(m, d.next_token_acc)}};
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("held-out: %zu sequences, %lld next-token positions\n", heldout.size(),
                static_cast<long long>(m.positions));
    std::printf("%-8s %10s %10s %10s %10s %10s\n", "model", "acc", "retention", "top1", "ppl", "kl");
    std::printf("%-8s %10.4f %10.4f %10.4f %10.4f %10.4f\n", "dense", d.next_token_acc, 1.0, 1.0, d.ppl, 0.0);
    std::printf("%-8s %10.4f %10.4f %10.4f %10.4f %10.4f\n", "moe", m.next_token_acc,
                m.next_token_acc / d.next_token_acc, m.top1_agreement, m.ppl, m.kl_to_dense);
  }
  return 0;
}

char const* const kInspectHelp =
    "usage: factorllm inspect FILE [--json]\n"
    "Describes a model file: its format, architecture and sizes, tensors, and for MoE models the experts and gating.\n";

json describe_model(fl::model::LlamaModel const& m) {
  auto const& c = m.config;
  json j{{"architecture", c.architecture},
         {"d_model", c.d_model},
         {"d_ff", c.d_ff},
         {"n_layers", c.n_layers},
         {"n_heads", c.n_heads},
         {"n_kv_heads", c.n_kv_heads},
         {"head_dim", c.head_dim},
         {"vocab_size", c.vocab_size},
         {"context_length", c.context_length},
         {"rope_theta", c.rope_theta},
         {"rms_norm_eps", c.rms_norm_eps},
         {"tied_embeddings", c.tied_embeddings},
         {"vocabulary", m.vocab ? m.vocab->model : "none"}};
  if (m.has_moe()) {
    json layers = json::array();
    for (auto const& l : m.layers) {
      if (!l.moe) continue;
      auto const& g = l.moe->gating();
      double bias = 0;
      for (std::ptrdiff_t e = 0; e < l.moe->router().bias().extent(0); ++e)
        bias = std::max(bias, std::fabs(static_cast<double>(l.moe->router().bias()(e))));
      layers.push_back(json{{"n_experts", l.moe->n_experts()},
                            {"top_k", l.moe->top_k()},
                            {"d_expert", l.moe->d_expert()},
                            {"gating", fl::moe::to_string(g.mode)},
                            {"output_scale", g.output_scale},
                            {"max_abs_router_bias", bias}});
    }
    j["moe_layers"] = layers;
  }
  return j;
}

int cmd_inspect(int argc, char** argv) {
  Args const a = parse(argc, argv, 2, {}, {"help", "json"});
  if (a.flag("help")) {
    std::printf("%s", kInspectHelp);
    return 0;
  }
  if (a.positional.size() != 1) throw usage_error("inspect takes one FILE");
  std::string const path = a.positional[0];
  fl::io::ModelFileKind const kind = fl::io::detect_model_file(path);
  json j{{"file", path}, {"format", fl::io::to_string(kind)}};
  if (kind == fl::io::ModelFileKind::factorized) {
    auto const layers = fl::io::load_factorized<fl::DefaultCpu, float>(path);
    json ls = json::array();
    for (auto const& l : layers)
      ls.push_back(json{{"n_experts", l.n_experts()}, {"top_k", l.top_k()}, {"d_model", l.d_model()},
                        {"d_expert", l.d_expert()}, {"gating", fl::moe::to_string(l.gating().mode)},
                        {"output_scale", l.gating().output_scale}});
    j["moe_layers"] = ls;
  } else {
    j["model"] = describe_model(fl::io::load_model(path));
    if (kind == fl::io::ModelFileKind::gguf) {
      auto const f = fl::io::GgufFile::load(path);
      std::map<std::string, int> types;
      for (auto const& t : f.tensors()) ++types[fl::io::to_string(t.type)];
      j["tensors"] = f.tensors().size();
      j["tensor_types"] = types;
    }
  }
  if (a.flag("json")) {
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("%s: %s\n", path.c_str(), fl::io::to_string(kind));
  auto print_flat = [](json const& o, std::string const& indent) {
    for (auto it = o.begin(); it != o.end(); ++it)
      if (!it->is_array() && !it->is_object()) std::printf("%s%-18s %s\n", indent.c_str(), it.key().c_str(), it->dump().c_str());
  };
  if (j.contains("model")) print_flat(j["model"], "  ");
  if (j.contains("tensors")) std::printf("  %-18s %s %s\n", "tensors", j["tensors"].dump().c_str(), j["tensor_types"].dump().c_str());
  json const& moe_layers = j.contains("model") && j["model"].contains("moe_layers") ? j["model"]["moe_layers"]
                           : j.contains("moe_layers")                                ? j["moe_layers"]
                                                                                     : json::array();
  for (std::size_t l = 0; l < moe_layers.size(); ++l) std::printf("  layer %-3zu MoE    %s\n", l, moe_layers[l].dump().c_str());
  return 0;
}

char const* const kHelp =
    "usage: factorllm COMMAND [options]     (factorllm COMMAND --help for each)\n"
    "  convert   dense FFNs of a model -> K-of-N mixture of experts (factorized safetensors, GGUF or Mixtral)\n"
    "  export    a base model + factorized MoE layers -> GGUF (llama.cpp) or Mixtral\n"
    "  eval      held-out retention, top-1 agreement, perplexity and KL of a MoE model against its dense model\n"
    "  inspect   format, architecture, tensors, experts and gating of a model file\n"
    "Models: llama2.c .bin (with --tokenizer for GGUF output), GGUF (llama architecture), Hugging Face folders\n"
    "(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM; safetensors, sharded or not).\n";

}  // namespace

int main(int argc, char** argv) {
  std::string const cmd = argc > 1 ? argv[1] : "";
  try {
#if defined(_OPENMP)
    // The reference engine and the conversion are serial over small matrices; threads help only the big kernels,
    // and results do not depend on their number.
    if (std::getenv("OMP_NUM_THREADS") == nullptr) omp_set_num_threads(1);
#endif
    if (cmd == "convert") return cmd_convert(argc, argv);
    if (cmd == "export") return cmd_export(argc, argv);
    if (cmd == "eval") return cmd_eval(argc, argv);
    if (cmd == "inspect") return cmd_inspect(argc, argv);
    if (cmd == "--version") {
      std::printf("factorllm %d.%d.%d\n", FLLM_VERSION_MAJOR, FLLM_VERSION_MINOR, FLLM_VERSION_PATCH);
      return 0;
    }
    if (cmd == "--help" || cmd == "-h" || cmd == "help") {
      std::printf("%s", kHelp);
      return 0;
    }
    std::fprintf(stderr, "factorllm: %s\n%s", cmd.empty() ? "no command" : ("unknown command '" + cmd + "'").c_str(),
                 kHelp);
    return 2;
  } catch (usage_error const& e) {
    std::fprintf(stderr, "factorllm %s: %s (see factorllm %s --help)\n", cmd.c_str(), e.what(), cmd.c_str());
    return 2;
  } catch (std::exception const& e) {
    std::fprintf(stderr, "factorllm %s: %s\n", cmd.c_str(), e.what());
    return 1;
  }
}
