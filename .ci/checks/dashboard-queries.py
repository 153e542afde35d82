#!/usr/bin/env python3
"""Checks every PromQL query of a Grafana dashboard against a real Prometheus (stdlib only).

    dashboard-queries.py DASHBOARD_JSON PROM_URL [--require-data] [--metrics-url URL]
                         [--allow-empty METRIC ...] [--names-from FILE] [--namespace REGEX]

- Walks every panel, including panels nested in collapsed rows, and every `expr` of their
  targets. It also checks the `label_values(metric, label)` queries of template variables.
- Substitutes the Grafana variables: $__rate_interval, $__interval, $__range, $namespace
  (all of its ${...} / [[...]] forms) and $datasource. Any other $variable left in an expr is a
  failure, because the dashboard would send it verbatim.
- Sends each expr to PROM_URL/api/v1/query. A Prometheus error fails the check. With
  --require-data, a query that returns no series fails too, unless it only uses metrics named
  with --allow-empty (for example mongo_syncd_conflicts_total when no conflict policy is
  configured).
- With --metrics-url, it reads the daemon's /metrics and fails on any mongo_syncd_* name in
  an expr that the daemon does not export. Histogram _bucket/_sum/_count series count by
  their family name. A family has no line at all until its first sample (a validation gauge
  before the first validation), so names given with --allow-empty may be absent from the live
  exposition, provided they are in --names-from.
- With --names-from (the daemon's metric-name constants, src/metrics/mod.rs), every
  mongo_syncd_* name in an expr must be one of the names that file spells.
- Checks statically that every panel and target uses the ${datasource} variable.

Exit status 0 when everything passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

METRIC_RE = re.compile(r"\bmongo_syncd_[a-zA-Z0-9_:]*")
LABEL_VALUES_RE = re.compile(r"^\s*label_values\(\s*(?:(?P<match>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$")
VAR_RE = re.compile(r"\$\{?(\w+)(?::\w+)?\}?|\[\[(\w+)(?::\w+)?\]\]")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def walk_panels(panels):
    for panel in panels or []:
        yield panel
        yield from walk_panels(panel.get("panels"))


def substitute(expr: str, values: dict[str, str]) -> tuple[str, list[str]]:
    unknown: list[str] = []

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name in values:
            return values[name]
        unknown.append(name)
        return m.group(0)

    return VAR_RE.sub(repl, expr), unknown


def http_get_json(url: str, timeout: float = 30) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:  # Prometheus answers 400/422 with a JSON error body
        try:
            return json.load(e)
        except ValueError:
            return {"status": "error", "errorType": f"http {e.code}", "error": e.reason}
    except (urllib.error.URLError, OSError) as e:
        return {"status": "error", "errorType": "connection", "error": str(e)}


def prom_query(prom: str, query: str) -> dict:
    params = urllib.parse.urlencode({"query": query, "time": f"{time.time():.3f}"})
    return http_get_json(f"{prom.rstrip('/')}/api/v1/query?{params}")


def exported_names(metrics_url: str) -> set[str]:
    """Metric family names and sample names of a /metrics exposition."""
    with urllib.request.urlopen(metrics_url, timeout=30) as resp:
        text = resp.read().decode("utf-8")
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE ") or line.startswith("# HELP "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dashboard", help="dashboard JSON file")
    parser.add_argument("prom_url", help="Prometheus base URL, e.g. http://127.0.0.1:19090")
    parser.add_argument("--require-data", action="store_true", help="fail on queries returning no series")
    parser.add_argument("--metrics-url", help="the daemon's /metrics URL for the static name check")
    parser.add_argument(
        "--allow-empty",
        action="append",
        default=[],
        metavar="METRIC",
        help="with --require-data, allow no data for queries using only these metrics; repeatable",
    )
    parser.add_argument(
        "--names-from",
        metavar="FILE",
        help="source file whose \"mongo_syncd_...\" string literals are every name the daemon can export",
    )
    parser.add_argument("--namespace", default=".*", help="value for $namespace (default .*)")
    parser.add_argument("--rate-interval", default="1m", help="value for $__rate_interval (default 1m)")
    parser.add_argument("--interval", default="15s", help="value for $__interval (default 15s)")
    parser.add_argument("--range", default="1h", help="value for $__range (default 1h)")
    args = parser.parse_args()

    with open(args.dashboard, encoding="utf-8") as f:
        dash = json.load(f)

    values = {
        "__rate_interval": args.rate_interval,
        "__interval": args.interval,
        "__range": args.range,
        "__range_s": "3600",
        "namespace": args.namespace,
        "datasource": "prometheus",
    }
    failures = 0

    def fail(msg: str) -> None:
        nonlocal failures
        failures += 1
        print(f"FAIL  {msg}")

    exported: set[str] | None = None
    if args.metrics_url:
        exported = exported_names(args.metrics_url)
        print(f"--    {args.metrics_url}: {len(exported)} names exported")

    known: set[str] | None = None
    if args.names_from:
        with open(args.names_from, encoding="utf-8") as f:
            known = set(re.findall(r'"(mongo_syncd_[a-z0-9_]+)"', f.read()))
        print(f"--    {args.names_from}: {len(known)} metric names declared")
        for name in args.allow_empty:
            if name not in known:
                fail(f"--allow-empty {name}: not a name the daemon declares")

    def family_of(name: str, names: set[str]) -> str:
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in names:
                return name[: -len(suffix)]
        return name

    def check_names(where: str, expr: str) -> list[str]:
        names = sorted(set(METRIC_RE.findall(expr)))
        for name in names:
            if known is not None and family_of(name, known) not in known:
                fail(f"[{where}] {name} is not a metric the daemon declares ({args.names_from})")
            if exported is not None and family_of(name, exported) not in exported:
                if name in args.allow_empty and known is not None and name in known:
                    print(f"--    [{where}] {name}: no samples yet (allowed empty)")
                else:
                    fail(f"[{where}] {name} is not exported by the daemon")
        return names

    # Template variables.
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        where = f"variable ${var.get('name')}"
        ds = var.get("datasource") or {}
        if isinstance(ds, dict) and ds.get("uid") != "${datasource}":
            fail(f"[{where}] datasource is {ds!r}, want uid ${{datasource}}")
        m = LABEL_VALUES_RE.match(query or "")
        if not m:
            fail(f"[{where}] unsupported variable query {query!r}")
            continue
        check_names(where, query)
        match, label = m.group("match"), m.group("label")
        # label_values(metric, label) = the label's values over the metric's series.
        expr = f"count by ({label}) ({match})" if match else f"count by ({label}) ({{{label}!=\"\"}})"
        result = prom_query(args.prom_url, expr)
        if result.get("status") != "success":
            fail(f"[{where}] {query}\n      {result.get('errorType')}: {result.get('error')}")
            continue
        found = [s["metric"].get(label) for s in result["data"]["result"]]
        if args.require_data and not found:
            fail(f"[{where}] {query}: no values")
        else:
            print(f"ok    [{where}] {query}  ({len(found)} values: {', '.join(map(str, found[:5]))})")

    # Panels.
    count = 0
    for panel in walk_panels(dash.get("panels")):
        title = panel.get("title", f"panel {panel.get('id')}")
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not targets:
            fail(f"[{title}] panel has no targets")
            continue
        ds = panel.get("datasource") or {}
        if ds.get("uid") != "${datasource}":
            fail(f"[{title}] panel datasource is {ds!r}, want uid ${{datasource}}")
        for tgt in targets:
            where = f"{title} / {tgt.get('refId', '?')}"
            if (tgt.get("datasource") or {}).get("uid") != "${datasource}":
                fail(f"[{where}] target datasource is {tgt.get('datasource')!r}, want uid ${{datasource}}")
            raw = tgt.get("expr")
            if not raw:
                fail(f"[{where}] target has no expr")
                continue
            count += 1
            expr, unknown = substitute(raw, values)
            if unknown:
                fail(f"[{where}] unknown variables {sorted(set(unknown))} in {raw}")
                continue
            names = check_names(where, raw)
            if not names:
                fail(f"[{where}] no mongo_syncd_* metric in {raw}")
            result = prom_query(args.prom_url, expr)
            if result.get("status") != "success":
                fail(f"[{where}] {expr}\n      {result.get('errorType')}: {result.get('error')}")
                continue
            series = result["data"]["result"]
            n = len(series) if isinstance(series, list) else 1
            if n == 0 and args.require_data:
                if names and all(name in args.allow_empty for name in names):
                    print(f"empty [{where}] {expr}  (allowed: {', '.join(names)})")
                else:
                    fail(f"[{where}] {expr}\n      no series (--require-data)")
                continue
            print(f"ok    [{where}] {expr}  ({n} series)")

    if count == 0:
        fail("no queries found in the dashboard")
    print(f"--    {count} panel queries, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
