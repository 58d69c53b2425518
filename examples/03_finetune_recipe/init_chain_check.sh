#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The README's path from a dense model to a fine-tuned GGUF, small (ctest finetune_recipe_init_chain):
#   factorllm convert (layer-local, bias-free softmax_renorm router, small calibration)
#   -> finetune_recipe.py --quick --init that file --router-bias none --save ft.safetensors
#   -> finetune_recipe_check (ft.safetensors against the recipe's float64 reference)
#   -> factorllm export (GGUF) -> factorllm eval --json (the GGUF and the --init file, on the recipe's held-out set)
# and fails unless:
#   - the recipe refuses an --init file whose N:K disagrees with --configs (a non-zero exit status and the
#     message), and a router bias that is not 0 under --router-bias none;
#   - factorllm eval of the --init file gives the retention the recipe measured for its --init student, and eval of
#     the exported GGUF the retention the recipe measured after fine-tuning (both within 0.005 = 5 of the 1024
#     positions: two engines, float32 rounding), so convert -> recipe -> export carry the same model;
#   - fine-tuning does not make the model worse: retention after >= retention of the --init model - 0.01.
# Usage: init_chain_check.sh FACTORLLM_CLI FINETUNE_RECIPE_CHECK PYTHON SHARED_DIR OUT_DIR
# (PYTHONPATH=<build>/python in the environment, as for finetune_recipe_quick). Exit 77 (skip) without the model.
set -euo pipefail
cli="$1" check="$2" python="$3" shared="$4" out="$5"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
model="$shared/models/stories260K.bin" tok="$shared/models/tok512.bin"
if [ ! -f "$model" ] || [ ! -f "$tok" ]; then
  echo "SKIPPED: $model or $tok missing"
  exit 77
fi
rm -rf "$out"
mkdir -p "$out"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

echo "== factorllm convert (small)"
"$cli" convert "$model" -o "$out/init.safetensors" --experts 4 --top-k 2 --gating softmax_renorm \
  --self-sample 24 --length 64 --epochs 4 --router-steps 60

recipe=("$python" "$here/finetune_recipe.py" --model "$model" --tokenizer "$tok")

echo "== the recipe must refuse an --init file that disagrees with --configs"
if "${recipe[@]}" --quick --init "$out/init.safetensors" --configs 4:1 --router-bias none >"$out/refuse.log" 2>&1; then
  echo "FAILED: --init N4K2 with --configs 4:1 was accepted"; exit 1
fi
grep -q "layer 0 has N=4 K=2, --configs says 4:1" "$out/refuse.log" || { cat "$out/refuse.log"; echo "FAILED: wrong message"; exit 1; }

echo "== the recipe must refuse a non-zero router bias under --router-bias none"
"$python" - "$out/init.safetensors" "$out/biased.safetensors" <<'PY'
import json, struct, sys
raw = bytearray(open(sys.argv[1], "rb").read())
n = struct.unpack("<Q", raw[:8])[0]
info = json.loads(raw[8:8 + n])["layers.2.ffn.router.bias"]
at = 8 + n + info["data_offsets"][0]
raw[at:at + 4] = struct.pack("<f", 0.25)
open(sys.argv[2], "wb").write(raw)
PY
if "${recipe[@]}" --quick --init "$out/biased.safetensors" --router-bias none >"$out/refuse_bias.log" 2>&1; then
  echo "FAILED: a router bias of 0.25 was accepted with --router-bias none"; exit 1
fi
grep -q "layer 2 router.bias is" "$out/refuse_bias.log" || { cat "$out/refuse_bias.log"; echo "FAILED: wrong message"; exit 1; }

echo "== finetune_recipe.py --quick --init"
"${recipe[@]}" --quick --init "$out/init.safetensors" --router-bias none --save "$out/ft.safetensors" \
  --save-heldout "$out/heldout.json" | tee "$out/recipe.log"

echo "== finetune_recipe_check"
"$check" "$out/ft.safetensors" "$out/ft.check.safetensors"

echo "== factorllm export, eval"
"$cli" export "$model" --moe "$out/ft.safetensors" -o "$out/ft.gguf" --tokenizer "$tok"
"$cli" eval "$model" "$out/ft.gguf" --heldout "$out/heldout.json" --json >"$out/eval_ft.json"
"$cli" eval "$model" "$out/init.safetensors" --heldout "$out/heldout.json" --json >"$out/eval_init.json"

"$python" - "$out" <<'PY'
import json, struct, sys
out = sys.argv[1]
raw = open(f"{out}/ft.safetensors", "rb").read()
meta = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])["__metadata__"]
ft, init = (json.load(open(f"{out}/eval_{name}.json")) for name in ("ft", "init"))
tol, margin, ok = 0.005, 0.01, True
def check(cond, text):
    global ok
    print(("ok    " if cond else "FAIL  ") + text)
    ok &= cond
positions = int(meta["heldout_sequences"]) * (len(json.load(open(f"{out}/heldout.json"))[0]) - 1)
check(ft["moe_metrics"]["positions"] == positions == init["moe_metrics"]["positions"],
      f"eval positions {ft['moe_metrics']['positions']} = the recipe's held-out positions {positions}")
r_init, r_ft = init["moe_metrics"]["acc_retention"], ft["moe_metrics"]["acc_retention"]
m_init, m_ft = float(meta["init_heldout_acc_retention"]), float(meta["heldout_acc_retention"])
check(abs(r_init - m_init) <= tol, f"--init file: factorllm eval retention {r_init:.4f} vs the recipe's {m_init:.4f} (tol {tol})")
check(abs(r_ft - m_ft) <= tol, f"fine-tuned GGUF: factorllm eval retention {r_ft:.4f} vs the recipe's {m_ft:.4f} (tol {tol})")
check(r_ft >= r_init - margin, f"fine-tuning: retention {r_init:.4f} -> {r_ft:.4f} (may not drop by more than {margin})")
print("init chain check: " + ("PASSED" if ok else "FAILED"))
sys.exit(0 if ok else 1)
PY
