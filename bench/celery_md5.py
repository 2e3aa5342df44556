"""The task-queue workload through Celery + Redis, for the ratio against hashmesh (run by hand).

    /work/venv/bin/python bench/celery_md5.py [--tasks 20000] [--rate 200] [--seconds 10] [--json]
        [--only throughput|latency]

One Celery worker process (``--pool solo``), Redis broker and result backend on
127.0.0.1:6379 (database 15, a queue of its own per run). Figures, as for bench/tasks_e2e.py:
- throughput: one ``apply_async`` per md5 task, N of them, then wait until the worker has
  recorded every result (a Redis counter) → tasks/s, and the CPU milliseconds per task of the
  client, the worker and (its PID in ``BENCH_REDIS_PID``) redis-server;
- latency: open loop at ``--rate`` tasks/s for ``--seconds``: submit → result, p50/p99.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
from celery import Celery

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
app = Celery("celery_md5", broker=REDIS, backend=REDIS)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=64,
    result_expires=600,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.md5")
def md5(data: str) -> str:
    return hashlib.md5(data.encode()).hexdigest()


_counter_client: redis.Redis | None = None


@app.task(name="bench.md5_counted", ignore_result=True)
def md5_counted(data: str, counter: str) -> None:
    """The throughput task: the result goes to Redis with one INCR, like a result write, so
    the client can see "all done" without holding 20,000 result subscriptions (Celery's
    Redis result consumer slows to ~100 tasks/s with that many outstanding)."""
    global _counter_client
    if _counter_client is None:
        _counter_client = redis.Redis.from_url(REDIS)
    hashlib.md5(data.encode()).hexdigest()
    _counter_client.incr(counter)


def start_worker(queue: str) -> subprocess.Popen[bytes]:
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_md5",
            "worker",
            "--pool",
            "solo",
            "-Q",
            queue,
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=Path(__file__).resolve().parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Ready when it answers a task.
    md5.apply_async(("warm-up",), queue=queue).get(timeout=60)
    return worker


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` has used, 0 when ``/proc`` does not show it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(worker: subprocess.Popen[bytes]) -> dict[str, float]:
    """CPU used so far by this client, the worker and (``BENCH_REDIS_PID``) the broker."""
    used = {"client": sum(os.times()[:2]), "worker": _proc_cpu(worker.pid)}
    if os.environ.get("BENCH_REDIS_PID"):
        used["redis"] = _proc_cpu(int(os.environ["BENCH_REDIS_PID"]))
    return used


def throughput(queue: str, n: int, worker: subprocess.Popen[bytes]) -> dict[str, float]:
    counter = f"{queue}:done"
    client = redis.Redis.from_url(REDIS)
    before = cpu_seconds(worker)
    started = time.perf_counter()
    for i in range(n):
        md5_counted.apply_async((f"task-{i}", counter), queue=queue)
    submitted = time.perf_counter()
    while int(client.get(counter) or 0) < n:
        time.sleep(0.01)
    done = time.perf_counter()
    after = cpu_seconds(worker)
    client.delete(counter)
    return {
        "tasks": n,
        "submit_per_s": n / (submitted - started),
        "end_to_end_per_s": n / (done - started),
        **{f"cpu_ms_{kind}": (after[kind] - before[kind]) * 1000 / n for kind in after},
    }


def latency(queue: str, rate: float, seconds: float) -> dict[str, float]:
    n = int(rate * seconds)
    samples: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter() + 0.2

    def one(i: int) -> None:
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        began = time.perf_counter()
        md5.apply_async((f"lat-{i}",), queue=queue).get(timeout=60)
        with lock:
            samples.append(time.perf_counter() - began)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(n)))
    cuts = statistics.quantiles(samples, n=100)
    return {"tasks": n, "rate": rate, "p50_ms": cuts[49] * 1000, "p99_ms": cuts[98] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--only", choices=("throughput", "latency"), help="run one part")
    args = parser.parse_args()
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    worker = start_worker(queue)
    report: dict[str, dict[str, float]] = {}
    try:
        if args.only != "latency":
            report["throughput"] = throughput(queue, args.tasks, worker)
        if args.only != "throughput":
            report["latency"] = latency(queue, args.rate, args.seconds)
    finally:
        worker.terminate()
        worker.wait(30)
    if args.json:
        print(json.dumps(report))
        return
    if "throughput" in report:
        t = report["throughput"]
        print(
            f"celery+redis: {t['end_to_end_per_s']:.0f} tasks/s end to end ({t['submit_per_s']:.0f}/s submit)"
        )
    if "latency" in report:
        lat = report["latency"]
        print(
            f"celery+redis: at {lat['rate']:.0f}/s p50 {lat['p50_ms']:.1f} ms p99 {lat['p99_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main()
