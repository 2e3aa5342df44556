"""``hashctl bench``: a ghz-compatible load generator for unary hashmesh calls.

The request is built once from JSON (``-d``) and sent as bytes on the generic call path, and
replies are not decoded, so a caller costs little; ``--procs`` spreads the load over several
processes (each with its own event loop and connections) and merges their results into one
ghz report (``hashmesh.cli.bench_report``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import queue as queue_module
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import descriptor, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hashmesh.cli.bench_report import (
    CallResults,
    build_report,
    every_call_failed,
    format_csv,
    format_summary,
    go_error,
    go_status,
)
from hashmesh.cli.client import CliError, ExitCode, aio_channel, channel_security, exit_code_of
from hashmesh.cli.state import state_of
from hashmesh.core.tls import ClientTls
from hashmesh.v1 import admin_pb2, cache_pb2, common_pb2, hash_pb2, task_pb2

_REGISTERED = (admin_pb2, cache_pb2, hash_pb2, task_pb2)  # importing them fills the descriptor pool
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
PROGRESS_EVERY = 64


def parse_duration(text: str) -> float:
    """A Go duration (``10s``, ``1m30s``, ``250ms``) or a bare number of seconds → seconds."""
    cleaned = text.strip()
    try:
        return float(cleaned)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(cleaned)
    if not parts or "".join(n + u for n, u in parts) != cleaned:
        raise CliError(
            f"bad duration {text!r} (use e.g. 10s, 500ms, 1m30s)", ExitCode.INVALID_ARGUMENT
        )
    return sum(float(n) * _UNITS[u] for n, u in parts)


def resolve_method(call: str) -> descriptor.MethodDescriptor:
    """``hashmesh.v1.HashService.ComputeHash`` (ghz form) or ``/hashmesh.v1.HashService/ComputeHash``."""
    name = call.strip().lstrip("/").replace("/", ".")
    try:
        method = descriptor_pool.Default().FindMethodByName(name)
    except KeyError:
        raise CliError(
            f"unknown method {call!r} (e.g. hashmesh.v1.HashService.ComputeHash)",
            ExitCode.INVALID_ARGUMENT,
        ) from None
    if method.client_streaming or method.server_streaming:
        raise CliError(
            f"{name} is a streaming method; bench drives unary methods", ExitCode.INVALID_ARGUMENT
        )
    return method


def build_request(method: descriptor.MethodDescriptor, data: str | None) -> Message:
    request = message_factory.GetMessageClass(method.input_type)()
    if data:
        try:
            json_format.ParseDict(json.loads(data), request)
        except (json.JSONDecodeError, json_format.ParseError) as exc:
            raise CliError(
                f"bad -d data for {method.input_type.full_name}: {exc}", ExitCode.INVALID_ARGUMENT
            ) from None
    return request


def carries_secret(message: Message) -> bool:
    """True when the request holds an argon2id password (its data must never be echoed)."""
    for field, value in message.ListFields():
        if field.name == "algorithm" and value == common_pb2.ALGORITHM_ARGON2ID:
            return True
        if field.name == "argon2" or (isinstance(value, str) and value.startswith("$argon2")):
            return True
        if field.type == field.TYPE_MESSAGE:
            items = value if field.is_repeated else [value]
            if any(isinstance(item, Message) and carries_secret(item) for item in items):
                return True
    return False


@dataclass(frozen=True)
class LoadPlan:
    """One process's share of the load."""

    target: str
    path: str
    payload: bytes
    metadata: tuple[tuple[str, str], ...]
    concurrency: int
    total: int | None
    duration: float | None
    rps: float | None
    timeout: float
    connections: int
    tls: ClientTls | None = None
    """hashctl's TLS options; each load process reads the files itself."""


