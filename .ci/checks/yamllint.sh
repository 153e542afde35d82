#!/usr/bin/env bash
# Lints the YAML under deploy/ (alert rules and tests, Prometheus config, docker compose, Grafana
# provisioning) and .ci/checks/ with the committed config .ci/checks/yamllint.yml; warnings fail too (--strict).
# Usage: .ci/checks/yamllint.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
command -v yamllint >/dev/null || { echo "FAIL: yamllint not found on PATH" >&2; exit 1; }

files=()
while IFS= read -r -d '' f; do
    files+=("$f")
done < <(find deploy .ci/checks -type f \( -name '*.yml' -o -name '*.yaml' \) -print0 | sort -z)
for f in docker-compose.yml docker-compose.yaml compose.yml compose.yaml; do
    [[ -f $f ]] && files+=("$f")
done

echo "== $(yamllint --version) on ${#files[@]} files:"
printf '   %s\n' "${files[@]}"
yamllint --strict -c .ci/checks/yamllint.yml "${files[@]}"
echo "OK: YAML"
