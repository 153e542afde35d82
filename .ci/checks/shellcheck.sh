#!/usr/bin/env bash
# Runs shellcheck on every *.sh file of the repository (outside .git, target and .venv) and on
# .ci/run when it exists.
# Usage: .ci/checks/shellcheck.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
command -v shellcheck >/dev/null || { echo "FAIL: shellcheck not found on PATH" >&2; exit 1; }

files=()
while IFS= read -r -d '' f; do
    files+=("$f")
done < <(find . \( -name .git -o -name target -o -name .venv -o -name node_modules \) -prune \
    -o -type f -name '*.sh' -print0 | sort -z)
[[ -f .ci/run ]] && files+=(.ci/run)

if [[ ${#files[@]} -eq 0 ]]; then
    echo "FAIL: no shell scripts found" >&2
    exit 1
fi
echo "== $(shellcheck --version | sed -n 's/^version: /shellcheck /p') on ${#files[@]} files:"
printf '   %s\n' "${files[@]}"
shellcheck --external-sources "${files[@]}"
echo "OK: shell scripts"
