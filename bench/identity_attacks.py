"""The hostile-client attacks of issue 10 against a real mesh, with a figure for each.

Starts an embedded PostgreSQL, one hashd, one workerd and two balancers on loopback (one
rate-limited at 50/s burst 50 with an override ``vip=100000``, one with API keys for alice
and bob and an admin token), runs each attack, prints one line per figure and stops
everything. Distinct peers come from relays bound to 127.0.0.2 / 127.0.0.3. It uses only the
public gRPC API, so it runs unchanged against an older checkout (``--python`` of that
checkout's virtualenv) for the "before" figures:

    .venv/bin/python bench/identity_attacks.py                       # this branch
    .venv/bin/python bench/identity_attacks.py --python /old/.venv/bin/python

Bounded: the floods last ``--seconds`` (default 10) at ``--rate`` calls/s (default 500)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hashmesh.balancer import keys  # noqa: E402
from hashmesh.core.queue.embedded_pg import EmbeddedPostgres  # noqa: E402
from hashmesh.v1 import (  # noqa: E402
    admin_pb2,
    admin_pb2_grpc,
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    hash_pb2,
    task_pb2,
    task_pb2_grpc,
)
from tests.source_relay import SourceRelay  # noqa: E402

LISTENING = re.compile(r"^(?P<name>[\w -]+?) (?:listening on|ready as) (?P<address>\S+)$")
HASH = "/hashmesh.v1.HashService/Hash"
HASH_REQUEST = hash_pb2.HashRequest(
    algorithm=common_pb2.ALGORITHM_SHA256, data=b"abc"
).SerializeToString()
ADMIN_TOKEN = "bench-admin-token"


def start(
    python: str, argv: list[str], env: dict[str, str], expect: int, log: Path
) -> tuple[subprocess.Popen[str], list[str]]:
    sink = open(log, "w")  # noqa: SIM115 - lives as long as the process
    popen = subprocess.Popen(
        [python, "-m", *argv],
        stdout=subprocess.PIPE,
        stderr=sink,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )
    assert popen.stdout is not None
    found: list[str] = []
    deadline = time.monotonic() + 60
    while len(found) < expect and time.monotonic() < deadline:
        line = popen.stdout.readline()
        if not line:
            break
        match = LISTENING.match(line.strip())
        if match:
            found.append(match.group("address"))
    if len(found) < expect:
        popen.kill()
        raise RuntimeError(f"{argv[0]} did not start; see {log}")
    return popen, found


async def paced(address: str, rate: float, seconds: float, metadata_for: Any) -> tuple[int, int]:
    """(admitted, sent): calls at ``rate``/s for ``seconds``, without waiting for answers."""
    admitted = sent = 0
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(HASH)

        async def one(index: int) -> None:
            nonlocal admitted
            try:
                await call(HASH_REQUEST, timeout=30, metadata=metadata_for(index))
                admitted += 1
            except grpc.aio.AioRpcError:
                pass

        tasks = []
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            while sent < elapsed * rate:
                tasks.append(asyncio.create_task(one(sent)))
                sent += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
    return admitted, sent


def rate_attacks(address: str, rate: float, seconds: float) -> None:
    with SourceRelay("127.0.0.2", address) as attacker, SourceRelay("127.0.0.3", address) as victim:
        admitted, sent = asyncio.run(
            paced(attacker.address, rate, seconds, lambda i: (("x-client-id", f"r{i}"),))
        )
        print(
            f"rotating x-client-id: {admitted} of {sent} admitted (limit 50/s + burst 50 over {seconds:g}s: "
            f"{50 * seconds + 50:.0f})"
        )
        admitted, sent = asyncio.run(
            paced(attacker.address, rate, seconds, lambda i: (("x-client-id", "vip"),))
        )
        print(f"claiming the override's id 'vip': {admitted} of {sent} admitted")

        async def victim_and_attacker() -> tuple[tuple[int, int], tuple[int, int]]:
            claim = (("x-client-id", "victim"),)
            return tuple(
                await asyncio.gather(  # type: ignore[return-value]
                    paced(victim.address, 9, seconds, lambda i: claim),
                    paced(attacker.address, rate, seconds, lambda i: claim),
                )
            )

        (ok, sent), _ = asyncio.run(victim_and_attacker())
        print(
            f"victim (9/s, its own id) while the attacker sends that id: {ok} of {sent} of the victim's calls admitted"
        )


def denied(call: Any, *args: Any, **kwargs: Any) -> str:
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as err:
        return err.code().name  # type: ignore[no-any-return]
    return "OK"


def tenant_attacks(address: str, admin_address: str, api_keys: dict[str, str]) -> None:
    alice = [("x-api-key", api_keys["alice"])]
    bob = [("x-api-key", api_keys["bob"])]
    md5 = common_pb2.ALGORITHM_MD5
    with grpc.insecure_channel(address) as channel:
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        spec = task_pb2.TaskSpec(algorithm=md5, data=b"alice's data", idempotency_key="bob-1")
        as_bob_body = denied(
            tasks.SubmitTask,
            task_pb2.SubmitTaskRequest(
                spec=task_pb2.TaskSpec(algorithm=md5, data=b"x"), client_id="bob"
            ),
            timeout=10,
            metadata=alice,
        )
        print(f"alice submits with client_id 'bob': {as_bob_body}")
        try:
            tasks.SubmitTask(
                task_pb2.SubmitTaskRequest(spec=spec, client_id="bob"), timeout=10, metadata=alice
            )
        except grpc.RpcError:
            tasks.SubmitTask(task_pb2.SubmitTaskRequest(spec=spec), timeout=10, metadata=alice)
        bobs = tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(
                spec=task_pb2.TaskSpec(algorithm=md5, data=b"bob's data", idempotency_key="bob-1")
            ),
            timeout=10,
            metadata=bob,
        )
        print(
            f"bob's keyed submission after alice used his key: created={bobs.created}, "
            f"client_id={bobs.task.client_id!r} (captured: {not bobs.created})"
        )
        victim = tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(
                spec=task_pb2.TaskSpec(
                    algorithm=md5,
                    data=b"b2",
                    run_after=timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600),
                )
            ),
            timeout=10,
            metadata=bob,
        ).task
        listed = tasks.ListTasks(task_pb2.ListTasksRequest(), timeout=10, metadata=alice).tasks
        print(f"alice lists tasks: sees {sum(t.client_id == 'bob' for t in listed)} of bob's")
        outcomes = {
            "GetTask": denied(
                tasks.GetTask, task_pb2.GetTaskRequest(id=victim.id), timeout=10, metadata=alice
            ),
            "WatchTask": denied(
                tasks.WatchTask, task_pb2.WatchTaskRequest(id=victim.id), timeout=3, metadata=alice
            ),
            "ListTasks(client_id=bob)": denied(
                tasks.ListTasks,
                task_pb2.ListTasksRequest(client_id="bob"),
                timeout=10,
                metadata=alice,
            ),
            "CancelTask": denied(
                tasks.CancelTask,
                task_pb2.CancelTaskRequest(id=victim.id),
                timeout=10,
                metadata=alice,
            ),
            "RequeueTask": denied(
                tasks.RequeueTask,
                task_pb2.RequeueTaskRequest(id=victim.id),
                timeout=10,
                metadata=alice,
            ),
        }
        print("alice on bob's task: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))

        first = tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(
                spec=task_pb2.TaskSpec(algorithm=md5, data=b"one", idempotency_key="reuse")
            ),
            timeout=10,
            metadata=alice,
        )
        other = denied(
            tasks.SubmitTask,
            task_pb2.SubmitTaskRequest(
                spec=task_pb2.TaskSpec(
                    algorithm=common_pb2.ALGORITHM_SHA256, data=b"two", idempotency_key="reuse"
                )
            ),
            timeout=10,
            metadata=alice,
        )
        print(f"reused key with another request: {other} (first task {first.task.id[:8]})")

        cache = cache_pb2_grpc.CacheServiceStub(channel)
        print(
            f"ClearCache with alice's key, no admin token: "
            f"{denied(cache.ClearCache, cache_pb2.ClearCacheRequest(), timeout=10, metadata=alice)}"
        )
        stats = tasks.GetQueueStats(task_pb2.GetQueueStatsRequest(), timeout=10, metadata=alice)
        print(f"GetQueueStats for alice: {len(stats.workers)} workers with host and PID shown")
    with grpc.insecure_channel(admin_address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        lower = denied(
            admin.GetStats,
            admin_pb2.GetStatsRequest(),
            timeout=10,
            metadata=[("authorization", f"bearer {ADMIN_TOKEN}")],
        )
        print(f"AdminService with 'authorization: bearer <token>' (lower case): {lower}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter whose hashmesh runs the mesh"
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=500.0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hm-identity-"))
    env = {"HASHMESH_IDENTITY_SECRET": os.urandom(16).hex(), "HASHMESH_ADMIN_TOKEN": ADMIN_TOKEN}
    pg = EmbeddedPostgres(data_dir=workdir / "pg")
    pg.start()
    procs: list[subprocess.Popen[str]] = []
    try:
        hashd, [replica] = start(
            args.python,
            ["hashmesh.hashd", "--listen", "127.0.0.1:0", "--database-url", pg.dsn],
            env,
            1,
            workdir / "hashd.log",
        )
        procs.append(hashd)
        worker, _ = start(
            args.python,
            ["hashmesh.workerd", "--database-url", pg.dsn],
            env,
            1,
            workdir / "workerd.log",
        )
        procs.append(worker)
        base = [
            "hashmesh.balancer",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--backends",
            replica,
        ]
        limited, (limited_address, _) = start(
            args.python,
            [*base, "--rate-limit", "50/50"],
            {**env, "HASHMESH_BALANCER_RATE_LIMIT_OVERRIDES": "vip=100000/100000"},
            2,
            workdir / "limited.log",
        )
        procs.append(limited)
        api_keys = {name: keys.generate_key() for name in ("alice", "bob")}
        (workdir / "keys").write_text(
            "".join(keys.key_line(n, k) + "\n" for n, k in api_keys.items())
        )
        keyed, (keyed_address, keyed_admin) = start(
            args.python,
            [*base, "--api-keys-file", str(workdir / "keys")],
            env,
            2,
            workdir / "keyed.log",
        )
        procs.append(keyed)
        rate_attacks(limited_address, args.rate, args.seconds)
        tenant_attacks(keyed_address, keyed_admin, api_keys)
    finally:
        for popen in procs:
            popen.terminate()
        for popen in procs:
            try:
                popen.wait(20)
            except subprocess.TimeoutExpired:
                popen.kill()
        pg.stop()


if __name__ == "__main__":
    main()
