"""The task queue on an empty table and on an aged one, run by hand (not by the tests).

    .venv/bin/python bench/queue_scale.py                                  # 10 M + 1 M rows
    .venv/bin/python bench/queue_scale.py --finished 2000000 --pending 200000 --skip-celery

Starts an embedded PostgreSQL (or uses ``--dsn``), and per scenario a fresh database, one
hashd, the balancer (unless ``--direct``) and one workerd. The "aged" database is first loaded
with ``--finished`` finished tasks (10 % of them finished two days ago, so due for the default
24 h retention; the rest within the last 20 hours, 2 % cancelled, 1 % dead letters) and
``--pending`` pending tasks scheduled a day ahead (waiting in the claim index, not due), by
batched ``INSERT … SELECT FROM generate_series`` (triggers on: the counters stay right), then
``VACUUM ANALYZE``; ids come from the table's default (time-ordered UUIDv7, as the store makes
them). Figures per scenario:

- single SubmitTask (64 in flight) and SubmitTasks of 1,000: submissions/s;
- claim rate: 20,000 due tasks inserted in one statement, then the time until one workerd has
  claimed and completed all of them (read from the O(1) counters);
- submit → final p50/p99 at ``--rate``/s, each task one SubmitAndWatchTask call (the first
  latency row of bench/tasks_e2e.py);
- GetQueueStats and ListTasks (first page of 100) latency, p50 and max of 50 calls;
- table and index size;
- aged only: the pruner deleting the rows due (1 M at the default scale) while the latency
  load runs, and the latency during it;
- Celery + Redis (bench/celery_md5.py against a redis-server of its own) in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks_e2e import celery, latency, postgres, redis_server, submit_batches, submit_single

from hashmesh.core.queue import db, migrations
from hashmesh.core.queue.embedded_pg import create_database
from hashmesh.core.queue.retention import PruneRun, RetentionPolicy
from hashmesh.core.queue.store import PostgresTaskStore
from hashmesh.core.settings import DatabaseSettings
from hashmesh.v1 import task_pb2, task_pb2_grpc

LATENCY_PATH = "one call"
"""How the latency load follows each task (``tasks_e2e.LATENCY_PATHS``)."""

LOAD_FINISHED = """
INSERT INTO hashmesh_tasks (algorithm, input, input_size, status, attempts, client_id,
    result_digest, result_encoded, created_at, run_after, started_at, finished_at, updated_at,
    worker, completions, last_error)
SELECT 'md5', convert_to('old-' || g, 'UTF8'), length('old-' || g),
       s.status, 1, 'client-' || (g %% 100),
       CASE WHEN s.status = 'succeeded' THEN decode(md5('old-' || g), 'hex') END,
       CASE WHEN s.status = 'succeeded' THEN md5('old-' || g) END,
       f.at - interval '5 ms', f.at - interval '5 ms', f.at - interval '2 ms', f.at, f.at,
       'loader', CASE WHEN s.status = 'succeeded' THEN 1 ELSE 0 END,
       CASE WHEN s.status = 'dead_letter' THEN 'ValueError: loaded' END
FROM generate_series(%(start)s::bigint, %(stop)s::bigint) AS g,
LATERAL (SELECT CASE WHEN g < %(old)s THEN 'succeeded'
                     WHEN g %% 100 < 2 THEN 'cancelled'
                     WHEN g %% 100 < 3 THEN 'dead_letter'
                     ELSE 'succeeded' END AS status) AS s,
LATERAL (SELECT CASE WHEN g < %(old)s
                     THEN now() - interval '2 days' - (g %% 3600) * interval '1 s'
                     ELSE now() - (g %% 72000) * interval '1 s' END AS at) AS f
"""

LOAD_PENDING = """
INSERT INTO hashmesh_tasks (algorithm, input, input_size, status, client_id, run_after)
SELECT 'md5', convert_to('later-' || g, 'UTF8'), length('later-' || g),
       'pending', 'scheduled-' || (g %% 100), now() + interval '1 day' + g * interval '1 ms'
