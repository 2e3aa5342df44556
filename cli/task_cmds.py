"""``hashctl task …`` and ``hashctl submit``: TaskService from the command line."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from google.protobuf import timestamp_pb2
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from hashmesh.cli.client import CliError, ExitCode
from hashmesh.cli.follow import NotAccepted, TaskDidNotFinish, submit_and_follow
from hashmesh.cli.follow import follow_task as follow
from hashmesh.cli.naming import (
    ALGORITHMS,
    FINAL_STATUSES,
    STATUSES,
    algorithm_name,
    parse_algorithm,
    parse_status,
    status_name,
)
from hashmesh.cli.options import (
    HashLen,
    JsonFlag,
    MemoryCost,
    Parallelism,
    Salt,
    TimeCost,
    argon2_params,
)
from hashmesh.cli.output import Output
from hashmesh.cli.state import CliState, state_of
from hashmesh.v1 import common_pb2, task_pb2

app = typer.Typer(help="Durable hashing tasks, run by workerd.", no_args_is_help=True)

TaskId = Annotated[str, typer.Argument(help="Task id (a UUID).", show_default=False)]


def _time(stamp: timestamp_pb2.Timestamp, present: bool) -> str | None:
    if not present:
        return None
    return stamp.ToDatetime(tzinfo=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def task_dict(task: task_pb2.Task) -> dict[str, Any]:
    """A task as JSON: enum values by their short names, times in RFC 3339."""
    return {
        "id": task.id,
        "status": status_name(task.status),
        "algorithm": algorithm_name(task.algorithm),
        "priority": task.priority,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "client_id": task.client_id,
        "idempotency_key": task.idempotency_key or None,
        "result": (
            {"encoded": task.result.encoded, "cached": task.result.cached}
            if task.HasField("result")
            else None
        ),
        "last_error": task.last_error or None,
        "input_size": task.input_size,
        "worker": task.worker or None,
        "cancel_requested": task.cancel_requested,
        "created_at": _time(task.created_at, task.HasField("created_at")),
        "run_after": _time(task.run_after, task.HasField("run_after")),
        "started_at": _time(task.started_at, task.HasField("started_at")),
        "finished_at": _time(task.finished_at, task.HasField("finished_at")),
    }


def _status_style(status: int) -> str:
    styles: dict[int, str] = {
        task_pb2.TASK_STATUS_SUCCEEDED: "green",
        task_pb2.TASK_STATUS_DEAD_LETTER: "red",
        task_pb2.TASK_STATUS_CANCELLED: "yellow",
        task_pb2.TASK_STATUS_RUNNING: "cyan",
    }
    return styles.get(status, "")


def show_task(out: Output, task: task_pb2.Task) -> None:
    if out.json_mode:
        out.json(task_dict(task))
        return
    values = task_dict(task)
    values["result"] = task.result.encoded if task.HasField("result") else None
    out.fields({k: v for k, v in values.items() if v not in (None, "")}, title=f"task {task.id}")


def _exit_for_final(task: task_pb2.Task) -> None:
    """Non-zero exit when a waited-for task did not succeed."""
    if task.status == task_pb2.TASK_STATUS_DEAD_LETTER:
        raise CliError(f"task {task.id} is dead-lettered: {task.last_error or 'no error recorded'}")
    if task.status == task_pb2.TASK_STATUS_CANCELLED:
        raise CliError(f"task {task.id} was cancelled", ExitCode.FAILED_PRECONDITION)


def follow_task(state: CliState, task_id: str, timeout: float | None) -> Iterator[task_pb2.Task]:
    """Each state of the task as it changes, ending at a final state (``cli.follow``)."""
    try:
        yield from follow(state.session.tasks(), task_id, timeout=timeout,
                          call_timeout=state.options.timeout, metadata=state.session.metadata())  # fmt: skip
    except TaskDidNotFinish as exc:
        raise CliError(str(exc), ExitCode.DEADLINE_EXCEEDED) from None


def submit_and_wait(
    state: CliState, out: Output, request: task_pb2.SubmitTaskRequest, timeout: float | None
) -> task_pb2.Task:
    """Submit and follow the task to its final state in one call (``cli.follow``), with a
    spinner on a terminal."""
    states = submit_and_follow(state.session.tasks(), request, timeout=timeout,
                               call_timeout=state.options.timeout,
                               metadata=state.session.metadata())  # fmt: skip
    try:
        if not out.interactive:
            for last, _ in states:  # noqa: B007 - the last state is the answer
                pass
            return last
        with out.err_console.status("submitting") as spinner:
            for last, created in states:
                note = "" if created else " (an earlier task with this idempotency key)"
                spinner.update(f"task {last.id}: {status_name(last.status)}{note}")
        return last
    except NotAccepted as exc:
        raise CliError(str(exc), ExitCode.DEADLINE_EXCEEDED) from None
    except TaskDidNotFinish as exc:
        raise CliError(str(exc), ExitCode.DEADLINE_EXCEEDED) from None


def wait_for(
    state: CliState, out: Output, task: task_pb2.Task, timeout: float | None
) -> task_pb2.Task:
    if task.status in FINAL_STATUSES:
        return task
    last = task
    if not out.interactive:
        for last in follow_task(state, task.id, timeout):  # noqa: B007 - the last state is the answer
            pass
        return last
    with out.err_console.status(f"task {task.id}: {status_name(task.status)}") as spinner:
        for last in follow_task(state, task.id, timeout):
            spinner.update(f"task {task.id}: {status_name(last.status)}")
    return last


def _spec(
    algorithm: common_pb2.Algorithm.ValueType,
    data: bytes,
    priority: int,
    max_attempts: int,
    idempotency_key: str | None,
    delay: float,
    argon2: common_pb2.Argon2Params,
) -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(
        algorithm=algorithm,
        data=data,
        priority=priority,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key or "",
    )
    if algorithm == common_pb2.ALGORITHM_ARGON2ID:
        spec.argon2.CopyFrom(argon2)
    if delay > 0:
        spec.run_after.FromDatetime(datetime.now(UTC) + timedelta(seconds=delay))
    return spec


def _batch_lines(path: Path) -> list[bytes]:
    try:
        raw = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", ExitCode.INVALID_ARGUMENT) from None
    # Blank lines are skipped: an empty input is rarely meant, and a trailing newline is common.
    return [line for line in raw.splitlines() if line.strip()]


def submit_batch(
    state: CliState, out: Output, specs: list[task_pb2.TaskSpec], chunk: int
) -> list[task_pb2.Task]:
    """SubmitTasks in chunks of ``chunk``, with a progress bar on a terminal."""
    stub = state.session.tasks()
    tasks: list[task_pb2.Task] = []
    progress = Progress(
        TextColumn("submitting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=out.err_console,
        disable=not out.interactive,
        transient=True,
    )
    with progress:
        bar = progress.add_task("submit", total=len(specs))
        for start in range(0, len(specs), chunk):
            part = specs[start : start + chunk]
            reply = stub.SubmitTasks(
                task_pb2.SubmitTasksRequest(specs=part),
                timeout=state.options.timeout,
                metadata=state.session.metadata(),
            )
            tasks.extend(reply.tasks)
            progress.advance(bar, len(part))
    return tasks


def submit_command(
    ctx: typer.Context,
    algorithm: Annotated[
        str, typer.Argument(help=f"One of: {', '.join(ALGORITHMS)}.", show_default=False)
    ],
    text: Annotated[str | None, typer.Argument(help="Input to hash; '-' reads stdin.")] = None,
    batch: Annotated[
        Path | None,
        typer.Option(
            "--batch",
            "-b",
            help="Submit one task per line of this file ('-' for stdin), in batches.",
        ),
    ] = None,
    chunk: Annotated[
        int, typer.Option(help="Tasks per SubmitTasks call with --batch.", min=1, max=10_000)
    ] = 500,
    priority: Annotated[int, typer.Option(help="Higher runs first (-100..100).")] = 0,
    max_attempts: Annotated[
        int, typer.Option(help="Attempts before dead-letter (0 = server default).", min=0)
    ] = 0,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            help="Submitting again with this key returns the "
            "first task (with --batch: KEY:LINE per line)."
        ),
    ] = None,
    delay: Annotated[
        float, typer.Option(help="Do not run before this many seconds from now.", min=0)
    ] = 0.0,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Wait for the result (spinner on a terminal).")
    ] = False,
    wait_timeout: Annotated[
        float | None, typer.Option(help="With --wait: give up after this many seconds.")
    ] = None,
    time_cost: TimeCost = 0,
    memory_cost: MemoryCost = 0,
    parallelism: Parallelism = 0,
    hash_len: HashLen = 0,
    salt: Salt = None,
    json_out: JsonFlag = False,
) -> None:
    """Queue a hashing task (or a batch) for the workers.

    Examples:

      hashctl submit md5 hello --wait

      hashctl task submit sha256 --batch inputs.txt --json

      hashctl submit argon2id - --salt saltsalt --priority 10 < password.txt
    """
    state = state_of(ctx)
    out = state.output(json_out)
    wire_algorithm = parse_algorithm(algorithm)
    params = argon2_params(time_cost, memory_cost, parallelism, hash_len, salt)
    if batch is not None:
        if text is not None:
            raise CliError("give TEXT or --batch, not both", ExitCode.USAGE)
        lines = _batch_lines(batch)
        specs = [
            _spec(
                wire_algorithm,
                line,
                priority,
                max_attempts,
                f"{idempotency_key}:{number}" if idempotency_key else None,
                delay,
                params,
            )
            for number, line in enumerate(lines, start=1)
        ]
        tasks = submit_batch(state, out, specs, chunk)
        if wait:
            tasks = [wait_for(state, out, task, wait_timeout) for task in tasks]
        if out.json_mode:
            out.json([task_dict(task) for task in tasks])
        else:
            for task in tasks:
                result = task.result.encoded if task.HasField("result") else ""
                out.line(f"{task.id}\t{status_name(task.status)}\t{result}".rstrip())
        return
    if text is None and sys.stdin.isatty():
        raise CliError(
            "nothing to submit: give TEXT, '-' for stdin, or --batch FILE", ExitCode.USAGE
        )
    data = sys.stdin.buffer.read() if text is None or text == "-" else text.encode()
    request = task_pb2.SubmitTaskRequest(
        spec=_spec(wire_algorithm, data, priority, max_attempts, idempotency_key, delay, params)
    )
    if not wait:
        reply = state.session.tasks().SubmitTask(
            request, timeout=state.options.timeout, metadata=state.session.metadata()
        )
        if out.json_mode:
            out.json({**task_dict(reply.task), "created": reply.created})
        else:
            out.line(reply.task.id)
            if not reply.created:
                out.note("an earlier task with this idempotency key was returned")
        return
    task = submit_and_wait(state, out, request, wait_timeout)
    if out.json_mode:
        out.json(task_dict(task))
    elif task.status == task_pb2.TASK_STATUS_SUCCEEDED:
        out.line(task.result.encoded)
    _exit_for_final(task)


app.command("submit")(submit_command)


@app.command("get")
def get_command(ctx: typer.Context, task_id: TaskId, json_out: JsonFlag = False) -> None:
    """Show a task's current state.

    Example:

      hashctl task get 0b9e7c1e-3f0a-4c1b-9d6e-2a5f8c7d1e00
    """
    state = state_of(ctx)
    reply = state.session.tasks().GetTask(
        task_pb2.GetTaskRequest(id=task_id),
        timeout=state.options.timeout,
        metadata=state.session.metadata(),
    )
    show_task(state.output(json_out), reply.task)


@app.command("watch")
def watch_command(
    ctx: typer.Context,
    task_id: TaskId,
    wait_timeout: Annotated[
        float | None, typer.Option(help="Give up after this many seconds.")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object per change (JSON Lines).")
    ] = False,
) -> None:
    """Print each status change of a task as it happens, until it ends.

    Exits 0 when the task succeeds, non-zero when it is dead-lettered or cancelled.

    Example:

      hashctl task watch 0b9e7c1e-3f0a-4c1b-9d6e-2a5f8c7d1e00
    """
    state = state_of(ctx)
    out = state.output(json_out)
    last: task_pb2.Task | None = None
    for task in follow_task(state, task_id, wait_timeout):
        last = task
        if out.json_mode:
            out.json(task_dict(task))
            continue
        now = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
        detail = (
            task.result.encoded
            if task.HasField("result")
            else (task.last_error or task.worker or "")
        )
        out.line(
            f"{now}  {status_name(task.status):<12} attempt {task.attempts}/{task.max_attempts}  {detail}".rstrip(),
            style=_status_style(task.status) or None,
        )
    if last is not None:
        _exit_for_final(last)


@app.command("list")
def list_command(
    ctx: typer.Context,
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status", "-s", help=f"Only these states (repeatable): {', '.join(STATUSES)}."
        ),
    ] = None,
    algorithm: Annotated[str | None, typer.Option(help="Only this algorithm.")] = None,
    client: Annotated[str | None, typer.Option(help="Only this client id.")] = None,
    limit: Annotated[int, typer.Option(help="Tasks per page (1..1000).", min=1, max=1000)] = 50,
    page_token: Annotated[str | None, typer.Option(help="Continue from a previous page.")] = None,
    all_pages: Annotated[bool, typer.Option("--all", help="Follow every page.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """List tasks, newest first.

    Examples:

      hashctl task list --status pending --status running

      hashctl task list --algorithm argon2id --all --json
    """
    state = state_of(ctx)
    out = state.output(json_out)
    request = task_pb2.ListTasksRequest(
        client_id=client or "",
        statuses=[parse_status(s) for s in status or []],
        algorithm=parse_algorithm(algorithm) if algorithm else common_pb2.ALGORITHM_UNSPECIFIED,
        page_size=limit,
        page_token=page_token or "",
    )
    tasks: list[task_pb2.Task] = []
    while True:
        reply = state.session.tasks().ListTasks(
            request, timeout=state.options.timeout, metadata=state.session.metadata()
        )
        tasks.extend(reply.tasks)
        if not all_pages or not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    if out.json_mode:
        out.json(
            {
                "tasks": [task_dict(t) for t in tasks],
                "next_page_token": reply.next_page_token or None,
            }
        )
        return
    out.table(
        ["ID", "STATUS", "ALGORITHM", "ATTEMPTS", "CREATED", "RESULT"],
        [
            [
                t.id,
                status_name(t.status),
                algorithm_name(t.algorithm),
                f"{t.attempts}/{t.max_attempts}",
                _time(t.created_at, t.HasField("created_at")),
                t.result.encoded if t.HasField("result") else None,
            ]
            for t in tasks
        ],
    )
    if reply.next_page_token:
        out.note(f"more: --page-token {reply.next_page_token}")


@app.command("cancel")
def cancel_command(ctx: typer.Context, task_id: TaskId, json_out: JsonFlag = False) -> None:
    """Cancel a task (a running one stops cooperatively).

    Example:

      hashctl task cancel 0b9e7c1e-3f0a-4c1b-9d6e-2a5f8c7d1e00
    """
    state = state_of(ctx)
    reply = state.session.tasks().CancelTask(
        task_pb2.CancelTaskRequest(id=task_id),
        timeout=state.options.timeout,
        metadata=state.session.metadata(),
    )
    show_task(state.output(json_out), reply.task)


@app.command("requeue")
def requeue_command(ctx: typer.Context, task_id: TaskId, json_out: JsonFlag = False) -> None:
    """Put a dead-lettered (or cancelled) task back in the queue with fresh attempts.

    Example:

      hashctl task requeue 0b9e7c1e-3f0a-4c1b-9d6e-2a5f8c7d1e00
    """
    state = state_of(ctx)
    reply = state.session.tasks().RequeueTask(
        task_pb2.RequeueTaskRequest(id=task_id),
        timeout=state.options.timeout,
        metadata=state.session.metadata(),
    )
    show_task(state.output(json_out), reply.task)


@app.command("stats")
def stats_command(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    """Summarise the queue: tasks by state, oldest pending age, workers.

    Example:

      hashctl task stats
    """
    state = state_of(ctx)
    out = state.output(json_out)
    reply = state.session.tasks().GetQueueStats(
        task_pb2.GetQueueStatsRequest(),
        timeout=state.options.timeout,
        metadata=state.session.metadata(),
    )
    counts = {status_name(c.status): c.count for c in reply.counts}
    workers = [
        {
            "name": w.name,
            "host": w.host,
            "pid": w.pid,
            "alive": w.alive,
            "in_flight": w.in_flight,
            "processed": w.processed,
        }
        for w in reply.workers
    ]
    age = reply.oldest_pending_age.ToNanoseconds() / 1e9
    if out.json_mode:
        out.json(
            {
                "counts": counts,
                "oldest_pending_seconds": age,
                "workers_alive": reply.workers_alive,
                "completed_last_minute": reply.completed_last_minute,
                "workers": workers,
            }
        )
        return
    out.table(["STATUS", "COUNT"], list(counts.items()))
    out.fields(
        {
            "oldest pending": f"{age:.1f}s",
            "workers alive": reply.workers_alive,
            "completed last minute": reply.completed_last_minute,
        }
    )
    if workers:
        out.table(
            ["WORKER", "HOST", "PID", "ALIVE", "IN FLIGHT", "PROCESSED"],
            [list(w.values()) for w in workers],
        )


@app.command("prune")
def prune_command(
    ctx: typer.Context,
    dsn: Annotated[
        str | None,
        typer.Option(
            "--dsn", envvar="HASHMESH_DATABASE_URL", help="PostgreSQL DSN (HASHMESH_DATABASE_URL)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would go; delete nothing.")
    ] = False,
    json_out: JsonFlag = False,
) -> None:
    """Delete finished tasks older than the retention ages (HASHMESH_RETENTION_*), as the
    workers' pruner does every minute; talks to PostgreSQL directly (operators only).

    Example:

      hashctl task prune --dry-run --dsn postgresql://postgres@127.0.0.1:5432/hashmesh
    """
    from hashmesh.cli.retention import run_prune

    out = state_of(ctx).output(json_out)
    dsn = dsn or os.environ.get("HASHMESH_DATABASE_URL")
    if not dsn:
        raise CliError("no database: give --dsn or set HASHMESH_DATABASE_URL", ExitCode.USAGE)
    report = run_prune(dsn, dry_run=dry_run)
    if out.json_mode:
        out.json(report)
        return
    verb = "would delete" if dry_run else "deleted"
    out.table(
        ["STATUS", "KEPT FOR", verb.upper()],
        [[row["status"], row["kept_for"], row["count"]] for row in report["statuses"]],
    )
    if report.get("skipped"):
        out.line("another pruner is running; nothing deleted", style="yellow")
    else:
        out.line(f"{verb} {report['total']} finished tasks")
