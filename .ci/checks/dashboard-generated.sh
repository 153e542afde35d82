#!/usr/bin/env bash
# Checks that deploy/grafana/mongo-syncd-dashboard.json is what
# deploy/grafana/generate-dashboard.py produces (the JSON is generated, then committed).
# Usage: .ci/checks/dashboard-generated.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
echo "== dashboard JSON up to date with its generator"
python3 "$root/deploy/grafana/generate-dashboard.py" --check
python3 -m json.tool "$root/deploy/grafana/mongo-syncd-dashboard.json" >/dev/null
echo "OK: dashboard JSON"
