#!/usr/bin/env bash
# Lints a live /metrics endpoint of mongo-syncd:
#   - the response is 2xx and the Content-Type header is exactly "text/plain; version=0.0.4"
#     (Prometheus 3 refuses scrapes with a missing or unknown content type);
#   - `promtool check metrics` reports no finding at all (DESIGN.md §6);
#   - the daemon's build_info series is present (we are scraping the right thing).
# Usage: .ci/checks/promtool-metrics.sh http://127.0.0.1:9290/metrics
set -euo pipefail

url=${1:?usage: promtool-metrics.sh URL (e.g. http://127.0.0.1:9290/metrics)}
expected_type='text/plain; version=0.0.4'

for tool in curl promtool; do
    command -v "$tool" >/dev/null || { echo "FAIL: $tool not found on PATH" >&2; exit 1; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== promtool-metrics: scraping $url"
curl -fsS --max-time 10 -D "$tmp/headers" -o "$tmp/body" "$url"

content_type=$(grep -i '^content-type:' "$tmp/headers" | tail -n 1 | cut -d: -f2- | tr -d '\r' \
    | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//')
echo "   Content-Type: ${content_type:-<missing>}"
if [[ "$content_type" != "$expected_type" ]]; then
    echo "FAIL: Content-Type must be exactly '$expected_type'" >&2
    exit 1
fi

if ! grep -q '^mongo_syncd_build_info{' "$tmp/body"; then
    echo "FAIL: no mongo_syncd_build_info series in the exposition" >&2
    exit 1
fi
echo "   $(grep -c '^# TYPE ' "$tmp/body") metric families, $(grep -vc '^#' "$tmp/body") samples"

echo "== promtool check metrics"
rc=0
findings=$(promtool check metrics <"$tmp/body" 2>&1) || rc=$?
if [[ $rc -ne 0 || -n "$findings" ]]; then
    echo "$findings" >&2
    echo "FAIL: promtool check metrics exited $rc with the findings above" >&2
    exit 1
fi
echo "OK: exposition is clean"
