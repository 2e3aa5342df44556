"""Benchmarks of one hashd replica, run by hand (not by the tests).

    /work/venv/bin/python bench/hashd_bench.py                 # everything, ~2 minutes
    /work/venv/bin/python bench/hashd_bench.py --only unary    # unary, argon2, stream, cost

Starts its own embedded PostgreSQL (or uses ``--dsn``), hashd processes and, for the unary
comparison, a bare grpc.aio server doing only sha256 (bench/hashd_bare_server.py). Figures:

- unary: sha256 of 32 bytes at 64 concurrent calls: calls/s, p50/p99, and server CPU per
  call (utime+stime from /proc/PID/stat before/after), hashd against the bare server in the
  same run, alternating rounds so both see the same machine load.
- argon2: argon2id with a given salt: cache miss, memory-tier hit and shared-tier hit (a
  second replica) p50; argon2id with default parameters (random salt): hashes/s.
- stream: HashStream sha256 MB/s against hashlib alone on the same bytes.
- cost: the cache's lookup cost against compute cost per algorithm and input size (the
  measurement behind the default cached algorithms; see hashd/CACHE.md).

The machine is shared and small: compare ratios within one run, not absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")


# -- processes --------------------------------------------------------------------------


@contextmanager
def database(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    from hashmesh.core import migrations
    from hashmesh.core.embedded_pg import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="hashd-bench-") as folder:
        server = EmbeddedPostgres(data_dir=Path(folder))
        server.start()
        migrations.migrate(server.dsn)
        try:
            yield server.dsn
        finally:
            server.stop()


class Daemon:
    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if " listening on " in line:
                self.address = line.strip().rsplit(" ", 1)[1]
                return
        raise RuntimeError(f"{argv} did not start")

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(20)


def hashd(dsn: str, **env: str) -> Daemon:
    return Daemon(
        ["-m", "hashmesh.hashd", "--listen", "127.0.0.1:0", "--database-url", dsn],
        {"HASHMESH_CACHE_SECRET": "bench-secret", "HASHMESH_LOG_LEVEL": "WARNING", **env},
    )


# -- measurements -----------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def unary_round(daemon: Daemon, seconds: float, concurrency: int) -> dict[str, float]:
    request = hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=os.urandom(32))
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        stub = hash_pb2_grpc.HashServiceStub(channel)
        for _ in range(200):  # warm up
            await stub.ComputeHash(request, timeout=10)
        stop_at = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                await stub.ComputeHash(request, timeout=10)
                latencies.append(time.perf_counter() - started)

        cpu_before, wall_before = daemon.cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        cpu_after, wall_after = daemon.cpu_seconds(), time.perf_counter()
    calls = len(latencies)
    return {
        "calls_s": calls / (wall_after - wall_before),
        "p50_ms": pct(latencies, 0.5) * 1e3,
        "p99_ms": pct(latencies, 0.99) * 1e3,
        "cpu_us": (cpu_after - cpu_before) / calls * 1e6,
    }


def bench_unary(dsn: str, seconds: float, rounds: int) -> None:
    print(f"\n## unary sha256 of 32 bytes, 64 concurrent calls, {rounds}x{seconds:.0f}s per server")
    bare = Daemon([str(HERE / "hashd_bare_server.py")])
    replica = hashd(dsn)
    results: dict[str, list[dict[str, float]]] = {"bare": [], "hashd": []}
    try:
        for _ in range(rounds):
            for name, daemon in (("bare", bare), ("hashd", replica)):
                results[name].append(asyncio.run(unary_round(daemon, seconds, 64)))
    finally:
        bare.stop()
        replica.stop()
    summary = {}
    for name, rows in results.items():
        merged = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        summary[name] = merged
        print(
            f"{name:6} {merged['calls_s']:8.0f} calls/s  p50 {merged['p50_ms']:.2f} ms"
            f"  p99 {merged['p99_ms']:.2f} ms  server CPU {merged['cpu_us']:.0f} us/call"
        )
    ratio = summary["hashd"]["cpu_us"] / summary["bare"]["cpu_us"]
    print(f"hashd / bare CPU per call: {ratio:.2f}x (target <= 1.3x)")


async def argon2_p50(
    address: str, passwords: list[bytes], params: common_pb2.Argon2Params
) -> tuple[float, int]:
    latencies = []
    cached = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = hash_pb2_grpc.HashServiceStub(channel)
        for password in passwords:
            started = time.perf_counter()
            reply = await stub.ComputeHash(
                hash_pb2.HashRequest(
                    algorithm=common_pb2.ALGORITHM_ARGON2ID, data=password, argon2=params
                ),
                timeout=60,
            )
            latencies.append(time.perf_counter() - started)
            cached += reply.result.cached
    return statistics.median(latencies) * 1e3, cached


async def argon2_rate(address: str, count: int, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = hash_pb2_grpc.HashServiceStub(channel)
        queue = list(range(count))

        async def caller() -> None:
            while queue:
                queue.pop()
                await stub.ComputeHash(
                    hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_ARGON2ID, data=b"pw"),
                    timeout=120,
                )

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


def bench_argon2(dsn: str, count: int) -> None:
    print(f"\n## argon2id (default t=3 m=64MiB p=4) with a given salt, {count} calls each")
    first, second = hashd(dsn), hashd(dsn)
    params = common_pb2.Argon2Params(salt=b"bench-salt-16byt")
    passwords = [os.urandom(12) for _ in range(count)]
    try:
        miss, hits = asyncio.run(argon2_p50(first.address, passwords, params))
        assert hits == 0
        memory, hits = asyncio.run(argon2_p50(first.address, passwords, params))
        assert hits == count
        shared, hits = asyncio.run(argon2_p50(second.address, passwords, params))
        assert hits == count
        print(
            f"miss p50 {miss:.2f} ms   memory-tier hit p50 {memory:.3f} ms   shared-tier hit p50 {shared:.3f} ms"
        )
        print(f"miss / shared hit: {miss / shared:.0f}x")
        rate = asyncio.run(argon2_rate(first.address, 4 * count, 4))
        print(f"argon2id default parameters, random salt: {rate:.1f} hashes/s (4 concurrent calls)")
    finally:
        first.stop()
        second.stop()


async def stream_once(address: str, block: bytes, count: int) -> float:
    async def messages() -> AsyncIterator[hash_pb2.HashStreamRequest]:
        yield hash_pb2.HashStreamRequest(
            header=hash_pb2.HashStreamHeader(algorithm=common_pb2.ALGORITHM_SHA256)
        )
        message = hash_pb2.HashStreamRequest(chunk=block)
        for _ in range(count):
            yield message

    async with grpc.aio.insecure_channel(address) as channel:
        stub = hash_pb2_grpc.HashServiceStub(channel)
        started = time.perf_counter()
        reply = await stub.HashStream(messages(), timeout=600)
        elapsed = time.perf_counter() - started
    assert reply.total_bytes == len(block) * count
    return len(block) * count / elapsed / 1e6


def bench_stream(dsn: str, mib: int, chunk_kib: int) -> None:
    print(f"\n## HashStream sha256, {mib} MiB in {chunk_kib} KiB chunks")
    replica = hashd(dsn)
    block = os.urandom(chunk_kib * 1024)
    count = mib * 1024 // chunk_kib
    try:
        asyncio.run(stream_once(replica.address, block, max(1, count // 8)))  # warm up
        through = statistics.median(
            asyncio.run(stream_once(replica.address, block, count)) for _ in range(3)
        )
    finally:
        replica.stop()
    rates = []
    for _ in range(3):
        digest = hashlib.sha256()
        started = time.perf_counter()
        for _ in range(count):
            digest.update(block)
        rates.append(len(block) * count / (time.perf_counter() - started) / 1e6)
    alone = statistics.median(rates)
    print(
        f"hashd stream {through:.0f} MB/s   hashlib alone {alone:.0f} MB/s   ratio {through / alone:.0%} (target >= 50%)"
    )


def bench_cost(dsn: str) -> None:
    from hashd_cache_cost import run as cost_run  # bench/ is on sys.path when run as a script

    asyncio.run(cost_run(dsn))


def main() -> None:
    # The daemons refuse to start without one (it signs the balancer's identity stamps).
    os.environ.setdefault("HASHMESH_IDENTITY_SECRET", os.urandom(16).hex())
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", help="PostgreSQL to use (default: an embedded one)")
    parser.add_argument("--only", default="unary,argon2,stream,cost")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one unary round")
    parser.add_argument("--rounds", type=int, default=3, help="unary rounds per server")
    parser.add_argument("--argon2-calls", type=int, default=20)
    parser.add_argument("--stream-mib", type=int, default=512)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    args = parser.parse_args()
    wanted = set(args.only.split(","))
    with database(args.dsn) as dsn:
        if "unary" in wanted:
            bench_unary(dsn, args.seconds, args.rounds)
        if "argon2" in wanted:
            bench_argon2(dsn, args.argon2_calls)
        if "stream" in wanted:
            bench_stream(dsn, args.stream_mib, args.chunk_kib)
        if "cost" in wanted:
            bench_cost(dsn)


if __name__ == "__main__":
    main()
