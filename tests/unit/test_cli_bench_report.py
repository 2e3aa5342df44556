"""ghz-compatible report building and bench helpers, without sockets."""

from __future__ import annotations

import json

import pytest

from hashmesh.cli.bench import (
    LoadPlan,
    build_request,
    carries_secret,
    parse_duration,
    plan_shares,
    resolve_method,
)
from hashmesh.cli.bench_report import (
    PERCENTILES,
    CallResults,
    build_report,
    every_call_failed,
    format_csv,
    format_summary,
    go_error,
    go_status,
    histogram,
    latency_distribution,
)
from hashmesh.cli.client import CliError


def _results(latencies_ms: list[float], statuses: list[str] | None = None) -> CallResults:
    results = CallResults()
    for i, ms in enumerate(latencies_ms):
        status = statuses[i] if statuses else "OK"
        error = "" if status == "OK" else go_error("RESOURCE_EXHAUSTED", "slow down")
        results.add(1_700_000_000_000_000_000 + i, int(ms * 1e6), status, error)
    return results


def test_report_has_ghz_fields_and_units() -> None:
    latencies = [float(i) for i in range(1, 101)]  # 1..100 ms
    results = _results([*latencies, 500.0], ["OK"] * 100 + ["ResourceExhausted"])
    report = build_report(
        results, total_ns=2_000_000_000, options={"call": "x"}, end_reason="normal"
    )
    for key in (
        "date",
        "count",
        "total",
        "average",
        "fastest",
        "slowest",
        "rps",
        "histogram",
        "latencyDistribution",
        "statusCodeDistribution",
        "errorDistribution",
        "options",
        "details",
    ):
        assert key in report
    assert report["count"] == 101
    assert report["total"] == 2_000_000_000 and isinstance(report["total"], int)
    # fastest/slowest count successful calls only, in integer nanoseconds
    assert report["fastest"] == 1_000_000 and report["slowest"] == 100_000_000
    assert report["rps"] == pytest.approx(50.5)
    assert report["statusCodeDistribution"] == {"OK": 100, "ResourceExhausted": 1}
    assert report["errorDistribution"] == {
        "rpc error: code = ResourceExhausted desc = slow down": 1
    }
    assert [p["percentage"] for p in report["latencyDistribution"]] == list(PERCENTILES)
    p50 = next(p for p in report["latencyDistribution"] if p["percentage"] == 50)
    assert p50["latency"] == 50_000_000
    marks = [b["mark"] for b in report["histogram"]]
    assert marks[0] == pytest.approx(0.001) and marks[-1] == pytest.approx(0.1)  # seconds
    assert sum(b["count"] for b in report["histogram"]) == 100
    assert report["details"][0]["status"] == "OK" and report["details"][0]["timestamp"].endswith(
        "Z"
    )
    json.dumps(report)


def test_percentiles_follow_ghz_nearest_rank() -> None:
    ten = [i / 1000 for i in range(1, 11)]
    points = {p["percentage"]: p["latency"] for p in latency_distribution(ten)}
    assert points[10] == 1_000_000  # 0.1*10 = 1 is whole: index 0
    assert points[99] == 10_000_000
    assert histogram([0.5])[0]["count"] == 1


def test_empty_run_reports_zeroes() -> None:
    report = build_report(CallResults(), total_ns=1, options={}, end_reason="cancel")
    assert report["count"] == 0 and report["histogram"] is None and report["endReason"] == "cancel"


def test_summary_and_csv_look_like_ghz() -> None:
    report = build_report(_results([1.0, 2.0, 3.0]), 10_000_000, {}, "normal")
    text = format_summary(report)
    for heading in (
        "Summary:",
        "Count:",
        "Requests/sec:",
        "Response time histogram:",
        "Latency distribution:",
        "Status code distribution:",
        "[OK]",
    ):
        assert heading in text
    lines = format_csv(report).splitlines()
    assert lines[0] == "duration (ms),status,error" and lines[1] == "1.00,OK,"


