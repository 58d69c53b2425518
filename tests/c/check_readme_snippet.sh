#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Compiles the README's C API snippet (the first ```c block after "## Embed in your engine") as strict C11, so the
# README shows code that compiles against the current header.
# Usage: bash tests/c/check_readme_snippet.sh <C compiler> [repo_root]
set -euo pipefail
cc="${1:?usage: check_readme_snippet.sh <C compiler> [repo_root]}"
root="${2:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
snippet="$(awk '/^## Embed in your engine/ { in_section = 1; next }
                in_section && /^```c$/ { in_code = 1; next }
                in_code && /^```$/ { exit }
                in_code { print }' "$root/README.md")"
[ -n "$snippet" ] || { echo "check_readme_snippet: no \`\`\`c block under '## Embed in your engine' in README.md" >&2; exit 1; }
printf '%s\n' "$snippet" | "$cc" -std=c11 -Wall -Wextra -Werror -pedantic -fsyntax-only -I"$root/include" -x c -
echo "check_readme_snippet: OK (README's C API snippet compiles as C11)"
