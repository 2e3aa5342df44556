"""``hashctl up``: the whole mesh on this machine, with a live status table.

The supervising lives in ``hashmesh.cli.supervisor``; this module parses flags, shows what
happens (a live table on a terminal, plain lines otherwise, JSON Lines with ``--json``), and
runs the optional demo."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from hashmesh.cli.client import CliError, ExitCode
from hashmesh.cli.naming import STRATEGIES, parse_strategy
from hashmesh.cli.options import DEFAULT_ADMIN_TARGET, DEFAULT_TARGET
from hashmesh.cli.state import state_of
from hashmesh.cli.state_lock import AlreadyRunning, StateLock
from hashmesh.cli.supervisor import Event, MeshPlan, StartupError, Supervisor
from hashmesh.core.errors import Unavailable
from hashmesh.core.queue.db import redact_dsn

_STATE_STYLE = {
    "running": "green",
    "starting": "yellow",
    "restarting": "yellow",
    "crashed": "red",
    "down": "red",
    "stopping": "dim",
    "stopped": "dim",
}


class Display:
    """Shows the supervisor's events: JSON Lines, plain lines, or a live table."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.live_mode = not json_mode and sys.stdout.isatty()
        self.console = Console(highlight=False)
        self.supervisor: Supervisor | None = None
        self.live: Live | None = None

    def event(self, event: Event) -> None:
        if self.json_mode:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
        elif self.live is not None:
            self.live.update(self.table())
            if event["event"] in ("exited", "restart_failed"):
                self.console.print(_plain(event), style="red", markup=False)
        else:
            sys.stdout.write(_plain(event) + "\n")
            sys.stdout.flush()

    def say(self, text: str, ok: bool | None = None) -> None:
        if self.json_mode:
            self.event({"event": "demo", "message": text, "ok": ok})
        elif self.live_mode:
            mark = {True: "[green]✓[/]", False: "[red]✗[/]", None: "[dim]…[/]"}[ok]
            self.console.print(f"{mark} ", end="")
            self.console.print(text, markup=False, highlight=False)
        else:
            sys.stdout.write(("ok   " if ok else "FAIL " if ok is False else "     ") + text + "\n")
            sys.stdout.flush()

    def table(self) -> Table:
        table = Table(title="hashmesh", header_style="bold")
        for column in ("PROCESS", "PID", "ADDRESS", "STATE", "RESTARTS"):
            table.add_column(column)
        for row in self.supervisor.rows() if self.supervisor else []:
            table.add_row(
                row["name"],
                str(row["pid"] or "-"),
                row["address"] or "-",
                f"[{_STATE_STYLE.get(row['state'], '')}]{row['state']}[/]",
                str(row["restarts"]),
            )
        return table


def _plain(event: Event) -> str:
    extra = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "name"))
    return f"{event.get('name', 'up')}: {event['event']} {extra}".rstrip()


async def _run(plan: MeshPlan, display: Display, demo: bool, once: bool) -> int:
    supervisor = Supervisor(plan, display.event)
    display.supervisor = supervisor
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP: the terminal was closed. Stop in order, as for Ctrl-C.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    starting = asyncio.create_task(supervisor.start())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # StartupError propagates
            db_watch = asyncio.create_task(supervisor.watch_database())
            display.event(
                {
                    "event": "ready",
                    "target": supervisor.target,
                    "admin_target": supervisor.admin_target,
                    "dsn": redact_dsn(supervisor.dsn),
                    "state_dir": str(plan.state_dir),
                    "pids": supervisor.pids(),
                }
            )
            if not display.json_mode:
                display.console.print(_ready_hint(supervisor), highlight=False, soft_wrap=True)
            if demo:
                passed = await asyncio.to_thread(_demo, supervisor.target, display)
                display.event({"event": "demo_done", "ok": passed})
                code = 0 if passed else int(ExitCode.OTHER)
                if once:
                    stop.set()
            await stop.wait()
            db_watch.cancel()
        else:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
    except StartupError as exc:
        display.event({"event": "failed", "error": str(exc).splitlines()[0]})
        sys.stderr.write(f"error: {exc}\n")
        code = int(ExitCode.OTHER)
    except Exception as exc:  # the database or a migration failed: say so, then clean up
        detail = getattr(exc, "stderr", None) or b""
        text = detail.decode(errors="replace").strip() if isinstance(detail, bytes) else str(detail)
        message = f"{type(exc).__name__}: {str(exc).strip() or text}"
        display.event({"event": "failed", "error": message.splitlines()[0]})
        sys.stderr.write(f"error: mesh did not start: {message}\n{text}\n".rstrip() + "\n")
        # A database that cannot be reached is "unavailable/unreachable" (3), as for `db migrate`.
        unreachable = isinstance(exc, Unavailable)
        code = int(ExitCode.UNAVAILABLE if unreachable else ExitCode.OTHER)
    finally:
        stopped.cancel()
        await supervisor.stop()
        display.event({"event": "down"})
    return code


