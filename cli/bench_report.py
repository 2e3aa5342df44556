"""ghz-compatible load-test reports, as pure functions over call results (no I/O, no gRPC).

Field names, units and rules follow ghz's runner/reporter.go so tools that read ghz reports
read ours: durations are integer nanoseconds, histogram marks are seconds, the latency
distribution has the fixed percentiles 10/25/50/75/90/95/99, status keys are spelled as
gRPC-Go spells codes (``OK``, ``ResourceExhausted``), errors as ``rpc error: code = X desc = Y``.
Fastest, slowest, average, the histogram and the distribution count successful calls only, as
ghz's do (so the average always lies between the fastest and the slowest)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
HISTOGRAM_BUCKETS = 10
MAX_DETAILS = 1_000_000

# grpc.StatusCode names (Python) -> codes.Code.String() (gRPC-Go, as ghz prints them).
GO_STATUS_NAMES = {
    "OK": "OK",
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}


def go_status(python_name: str) -> str:
    return GO_STATUS_NAMES.get(python_name, python_name)


def go_error(python_name: str, details: str) -> str:
    return f"rpc error: code = {go_status(python_name)} desc = {details}"


@dataclass
class CallResults:
    """Results of calls, in columns (cheap to pickle between processes)."""

    timestamps_ns: list[int] = field(default_factory=list)
    """Wall-clock start of each call (ns since the epoch)."""
    latencies_ns: list[int] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    """ghz spelling of the status of each call."""
    errors: list[str] = field(default_factory=list)
    """Empty for a successful call."""
    started_ns: int = 0
    """Wall clock when the load began (ns since the epoch); 0 when not known."""
    ended_ns: int = 0
    """Wall clock when the last call ended."""

    def add(self, timestamp_ns: int, latency_ns: int, status: str, error: str) -> None:
        self.timestamps_ns.append(timestamp_ns)
        self.latencies_ns.append(latency_ns)
        self.statuses.append(status)
        self.errors.append(error)

    def extend(self, other: CallResults) -> None:
        self.timestamps_ns.extend(other.timestamps_ns)
        self.latencies_ns.extend(other.latencies_ns)
        self.statuses.extend(other.statuses)
        self.errors.extend(other.errors)
        if other.started_ns:
            self.started_ns = min(self.started_ns or other.started_ns, other.started_ns)
        self.ended_ns = max(self.ended_ns, other.ended_ns)

    def __len__(self) -> int:
        return len(self.latencies_ns)


def latency_distribution(sorted_seconds: list[float]) -> list[dict[str, int]]:
    """ghz's nearest-rank percentiles over sorted latencies (seconds) → nanoseconds."""
    if not sorted_seconds:
        return []
    count = float(len(sorted_seconds))
    out = []
    for pct in PERCENTILES:
        position = pct / 100.0 * count
        index = int(position)
        if position == float(index):
            index -= 1
        index = max(index, 0)
        out.append({"percentage": pct, "latency": int(sorted_seconds[index] * 1e9)})
    return out


def histogram(sorted_seconds: list[float]) -> list[dict[str, float | int]]:
    """ghz's 10 equal buckets between fastest and slowest (+ one at slowest), marks in seconds."""
    if not sorted_seconds:
        return []
    fastest, slowest = sorted_seconds[0], sorted_seconds[-1]
    size = (slowest - fastest) / HISTOGRAM_BUCKETS
    marks = [fastest + size * i for i in range(HISTOGRAM_BUCKETS)] + [slowest]
    counts = [0] * len(marks)
    bucket = 0
    for value in sorted_seconds:
        while value > marks[bucket] and bucket < len(marks) - 1:
            bucket += 1
        counts[bucket] += 1
    total = len(sorted_seconds)
    return [
        {"mark": mark, "count": n, "frequency": n / total}
        for mark, n in zip(marks, counts, strict=True)
    ]


