#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs factorllm's GGUF exports in real llama.cpp: installs node-llama-cpp (prebuilt llama.cpp for linux-x64) and
# @huggingface/gguf with npm into BUILD_DIR/llama_check, checks factorllm's q8_0 / q4_0 quantization against the
# ggml library that package ships (tests/llama_cpp/ggml_quant_check.cpp), converts stories260K with factorllm_export
# (dense and a K-of-N MoE, F32 and F16; the MoE also with Q8_0 and Q4_0 experts), then compares llama.cpp with
# factorllm's engine (tests/llama_cpp/check.mjs), including held-out accuracy, retention, top-1 agreement and
# perplexity from llama.cpp's own logits. Then the same for the two-stage recipe's fine-tuned, bias-free model
# (examples/03_finetune_recipe --quick --router-bias none --save; FLLM_FT_MOE / FLLM_FT_HELDOUT select a saved one),
# and for the best exportable layer-local conversion, made by `factorllm convert` (tools/factorllm).
# FLLM_EXPORT_ARGS: extra factorllm_export options for the layer-local conversion (e.g. --router par_subset).
#
# Usage: bash tests/llama_cpp/run_check.sh [BUILD_DIR]     (default: build; builds factorllm_export there if missing)
# Exit status: 0 when the check passes, or when it is SKIPPED (printed) because Node >= 20 / npm is missing or the npm
# registry cannot be reached; non-zero when the install fails with a reachable registry, the export fails, or the
# check fails.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mkdir -p "${1:-$repo_root/build}"
build_dir="$(cd "${1:-$repo_root/build}" && pwd)"
exporter="$build_dir/examples/factorllm_export"
work="$build_dir/llama_check"
here="$repo_root/tests/llama_cpp"

skip() {
  echo "SKIPPED: llama.cpp check: $*"
  exit 0
}

if [ ! -x "$exporter" ]; then
  # Not built yet (e.g. the README's one command on a fresh checkout): configure if needed and build the exporter.
  [ -f "$build_dir/CMakeCache.txt" ] || cmake -S "$repo_root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release
  cmake --build "$build_dir" --target factorllm_export -j"$(nproc)"
fi
command -v node >/dev/null 2>&1 || skip "node is not installed (needs Node >= 20 and npm)"
command -v npm >/dev/null 2>&1 || skip "npm is not installed (needs Node >= 20 and npm)"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || skip "Node $(node --version) is too old (node-llama-cpp needs >= 20)"

# ---- npm install (into the build tree; never into the repository). ----
# --omit=optional: node-llama-cpp lists every platform's binaries (CUDA and Vulkan ones are hundreds of MB) as
# optional dependencies; package.json names the one CPU linux-x64 package directly instead.
# --ignore-scripts: the prebuilt binaries need no postinstall step (it would only try to build llama.cpp from source).
mkdir -p "$work"
cp "$here/package.json" "$here/package-lock.json" "$here/check.mjs" "$work/"
if [ ! -f "$work/node_modules/.factorllm-installed" ] || ! cmp -s "$here/package-lock.json" "$work/node_modules/.factorllm-installed"; then
  # Only an unreachable registry skips the check; an install that fails with a reachable registry is an error.
  (cd "$work" && npm ping --loglevel=error >/dev/null 2>&1) || skip "the npm registry is not reachable, so llama.cpp cannot be installed"
  # npm install (not npm ci) with the committed lock file: the lock pins every version, but npm ci refuses it because
  # node-llama-cpp lists optional platform packages that were never published for this version.
  echo "npm install (node-llama-cpp, @huggingface/gguf; versions from package-lock.json) in $work"
  (cd "$work" && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --omit=optional --ignore-scripts --no-audit --no-fund \
     --loglevel=error)
  cp "$here/package-lock.json" "$work/node_modules/.factorllm-installed"
fi

# ---- core/quant.hpp against ggml's own quantize_row_q8_0_ref / _q4_0_ref and dequantize_row_q8_0 / _q4_0. ----
ggml_base="$work/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/libggml-base.so"
if [ -f "$ggml_base" ]; then
  "${CXX:-c++}" -std=c++17 -O2 -I"$repo_root/include" "$here/ggml_quant_check.cpp" -o "$work/ggml_quant_check" -ldl
  "$work/ggml_quant_check" "$ggml_base"
