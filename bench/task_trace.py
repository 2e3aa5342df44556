"""Where a task's round trip goes: timestamps of every hop, run by hand (not by the tests).

    .venv/bin/python bench/task_trace.py [--rate 200] [--seconds 10] [--balancer] [--one-call]

Starts an embedded PostgreSQL, one hashd (and the balancer with ``--balancer``) and one
workerd, then submits md5 tasks open loop at ``--rate``/s, each followed by WatchTask until
final, as bench/tasks_e2e.py does (with ``--one-call``, one SubmitAndWatchTask each). An observer process LISTENs on both channels (as workerd and hashd
do), so it sees each NOTIFY when they do. Per task, on one clock (client, observer and
PostgreSQL share the host's):

  sent        client sends SubmitTask
  created     created_at: the submit transaction's start (hashd → PostgreSQL)
  ready       the observer receives `hashmesh_tasks_ready` (submit committed, first after created)
  accepted    the client has SubmitTask's answer (SubmitAndWatchTask's first message)
  claimed     started_at: the claim transaction's start (worker woke and asked)
  running     the observer receives the task's `running` notification (claim committed)
  finished    finished_at: the completion transaction's start (computed, flush began)
  succeeded   the observer receives `succeeded` (completion committed)
  answered    the client receives the final WatchTask message

Prints the median and p90 of each hop's duration (ms), so what waits stands out.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import bisect
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import psycopg
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks_e2e import Daemon, postgres, spec

from hashmesh.core.queue import migrations
from hashmesh.core.queue.embedded_pg import create_database
from hashmesh.hashd.watch import parse_status_payload
from hashmesh.v1 import task_pb2, task_pb2_grpc

HOPS = (
    ("sent", "created", "client → hashd → submit statement begins"),
    ("created", "ready", "submit runs + commits (WAL flush) + NOTIFY delivered"),
    ("ready", "accepted", "answer back to the client"),
    ("ready", "claimed", "worker wakes on NOTIFY and its claim begins"),
    ("claimed", "running", "claim runs + commits + NOTIFY"),
    ("running", "finished", "worker computes, flush begins"),
    ("finished", "succeeded", "completion runs + commits + NOTIFY"),
    ("succeeded", "answered", "hashd's watch hub → the watch stream → client"),
    ("sent", "answered", "total: submit → final"),
)
FINAL = {task_pb2.TASK_STATUS_SUCCEEDED, task_pb2.TASK_STATUS_DEAD_LETTER}


OBSERVER = r"""
import select, sys, time, psycopg
out = open(sys.argv[2], "w")
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    conn.execute("LISTEN hashmesh_tasks_ready")
    conn.execute("LISTEN hashmesh_task_status")
    print("listening", flush=True)
    stopping = False
    while True:
        seen = 0
        for note in conn.notifies(timeout=0.5):
            out.write(repr((time.time(), note.channel, note.payload)) + "\n")
            seen += 1
        stopping = stopping or bool(select.select([sys.stdin], [], [], 0)[0])
        if stopping and not seen:
            break  # asked to stop, and half a second without notifications: all drained
