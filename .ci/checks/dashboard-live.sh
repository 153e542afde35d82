#!/usr/bin/env bash
# End-to-end check of the Grafana dashboard and the alert rules against a live mongo-syncd:
#   1. starts a real Prometheus on 127.0.0.1 (a free port, a temporary TSDB, scrape and rule
#      evaluation every 1 s) that scrapes METRICS_ADDR and loads deploy/alerts.yml;
#   2. polls /api/v1/targets until the target is up (bounded), then waits for a few scrapes;
#   3. runs dashboard-queries.py --require-data --metrics-url on the dashboard: every query
#      must parse, run and return data, and use only names the daemon exports;
#   4. checks that every alert rule evaluated without error against the real series.
# Prometheus is stopped on exit (trap).
# Usage: .ci/checks/dashboard-live.sh 127.0.0.1:9290 [extra dashboard-queries.py options]
#   METRICS_ADDR is host:port (path /metrics) or a full http://host:port/path URL.
#   e.g. --allow-empty mongo_syncd_conflicts_total when no conflict policy is configured.
#   Env: DASHBOARD (default deploy/grafana/mongo-syncd-dashboard.json), WAIT_SECONDS (60),
#        MIN_SCRAPES (5).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
addr=${1:?usage: dashboard-live.sh METRICS_ADDR [dashboard-queries.py options]}
shift
dashboard=${DASHBOARD:-$root/deploy/grafana/mongo-syncd-dashboard.json}
wait_seconds=${WAIT_SECONDS:-60}
min_scrapes=${MIN_SCRAPES:-5}

for tool in prometheus curl python3; do
    command -v "$tool" >/dev/null || { echo "FAIL: $tool not found on PATH" >&2; exit 1; }
done

# host:port[/path] or http(s)://host:port[/path]
scheme=http
rest=$addr
if [[ $addr == *://* ]]; then
    scheme=${addr%%://*}
    rest=${addr#*://}
fi
target=${rest%%/*}
path=/${rest#"$target"}
path=${path#/}
path=/${path:-metrics}
[[ $path == / ]] && path=/metrics
metrics_url="$scheme://$target$path"

tmp=$(mktemp -d)
prom_pid=
cleanup() {
    if [[ -n $prom_pid ]] && kill -0 "$prom_pid" 2>/dev/null; then
        kill "$prom_pid" 2>/dev/null || true
        wait "$prom_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
prom=http://127.0.0.1:$port

cat >"$tmp/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $root/deploy/alerts.yml
scrape_configs:
  - job_name: mongo-syncd
    scheme: $scheme
    metrics_path: $path
    static_configs:
      - targets: ["$target"]
YAML

echo "== dashboard-live: Prometheus on $prom scraping $metrics_url every 1s"
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
    --web.listen-address="127.0.0.1:$port" --log.level=warn >"$tmp/prometheus.log" 2>&1 &
prom_pid=$!

# Poll helper: runs "$@" every 0.5 s until it succeeds or the deadline passes.
poll() {
    local what=$1 deadline=$((SECONDS + wait_seconds))
    shift
    until "$@"; do
        if ! kill -0 "$prom_pid" 2>/dev/null; then
            cat "$tmp/prometheus.log" >&2
            echo "FAIL: prometheus exited while waiting for $what" >&2
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "FAIL: timed out after ${wait_seconds}s waiting for $what" >&2
            tail -n 20 "$tmp/prometheus.log" >&2
            exit 1
        fi
        sleep 0.5
    done
}

target_up() {
    curl -fsS "$prom/api/v1/targets" 2>/dev/null | python3 -c '
import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
sys.exit(0 if any(t["health"] == "up" for t in targets) else 1)'
}

enough_scrapes() {
    curl -fsS "$prom/api/v1/query" --data-urlencode \
        "query=count_over_time(up{job=\"mongo-syncd\"}[5m]) >= $min_scrapes" 2>/dev/null \
        | python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["data"]["result"] else 1)'
}

rules_evaluated() {
    curl -fsS "$prom/api/v1/rules" 2>/dev/null | python3 -c '
import json, sys
rules = [r for g in json.load(sys.stdin)["data"]["groups"] for r in g["rules"]]
sys.exit(0 if rules and all(not r.get("lastEvaluation", "0001").startswith("0001") for r in rules) else 1)'
}

poll "Prometheus readiness" curl -fs -o /dev/null "$prom/-/ready"
poll "the target to be up" target_up
echo "   target up"
poll "$min_scrapes scrapes" enough_scrapes
echo "   $min_scrapes scrapes done"

echo "== dashboard queries ($dashboard)"
python3 "$root/.ci/checks/dashboard-queries.py" "$dashboard" "$prom" \
    --require-data --metrics-url "$metrics_url" "$@"

echo "== alert rules evaluated against the live series"
poll "rule evaluation" rules_evaluated
curl -fsS "$prom/api/v1/rules" | python3 -c '
import json, sys
bad = 0
for g in json.load(sys.stdin)["data"]["groups"]:
    for r in g["rules"]:
        ok = r["health"] == "ok"
        bad += not ok
        mark = "ok  " if ok else "FAIL"
        extra = "" if ok else " error=" + str(r.get("lastError"))
        print(mark, r["name"], "health=" + r["health"], "state=" + str(r.get("state")) + extra)
sys.exit(1 if bad else 0)'
echo "OK: dashboard and rules against live metrics"
