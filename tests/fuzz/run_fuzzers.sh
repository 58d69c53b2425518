#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the libFuzzer targets (clang, ASan + UBSan) and runs each one.
#
# Usage: tests/fuzz/run_fuzzers.sh [SECONDS]   short mode: each target for SECONDS (default 60)
#        tests/fuzz/run_fuzzers.sh --long      long mode: 1,000,000 executions per target, counts printed
# Environment: FUZZ_BUILD_DIR (default: build-fuzz in the repository), FUZZ_JOBS (build jobs, default 2),
#              FUZZ_RUNS (executions per target in long mode, default 1000000).
# Seeds come from make_corpus.py (regenerated every run, never committed); what the fuzzers learn accumulates in
# $FUZZ_BUILD_DIR/fuzz-corpus/<target>, crash inputs land in $FUZZ_BUILD_DIR/fuzz-artifacts/. Exits non-zero when
# any target crashes, leaks, trips a sanitizer or a FUZZ_CHECK, or times out on one input.
set -euo pipefail

usage() {
  echo "usage: tests/fuzz/run_fuzzers.sh [SECONDS|--long]" >&2
  exit 2
}

mode=short
seconds=60
case "${1:-}" in
  "") ;;
  --long) mode=long ;;
  -h | --help) usage ;;
  *)
    [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ] || usage
    seconds="$1"
    ;;
esac
[ "$#" -le 1 ] || usage

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${FUZZ_BUILD_DIR:-$repo_root/build-fuzz}"
jobs="${FUZZ_JOBS:-2}"
runs="${FUZZ_RUNS:-1000000}"
readonly targets=(fuzz_llama2c_checkpoint fuzz_llama2c_tokenizer fuzz_gguf fuzz_gguf_model fuzz_api fuzz_safetensors fuzz_hf_config)

# ---- Build. Configure every run (cheap with a cache): a build folder configured before a fuzz target was added
# has no rule for it, and `cmake --build --target` fails before CMake would regenerate. Later runs only rebuild
# what changed. ----
cmake -S "$repo_root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  -DFACTORLLM_BUILD_FUZZERS=ON -DFACTORLLM_BUILD_TESTS=OFF -DFACTORLLM_BUILD_BENCHMARKS=OFF \
  -DFACTORLLM_BUILD_EXAMPLES=OFF -DFACTORLLM_INSTALL=OFF -DFACTORLLM_BUILD_TORCH=OFF \
  -DFACTORLLM_ENABLE_OPENMP=OFF >/dev/null
cmake --build "$build" -j"$jobs" --target "${targets[@]}"

# ---- Corpora. ----
seeds="$build/fuzz-seeds"
rm -rf "$seeds"
python3 "$repo_root/tests/fuzz/make_corpus.py" "$seeds"
mkdir -p "$build/fuzz-artifacts" "$build/fuzz-logs"

# Input size caps. The checkpoint seeds include the real stories260K.bin (1 MB) when ../shared has it; a 1 MB cap would
# make libFuzzer mutate megabyte inputs at ~200 executions/s, so it sees the model's first 64 KiB (header and
# layout; the full file is a unit test) and the small generated checkpoints cover the accepting path.
max_len_of() {
  case "$1" in
    fuzz_llama2c_checkpoint) echo 65536 ;;
    *) echo 4096 ;;
  esac
}

# ---- Run. ----
status=0
summary=()
for t in "${targets[@]}"; do
  work="$build/fuzz-corpus/$t"
  log="$build/fuzz-logs/$t.log"
  mkdir -p "$work"
  flags=(-print_final_stats=1 -rss_limit_mb=2048 -timeout=30 -max_len="$(max_len_of "$t")"
         -artifact_prefix="$build/fuzz-artifacts/$t-")
  if [ "$mode" = long ]; then
    flags+=(-runs="$runs")
  else
    flags+=(-max_total_time="$seconds")
  fi
  echo "== $t ($mode: ${flags[*]: -1})"
  start=$SECONDS
  rc=0
  "$build/tests/fuzz/$t" "${flags[@]}" "$work" "$seeds/$t" >"$log" 2>&1 || rc=$?
  took=$((SECONDS - start))
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2 || true)"
  if [ "$rc" -eq 0 ]; then
    result=ok
  else
    result="FAILED (exit $rc; log $log)"
    status=1
    tail -n 40 "$log"
  fi
  summary+=("$(printf '%-26s %10s execs %6ss  cov %-6s %s' "$t" "${execs:-?}" "$took" "${cov:-?}" "$result")")
done

echo
echo "== fuzz summary ($mode)"
printf '%s\n' "${summary[@]}"
exit "$status"