FROM generate_series(%(start)s::bigint, %(stop)s::bigint) AS g
"""

DUE_NOW = """
INSERT INTO hashmesh_tasks (id, algorithm, input, input_size, client_id)
SELECT gen_random_uuid(), 'md5', convert_to('due-' || g, 'UTF8'), length('due-' || g), 'drain'
FROM generate_series(1, %(n)s) AS g
"""

FINAL_COUNT = """SELECT coalesce(sum(n), 0)::bigint FROM hashmesh_task_counts
WHERE status IN ('succeeded', 'cancelled', 'dead_letter')"""

CHUNK = 500_000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load(dsn: str, finished: int, pending: int) -> float:
    started = time.perf_counter()
    old = finished // 10
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(0, finished, CHUNK):
            stop = min(finished, start + CHUNK) - 1
            conn.execute(LOAD_FINISHED, {"start": start, "stop": stop, "old": old})
            log(f"loaded {stop + 1:,} finished rows")
        for start in range(0, pending, CHUNK):
            stop = min(pending, start + CHUNK) - 1
            conn.execute(LOAD_PENDING, {"start": start, "stop": stop})
            log(f"loaded {stop + 1:,} pending rows")
        conn.execute("VACUUM ANALYZE hashmesh_tasks")
    return time.perf_counter() - started


def sizes(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT pg_table_size('hashmesh_tasks'), pg_indexes_size('hashmesh_tasks'),"
            " (SELECT sum(n) FROM hashmesh_task_counts)"
        ).fetchone()
    assert row is not None
    return {"table_mb": row[0] / 2**20, "indexes_mb": row[1] / 2**20, "rows": int(row[2] or 0)}


async def final_count(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute(FINAL_COUNT)
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def wait_final(dsn: str, target: int, timeout: float = 600) -> float:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if await final_count(conn) >= target:
                return time.perf_counter()
            await asyncio.sleep(0.01)
    raise TimeoutError("tasks did not finish")


async def submit_rates(address: str, dsn: str, single: int, batch: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        await stub.GetQueueStats(task_pb2.GetQueueStatsRequest(), timeout=10)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            base = await final_count(conn)
        started = time.perf_counter()
        await submit_single(stub, single)
        single_s = time.perf_counter() - started
        await wait_final(dsn, base + single)
        started = time.perf_counter()
        await submit_batches(stub, batch)
        batch_s = time.perf_counter() - started
        await wait_final(dsn, base + single + batch)
    return {"single_per_s": single / single_s, "batch_per_s": batch / batch_s}


async def claim_rate(dsn: str, n: int) -> float:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        base = await final_count(conn)
        started = time.perf_counter()
        await conn.execute(DUE_NOW, {"n": n})
    finished = await wait_final(dsn, base + n)
    return n / (finished - started)


async def read_latency(address: str, calls: int = 50) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        figures: dict[str, float] = {}
        for name, call in (
            ("stats", lambda: stub.GetQueueStats(task_pb2.GetQueueStatsRequest(), timeout=30)),
            ("list", lambda: stub.ListTasks(task_pb2.ListTasksRequest(page_size=100), timeout=30)),
        ):
            await call()  # warm
            samples = []
            for _ in range(calls):
                began = time.perf_counter()
                await call()
                samples.append(time.perf_counter() - began)
            figures[f"{name}_p50_ms"] = statistics.median(samples) * 1000
            figures[f"{name}_max_ms"] = max(samples) * 1000
    return figures


async def prune_under_load(address: str, dsn: str, rate: float, seconds: float) -> dict[str, Any]:
    pool = db.make_pool(DatabaseSettings(dsn=dsn), name="bench-pruner", max_size=2)
    await pool.open()
    try:
        store = PostgresTaskStore(pool)
        policy = RetentionPolicy()
        due = await store.prune_preview(policy.ages)
        prune_s = 0.0

        async def timed_prune() -> PruneRun | None:
            nonlocal prune_s
            began = time.perf_counter()
            run = await store.prune(policy.ages, batch=policy.batch_size)
            prune_s = time.perf_counter() - began
            return run

        pruning = asyncio.create_task(timed_prune())
        lat = await latency(address, rate, seconds, LATENCY_PATH)
        run = await pruning
    finally:
        await pool.close()
    assert run is not None
    return {"due": sum(due.values()), "deleted": run.total, "seconds": prune_s, "latency": lat}


async def scenario(address: str, dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    figures.update(await submit_rates(address, dsn, args.single, args.batch))
    log(f"submit rates {figures}")
    figures["claim_per_s"] = await claim_rate(dsn, args.drain)
    await latency(address, args.rate, 1.0, LATENCY_PATH)  # warm-up, not counted
    figures["latency"] = await latency(address, args.rate, args.seconds, LATENCY_PATH)
    figures.update(await read_latency(address))
    log(f"figures {figures}")
    return figures


def row(name: str, empty: Any, aged: Any, fmt: str = "{:,.0f}") -> str:
    def cell(value: Any) -> str:
        return "—" if value is None else fmt.format(value)

    ratio = ""
    if isinstance(empty, int | float) and isinstance(aged, int | float) and empty:
        ratio = f"{aged / empty:.2f}"
    return f"| {name} | {cell(empty)} | {cell(aged)} | {ratio} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", help="PostgreSQL admin DSN (default: an embedded server)")
    parser.add_argument("--finished", type=int, default=10_000_000)
    parser.add_argument("--pending", type=int, default=1_000_000)
    parser.add_argument("--single", type=int, default=5000, help="single SubmitTask calls")
    parser.add_argument("--batch", type=int, default=20_000, help="tasks in SubmitTasks of 1,000")
    parser.add_argument("--drain", type=int, default=20_000, help="tasks for the claim rate")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--direct", action="store_true", help="clients talk to hashd directly")
    parser.add_argument("--skip-celery", action="store_true")
    parser.add_argument("--load-only", action="store_true", help="load the aged database, stop")
    parser.add_argument("--aged-db", help="an aged database loaded earlier (with --load-only)")
    args = parser.parse_args()
    os.environ.setdefault("HASHMESH_IDENTITY_SECRET", os.urandom(16).hex())  # the daemons need one
    # Backpressure counts the scheduled backlog too; the retention runs are the bench's own.
    os.environ["HASHMESH_MAX_PENDING_TASKS"] = str(10 * (args.pending + 1_000_000))
    os.environ["HASHMESH_MAX_PENDING_PER_CLIENT"] = str(10 * (args.pending + 1_000_000))
    os.environ["HASHMESH_RETENTION_INTERVAL_SECONDS"] = "0"
    # One client holds every latency task's stream: while the pruner runs, more than the
    # default 256 per client are open at once (as in bench/tasks_e2e.py).
    os.environ.setdefault("HASHMESH_BALANCER_PEER_WATCH_STREAMS", "4096")
    results: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        admin = stack.enter_context(postgres(args.dsn))
        # The long load first, so both scenarios are measured minutes apart.
        if args.aged_db:
            aged_dsn = admin.rsplit("/", 1)[0] + "/" + args.aged_db
            results["load"] = {"seconds": float("nan")}
        else:
            aged_dsn = create_database(admin, f"scale_aged_{uuid.uuid4().hex[:8]}")
            migrations.migrate(aged_dsn)
            log(
                f"loading {args.finished:,} finished + {args.pending:,} pending rows: "
                f"{db.redact_dsn(aged_dsn)}"
            )
            results["load"] = {"seconds": load(aged_dsn, args.finished, args.pending)}
            log(f"loaded in {results['load']['seconds']:.0f} s")
            if args.load_only:
                return
        for name in ("empty", "aged"):
            if name == "empty":
                dsn = create_database(admin, f"scale_empty_{uuid.uuid4().hex[:8]}")
                migrations.migrate(dsn)
            else:
                dsn = aged_dsn
            with attach(admin, dsn, direct=args.direct) as address:
                figures = asyncio.run(scenario(address, dsn, args))
                figures["size_before"] = sizes(dsn)
                if name == "aged":
                    figures["prune"] = asyncio.run(
                        prune_under_load(address, dsn, args.rate, args.seconds)
                    )
                    log(f"prune {figures['prune']}")
                figures["size"] = sizes(dsn)
            results[name] = figures
    celery_report = None
    if not args.skip_celery:
        with redis_server() as url:
            os.environ["BENCH_REDIS_URL"] = url
            throughput = celery("throughput", args.single, args.rate, args.seconds)
            latency_ = celery("latency", args.single, args.rate, args.seconds)
            if throughput and latency_:
                celery_report = {"throughput": throughput, "latency": latency_}
    report(args, results, celery_report)


@contextmanager
def attach(admin: str, dsn: str, *, direct: bool) -> Iterator[str]:
    """The mesh of bench/tasks_e2e.py on an existing database (one hashd, one workerd)."""
    from tasks_e2e import Daemon

    daemons: list[Daemon] = []
    try:
        hashd = Daemon("hashmesh.hashd", ["--listen", "127.0.0.1:0", "--database-url", dsn])
        daemons.append(hashd)
        address = hashd.addresses[0]
        if not direct:
            front = Daemon(
                "hashmesh.balancer",
                ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                 "--backends", address],
                expect=2,
            )  # fmt: skip
            daemons.append(front)
            address = front.addresses[0]
        daemons.append(Daemon("hashmesh.workerd", ["--database-url", dsn, "--name", "bench-0"]))
        yield address
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


def report(
    args: argparse.Namespace,
    results: dict[str, dict[str, Any]],
    celery_report: dict[str, dict[str, float]] | None,
) -> None:
    empty, aged = results["empty"], results["aged"]
    path = "direct to hashd" if args.direct else "through the balancer, 1 hashd"
    print(f"\n# queue_scale: {path}, 1 workerd, {os.cpu_count()} CPUs, "
          f"aged = {args.finished:,} finished + {args.pending:,} pending "
          f"(loaded in {results['load']['seconds']:.0f} s)\n")  # fmt: skip
    print("| | empty table | aged table | aged / empty |")
    print("|---|---|---|---|")
    print(row("single SubmitTask, tasks/s", empty["single_per_s"], aged["single_per_s"]))
    print(row("SubmitTasks of 1,000, tasks/s", empty["batch_per_s"], aged["batch_per_s"]))
    print(row("claim → complete, tasks/s", empty["claim_per_s"], aged["claim_per_s"]))
    for q in ("p50_ms", "p99_ms"):
        print(row(f"submit → final {q[:3]} at {args.rate:.0f}/s, ms",
                  empty["latency"][q], aged["latency"][q], "{:.1f}"))  # fmt: skip
    for key, label in (("stats", "GetQueueStats"), ("list", "ListTasks page of 100")):
        print(f"| {label} p50 / max, ms | {empty[key + '_p50_ms']:.1f} / "
              f"{empty[key + '_max_ms']:.1f} | {aged[key + '_p50_ms']:.1f} / "
              f"{aged[key + '_max_ms']:.1f} | |")  # fmt: skip
    for key in ("table_mb", "indexes_mb"):
        print(row(f"{key[:-3]} size before pruning, MB", empty["size_before"][key],
                  aged["size_before"][key]))  # fmt: skip
    prune = aged["prune"]
    print(f"\npruner: {prune['deleted']:,} rows deleted (due: {prune['due']:,}) in "
          f"{prune['seconds']:.1f} s while {args.rate:.0f} tasks/s ran; submit → final meanwhile "
          f"p50 {prune['latency']['p50_ms']:.1f} ms, p99 {prune['latency']['p99_ms']:.1f} ms")  # fmt: skip
    if celery_report:
        t, lat = celery_report["throughput"], celery_report["latency"]
        print(f"celery+redis (same run, 1 worker): single submit {t['submit_per_s']:,.0f}/s "
              f"({t['end_to_end_per_s']:,.0f}/s end to end); latency at {lat['rate']:.0f}/s "
              f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms")  # fmt: skip
        print(f"ratios, empty table: single submit {empty['single_per_s'] / t['submit_per_s']:.2f}x "
              f"celery; p50 {empty['latency']['p50_ms'] / lat['p50_ms']:.1f}x, "
              f"p99 {empty['latency']['p99_ms'] / lat['p99_ms']:.1f}x celery")  # fmt: skip


if __name__ == "__main__":
    main()
