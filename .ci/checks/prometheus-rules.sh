#!/usr/bin/env bash
# Checks the Prometheus artifacts under deploy/:
#   - promtool check rules  deploy/alerts.yml   (syntax, templates, duplicate rules)
#   - promtool test rules   deploy/alerts_test.yml   (every alert, firing and not firing)
#   - promtool check config deploy/prometheus.yml    (the compose stack's config; its
#     rule_files are relative to the config file, so this also loads deploy/alerts.yml)
# Usage: .ci/checks/prometheus-rules.sh   (from anywhere)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
command -v promtool >/dev/null || { echo "FAIL: promtool not found on PATH" >&2; exit 1; }
echo "== $(promtool --version 2>&1 | head -n 1)"

echo "== promtool check rules --lint=all --lint-fatal deploy/alerts.yml"
promtool check rules --lint=all --lint-fatal deploy/alerts.yml

echo "== promtool test rules deploy/alerts_test.yml"
promtool test rules deploy/alerts_test.yml

echo "== promtool check config deploy/prometheus.yml"
promtool check config deploy/prometheus.yml

echo "OK: rules, rule tests and config"
