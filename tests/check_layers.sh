#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Layering check (docs/design.md §1): includes point down the layers only, and x86 intrinsics stay in backend/simd/.
#
#   backend/  may include core/, detail/ and backend/ itself; never moe/, ffn/, train/, model/ or io/
#   core/     may include core/ and detail/; never backend/, ffn/, moe/, train/, model/ or io/
#   ffn/, moe/, train/  never model/ or io/
#   model/    (the Llama model type, engine, conversion) never io/
#   c/        the C API header (the bindings layer, above io/): no library header includes it, and it includes no
#             factorllm header (it is plain C11; its shim src/c/ includes the C++ layers)
#   <immintrin.h>, <x86intrin.h> and the other <*intrin.h> headers: only under include/factorllm/backend/simd/
#   <mpi.h>: only under include/factorllm/moe/mpi/ (the optional MPI adapter; the rest of the library never needs MPI)
#
# Every include is resolved to the file it names, so any spelling is caught ("../../moe/x.hpp",
# "factorllm/moe/x.hpp", <factorllm/moe/x.hpp>, "../scalar/../../moe/x.hpp").
# Usage: bash tests/check_layers.sh [repo_root]   (default: the repository holding this script)
# Exit status: 0 when clean, 1 with one line per offending include, 2 on a usage error.
set -euo pipefail

root="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[ -d "$root/include/factorllm" ] || { echo "check_layers: $root has no include/factorllm" >&2; exit 2; }
root="$(cd "$root" && pwd)"
inc="$root/include"
lib="$inc/factorllm"

# Layers a header in $1 (backend or core) must not include.
forbidden_for() {
  case "$1" in
    backend) echo "moe ffn train model io c" ;;
    core) echo "backend ffn moe train model io c" ;;
    ffn|moe|train) echo "model io c" ;;
    model) echo "io c" ;;
    io) echo "c" ;;
    c) echo "core backend detail ffn moe train model io" ;;
  esac
}

# Prints the library-relative path (e.g. moe/gating.hpp) an include names, or nothing when it names no
# factorllm header (a system or third-party header). $1: including file, $2: the include's path, $3: " or <.
resolve() {
  local file="$1" path="$2" delim="$3" target=""
  if [ "$delim" = '"' ]; then
    target="$(realpath -m "$(dirname "$file")/$path")"
  fi
  # Not found next to the file (or an <...> include): the compiler goes on to the include directories.
  if [ -z "$target" ] || [ ! -e "$target" ]; then
    case "$path" in factorllm/*) target="$(realpath -m "$inc/$path")" ;; esac
  fi
  case "$target" in "$lib"/*) echo "${target#"$lib"/}" ;; esac
}

offences=()

# 1. Layer rules for backend/ and core/.
for layer in backend core ffn moe train model io c; do
  [ -d "$lib/$layer" ] || continue
  read -r -a banned <<<"$(forbidden_for "$layer")"
  while IFS= read -r -d '' file; do
    lineno=0
    while IFS= read -r line || [ -n "$line" ]; do
      lineno=$((lineno + 1))
      [[ "$line" =~ ^[[:space:]]*#[[:space:]]*include[[:space:]]*([\"\<])([^\"\>]+)[\"\>] ]] || continue
      delim="${BASH_REMATCH[1]}"
      path="${BASH_REMATCH[2]}"
      rel="$(resolve "$file" "$path" "$delim")"
      [ -n "$rel" ] || continue
      top="${rel%%/*}"
      for b in "${banned[@]}"; do
        if [ "$top" = "$b" ]; then
          offences+=("${file#"$root"/}:$lineno: includes $rel (${layer}/ must not include ${b}/)")
        fi
      done
    done <"$file"
  done < <(find "$lib/$layer" -type f \( -name '*.hpp' -o -name '*.h' -o -name '*.cuh' -o -name '*.inl' \) -print0 | sort -z)
done

# 2. x86 intrinsic headers outside include/factorllm/backend/simd/ (library, tests, examples, benchmarks, python).
intrin_re='^[[:space:]]*#[[:space:]]*include[[:space:]]*<([A-Za-z0-9_]*intrin\.h)>'
for dir in include src tests examples benchmarks python; do
  [ -d "$root/$dir" ] || continue
  while IFS= read -r -d '' file; do
    case "$file" in "$lib/backend/simd/"*) continue ;; esac
    lineno=0
    while IFS= read -r line || [ -n "$line" ]; do
      lineno=$((lineno + 1))
      [[ "$line" =~ $intrin_re ]] || continue
      offences+=("${file#"$root"/}:$lineno: includes <${BASH_REMATCH[1]}> (x86 intrinsics belong in include/factorllm/backend/simd/)")
    done <"$file"
  done < <(find "$root/$dir" -type f \( -name '*.hpp' -o -name '*.h' -o -name '*.cpp' -o -name '*.cc' -o -name '*.cu' \
                                        -o -name '*.cuh' -o -name '*.inl' \) -not -path '*/node_modules/*' -print0 | sort -z)
done

# 3. <mpi.h> inside the library outside include/factorllm/moe/mpi/ (docs/expert_parallel.md §2).
mpi_re='^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"]mpi\.h[>"]'
while IFS= read -r -d '' file; do
  case "$file" in "$lib/moe/mpi/"*) continue ;; esac
  lineno=0
  while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    [[ "$line" =~ $mpi_re ]] || continue
    offences+=("${file#"$root"/}:$lineno: includes <mpi.h> (only include/factorllm/moe/mpi/ may: MPI is optional)")
  done <"$file"
done < <(find "$lib" -type f \( -name '*.hpp' -o -name '*.h' -o -name '*.cuh' -o -name '*.inl' \) -print0 | sort -z)

if [ "${#offences[@]}" -gt 0 ]; then
  echo "check_layers: ${#offences[@]} include(s) break the layering (docs/design.md §1):"
  printf '  %s\n' "${offences[@]}"
  exit 1
fi
echo "check_layers: OK (core/, backend/, ffn/, moe/, train/, model/, io/ and c/ include only lower layers; x86 intrinsics only in backend/simd/; <mpi.h> only in moe/mpi/)"
