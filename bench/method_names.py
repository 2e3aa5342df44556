"""Memory a flood of invented method names costs: RSS growth of the balancer and of one
replica after N calls, each to a method name never used before (answered UNIMPLEMENTED).

    python bench/method_names.py [--names 50000] [--replicas 3] [--dsn DSN]

Without ``--dsn`` an embedded PostgreSQL is started for the hashd replicas. The peer's budget
of other streams (32) caps the calls in flight; 16 are kept in flight."""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from balancer_bench import start

MIB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def flood(address: str, first: int, count: int, in_flight: int = 16) -> dict[str, int]:
    codes: dict[str, int] = {}
    lock = threading.Lock()
    slots = threading.Semaphore(in_flight)
    with grpc.insecure_channel(address) as channel:

        def done(future: grpc.Future) -> None:
            with lock:
                codes[future.code().name] = codes.get(future.code().name, 0) + 1
            slots.release()

        for index in range(first, first + count):
            slots.acquire()
            channel.unary_unary(f"/hashmesh.v1.HashService/Invented{index}").future(
                b"", timeout=30
            ).add_done_callback(done)
        for _ in range(in_flight):
            slots.acquire()
    return codes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--names", type=int, default=50_000)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--dsn")
    args = parser.parse_args()
    py = sys.executable
    workdir = Path(tempfile.mkdtemp(prefix="hm-names-"))
    procs: list[subprocess.Popen[str]] = []
    pg = None
    try:
        dsn = args.dsn
        if not dsn:
            from hashmesh.core.queue import migrations
            from hashmesh.core.queue.embedded_pg import EmbeddedPostgres

            pg = EmbeddedPostgres(data_dir=workdir / "pg")
            pg.start()
            migrations.migrate(pg.dsn)
            dsn = pg.dsn
        replicas = []
        for _ in range(args.replicas):
            popen, address = start(
                [py, "-m", "hashmesh.hashd", "--listen", "127.0.0.1:0", "--database-url", dsn]
            )
            procs.append(popen)
            replicas.append(address)
        balancer, address = start(
            [
                py,
                "-m",
                "hashmesh.balancer",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--backends",
                ",".join(replicas),
            ]
        )
        procs.append(balancer)
        flood(address, 0, 2000)  # warm up
        before = [rss(p.pid) for p in procs]
        codes = flood(address, 2000, args.names)
        after = [rss(p.pid) for p in procs]
        print(
            f"# {args.names} distinct method names through the balancer, {args.replicas} replicas: {codes}"
        )
        print(
            f"balancer RSS {before[-1] / MIB:.0f} -> {after[-1] / MIB:.0f} MiB "
            f"(+{(after[-1] - before[-1]) / MIB:.1f})"
        )
        for index in range(args.replicas):
            print(
                f"replica {index} RSS {before[index] / MIB:.0f} -> {after[index] / MIB:.0f} MiB "
                f"(+{(after[index] - before[index]) / MIB:.1f})"
            )
    finally:
        for popen in procs:
            popen.send_signal(signal.SIGTERM)
        for popen in procs:
            try:
                popen.wait(10)
            except subprocess.TimeoutExpired:
                popen.kill()
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
