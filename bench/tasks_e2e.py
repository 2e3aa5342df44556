"""End-to-end figures of the task queue, run by hand (not by the tests).

    /work/venv/bin/python bench/tasks_e2e.py                      # everything, ~2-3 minutes
    /work/venv/bin/python bench/tasks_e2e.py --direct             # skip the balancer
    /work/venv/bin/python bench/tasks_e2e.py --skip-celery --tasks 5000

Starts an embedded PostgreSQL (or uses ``--dsn``, where it creates one database per
scenario), one hashd (``--hashd N`` for more), the balancer in front of them unless
``--direct``, and 1 or 2 workerd. Figures:

- throughput: submit N md5 tasks (single: one SubmitTask per task, 64 in flight; batch:
  SubmitTasks of 1,000) → until every task is final (counted in the database), with 1 and 2
  workerd: tasks/s end to end, and the submission rate alone;
- latency: open loop at ``--rate`` tasks/s for ``--seconds``, each task followed until its
  final state arrives, in one call (SubmitAndWatchTask) and, in a second mesh, in two
  (SubmitTask, then WatchTask); p50/p99 of submit → final, as the client sees it;
- the same workload through Celery + Redis (bench/celery_md5.py, against a redis-server of its
  own unless ``--redis-url``), in the same run, for the ratio:
  its throughput right after hashmesh's single-submit run with 1 workerd, its latency right
  after each of hashmesh's latency runs (the load on a shared machine changes from minute to
  minute);
- under each hashmesh figure, the CPU milliseconds each kind of process spent per task
  (client, balancer, hashd, workerd, and PostgreSQL's backends for the run's database): on two
  cores, the sum bounds the rate, and under load every millisecond of it is queueing delay;
  under each latency figure also the wake-ups per task (voluntary context switches of every
  thread) by the same kinds: at 200/s nothing batches, and each is an event-loop turn or a
  backend woken for a statement or a notification.

The client runs on uvloop, as hashd and workerd do, and on grpc's iomgr transport, as hashd and
the balancer do (``HASHMESH_GRPC_TRANSPORT``): on two shared cores the load generator's own
event-loop turns compete with the mesh for CPU (Celery's client is a plain loop of
``apply_async`` calls).

What each side does for "single submit, end to end": one task per call, N calls, then wait
until every result is recorded; one worker process each (workerd; a ``--pool solo`` Celery
worker). hashmesh's client keeps 64 calls in flight, Celery's sends one at a time — its client
submits about twice as fast as its worker runs, so its end-to-end rate is its worker's, and more
client concurrency would only take CPU from that worker. What differs and stays: hashmesh
answers a submission after its commit is flushed to disk (the client's "accepted" survives a
crash); Redis acknowledges the push before any fsync (the one this bench uses here runs with
``appendonly no`` and no snapshots: it keeps nothing across a crash). And hashmesh's
calls cross the balancer and hashd, Celery's client talks to Redis directly.

On a machine loaded by other work, a rate also measures how much of the cores each side wins:
hashmesh runs five busy processes, Celery two. The CPU milliseconds per task printed under each
side (Celery's: client, worker, redis-server) do not depend on that share.

The machine is small and shared: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hashmesh.core import grpc_transport

# The client on the daemons' transport (iomgr), set before grpc is first imported (so the
# imports below follow code): at 200/s it took 0.74 against 0.90 ms of CPU per task on grpc's
# default (two interleaved rounds at 21:12 UTC), CPU the mesh's processes get instead on the
# same two cores; the latency did not move.
grpc_transport.configure(os.environ)
# ruff: noqa: E402

import grpc
import psycopg
import uvloop
from psycopg import sql

from hashmesh.core.queue import migrations
from hashmesh.core.queue.embedded_pg import EmbeddedPostgres, create_database
from hashmesh.v1 import common_pb2, task_pb2, task_pb2_grpc

HERE = Path(__file__).resolve().parent
FINAL = "('succeeded', 'cancelled', 'dead_letter')"


@contextmanager
def postgres(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    with tempfile.TemporaryDirectory(prefix="tasks-bench-") as folder:
        server = EmbeddedPostgres(data_dir=Path(folder))
        server.start()
        try:
            yield server.dsn
        finally:
            server.stop()


class Daemon:
    """A hashmesh daemon; ready once it printed its ``listening on`` / ``ready as`` lines."""

    def __init__(self, module: str, args: list[str], expect: int = 1) -> None:
        self.module = module
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.addresses: list[str] = []
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if " listening on " in line or " ready as " in line:
                self.addresses.append(line.strip().rsplit(" ", 1)[1])
                if len(self.addresses) == expect:
                    return
        raise RuntimeError(f"{module} did not start")

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()


@dataclass
class Mesh:
    address: str
    """Where clients connect (the balancer, or hashd with ``--direct``)."""
    dsn: str
    daemons: list[Daemon]

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) used so far by each kind of process: the daemons, this
        client, and the PostgreSQL backends serving this database (when the server runs on
        this host and ``/proc`` shows them; otherwise no ``postgres`` entry)."""
        return {"client": sum(os.times()[:2]), **self._by_kind(_proc_cpu)}

    def wakeups(self) -> dict[str, float]:
        """Voluntary context switches so far (every thread's: a thread that blocked and was
        woken again) by the same kinds as ``cpu_seconds``: at a low rate, where nothing is
        batched, each one is an event-loop turn or a PostgreSQL backend woken for a statement
        or a notification."""
        return {"client": _proc_wakeups(os.getpid()), **self._by_kind(_proc_wakeups)}

    def _by_kind(self, read: Callable[[int], float]) -> dict[str, float]:
        """``read(pid)`` summed by kind over the daemons and this database's backends."""
        summed: dict[str, float] = {}
        for daemon in self.daemons:
            kind = daemon.module.rsplit(".", 1)[-1]
            summed[kind] = summed.get(kind, 0.0) + read(daemon.popen.pid)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            backends = conn.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        server = [read(pid) for (pid,) in backends]
        if any(server):
            summed["postgres"] = sum(server)
        return summed


