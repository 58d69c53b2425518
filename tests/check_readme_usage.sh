#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Checks that the README's "Usage" snippet is examples/01_moe_forward/main.cpp verbatim, so the README shows a
# program that CI compiles and runs.
# Usage: bash tests/check_readme_usage.sh [repo_root]   (default: the repository holding this script)
set -euo pipefail

root="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
example="$root/examples/01_moe_forward/main.cpp"
# The first ```cpp block after the "## Usage" heading.
snippet="$(awk '/^## Usage/ { in_usage = 1; next }
                in_usage && /^```cpp$/ { in_code = 1; next }
                in_code && /^```$/ { exit }
                in_code { print }' "$root/README.md")"
if [ "$snippet" != "$(cat "$example")" ]; then
  echo "check_readme_usage: README.md's Usage snippet differs from examples/01_moe_forward/main.cpp:" >&2
  diff <(printf '%s\n' "$snippet") "$example" >&2 || true
  exit 1
fi
echo "check_readme_usage: OK (README Usage == examples/01_moe_forward/main.cpp)"
