"""Writes dashboards/hashmesh.json, the Grafana dashboard of the mesh (run after changing a
panel: ``python deploy/grafana/dashboard.py``; a test checks the JSON matches this script).

Metric names are those of ``hashmesh.core.metrics``; queries use ``job`` as set by both the
compose and the Kubernetes scrape configurations (hashd, balancer, workerd)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards" / "hashmesh.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(
    title: str,
    exprs: list[tuple[str, str]],
    *,
    unit: str = "short",
    kind: str = "timeseries",
    w: int = 12,
    h: int = 8,
    description: str = "",
) -> dict[str, Any]:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "right",
                "calcs": ["lastNotNull", "max"],
            }
        }
        if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}},
        "targets": [target(e, legend, chr(ord("A") + i)) for i, (e, legend) in enumerate(exprs)],
    }


def row(title: str) -> dict[str, Any]:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"w": 24, "h": 1},
        "panels": [],
    }


def quantiles(metric: str, by: str, selector: str = "") -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{selector}{RATE})))",
            f"p{int(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.99)
    ]


CALLS = "hashmesh_grpc_server_handled_total"
# Health checks (probes, the balancer's checks) are not calls: they would water the ratios down.
SEL = '{job=~"$job", grpc_service!="grpc.health.v1.Health"}'
ERR_SEL = '{job=~"$job", grpc_service!="grpc.health.v1.Health", grpc_code!="OK"}'

PANELS: list[dict[str, Any]] = [
    row("Throughput and errors"),
    panel(
        "Calls per second by method",
        [(f"sum by (job, grpc_method) (rate({CALLS}{SEL}{RATE}))", "{{job}} {{grpc_method}}")],
        unit="reqps",
        description="Completed gRPC calls, every status code.",
    ),
    panel(
        "Errors per second by code",
        [(f"sum by (job, grpc_code) (rate({CALLS}{ERR_SEL}{RATE}))", "{{job}} {{grpc_code}}")],
        unit="reqps",
        description="Calls that ended with a status other than OK.",
    ),
    panel(
        "Error ratio",
        [
            (
                f"sum by (job) (rate({CALLS}{ERR_SEL}{RATE})) / sum by (job) (rate({CALLS}{SEL}{RATE}))",
                "{{job}}",
            )
        ],
        unit="percentunit",
        kind="stat",
        w=6,
        h=6,
    ),
    panel(
        "Calls in flight",
        [(f"sum by (job) (hashmesh_grpc_server_in_flight_calls{SEL})", "{{job}}")],
        kind="stat",
        w=6,
        h=6,
    ),
    panel(
        "Balancer refusals",
        [
            ("sum(rate(hashmesh_balancer_rate_limited_total[$__rate_interval]))", "rate limited"),
            (
                "sum(rate(hashmesh_balancer_auth_failures_total[$__rate_interval]))",
                "unauthenticated",
            ),
            ("sum(rate(hashmesh_balancer_no_backend_total[$__rate_interval]))", "no replica ready"),
        ],
        unit="reqps",
        w=12,
        h=6,
    ),
    row("Latency"),
    panel(
        "Latency by method (p50, p99)",
        quantiles("hashmesh_grpc_server_handling_seconds", "grpc_method", SEL),
        unit="s",
        w=24,
    ),
    row("Replica health (balancer)"),
    panel(
        "Replicas in rotation",
        [
            ("max(sum by (instance) (hashmesh_balancer_backend_up))", "in rotation"),
            ("max(hashmesh_balancer_backends)", "known"),
            ('count(up{job="hashd"} == 1)', "scraped up"),
        ],
        kind="stat",
        w=6,
    ),
    panel(
        "Picks per second by replica",
        [
            (
                "sum by (backend) (rate(hashmesh_balancer_picks_total[$__rate_interval]))",
                "{{backend}}",
            )
        ],
        unit="reqps",
        w=9,
    ),
    panel(
        "Calls in flight per replica",
        [("sum by (backend) (hashmesh_balancer_backend_in_flight_calls)", "{{backend}}")],
        w=9,
    ),
    panel(
        "Replica up (1) / out of rotation (0)",
        [("min by (backend) (hashmesh_balancer_backend_up)", "{{backend}}")],
        w=8,
    ),
    panel(
        "Ejections per minute by replica",
        [("sum by (backend) (increase(hashmesh_balancer_ejections_total[1m]))", "{{backend}}")],
        w=8,
    ),
    panel(
        "Retries and replica errors per second",
        [
            ("sum(rate(hashmesh_balancer_retries_total[$__rate_interval]))", "retries"),
            (
                "sum by (backend) (rate(hashmesh_balancer_backend_errors_total[$__rate_interval]))",
                "errors {{backend}}",
            ),
        ],
        unit="reqps",
        w=8,
    ),
    row("Task queue"),
    panel(
        "Queue depth by status",
        [
            (
                'max by (status) (hashmesh_task_queue_depth{status=~"pending|running|retrying|dead_letter"})',
                "{{status}}",
            )
        ],
        w=12,
        description="Every hashd reports the same queue, hence max rather than sum.",
    ),
    panel(
        "Task throughput",
        [
            ("sum(rate(hashmesh_tasks_submitted_total[$__rate_interval]))", "submitted"),
            ("sum(rate(hashmesh_tasks_claimed_total[$__rate_interval]))", "claimed"),
            ("sum(rate(hashmesh_tasks_succeeded_total[$__rate_interval]))", "succeeded"),
            ("sum(rate(hashmesh_tasks_failed_total[$__rate_interval]))", "failed attempts"),
            ("sum(rate(hashmesh_tasks_dead_lettered_total[$__rate_interval]))", "dead-lettered"),
        ],
        unit="ops",
        w=12,
    ),
    panel(
        "Submit to final latency (p50, p99)",
        quantiles("hashmesh_task_latency_seconds", "algorithm"),
        unit="s",
        w=12,
    ),
    panel(
        "Tasks running per worker",
        [("sum by (instance) (hashmesh_worker_in_flight_tasks)", "{{instance}}")],
        w=12,
    ),
    row("Cache, CPU and database"),
    panel(
        "Cache hit ratio by tier",
        [
            (
                "sum by (tier) (rate(hashmesh_cache_hits_total[$__rate_interval])) / (sum by (tier) "
                "(rate(hashmesh_cache_hits_total[$__rate_interval])) + sum by (tier) "
                "(rate(hashmesh_cache_misses_total[$__rate_interval])))",
                "{{tier}}",
            )
        ],
        unit="percentunit",
        w=8,
    ),
    panel(
        "hashd CPU queue",
        [
            ("sum by (instance) (hashmesh_hashd_cpu_queued_calls)", "queued {{instance}}"),
            ("sum(rate(hashmesh_hashd_cpu_refused_total[$__rate_interval]))", "refused/s"),
        ],
        w=8,
    ),
    panel(
        "Database pool",
        [
            ("sum by (job, pool) (hashmesh_db_pool_connections)", "{{job}} open"),
            ("sum by (job, pool) (hashmesh_db_pool_idle_connections)", "{{job}} idle"),
            ("sum by (job, pool) (hashmesh_db_pool_waiting_requests)", "{{job}} waiting"),
            ("sum by (job, pool) (hashmesh_db_pool_max_connections)", "{{job}} max"),
        ],
        w=8,
    ),
    panel(
        "Database errors per second",
        [
            (
                "sum by (job) (rate(hashmesh_db_pool_request_errors_total[$__rate_interval]))",
                "{{job}} pool request errors",
            ),
            (
                "sum by (job) (rate(hashmesh_db_pool_connection_errors_total[$__rate_interval]))",
                "{{job}} connection errors",
            ),
            ("sum by (job) (rate(hashmesh_db_retries_total[$__rate_interval]))", "{{job}} retries"),
        ],
        unit="ops",
        w=24,
        h=6,
    ),
]


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ids and positions: left to right, wrapping at 24 columns."""
    x = y = row_height = 0
    for number, item in enumerate(panels, start=1):
        item["id"] = number
        pos = item["gridPos"]
        if item["type"] == "row" or x + pos["w"] > 24:
            x, y = 0, y + row_height
            row_height = 0
        pos["x"], pos["y"] = x, y
        x += pos["w"]
        row_height = max(row_height, pos["h"])
        if item["type"] == "row":
            x, y, row_height = 0, y + pos["h"], 0
    return panels


def dashboard() -> dict[str, Any]:
    return {
        "uid": "hashmesh",
        "title": "hashmesh",
        "tags": ["hashmesh"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Data source",
                    "current": {"text": "Prometheus", "value": "prometheus"},
                },
                {
                    "name": "job",
                    "type": "query",
                    "datasource": DS,
                    "label": "Component",
                    "query": {
                        "query": "label_values(hashmesh_grpc_server_handled_total, job)",
                        "refId": "job",
                    },
                    "definition": "label_values(hashmesh_grpc_server_handled_total, job)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "refresh": 2,
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "annotations": {"list": []},
        "panels": layout(PANELS),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