def _ready_hint(supervisor: Supervisor) -> str:
    """What to type next; the flags say where whenever the mesh is not on the default ports."""
    flags = ""
    if supervisor.target != DEFAULT_TARGET:
        flags += f"--target {supervisor.target} "
    hashctl = f"hashctl {flags}"
    admin = (
        ""
        if supervisor.admin_target == DEFAULT_ADMIN_TARGET
        else f"--admin-target {supervisor.admin_target} "
    )
    return (
        f"hashmesh is up: [bold]{supervisor.target}[/] (admin {supervisor.admin_target}), logs in "
        f"{supervisor.logs}\n  try: {hashctl}hash sha256 hello · {hashctl}submit md5 hello --wait · "
        f"hashctl {admin}lb stats · Ctrl-C stops everything"
    )


def _demo(target: str, display: Display) -> bool:
    from hashmesh.cli.demo import run_demo

    try:
        return run_demo(target, display.say)
    except Exception as exc:
        display.say(f"demo failed: {exc}", False)
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def up_command(
    ctx: typer.Context,
    replicas: Annotated[int, typer.Option("--replicas", "-r", help="hashd replicas.", min=1)] = 3,
    workers: Annotated[int, typer.Option("--workers", "-w", help="workerd processes.", min=0)] = 1,
    balancers: Annotated[
        int,
        typer.Option(
            "--balancers", help="Balancer processes sharing the public port (SO_REUSEPORT).", min=1
        ),
    ] = 1,
    strategy: Annotated[
        str | None, typer.Option(help=f"Balancer strategy: {', '.join(STRATEGIES)}.")
    ] = None,
    port: Annotated[
        int, typer.Option(help="Public (balancer) port; 0 picks a free one.", min=0, max=65535)
    ] = 50050,
    admin_port: Annotated[
        int, typer.Option(help="Admin port; 0 picks a free one.", min=0, max=65535)
    ] = 50060,
    database_url: Annotated[
        str | None,
        typer.Option(
            envvar="HASHMESH_DATABASE_URL",
            show_default=False,
            help="Use this PostgreSQL instead of an embedded one.",
        ),
    ] = None,
    state_dir: Annotated[Path, typer.Option(help="Embedded database data and logs.")] = Path(
        ".hashmesh"
    ),
    demo: Annotated[
        bool, typer.Option("--demo", help="Once up, hash a few inputs and run a task.")
    ] = False,
    once: Annotated[
        bool,
        typer.Option(
            "--once",
            help="With --demo: stop the mesh after the demo (exit code says whether it passed).",
        ),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Events as JSON Lines (child PIDs included).")
    ] = False,
    metrics: Annotated[
        bool,
        typer.Option(
            "--metrics",
            help="Every process also serves Prometheus "
            "/metrics on a free loopback port (shown with its address).",
        ),
    ] = False,
) -> None:
    """Run the whole mesh on this machine, with a live status table.

    Starts PostgreSQL (embedded unless a DSN is given), the hashd replicas, the balancer and
    workerd; restarts what crashes, with backoff; Ctrl-C or SIGTERM stops it all in order.

    Examples:

      hashctl up --demo

      hashctl up --replicas 5 --workers 2 --strategy p2c_ewma

      hashctl up --metrics --json    # then scrape each "<kind> metrics" address

      HASHMESH_DATABASE_URL=postgresql://me@db/hashmesh hashctl up --port 0 --json
    """
    state = state_of(ctx)
    if strategy:
        parse_strategy(strategy)
    if once and not demo:
        raise CliError("--once only makes sense with --demo", ExitCode.USAGE)
    plan = MeshPlan(
        state_dir=state_dir.resolve(),
        database_url=database_url,
        replicas=replicas,
        workers=workers,
        balancers=balancers,
        port=port,
        admin_port=admin_port,
        metrics=metrics,
        strategy=strategy.strip().lower().replace("-", "_") if strategy else None,
    )
    lock = StateLock(plan.state_dir)
    try:
        lock.check_free()  # first: "already running" explains a busy port too
        for flag, number in (("--port", port), ("--admin-port", admin_port)):
            if number and not _port_free(plan.host, number):
                raise CliError(
                    f"port {number} is in use (another `hashctl up`?); choose another with "
                    f"{flag}, or 0 for any free port"
                )
        lock.acquire()
    except AlreadyRunning as exc:
        raise CliError(str(exc), ExitCode.FAILED_PRECONDITION) from None
    try:
        code = _show(plan, Display(json_mode=state.options.json or json_out), demo, once)
    finally:
        lock.release()
    if code:
        raise typer.Exit(code)


def _show(plan: MeshPlan, display: Display, demo: bool, once: bool) -> int:
    """Run the mesh under a live table on a terminal, plain lines or JSON otherwise."""
    if not display.live_mode:
        return asyncio.run(_run(plan, display, demo, once))
    with Live(display.table(), console=display.console, refresh_per_second=4) as live:
        display.live = live
        return asyncio.run(_run(plan, display, demo, once))
