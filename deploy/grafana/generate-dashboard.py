#!/usr/bin/env python3
"""Generates deploy/grafana/mongo-syncd-dashboard.json (Grafana 10/11, schemaVersion 39).

python3 stdlib only. The JSON is committed; regenerate after editing this file:

    python3 deploy/grafana/generate-dashboard.py            # rewrite the JSON
    python3 deploy/grafana/generate-dashboard.py --check    # exit 1 if the JSON is stale

Every query uses only metric names that mongo-syncd exports (src/metrics/mod.rs);
.ci/checks/dashboard-queries.py checks that against a live /metrics and runs each query on a
real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

OUT = pathlib.Path(__file__).with_name("mongo-syncd-dashboard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
NS = 'namespace=~"$namespace"'

_next_id = 0


def next_id() -> int:
    global _next_id
    _next_id += 1
    return _next_id


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict:
    t = {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "refId": ref,
    }
    if instant:
        t["format"] = "table"
    return t


def targets(*specs) -> list[dict]:
    """specs: (expr, legend) pairs; refIds A, B, C..."""
    return [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(specs)]


def timeseries(title, desc, tgts, unit="short", stack=False, min0=True, w=12, h=8, **extra):
    defaults = {
        "unit": unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if stack else 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if min0:
        defaults["min"] = 0
    defaults.update(extra.pop("defaults", {}))
    return {
        "type": "timeseries",
        "title": title,
        "description": desc,
        "datasource": DS,
        "targets": tgts,
        "fieldConfig": {"defaults": defaults, "overrides": extra.pop("overrides", [])},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "_size": (w, h),
    }


def stat(title, desc, expr, unit="short", w=4, h=4, mappings=None, thresholds=None, legend=""):
    return {
        "type": "stat",
        "title": title,
        "description": desc,
        "datasource": DS,
        "targets": [target(expr, legend)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "mappings": mappings or [],
                "thresholds": thresholds
                or {"mode": "absolute", "steps": [{"color": "green", "value": None}]},
                "color": {"mode": "thresholds"},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
        },
        "_size": (w, h),
    }


def steps(*pairs) -> dict:
    return {
        "mode": "absolute",
        "steps": [{"color": c, "value": v} for v, c in pairs],
    }


UP_DOWN = [
    {
        "type": "value",
        "options": {
            "0": {"text": "disconnected", "color": "red", "index": 0},
            "1": {"text": "connected", "color": "green", "index": 1},
        },
    }
]


def row(title, panels, collapsed=False) -> dict:
    return {"type": "row", "title": title, "collapsed": collapsed, "_panels": panels}


def quantiles(metric: str, by: str = "") -> list[dict]:
    grouping = f"le{', ' + by if by else ''}"
    return targets(
        *[
            (
                f"histogram_quantile({q}, sum by ({grouping}) (rate({metric}_bucket[$__rate_interval])))",
                f"p{int(q * 100)}",
            )
            for q in (0.5, 0.9, 0.99)
        ]
    )


ROWS = [
    row(
        "Overview",
        [
            stat(
                "Source",
                "1 while the source answered within the last 10 s.",
                "min(mongo_syncd_source_connected)",
                mappings=UP_DOWN,
                thresholds=steps((None, "red"), (1, "green")),
            ),
            stat(
                "Destination",
                "1 while the destination is reachable.",
                "min(mongo_syncd_destination_connected)",
                mappings=UP_DOWN,
                thresholds=steps((None, "red"), (1, "green")),
            ),
            stat(
                "Worst lag",
                "Largest mongo_syncd_lag_seconds over the selected namespaces.",
                f"max(mongo_syncd_lag_seconds{{{NS}}})",
                unit="s",
                thresholds=steps((None, "green"), (30, "orange"), (120, "red")),
            ),
            stat(
                "Oldest recovery point",
                "time() minus the oldest applied-through cluster time: the data a failover to the destination would lose now.",
                f"time() - min(mongo_syncd_applied_through_timestamp_seconds{{{NS}}})",
                unit="s",
                thresholds=steps((None, "green"), (60, "orange"), (900, "red")),
            ),
            stat(
                "Parked workers",
                "Namespaces whose worker gave up and needs an operator (force-sync or reload restarts it).",
                f'sum(mongo_syncd_worker_state{{state="parked", {NS}}})',
                thresholds=steps((None, "green"), (1, "red")),
            ),
            stat(
                "Version / uptime",
                "Daemon version (build_info) and time since start.",
                "time() - max by (version) (mongo_syncd_start_time_seconds * on (job, instance) group_left (version) mongo_syncd_build_info)",
                unit="dtdurations",
                legend="{{version}}",
            ),
        ],
    ),
    row(
        "Replication",
        [
            timeseries(
                "Lag per namespace",
                "Source cluster time minus applied-through cluster time (DESIGN §2.9). 0 when caught up; grows while the source is unreachable.",
                targets((f"max by (namespace) (mongo_syncd_lag_seconds{{{NS}}})", "{{namespace}}")),
                unit="s",
            ),
            timeseries(
                "Recovery point age per namespace",
                "time() - applied_through: how stale the destination copy of each namespace is.",
                targets(
                    (
                        f"time() - min by (namespace) (mongo_syncd_applied_through_timestamp_seconds{{{NS}}})",
                        "{{namespace}}",
                    )
                ),
                unit="s",
            ),
            timeseries(
                "Apply rate by operation",
                "Source events applied to the destination per second, by op.",
                targets(
                    (
                        f"sum by (op) (rate(mongo_syncd_events_applied_total{{{NS}}}[$__rate_interval]))",
                        "{{op}}",
                    )
                ),
                unit="ops",
                stack=True,
            ),
            timeseries(
                "Read, applied, written",
                "Events read from change streams, events applied, destination write statements and replays skipped, per second.",
                targets(
                    (f"sum(rate(mongo_syncd_events_read_total{{{NS}}}[$__rate_interval]))", "read"),
                    (f"sum(rate(mongo_syncd_events_applied_total{{{NS}}}[$__rate_interval]))", "applied"),
                    (f"sum(rate(mongo_syncd_writes_total{{{NS}}}[$__rate_interval]))", "write statements"),
                    (
                        f"sum(rate(mongo_syncd_replay_skipped_total{{{NS}}}[$__rate_interval]))",
                        "replay skipped",
                    ),
                ),
                unit="ops",
            ),
            timeseries(
                "Queue depth",
                "Events read but not yet applied, per namespace. Bounded by the channel capacity: a full queue means the destination is the bottleneck.",
                targets((f"sum by (namespace) (mongo_syncd_queue_events{{{NS}}})", "{{namespace}}")),
            ),
            timeseries(
                "Checkpoint age",
                "Seconds since each namespace's last checkpoint write (written at least every checkpoint.interval_seconds, even when idle).",
                targets(
                    (f"max by (namespace) (mongo_syncd_checkpoint_age_seconds{{{NS}}})", "{{namespace}}")
                ),
                unit="s",
            ),
        ],
    ),
    row(
        "Latency",
        [
            timeseries(
                "Replication latency",
                "Source event wall time to destination acknowledgement (all namespaces).",
                quantiles("mongo_syncd_replication_latency_seconds"),
                unit="s",
            ),
            timeseries(
                "Apply batch duration",
                "One bulk write plus its checkpoint (all namespaces).",
                quantiles("mongo_syncd_apply_batch_duration_seconds"),
                unit="s",
            ),
        ],
    ),
    row(
        "Workers and errors",
        [
            timeseries(
                "Workers by state",
                "Number of namespace workers in each state.",
                targets((f"sum by (state) (mongo_syncd_worker_state{{{NS}}})", "{{state}}")),
                stack=True,
                w=8,
                defaults={"decimals": 0},
            ),
            {
                "type": "table",
                "title": "Current worker state",
                "description": "The state of each namespace worker (under _other: how many workers are in it).",
                "datasource": DS,
                "targets": [
                    target(f"mongo_syncd_worker_state{{{NS}}} > 0", instant=True),
                ],
                "transformations": [
                    {
                        "id": "organize",
                        "options": {
                            "excludeByName": {"Time": True, "__name__": True, "job": True},
                            "renameByName": {"Value": "workers"},
                        },
                    }
                ],
                "fieldConfig": {"defaults": {}, "overrides": []},
                "options": {"showHeader": True},
                "_size": (8, 8),
            },
            timeseries(
                "Errors by kind",
                "Classified non-fatal errors per second: transient (retried with backoff), history_lost (re-copy), document (dead-lettered).",
                targets(
                    (
                        f"sum by (kind) (rate(mongo_syncd_errors_total{{{NS}}}[$__rate_interval]))",
                        "{{kind}}",
                    )
                ),
                unit="ops",
                w=8,
            ),
            timeseries(
                "Worker restarts",
                "Restarts per namespace in each interval.",
                targets(
                    (
                        f"sum by (namespace) (increase(mongo_syncd_worker_restarts_total{{{NS}}}[$__rate_interval]))",
                        "{{namespace}}",
                    )
                ),
            ),
            timeseries(
                "Conflicts by outcome",
                "Conflicts with independent destination writes per second, by policy and outcome (source-wins does not count conflicts).",
                targets(
                    (
                        f"sum by (policy, outcome) (rate(mongo_syncd_conflicts_total{{{NS}}}[$__rate_interval]))",
                        "{{policy}} {{outcome}}",
                    )
                ),
                unit="ops",
            ),
            timeseries(
                "Dead letters",
                "Documents the destination rejected, written to <metadata>.dead_letters, per interval.",
                targets(
                    (
                        f"sum by (namespace) (increase(mongo_syncd_dead_letters_total{{{NS}}}[$__rate_interval]))",
                        "{{namespace}}",
                    )
                ),
            ),
            stat(
                "Dead letters (range)",
                "Documents dead-lettered over the dashboard's time range.",
                f"sum(increase(mongo_syncd_dead_letters_total{{{NS}}}[$__range]))",
                w=12,
                h=8,
                thresholds=steps((None, "green"), (1, "orange")),
            ),
        ],
    ),
    row(
        "Validation",
        [
            timeseries(
                "Validation runs by result",
                "Validation runs per interval by result (match, mismatch, unverified, error).",
                targets(
                    (
                        f"sum by (result) (increase(mongo_syncd_validation_runs_total{{{NS}}}[$__rate_interval]))",
                        "{{result}}",
                    )
                ),
                w=8,
                stack=True,
            ),
            timeseries(
                "Mismatched documents (last run)",
                "Documents found drifted by each namespace's last validation run.",
                targets(
                    (
                        f"max by (namespace) (mongo_syncd_validation_mismatched_documents{{{NS}}})",
                        "{{namespace}}",
                    )
                ),
                w=8,
            ),
            timeseries(
                "Time since last successful validation",
                "time() minus the last validation run whose result was match; before a "
                "namespace's first match (the gauge is 0), the time since the daemon started, "
                "so a young daemon shows its uptime rather than 56 years.",
                targets(
                    (
                        f"time() - min by (namespace) (clamp_min(mongo_syncd_validation_last_success_timestamp_seconds{{{NS}}}, scalar(min(mongo_syncd_start_time_seconds))))",
                        "{{namespace}}",
                    )
                ),
                unit="s",
                w=8,
            ),
        ],
    ),
    row(
        "Initial copy",
        [
            timeseries(
                "Documents copied vs estimated",
                "Documents copied by initial copies and re-copies (counter) against the source estimate taken at copy start.",
                targets(
                    (
                        f"sum by (namespace) (mongo_syncd_initial_sync_documents_copied_total{{{NS}}})",
                        "copied {{namespace}}",
                    ),
                    (
                        f"sum by (namespace) (mongo_syncd_initial_sync_documents_estimated{{{NS}}})",
                        "estimated {{namespace}}",
                    ),
                ),
            ),
            {
                "type": "bargauge",
                "title": "Copy progress",
                "description": "Copied / estimated per namespace, capped at 100% (re-copies add to the copied counter).",
                "datasource": DS,
                "targets": [
                    target(
                        f"clamp_max(sum by (namespace) (mongo_syncd_initial_sync_documents_copied_total{{{NS}}}) "
                        f"/ sum by (namespace) (mongo_syncd_initial_sync_documents_estimated{{{NS}}} > 0), 1)",
                        "{{namespace}}",
                    )
                ],
                "fieldConfig": {
                    "defaults": {
                        "unit": "percentunit",
                        "min": 0,
                        "max": 1,
                        "thresholds": steps((None, "blue"), (1, "green")),
                        "color": {"mode": "thresholds"},
                    },
                    "overrides": [],
                },
                "options": {
                    "orientation": "horizontal",
                    "displayMode": "basic",
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                },
                "_size": (12, 8),
            },
        ],
    ),
    row(
        "Operations",
        [
            timeseries(
                "Force-syncs by trigger",
                "Force-sync requests per interval (signal = SIGUSR1, http = POST /api/v1/force-sync).",
                targets(
                    (
                        "sum by (trigger) (increase(mongo_syncd_force_syncs_total[$__rate_interval]))",
                        "{{trigger}}",
                    )
                ),
                w=8,
            ),
            timeseries(
                "Config reloads by result",
                "SIGHUP reloads per interval; failure = rejected, old config kept.",
                targets(
                    (
                        "sum by (result) (increase(mongo_syncd_config_reloads_total[$__rate_interval]))",
                        "{{result}}",
                    )
                ),
                w=8,
            ),
            timeseries(
                "Source cluster time",
                "How far the latest source cluster time trails the wall clock (the source's no-op writes keep it within ~10 s), and namespaces aggregated under _other.",
                targets(
                    ("time() - max(mongo_syncd_source_cluster_time_seconds)", "wall clock - source cluster time"),
                    ("max(mongo_syncd_overflow_namespaces)", "namespaces under _other"),
                ),
                w=8,
                min0=False,
            ),
            timeseries(
                "Read-ahead buffer",
                "Bytes of change events read from the source and not yet applied, all namespaces, against apply.max_buffered_bytes. At the budget the readers wait for the destination: lag grows, memory does not.",
                targets(
                    ("sum(mongo_syncd_buffered_bytes)", "buffered"),
                    ("max(mongo_syncd_buffer_budget_bytes)", "budget"),
                ),
                unit="bytes",
            ),
            timeseries(
                "Connections by side",
                "Pooled connections the daemon holds open to each cluster. With one change stream per collection the source count grows with the collections streamed; pinned at source.max_pool_size, streams wait for a connection.",
                targets(("sum by (side) (mongo_syncd_connections)", "{{side}}")),
            ),
            timeseries(
                "Write lanes by namespace",
                "Concurrent bulk commands each namespace's batches are cut into. A fixed apply.write_lanes shows as a flat line; under \"auto\" (the default) each worker starts at 1 and moves only when its trials measured more statements per second with the other count, so a step here is a measured change of the destination's speed.",
                targets(("max by (namespace) (mongo_syncd_write_lanes{" + NS + "})", "{{namespace}}")),
            ),
            timeseries(
                "Source transactions by outcome",
                "With apply.transactions = \"atomic\": parts of source transactions (one namespace's events of one transaction) per second, written in one destination transaction with the other parts (atomic) or per document because a member could not take part (per_document: still copying, a conflict policy, a replay, a write the destination refused). Flat at 0 with the default per-document mode.",
                targets(
                    ("sum by (outcome) (rate(mongo_syncd_transaction_parts_total[$__rate_interval]))", "{{outcome}}"),
                ),
                unit="ops",
            ),
        ],
        collapsed=True,
    ),
    row(
        "High availability (ha.enabled)",
        [
            timeseries(
                "Instances by role",
                "Instances running with ha.enabled, by role. Exactly one should be active with one partition; with ha.partitions > 1, every live instance holding a partition is active. No active instance while standbys run means nothing is synced (alert MongoSyncdNoActiveInstance). Empty without ha.enabled.",
                targets(("sum by (role) (mongo_syncd_role)", "{{role}}")),
                w=8,
            ),
            timeseries(
                "Partitions held per instance",
                "Partitions (leases) each instance syncs. Balanced, each holds at most ceil(ha.partitions / live instances); after an instance fails its partitions move to the others within a lease. Empty without ha.enabled.",
                targets(
                    ("sum by (instance) (mongo_syncd_partitions_held)", "{{instance}}"),
                    ("max(mongo_syncd_ha_partitions)", "ha.partitions"),
                ),
                w=8,
            ),
            timeseries(
                "Lease losses and epochs",
                "Leases lost per interval (an active that could not renew in time or was taken over: its writes stopped) and the highest lease epoch per instance; the epoch grows with every change of owner. Empty without ha.enabled.",
                targets(
                    ("sum by (instance) (increase(mongo_syncd_lease_losses_total[$__rate_interval]))", "lost {{instance}}"),
                    ("max by (instance) (mongo_syncd_lease_epoch)", "epoch {{instance}}"),
                ),
                w=8,
            ),
        ],
        collapsed=True,
    ),
]


def layout(rows: list[dict]) -> list[dict]:
    """Assigns ids and gridPos; collapsed rows keep their panels inside."""
    panels = []
    y = 0
    for r in rows:
        r = dict(r)
        children = r.pop("_panels")
        r.update({"id": next_id(), "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        y += 1
        x = 0
        row_h = 0
        placed = []
        for p in children:
            p = dict(p)
            w, h = p.pop("_size")
            if x + w > 24:
                x = 0
                y += row_h
                row_h = 0
            p = {"id": next_id(), "gridPos": {"h": h, "w": w, "x": x, "y": y}, **p}
            placed.append(p)
            x += w
            row_h = max(row_h, h)
        y += row_h
        if r["collapsed"]:
            r["panels"] = placed
            panels.append(r)
        else:
            r["panels"] = []
            panels.append(r)
            panels.extend(placed)
    return panels


def dashboard() -> dict:
    return {
        "__inputs": [],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "mongo-syncd: MongoDB change-stream replication (lag, throughput, latency, workers, errors, validation, initial copy).",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "links": [],
        "panels": layout(ROWS),
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["mongodb", "mongo-syncd", "replication"],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "includeAll": False,
                    "multi": False,
                    "options": [],
                    "refresh": 1,
                    "regex": "",
                    "skipUrlSync": False,
                },
                {
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": DS,
                    "definition": "label_values(mongo_syncd_lag_seconds, namespace)",
                    "query": {
                        "qryType": 1,
                        "query": "label_values(mongo_syncd_lag_seconds, namespace)",
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "current": {},
                    "hide": 0,
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "options": [],
                    "refresh": 2,
                    "regex": "",
                    "sort": 1,
                    "skipUrlSync": False,
                },
            ]
        },
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "mongo-syncd",
        "uid": "mongo-syncd",
        "version": 1,
        "weekStart": "",
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs")
    args = parser.parse_args()
    text = render()
    if args.check:
        if OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is stale: run python3 {__file__}", file=sys.stderr)
            return 1
        print(f"{OUT} is up to date")
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