def split(value: int, parts: int) -> list[int]:
    return [value // parts + (1 if i < value % parts else 0) for i in range(parts)]


def plan_shares(plan: LoadPlan, procs: int) -> list[LoadPlan]:
    procs = max(1, min(procs, plan.concurrency, plan.total or plan.concurrency))
    concurrency = split(plan.concurrency, procs)
    totals = split(plan.total, procs) if plan.total is not None else [None] * procs
    rps = plan.rps / procs if plan.rps else None
    return [
        LoadPlan(
            plan.target,
            plan.path,
            plan.payload,
            plan.metadata,
            c,
            t,
            plan.duration,
            rps,
            plan.timeout,
            plan.connections,
            plan.tls,
        )
        for c, t in zip(concurrency, totals, strict=True)
    ]


@dataclass(frozen=True)
class Signals:
    """Shared between the load processes: calls done (progress), processes ready, go, stop."""

    done: Synchronized[int]
    ready: Synchronized[int]
    go: Any
    stop: Any


async def _drive(plan: LoadPlan, signals: Signals) -> CallResults:
    loop = asyncio.get_running_loop()
    # Same transport security as every other hashctl channel.
    channels = [
        aio_channel(
            plan.target,
            plan.tls,
            [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)],
        )
        for _ in range(max(1, plan.connections))
    ]
    # bytes in, bytes out: no serializers
    calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
        channel.unary_unary(plan.path) for channel in channels
    ]
    results = CallResults()
    remaining = [plan.total]
    deadline = loop.time() + plan.duration if plan.duration else None
    interval = 1.0 / plan.rps if plan.rps else None
    next_slot = [loop.time()]
    metadata = plan.metadata or None

    async def caller(index: int) -> None:
        call = calls[index % len(calls)]
        unreported = 0
        while not stop.is_set():
            if remaining[0] is not None:
                if remaining[0] <= 0:
                    break
                remaining[0] -= 1
            if interval is not None:
                slot = max(next_slot[0], loop.time())
                next_slot[0] = slot + interval
                if slot > loop.time():
                    await asyncio.sleep(slot - loop.time())
            if deadline is not None and loop.time() >= deadline:
                break
            started_wall = time.time_ns()
            started = time.perf_counter_ns()
            try:
                await call(plan.payload, timeout=plan.timeout, metadata=metadata)
                status, error = "OK", ""
            except grpc.aio.AioRpcError as err:
                status, error = (
                    go_status(err.code().name),
                    go_error(err.code().name, err.details() or ""),
                )
            results.add(started_wall, time.perf_counter_ns() - started, status, error)
            unreported += 1
            if unreported >= PROGRESS_EVERY:
                with done.get_lock():
                    done.value += unreported
                unreported = 0
        with done.get_lock():
            done.value += unreported

    # Every process starts together, so the wall time measured is the load's alone.
    with signals.ready.get_lock():
        signals.ready.value += 1
    await asyncio.to_thread(signals.go.wait)
    done, stop = signals.done, signals.stop
    deadline = loop.time() + plan.duration if plan.duration else None
    next_slot[0] = loop.time()
    results.started_ns = time.time_ns()
    try:
        await asyncio.gather(*(caller(i) for i in range(plan.concurrency)))
        results.ended_ns = time.time_ns()
    finally:
        for channel in channels:
            await channel.close()
    return results


def run_share(plan: LoadPlan, signals: Signals) -> CallResults:
    return asyncio.run(_drive(plan, signals))