def build_report(
    results: CallResults,
    total_ns: int,
    options: dict[str, Any],
    end_reason: str,
    name: str | None = None,
    date: datetime | None = None,
) -> dict[str, Any]:
    """The report ghz's ``-O json`` prints, from every call's result."""
    count = len(results)
    report: dict[str, Any] = {}
    if name:
        report["name"] = name
    report.update(
        {
            "endReason": end_reason,
            "options": options,
            "date": (date or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "count": count,
            "total": int(total_ns),
            "average": 0,
            "fastest": 0,
            "slowest": 0,
            "rps": 0.0,
            "errorDistribution": dict(Counter(e for e in results.errors if e)),
            "statusCodeDistribution": dict(Counter(results.statuses)),
            "latencyDistribution": None,
            "histogram": None,
            "details": None,
        }
    )
    if count:
        report["rps"] = count / (total_ns / 1e9) if total_ns else 0.0
        ok_ns = [
            lat for lat, err in zip(results.latencies_ns, results.errors, strict=True) if not err
        ]
        ok = sorted(lat / 1e9 for lat in ok_ns)
        if ok:
            report["average"] = int(sum(ok_ns) / len(ok_ns))
            report["fastest"] = int(ok[0] * 1e9)
            report["slowest"] = int(ok[-1] * 1e9)
            report["histogram"] = histogram(ok)
            report["latencyDistribution"] = latency_distribution(ok)
        report["details"] = [
            {"timestamp": _rfc3339(ts), "latency": lat, "error": err, "status": status}
            for ts, lat, err, status in zip(
                results.timestamps_ns[:MAX_DETAILS],
                results.latencies_ns,
                results.errors,
                results.statuses,
                strict=False,
            )
        ]
    return report


def every_call_failed(report: dict[str, Any]) -> tuple[str, str] | None:
    """``(python status name, most frequent error)`` when no call succeeded (or none was
    made), else ``None``: such a run must not exit 0."""
    statuses: dict[str, int] = report["statusCodeDistribution"]
    if statuses.get("OK", 0):
        return None
    if not statuses:
        return "UNKNOWN", "no call was made"
    go_name = max(statuses, key=lambda name: statuses[name])
    python_name = {go: py for py, go in GO_STATUS_NAMES.items()}.get(go_name, "UNKNOWN")
    errors: dict[str, int] = report["errorDistribution"]
    error = max(errors, key=lambda text: errors[text]) if errors else go_name
    return python_name, error


def _rfc3339(ns: int) -> str:
    moment = datetime.fromtimestamp(ns / 1e9, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ns % 1_000_000_000:09d}Z"


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f} ms"


def format_summary(report: dict[str, Any]) -> str:
    """The text ghz prints by default (``-O summary``)."""
    lines = ["", "Summary:"]
    if report.get("name"):
        lines.append(f"  Name:\t\t{report['name']}")
    lines += [
        f"  Count:\t{report['count']}",
        f"  Total:\t{_ms(report['total'])}",
        f"  Slowest:\t{_ms(report['slowest'])}",
        f"  Fastest:\t{_ms(report['fastest'])}",
        f"  Average:\t{_ms(report['average'])}",
        f"  Requests/sec:\t{report['rps']:.2f}",
        "",
        "Response time histogram:",
    ]
    buckets = report.get("histogram") or []
    peak = max((b["count"] for b in buckets), default=0)
    for bucket in buckets:
        bar = "∎" * (round(40 * bucket["count"] / peak) if peak else 0)
        lines.append(f"  {bucket['mark'] * 1000:.3f} [{bucket['count']}]\t|{bar}")
    lines += ["", "Latency distribution:"]
    for point in report.get("latencyDistribution") or []:
        lines.append(f"  {point['percentage']} % in {_ms(point['latency'])} ")
    lines += ["", "Status code distribution:"]
    for status, number in sorted(report["statusCodeDistribution"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  [{status}]\t{number} responses")
    if report["errorDistribution"]:
        lines += ["", "Error distribution:"]
        for error, number in sorted(report["errorDistribution"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  [{number}]\t{error}")
    return "\n".join(lines) + "\n"


def format_csv(report: dict[str, Any]) -> str:
    """ghz's ``-O csv``: one line per call."""
    rows = ["duration (ms),status,error"]
    for detail in report.get("details") or []:
        error = detail["error"]
        if any(ch in error for ch in ',"\n'):
            error = '"' + error.replace('"', '""') + '"'
        rows.append(f"{detail['latency'] / 1e6:.2f},{detail['status']},{error}")
    return "\n".join(rows) + "\n"