out.close()
"""


class Observer:
    """A process of its own (so the load generator's event loop does not delay its clock)
    LISTENing as workerd and hashd do; one line per notification, read at the end."""

    def __init__(self) -> None:
        self.ready: list[float] = []
        self.status: dict[tuple[str, str], float] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._log = tempfile.NamedTemporaryFile("r", suffix=".trace")  # noqa: SIM115

    def start(self, dsn: str) -> None:
        # A file, not a pipe: a full pipe would stall the observer and delay its timestamps.
        self._proc = subprocess.Popen(
            [sys.executable, "-c", OBSERVER, dsn, self._log.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        assert self._proc.stdout.readline().strip() == "listening"

    def stop(self) -> None:
        assert self._proc is not None and self._proc.stdout and self._proc.stdin
        self._proc.stdin.write("stop\n")
        self._proc.stdin.flush()
        self._proc.wait(60)
        for line in self._log:
            at, channel, payload = ast.literal_eval(line)
            if channel == "hashmesh_tasks_ready":
                self.ready.append(at)
            else:
                for task_id, status, *_ in parse_status_payload(payload):
                    self.status.setdefault((task_id, status.value), at)
        self._log.close()


async def load(
    address: str, rate: float, seconds: float, one_call: bool
) -> dict[str, dict[str, float]]:
    traces: dict[str, dict[str, float]] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        await stub.GetQueueStats(task_pb2.GetQueueStatsRequest(), timeout=10)
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.3

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            sent = time.time()
            if one_call:  # SubmitAndWatchTask: "accepted" is its first message
                accepted = 0.0
                call = stub.SubmitAndWatchTask(
                    task_pb2.SubmitAndWatchTaskRequest(spec=spec(2 * 10**9 + i)), timeout=30
                )
                async for state in call:
                    accepted = accepted or time.time()
                    if state.task.status in FINAL:
                        break
                traces[state.task.id] = {
                    "sent": sent,
                    "accepted": accepted,
                    "answered": time.time(),
                }
                return
            reply = await stub.SubmitTask(
                task_pb2.SubmitTaskRequest(spec=spec(2 * 10**9 + i)), timeout=30
            )
            accepted = time.time()
            async for message in stub.WatchTask(
                task_pb2.WatchTaskRequest(id=reply.task.id), timeout=30
            ):
                if message.task.status in FINAL:
                    break
            traces[reply.task.id] = {"sent": sent, "accepted": accepted, "answered": time.time()}

        await asyncio.gather(*(one(i) for i in range(int(rate * seconds))))
    return traces


async def trace(
    address: str, dsn: str, rate: float, seconds: float, one_call: bool
) -> list[dict[str, float]]:
    observer = Observer()
    observer.start(dsn)
    traces = await load(address, rate, seconds, one_call)
    await asyncio.sleep(0.5)
    observer.stop()
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT id::text, extract(epoch FROM created_at), extract(epoch FROM started_at),"
            " extract(epoch FROM finished_at) FROM hashmesh_tasks WHERE id = ANY(%s::uuid[])",
            (list(traces),),
        )
        rows = await cur.fetchall()
    ready = sorted(observer.ready)
    out = []
    for task_id, created, claimed, finished in rows:
        t = traces[task_id]
        after = bisect.bisect_left(ready, float(created))
        t.update(created=float(created), claimed=float(claimed), finished=float(finished))
        t["ready"] = ready[after] if after < len(ready) else float("nan")
        t["running"] = observer.status.get((task_id, "running"), float("nan"))
        t["succeeded"] = observer.status.get((task_id, "succeeded"), float("nan"))
        out.append(t)
    return out


def report(traces: list[dict[str, float]], rate: float, path: str) -> None:
    print(f"# one task's hops at {rate:.0f}/s ({len(traces)} tasks, {path}); ms")
    print("| hop | what | p50 | p90 |")
    print("|---|---|---|---|")
    for begin, end, what in HOPS:
        spans = [
            (t[end] - t[begin]) * 1000
            for t in traces
            if t[end] == t[end] and t[begin] == t[begin]  # skip NaN: not observed
        ]
        if len(spans) < 10:
            continue
        cuts = statistics.quantiles(spans, n=10)
        print(f"| {begin} → {end} | {what} | {statistics.median(spans):.2f} | {cuts[8]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", help="PostgreSQL admin DSN (default: an embedded server)")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--balancer", action="store_true", help="through the balancer")
    parser.add_argument(
        "--one-call", action="store_true", help="SubmitAndWatchTask instead of the two calls"
    )
    args = parser.parse_args()
    os.environ.setdefault("HASHMESH_IDENTITY_SECRET", os.urandom(16).hex())  # the daemons need one
    with postgres(args.dsn) as admin:
        dsn = create_database(admin, f"trace_{uuid.uuid4().hex[:8]}")
        migrations.migrate(dsn)
        daemons: list[Daemon] = []
        try:
            hashd = Daemon("hashmesh.hashd", ["--listen", "127.0.0.1:0", "--database-url", dsn])
            daemons.append(hashd)
            address = hashd.addresses[0]
            if args.balancer:
                front = Daemon(
                    "hashmesh.balancer",
                    ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                     "--backends", address],
                    expect=2,
                )  # fmt: skip
                daemons.append(front)
                address = front.addresses[0]
            daemons.append(Daemon("hashmesh.workerd", ["--database-url", dsn, "--name", "t"]))
            traces: list[dict[str, Any]] = uvloop.run(
                trace(address, dsn, args.rate, args.seconds, args.one_call)
            )
        finally:
            for daemon in reversed(daemons):
                daemon.stop()
    path = "through the balancer" if args.balancer else "direct to hashd"
    report(traces, args.rate, path + (", SubmitAndWatchTask" if args.one_call else ""))


if __name__ == "__main__":
    main()
