"""hashd in a real memory- and CPU-limited cgroup (as a container runs it): the argon2
threads and the largest memory_cost it accepts come from the limits, two maximal calls at
once still fit, and a call over the bound is refused with INVALID_ARGUMENT naming the field,
not an out-of-memory kill. Needs root and cgroup v1 controllers (skipped otherwise); the
explicit setting is checked everywhere."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hashmesh.core import resources
from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc
from tests.conftest import Processes
from tests.procs import start_process, wait_serving

MiB = 1024 * 1024


def _argon2(address: str, memory_kib: int) -> hash_pb2.HashResponse:
    with grpc.insecure_channel(address) as channel:
        return hash_pb2_grpc.HashServiceStub(channel).Hash(
            hash_pb2.HashRequest(
                algorithm=common_pb2.ALGORITHM_ARGON2ID,
                data=b"pw",
                argon2=common_pb2.Argon2Params(
                    time_cost=1, memory_cost_kib=memory_kib, parallelism=1
                ),
            ),
            timeout=60,
        )


def _refused_field(address: str, memory_kib: int) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as refused:
        _argon2(address, memory_kib)
    status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
    assert status is not None
    [detail] = [d for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)]
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    violation = bad.field_violations[0]
    return refused.value.code(), violation.field, violation.description  # type: ignore[attr-defined]


@pytest.fixture
def limited_cgroup() -> Iterator[list[Path]]:
    """A child of this process's own v1 memory and cpu cgroups: 256 MiB, 2 CPUs."""
    own = resources.own_cgroups(Path("/proc/self/cgroup").read_text())
    base = Path("/sys/fs/cgroup")
    if os.geteuid() != 0 or "memory" not in own or "cpu" not in own:
        pytest.skip("needs root and cgroup v1 memory and cpu controllers")
    name = f"hashmesh-test-{uuid.uuid4().hex[:8]}"
    made = []
    try:
        for controller in ("memory", "cpu"):
            directory = base / controller / own[controller].lstrip("/") / name
            directory.mkdir()
            made.append(directory)
        (made[0] / "memory.limit_in_bytes").write_text(str(256 * MiB))
        (made[1] / "cpu.cfs_period_us").write_text("100000")
        (made[1] / "cpu.cfs_quota_us").write_text("200000")
    except OSError as exc:
        for directory in made:
            directory.rmdir()
        pytest.skip(f"cannot make a cgroup here: {exc}")
    try:
        yield made
    finally:
        for directory in made:
            directory.rmdir()  # empty by then: the fixture's process has been stopped


def test_limits_of_the_cgroup_size_argon2(
    dsn: str, tmp_path: Path, limited_cgroup: list[Path]
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HASHMESH_HASHD_CPU", "HASHMESH_HASHD_ARGON2"))
    }
    hashd = start_process(
        "hashd",
        [
            "tests.in_cgroup",
            ",".join(map(str, limited_cgroup)),
            "hashmesh.hashd",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            dsn,
        ],
        log_dir=tmp_path,
        env=env,
        expect=("hashd",),
    )
    try:
        wait_serving(hashd.address)
        # 2 CPUs → 2 argon2 threads; (256 - 128 reserved) MiB / 2 threads = 64 MiB per call.
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda _: _argon2(hashd.address, 64 * 1024), range(2)))
        assert all(r.result.encoded.startswith("$argon2id$v=19$m=65536,") for r in replies)
        code, field, description = _refused_field(hashd.address, 64 * 1024 + 1)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and field == "argon2.memory_cost_kib"
        assert "at most 65536 KiB on this server" in description
        assert hashd.popen.poll() is None  # alive: nothing was killed
    finally:
        hashd.terminate()


def test_an_explicit_bound_refuses_larger_requests(dsn: str, procs: Processes) -> None:
    hashd = procs.hashd(dsn, env={"HASHMESH_HASHD_ARGON2_MAX_MEMORY_KIB": "16384"})
    assert _argon2(hashd.address, 16384).result.encoded.startswith("$argon2id$v=19$m=16384,")
    code, field, _ = _refused_field(hashd.address, 32768)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and field == "argon2.memory_cost_kib"