def _process_main(plan: LoadPlan, signals: Signals, queue: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    queue.put(run_share(plan, signals))


def run_load(plan: LoadPlan, procs: int, progress: Progress | None) -> tuple[CallResults, int, str]:
    """Run ``plan`` over ``procs`` processes; returns the merged results, the wall time (ns)
    and ghz's end reason (normal, timeout or cancel)."""
    context = multiprocessing.get_context("spawn")
    signals = Signals(
        done=context.Value("q", 0),
        ready=context.Value("i", 0),
        go=context.Event(),
        stop=context.Event(),
    )
    done = signals.done
    shares = plan_shares(plan, procs)
    merged = CallResults()
    outputs: list[CallResults] = []
    started = time.perf_counter_ns()
    if len(shares) == 1:
        runner = threading.Thread(
            target=lambda: outputs.append(run_share(shares[0], signals)), daemon=True
        )
        runner.start()
        workers: list[Any] = [runner]
        queue = None
    else:
        queue = context.Queue()
        workers = [
            context.Process(target=_process_main, args=(share, signals, queue), daemon=True)
            for share in shares
        ]
        for worker in workers:
            worker.start()
    bar = progress.add_task("bench", total=plan.total) if progress is not None else None
    reason = "normal"
    try:
        collected = 0
        while collected < len(shares):
            if not signals.go.is_set() and signals.ready.value >= len(shares):
                signals.go.set()
            if progress is not None and bar is not None:
                progress.update(bar, completed=done.value)
            if queue is not None:
                with contextlib.suppress(queue_module.Empty):
                    outputs.append(queue.get(timeout=0.1))
            else:
                workers[0].join(0.1)
            collected = len(outputs)
            if (
                queue is not None
                and collected < len(shares)
                and not any(w.is_alive() for w in workers)
                and queue.empty()
            ):
                raise CliError("a load process died before reporting")
    except KeyboardInterrupt:
        reason = "cancel"
        signals.stop.set()
        signals.go.set()
        if queue is not None:
            while len(outputs) < len(shares):
                outputs.append(queue.get(timeout=30))
        else:
            workers[0].join(30)
    total_ns = time.perf_counter_ns() - started
    for worker in workers:
        worker.join(5)
    for output in outputs:
        merged.extend(output)
    if merged.started_ns and merged.ended_ns > merged.started_ns:
        total_ns = merged.ended_ns - merged.started_ns  # the load itself, not process start-up
    if reason == "normal" and plan.duration:
        reason = "timeout"
    return merged, total_ns, reason


def report_options(
    plan: LoadPlan,
    call: str,
    request: Message,
    data: str | None,
    metadata: dict[str, str],
    procs: int,
    name: str | None,
) -> dict[str, Any]:
    """ghz's ``options`` object; request data is left out when it holds an argon2id password."""
    options: dict[str, Any] = {"host": plan.target, "call": call, "insecure": plan.tls is None}
    if plan.total is not None and not plan.duration:
        options["total"] = plan.total
    options["concurrency"] = plan.concurrency
    if plan.rps:
        options["qps"] = int(plan.rps)
    options["connections"] = plan.connections
    if plan.duration:
        options["duration"] = int(plan.duration * 1e9)
    options["timeout"] = int(plan.timeout * 1e9)
    if data and not carries_secret(request):
        options["data"] = json.loads(data)
    options["binary"] = False
    if metadata:
        options["metadata"] = {
            k: ("<redacted>" if k.lower() == "authorization" else v) for k, v in metadata.items()
        }
    options["CPUs"] = os.cpu_count() or 1
    options["procs"] = procs
    if name:
        options["name"] = name
    return options


def bench_command(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Argument(help="host:port to load (default: --target).")
    ] = None,
    call: Annotated[
        str,
        typer.Option(
            "--call", help="Fully-qualified method, e.g. hashmesh.v1.HashService.ComputeHash."
        ),
    ] = "hashmesh.v1.HashService.ComputeHash",
    concurrency: Annotated[
        int, typer.Option("-c", "--concurrency", help="Concurrent callers.", min=1)
    ] = 50,
    total: Annotated[
        int, typer.Option("-n", "--total", help="Calls to make (ignored with -z).", min=1)
    ] = 200,
    duration: Annotated[
        str | None, typer.Option("-z", "--duration", help="Run for this long (e.g. 10s).")
    ] = None,
    rps: Annotated[
        float | None,
        typer.Option("-r", "--rps", help="Rate limit, calls per second in total.", min=0.001),
    ] = None,
    data: Annotated[
        str | None, typer.Option("-d", "--data", help="Request as JSON (bytes base64).")
    ] = None,
    data_file: Annotated[
        Path | None, typer.Option("-D", "--data-file", help="Read -d JSON from this file.")
    ] = None,
    metadata: Annotated[
        str | None, typer.Option("-m", "--metadata", help="Request metadata as a JSON object.")
    ] = None,
    output_format: Annotated[
        str, typer.Option("-O", "--format", help="summary, json, pretty or csv.")
    ] = "summary",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the report here, not stdout.")
    ] = None,
    call_timeout: Annotated[
        str, typer.Option("-t", "--timeout", help="Deadline of each call.")
    ] = "20s",
    connections: Annotated[
        int, typer.Option("--connections", help="Connections per process.", min=1)
    ] = 1,
    procs: Annotated[
        int, typer.Option("--procs", help="Processes generating load (merged report).", min=1)
    ] = 1,
    name: Annotated[
        str | None, typer.Option("--name", help="Name of the run, kept in the report.")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plaintext (accepted for ghz compatibility).")
    ] = True,
) -> None:
    """Load-test a unary method, ghz-style, and print ghz's report.

    Flags follow ghz (--call, -c, -n, -z, --rps, -d, -m, -O summary|json|csv); `-O json` is
    read by tools that read ghz reports. argon2id request data is never echoed.

    Examples:

      hashctl bench --call hashmesh.v1.HashService.ComputeHash -d '{"algorithm":"ALGORITHM_SHA256","data":"aGVsbG8="}' -n 2000 -c 50

      hashctl bench -d '{"algorithm":"ALGORITHM_SHA256","data":"aGVsbG8="}' -z 10s --rps 500 --procs 2 -O json -o report.json 127.0.0.1:50050

    Exits non-zero (with the code of the most frequent status) when no call succeeded.
    """
    state = state_of(ctx)
    if output_format not in ("summary", "json", "pretty", "csv"):
        raise CliError(
            f"unknown -O {output_format!r}: use summary, json, pretty or csv", ExitCode.USAGE
        )
    if data_file is not None:
        data = data_file.read_text(encoding="utf-8")
    method = resolve_method(call)
    request = build_request(method, data)
    try:
        meta: dict[str, str] = json.loads(metadata) if metadata else {}
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise CliError(
            f"bad -m metadata (a JSON object of strings): {exc}", ExitCode.INVALID_ARGUMENT
        ) from None
    if state.options.client_id and "x-client-id" not in meta:
        meta["x-client-id"] = state.options.client_id
    if state.options.api_key and "x-api-key" not in meta:
        meta["x-api-key"] = state.options.api_key
    seconds = parse_duration(duration) if duration else None
    plan = LoadPlan(
        target=host or state.options.target,
        path=f"/{method.containing_service.full_name}/{method.name}",
        payload=request.SerializeToString(),
        metadata=tuple((k.lower(), str(v)) for k, v in meta.items()),
        concurrency=concurrency,
        total=None if seconds else total,
        duration=seconds,
        rps=rps,
        timeout=parse_duration(call_timeout),
        connections=connections,
        tls=state.options.tls,
    )
    channel_security(plan.tls)  # an unreadable certificate fails here, not in every load process
    err_console = Console(file=sys.stderr)
    progress = Progress(
        TextColumn("bench"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not sys.stderr.isatty(),
    )
    with progress:
        results, total_ns, reason = run_load(plan, procs, progress)
    method_name = f"{method.containing_service.full_name}.{method.name}"
    report = build_report(
        results,
        total_ns,
        report_options(plan, method_name, request, data, meta, procs, name),
        reason,
        name=name,
    )
    if output_format == "json":
        text = json.dumps(report) + "\n"
    elif output_format == "pretty":
        text = json.dumps(report, indent=2) + "\n"
    elif output_format == "csv":
        text = format_csv(report)
    else:
        text = format_summary(report)
    if output is not None:
        output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    failed = every_call_failed(report)
    if failed is not None:
        status, error = failed
        hint = (
            " (the request is built from -d; see `hashctl bench --help`)"
            if status == "INVALID_ARGUMENT"
            else ""
        )
        raise CliError(f"every call failed: {error}{hint}", exit_code_of(grpc.StatusCode[status]))