def test_status_names_are_go_spellings() -> None:
    assert go_status("RESOURCE_EXHAUSTED") == "ResourceExhausted"
    assert go_status("CANCELLED") == "Canceled"
    assert go_status("UNAVAILABLE") == "Unavailable"


def test_durations_parse_like_go() -> None:
    assert parse_duration("10s") == 10
    assert parse_duration("1m30s") == 90
    assert parse_duration("250ms") == pytest.approx(0.25)
    assert parse_duration("2") == 2
    with pytest.raises(CliError):
        parse_duration("ten seconds")


def test_method_resolution_and_request_building() -> None:
    method = resolve_method("hashmesh.v1.HashService.Hash")
    assert method.full_name == "hashmesh.v1.HashService.Hash"
    assert resolve_method("/hashmesh.v1.HashService/Hash") is method
    request = build_request(method, '{"algorithm": "ALGORITHM_SHA256", "data": "aGVsbG8="}')
    assert request.data == b"hello"  # type: ignore[attr-defined]
    with pytest.raises(CliError):
        resolve_method("hashmesh.v1.HashService.HashStream")  # streaming
    with pytest.raises(CliError):
        resolve_method("nope.Service.Method")
    with pytest.raises(CliError):
        build_request(method, '{"algorithm": "ALGORITHM_SHA256", "bogus": 1}')


def test_argon2_requests_are_recognised_as_secret() -> None:
    hash_method = resolve_method("hashmesh.v1.HashService.Hash")
    assert carries_secret(
        build_request(hash_method, '{"algorithm": "ALGORITHM_ARGON2ID", "data": "cHc="}')
    )
    assert not carries_secret(
        build_request(hash_method, '{"algorithm": "ALGORITHM_MD5", "data": "cHc="}')
    )
    verify = resolve_method("hashmesh.v1.HashService.Verify")
    assert carries_secret(
        build_request(verify, '{"data": "cHc=", "encoded": "$argon2id$v=19$m=8,t=1,p=1$x$y"}')
    )
    submit = resolve_method("hashmesh.v1.TaskService.SubmitTasks")
    assert carries_secret(build_request(submit, '{"specs": [{"algorithm": "ALGORITHM_ARGON2ID"}]}'))


def test_load_is_split_over_processes() -> None:
    plan = LoadPlan(
        "t",
        "/p",
        b"",
        (),
        concurrency=5,
        total=11,
        duration=None,
        rps=100.0,
        timeout=1.0,
        connections=1,
    )
    shares = plan_shares(plan, 2)
    assert [s.concurrency for s in shares] == [3, 2]
    assert sum(s.total or 0 for s in shares) == 11
    assert all(s.rps == 50.0 for s in shares)
    assert len(plan_shares(plan, 50)) == 5  # never more processes than callers


def test_average_counts_successful_calls_only_and_lies_between_fastest_and_slowest() -> None:
    # Fast failures (a refused call answers in microseconds) must not drag the average down.
    results = _results([10.0, 20.0, 30.0, 0.01, 0.01, 0.01], ["OK"] * 3 + ["ResourceExhausted"] * 3)
    report = build_report(results, total_ns=1_000_000_000, options={}, end_reason="normal")
    assert report["average"] == 20_000_000
    assert report["fastest"] <= report["average"] <= report["slowest"]
    assert "Average:\t20.00 ms" in format_summary(report)


def test_a_run_where_every_call_failed_is_a_failure() -> None:
    refused = build_report(
        _results([0.1, 0.2], ["ResourceExhausted"] * 2), total_ns=1, options={}, end_reason="normal"
    )
    assert every_call_failed(refused) == (
        "RESOURCE_EXHAUSTED",
        "rpc error: code = ResourceExhausted desc = slow down",
    )
    assert refused["average"] == 0 and refused["fastest"] == 0
    one_ok = build_report(
        _results([0.1, 5.0], ["ResourceExhausted", "OK"]),
        total_ns=1,
        options={},
        end_reason="normal",
    )
    assert every_call_failed(one_ok) is None
    nothing = build_report(CallResults(), total_ns=1, options={}, end_reason="normal")
    assert every_call_failed(nothing) == ("UNKNOWN", "no call was made")