def _proc_wakeups(pid: int) -> int:
    total = 0
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def wakeups_per_task(before: dict[str, float], after: dict[str, float], n: int) -> str:
    """``hashd 9.1 · postgres 6.0 · …``: voluntary context switches per task by process kind."""
    spent = {kind: (after[kind] - before.get(kind, 0)) / n for kind in after}
    parts = [f"{kind} {k:.1f}" for kind, k in sorted(spent.items(), key=lambda kv: -kv[1])]
    return " · ".join(parts) + f" = {sum(spent.values()):.1f} wake-ups per task"


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_task(before: dict[str, float], after: dict[str, float], n: int) -> str:
    """``hashd 0.41 · workerd 0.12 · … ms``: CPU milliseconds per task by process kind."""
    spent = {kind: (after[kind] - before.get(kind, 0.0)) * 1000 / n for kind in after}
    parts = [f"{kind} {ms:.2f}" for kind, ms in sorted(spent.items(), key=lambda kv: -kv[1])]
    return " · ".join(parts) + f" = {sum(spent.values()):.2f} ms CPU per task"


@contextmanager
def mesh(admin_dsn: str, *, hashd: int, workers: int, direct: bool) -> Iterator[Mesh]:
    """A fresh mesh on a fresh database."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    dsn = create_database(admin_dsn, name)
    migrations.migrate(dsn)
    daemons: list[Daemon] = []
    try:
        replicas = [
            Daemon("hashmesh.hashd", ["--listen", "127.0.0.1:0", "--database-url", dsn])
            for _ in range(hashd)
        ]
        daemons += replicas
        address = replicas[0].addresses[0]
        if not direct:
            front = Daemon(
                "hashmesh.balancer",
                [
                    "--listen",
                    "127.0.0.1:0",
                    "--admin-listen",
                    "127.0.0.1:0",
                    "--backends",
                    ",".join(r.addresses[0] for r in replicas),
                ],
                expect=2,
            )
            daemons.append(front)
            address = front.addresses[0]
        daemons += [
            Daemon("hashmesh.workerd", ["--database-url", dsn, "--name", f"bench-{i}"])
            for i in range(workers)
        ]
        yield Mesh(address, dsn, daemons)
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        # Dropped, or autovacuum works through its dead rows during the next scenarios, on
        # the cores they measure on (Celery's side starts each run on an empty queue too).
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def spec(i: int) -> task_pb2.TaskSpec:
    return task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_MD5, data=b"task-%d" % i)


async def submit_single(stub: task_pb2_grpc.TaskServiceStub, n: int, in_flight: int = 64) -> None:
    next_index = 0

    async def lane() -> None:
        nonlocal next_index
        while next_index < n:
            i = next_index
            next_index += 1
            await stub.SubmitTask(task_pb2.SubmitTaskRequest(spec=spec(i)), timeout=30)

    await asyncio.gather(*(lane() for _ in range(in_flight)))


async def submit_batches(
    stub: task_pb2_grpc.TaskServiceStub, n: int, size: int = 1000, in_flight: int = 2
) -> None:
    starts = iter(range(0, n, size))

    async def lane() -> None:
        for start in starts:
            batch = [spec(i) for i in range(start, min(n, start + size))]
            await stub.SubmitTasks(task_pb2.SubmitTasksRequest(specs=batch), timeout=60)

    await asyncio.gather(*(lane() for _ in range(in_flight)))


async def wait_all_final(dsn: str, n: int, timeout: float = 600) -> float:
    """When ``n`` tasks are final, read every 10 ms from the status counters (migration 0006):
    a ``count(*)`` over the table each time would cost PostgreSQL more CPU than the workload's
    own statements, on the cores the mesh runs on (Celery's side polls one Redis counter)."""
    deadline = time.perf_counter() + timeout
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while time.perf_counter() < deadline:
            cur = await conn.execute(
                f"SELECT coalesce(sum(n), 0) FROM hashmesh_task_counts WHERE status IN {FINAL}"
            )
            row = await cur.fetchone()
            if row and row[0] >= n:
                return time.perf_counter()
            await asyncio.sleep(0.01)
    raise TimeoutError("tasks did not finish")


async def throughput(address: str, dsn: str, n: int, mode: str) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        await stub.GetQueueStats(task_pb2.GetQueueStatsRequest(), timeout=10)  # warm the channel
        started = time.perf_counter()
        waiter = asyncio.create_task(wait_all_final(dsn, n))
        await (submit_single(stub, n) if mode == "single" else submit_batches(stub, n))
        submitted = time.perf_counter()
        finished = await waiter
    return {"submit_per_s": n / (submitted - started), "end_to_end_per_s": n / (finished - started)}


LATENCY_PATHS = {
    "one call": "SubmitAndWatchTask",
    "two calls": "SubmitTask, then WatchTask",
}
"""How the latency run's client follows a task: one streaming call, or the two calls in a row
that clients of the first contract made."""
FINAL_STATUSES = (
    task_pb2.TASK_STATUS_SUCCEEDED,
    task_pb2.TASK_STATUS_DEAD_LETTER,
    task_pb2.TASK_STATUS_CANCELLED,
)


LATENCY_CHANNELS = 8
"""Connections the latency run's client spreads its tasks over (round robin). On one, a stall
of the machine piled more streams onto it than the balancer lets one connection hold
(HTTP/2 MAX_CONCURRENT_STREAMS, 512), and the run died with RST_STREAM 7 (refused stream)."""


async def latency(address: str, rate: float, seconds: float, path: str) -> dict[str, float]:
    n = int(rate * seconds)
    samples: list[float] = []
    async with AsyncExitStack() as stack:
        # A local subchannel pool each: channels with the same target and arguments otherwise
        # share one connection.
        channels = [
            await stack.enter_async_context(
                grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            )
            for _ in range(LATENCY_CHANNELS)
        ]
        stubs = [task_pb2_grpc.TaskServiceStub(channel) for channel in channels]
        for stub in stubs:  # every connection open before the clock starts
            await stub.GetQueueStats(task_pb2.GetQueueStatsRequest(), timeout=10)
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.2

        # Each stream is read to its end, as a client does (one left right after its final
        # message is cancelled if its status has not arrived yet); the time taken is the
        # final message's. Two interleaved rounds at 20:50 showed no difference either way.

        async def final_at(stream: AsyncIterator[Any]) -> float:
            finished = math.nan
            async for message in stream:
                if message.task.status in FINAL_STATUSES:
                    finished = time.perf_counter()
            return finished

        async def one_call(i: int) -> float:
            stub = stubs[i % LATENCY_CHANNELS]
            request = task_pb2.SubmitAndWatchTaskRequest(spec=spec(10**9 + i))
            return await final_at(stub.SubmitAndWatchTask(request, timeout=30))

        async def two_calls(i: int) -> float:
            stub = stubs[i % LATENCY_CHANNELS]
            reply = await stub.SubmitTask(
                task_pb2.SubmitTaskRequest(spec=spec(10**9 + i)), timeout=30
            )
            return await final_at(
                stub.WatchTask(task_pb2.WatchTaskRequest(id=reply.task.id), timeout=30)
            )

        follow = one_call if path == "one call" else two_calls

        failures: dict[str, int] = {}

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            began = time.perf_counter()
            try:
                finished = await follow(i)
            except grpc.aio.AioRpcError as exc:  # counted and shown, not the end of the run
                failures[exc.code().name] = failures.get(exc.code().name, 0) + 1
                return
            if math.isnan(finished):  # the stream ended without a final state
                failures["NO_FINAL_STATE"] = failures.get("NO_FINAL_STATE", 0) + 1
                return
            samples.append(finished - began)

        await asyncio.gather(*(one(i) for i in range(n)))
    if failures:
        print(f"latency run, {path}: failed calls {failures}", flush=True)
    cuts = statistics.quantiles(samples, n=100)
    return {
        "tasks": n,
        "rate": rate,
        "failed": sum(failures.values()),
        "p50_ms": cuts[49] * 1000,
        "p99_ms": cuts[98] * 1000,
    }


def celery(part: str, n: int, rate: float, seconds: float) -> dict[str, float] | None:
    """One part ("throughput" or "latency") of bench/celery_md5.py, in a process of its own."""
    try:
        out = subprocess.run(
            [
                sys.executable,
                str(HERE / "celery_md5.py"),
                "--only",
                part,
                "--tasks",
                str(n),
                "--rate",
                str(rate),
                "--seconds",
                str(seconds),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=True,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"celery comparison skipped: {exc}", file=sys.stderr)
        return None
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return report[part]  # type: ignore[no-any-return]


@contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server on a free loopback port for Celery, persisting nothing, as a default
    Redis: its URL, also in ``BENCH_REDIS_URL``, and its PID in ``BENCH_REDIS_PID`` so its CPU
    is counted."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("no redis-server on PATH (or pass --redis-url / --skip-celery)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as folder:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", folder],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                with socket.socket() as conn:
                    if conn.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            url = os.environ["BENCH_REDIS_URL"] = f"redis://127.0.0.1:{port}/15"
            os.environ["BENCH_REDIS_PID"] = str(proc.pid)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    # The daemons refuse to start without one (it signs the balancer's identity stamps).
    os.environ.setdefault("HASHMESH_IDENTITY_SECRET", os.urandom(16).hex())
    # The latency run's one client stands for many: on a loaded machine it can hold more
    # watches, and (two calls) more SubmitTask calls, at once than the balancer allows one
    # peer (256 each); with 4096 (the totals) a stall shows as latency, not RESOURCE_EXHAUSTED
    # (seen at 21:01 with the machine at load average 7-12).
    os.environ.setdefault("HASHMESH_BALANCER_PEER_WATCH_STREAMS", "4096")
    os.environ.setdefault("HASHMESH_BALANCER_PEER_CALLS", "4096")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", help="PostgreSQL admin DSN (default: an embedded server)")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hashd", type=int, default=1, help="hashd replicas behind the balancer")
    parser.add_argument("--direct", action="store_true", help="clients talk to hashd, no balancer")
    parser.add_argument("--skip-celery", action="store_true")
    parser.add_argument(
        "--redis-url", help="Celery's broker (default: a redis-server of its own, no persistence)"
    )
    parser.add_argument(
        "--only",
        choices=("throughput", "latency"),
        help="run one part (Celery too, unless skipped)",
    )
    args = parser.parse_args()
    path = "direct to hashd" if args.direct else f"through the balancer ({args.hashd} hashd)"
    print(f"# task queue, {args.tasks} md5 tasks per run, {path}, {os.cpu_count()} CPUs")
    with ExitStack() as stack:
        admin = stack.enter_context(postgres(args.dsn))
        if not args.skip_celery and not args.redis_url:
            # A broker of its own, as hashmesh has a database of its own: a Redis shared with
            # other work would make Celery wait for that work.
            stack.enter_context(redis_server())
        elif args.redis_url:
            os.environ["BENCH_REDIS_URL"] = args.redis_url
        for workers in (1, 2) if args.only != "latency" else ():
            for mode in ("single", "batch"):
                with mesh(admin, hashd=args.hashd, workers=workers, direct=args.direct) as m:
                    before = m.cpu_seconds()
                    figures = uvloop.run(throughput(m.address, m.dsn, args.tasks, mode))
                    cpu = cpu_per_task(before, m.cpu_seconds(), args.tasks)
                print(
                    f"hashmesh {mode:6s} submit, {workers} workerd: {figures['end_to_end_per_s']:7.0f} tasks/s "
                    f"end to end ({figures['submit_per_s']:.0f}/s submitting)\n    {cpu}",
                    flush=True,
                )
                if (workers, mode) == (1, "single") and not args.skip_celery:
                    # Right after hashmesh's run, not minutes later: on a shared machine the
                    # load changes from one minute to the next, and the ratio is the figure.
                    t = celery("throughput", args.tasks, args.rate, args.seconds)
                    if t:
                        spent = {k[7:]: v for k, v in t.items() if k.startswith("cpu_ms_")}
                        celery_cpu = " · ".join(
                            f"{kind} {ms:.2f}"
                            for kind, ms in sorted(spent.items(), key=lambda kv: -kv[1])
                        )
                        print(
                            f"celery+redis single submit, 1 worker: {t['end_to_end_per_s']:7.0f} tasks/s "
                            f"end to end ({t['submit_per_s']:.0f}/s submitting) — hashmesh/celery "
                            f"{figures['end_to_end_per_s'] / t['end_to_end_per_s']:.2f}x\n    "
                            f"{celery_cpu} = {sum(spent.values()):.2f} ms CPU per task",
                            flush=True,
                        )
        for latency_path in LATENCY_PATHS if args.only != "throughput" else ():
            with mesh(admin, hashd=args.hashd, workers=1, direct=args.direct) as m:
                before, woken = m.cpu_seconds(), m.wakeups()
                lat = uvloop.run(latency(m.address, args.rate, args.seconds, latency_path))
                cpu = cpu_per_task(before, m.cpu_seconds(), int(lat["tasks"]))
                wakeups = wakeups_per_task(woken, m.wakeups(), int(lat["tasks"]))
            print(
                f"hashmesh latency at {lat['rate']:.0f}/s, {latency_path} "
                f"({LATENCY_PATHS[latency_path]}), submit → final: "
                f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms"
                + (
                    f" ({lat['failed']:.0f} calls failed, not in the figures)"
                    if lat["failed"]
                    else ""
                )
                + f"\n    {cpu}\n    {wakeups}",
                flush=True,
            )
            c_lat = (
                None if args.skip_celery else celery("latency", args.tasks, args.rate, args.seconds)
            )
            if c_lat:
                print(
                    f"celery+redis latency at {c_lat['rate']:.0f}/s (delay → result): p50 "
                    f"{c_lat['p50_ms']:.1f} ms, p99 {c_lat['p99_ms']:.1f} ms — hashmesh/celery p50 "
                    f"{lat['p50_ms'] / c_lat['p50_ms']:.1f}x, p99 {lat['p99_ms'] / c_lat['p99_ms']:.1f}x"
                )
    print(f"load average after the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
