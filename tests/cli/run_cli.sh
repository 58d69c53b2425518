#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# End-to-end checks of the factorllm command-line tool on stories260K (ctest: cli_end_to_end).
#   1. convert to the factorized format and to GGUF; export the factorized file to GGUF: the exported model must
#      evaluate exactly like the factorized layers applied to the base model (the folded output scale K = 2 is exact);
#   2. the K = N plain-sum conversion without recovery is the dense model (top-1 agreement 1);
#   3. a Hugging Face copy of the model evaluates exactly like the llama2.c original;
#   4. inspect reports the experts; bad usage exits 2 and bad files exit 1, naming the option or the file.
# Usage: run_cli.sh FACTORLLM_BINARY SHARED_DIR
set -euo pipefail
bin="$1"
models="$2/models"
for f in "$models/stories260K.bin" "$models/tok512.bin"; do
  [ -f "$f" ] || { echo "FAIL: shared data missing: $f"; exit 1; }
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
fail() { echo "FAIL: $*"; exit 1; }
json_field() { python3 -c "import json,sys; d=json.load(open('$1')); print(d$2)"; }
quick=(--self-sample 24 --length 64 --epochs 4 --router-steps 60)

"$bin" convert "$models/stories260K.bin" -o moe.safetensors --experts 4 --top-k 2 --gating softmax_renorm "${quick[@]}"
"$bin" convert "$models/stories260K.bin" -o moe.gguf --experts 4 --top-k 2 --format gguf \
  --tokenizer "$models/tok512.bin" "${quick[@]}"
"$bin" export "$models/stories260K.bin" --moe moe.safetensors -o exported.gguf --tokenizer "$models/tok512.bin"
"$bin" eval "$models/stories260K.bin" moe.safetensors --sequences 8 --length 64 --json > factorized.json
"$bin" eval "$models/stories260K.bin" exported.gguf --sequences 8 --length 64 --json > exported.json
"$bin" eval "$models/stories260K.bin" moe.gguf --sequences 8 --length 64 --json > converted.json
a="$(json_field factorized.json "['moe_metrics']")"
b="$(json_field exported.json "['moe_metrics']")"
c="$(json_field converted.json "['moe_metrics']")"
echo "factorized: $a"
echo "exported:   $b"
[ "$a" = "$b" ] || fail "the exported GGUF does not evaluate like the factorized layers on the base model"
[ "$a" = "$c" ] || fail "convert --format gguf and convert + export differ (same seeds and data)"
retention="$(json_field exported.json "['moe_metrics']['acc_retention']")"
python3 -c "import sys; sys.exit(0 if 0.3 < $retention <= 1.2 else 1)" || fail "implausible retention $retention"

"$bin" convert "$models/stories260K.bin" -o full.safetensors --experts 4 --top-k 4 --gating plain_sum \
  --partition random --router random --recover none --self-sample 2 --length 16
"$bin" eval "$models/stories260K.bin" full.safetensors --sequences 4 --length 64 --json > full.json
agree="$(json_field full.json "['moe_metrics']['top1_agreement']")"
kl="$(json_field full.json "['moe_metrics']['kl_to_dense']")"
python3 -c "import sys; sys.exit(0 if $agree == 1.0 and $kl < 1e-6 else 1)" || fail "K = N is not the dense model: top1 $agree, kl $kl"

"$bin" export "$models/stories260K.bin" -o hf --format hf
"$bin" eval "$models/stories260K.bin" hf --sequences 4 --length 64 --json > hf.json
[ "$(json_field hf.json "['moe_metrics']['top1_agreement']")" = "1.0" ] || fail "the HF copy is not the same model"
[ "$(json_field hf.json "['moe_metrics']['kl_to_dense']")" = "0.0" ] || fail "the HF copy does not give the same logits"
python3 - "$bin" "$models" <<'PY'
import json, subprocess, sys
bin, models = sys.argv[1], sys.argv[2]
out = subprocess.run([bin, "inspect", "moe.gguf", "--json"], check=True, capture_output=True, text=True).stdout
d = json.loads(out)
layers = d["model"]["moe_layers"]
assert len(layers) == 5 and all(l["n_experts"] == 4 and l["top_k"] == 2 for l in layers), d
assert all(l["output_scale"] == 1.0 and l["max_abs_router_bias"] == 0.0 for l in layers), d
assert d["tensor_types"] == {"F32": 52}, d
PY

expect_fail() {  # expect_fail STATUS TEXT command...
  local want="$1" text="$2"
  shift 2
  set +e
  "$@" > out.txt 2>&1
  local got=$?
  set -e
  [ "$got" = "$want" ] || { cat out.txt; fail "'$*' exited $got, expected $want"; }
  grep -q -- "$text" out.txt || { cat out.txt; fail "'$*' did not say '$text'"; }
}
expect_fail 2 "needs -o OUT" "$bin" convert "$models/stories260K.bin" --experts 4 --top-k 2
expect_fail 2 "unknown option '--bogus'" "$bin" eval a b --bogus
expect_fail 2 "--experts 'x'" "$bin" convert "$models/stories260K.bin" -o x --experts x --top-k 2
expect_fail 2 "--partition 'kmeans'" "$bin" convert "$models/stories260K.bin" -o x --experts 4 --top-k 2 --partition kmeans
expect_fail 1 "'missing.bin' does not exist" "$bin" inspect missing.bin
expect_fail 1 "top_k = 5 must be in" "$bin" convert "$models/stories260K.bin" -o x --experts 4 --top-k 5
expect_fail 1 "has no vocabulary" "$bin" convert "$models/stories260K.bin" -o x.gguf --experts 4 --top-k 2 --format gguf "${quick[@]}"
head -c 100 "$models/stories260K.bin" > truncated.bin
expect_fail 1 "truncated.bin" "$bin" inspect truncated.bin
printf '[[1, 2, 99999]]' > bad_tokens.json
expect_fail 1 "token 99999 outside the vocabulary" "$bin" eval "$models/stories260K.bin" moe.gguf --heldout bad_tokens.json
echo "cli end-to-end: all checks passed"