else
  echo "SKIPPED: ggml quantization check: $ggml_base not found"
fi

# ---- Export with factorllm, then compare in llama.cpp. ----
# One OpenMP thread unless the caller says otherwise: the model is tiny, threads only add synchronization (spinning
# on a loaded CI machine made the export ten times slower), and results are identical for any thread count.
# (a) the layer-local exportable conversion (examples/04_export: clustering partition, bias-free router, refit).
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$exporter" --out "$work/export" ${FLLM_EXPORT_ARGS:-}
rc=0
(cd "$work" && node check.mjs "$work/export") || rc=1

# (b) the recipe's fine-tuned, bias-free model (examples/03_finetune_recipe --router-bias none --save): by default
# a --quick run here (N=4 K=2, ~30 s); FLLM_FT_MOE=FILE (and FLLM_FT_HELDOUT=FILE, its --save-heldout) checks a model
# saved by a full run instead. factorllm_export --moe writes the GGUF files (output scale folded into the down
# projections) and our engine's reference; where the factorllm CLI is built (tools/factorllm), its
# `factorllm export --moe` file replaces the F32 GGUF, so llama.cpp runs the CLI's export.
shared="${FACTORLLM_SHARED_DIR:-$repo_root/../shared}"
ft_moe="${FLLM_FT_MOE:-}"
ft_heldout="${FLLM_FT_HELDOUT:-}"
if [ -z "$ft_moe" ]; then
  python="${FACTORLLM_TORCH_PYTHON:-/usr/bin/python3}"
  torch_lib="$build_dir/python/factorllm/libfactorllm_torch.so"
  if [ -f "$torch_lib" ] && "$python" -c "import torch, numpy" >/dev/null 2>&1; then
    mkdir -p "$work/ft"
    PYTHONPATH="$build_dir/python" OMP_NUM_THREADS=1 "$python" "$repo_root/examples/03_finetune_recipe/finetune_recipe.py" \
      --quick --configs 4:2 --router-bias none --model "$shared/models/stories260K.bin" \
      --tokenizer "$shared/models/tok512.bin" --save "$work/ft/moe.safetensors" --save-heldout "$work/ft/heldout.json"
    ft_moe="$work/ft/moe.safetensors"
    ft_heldout="$work/ft/heldout.json"
  else
    echo "SKIPPED: llama.cpp check of the fine-tuned model: needs $torch_lib (FACTORLLM_BUILD_TORCH) and $python with torch and numpy"
  fi
fi
# Exports a factorized MoE file with factorllm_export --moe into $work/$2 (our engine's reference included), has the
# CLI's `factorllm export` write the F32 GGUF llama.cpp runs when the CLI is built, and runs check.mjs on it.
check_factorized() {  # check_factorized FACTORIZED OUT_SUBDIR [HELDOUT]
  local moe="$1" out="$work/$2" heldout="${3:-}"
  rm -rf "$out"
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$exporter" --out "$out" --moe "$moe" ${heldout:+--heldout "$heldout"}
  local cli="$build_dir/tools/factorllm"
  if [ -x "$cli" ]; then
    local f32
    f32="$(cd "$out" && ls ft-n*k*-f32.gguf)"
    "$cli" export "$shared/models/stories260K.bin" --moe "$moe" -o "$out/$f32" --format gguf --type f32 \
      --tokenizer "$shared/models/tok512.bin"
    echo "llama.cpp runs $f32 as written by factorllm export (tools/factorllm)"
  fi
  (cd "$work" && node check.mjs "$out") || rc=1
}
if [ -n "$ft_moe" ]; then
  check_factorized "$ft_moe" export_ft "$ft_heldout"
fi

# (c) the best exportable layer-local conversion, made by the CLI with its defaults (co-activation partition,
# bias-free router toward the best K-subset, refit + distill, 256 self-sampled calibration sequences).
cli="$build_dir/tools/factorllm"
if [ -x "$cli" ]; then
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$cli" convert "$shared/models/stories260K.bin" -o "$work/layer_local.safetensors" \
    --experts 4 --top-k 2 --gating softmax_renorm
  check_factorized "$work/layer_local.safetensors" export_layer_local "$ft_heldout"
else
  echo "SKIPPED: llama.cpp check of the CLI's layer-local conversion: $cli is not built"
fi
exit $rc
