"""Input that does not apply is refused, naming the field; bounds are the ones the proto
comments state; an oversized page_size is capped (AIP-158), not an error."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from hashmesh.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    hash_pb2,
    hash_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)
from tests.conftest import Processes

LIMIT = 64 * 1024
SHA256 = common_pb2.ALGORITHM_SHA256


def fields(error: grpc.RpcError) -> list[str]:
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error  # type: ignore[attr-defined]
    raw = dict(error.trailing_metadata())["grpc-status-details-bin"]  # type: ignore[attr-defined]
    for packed in status_pb2.Status.FromString(raw).details:
        bad = error_details_pb2.BadRequest()
        if packed.Unpack(bad):
            return [v.field for v in bad.field_violations]
    raise AssertionError("no BadRequest")


def refused(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value


def stream(*messages: hash_pb2.HashStreamRequest) -> Iterator[hash_pb2.HashStreamRequest]:
    yield from messages


def test_parameters_that_do_not_apply_and_bounds_are_refused(dsn: str, procs: Processes) -> None:
    replica = procs.hashd(dsn, env={"HASHMESH_MAX_MESSAGE_BYTES": str(LIMIT)})
    balancer = procs.balancer([replica.address], env={"HASHMESH_MAX_MESSAGE_BYTES": str(LIMIT)})
    with grpc.insecure_channel(replica.address) as channel:
        hashes = hash_pb2_grpc.HashServiceStub(channel)
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        # argon2 parameters with sha256: refused, not ignored (the deprecated Hash name too).
        with_params = hash_pb2.HashRequest(
            algorithm=SHA256, data=b"x", argon2=common_pb2.Argon2Params()
        )
        assert fields(refused(hashes.ComputeHash, with_params, timeout=10)) == ["argon2"]
        assert fields(refused(hashes.Hash, with_params, timeout=10)) == ["argon2"]
        spec = task_pb2.TaskSpec(algorithm=SHA256, argon2=common_pb2.Argon2Params(salt=b"s" * 16))
        assert fields(
            refused(tasks.SubmitTask, task_pb2.SubmitTaskRequest(spec=spec), timeout=10)
        ) == ["spec.argon2"]
        # Signed types: a negative value is out of bounds, field by field.
        argon2 = common_pb2.Argon2Params(
            time_cost=-1, memory_cost_kib=-5, parallelism=-1, hash_len=-1
        )
        request = hash_pb2.HashRequest(
            algorithm=common_pb2.ALGORITHM_ARGON2ID, data=b"pw", argon2=argon2
        )
        assert fields(refused(hashes.ComputeHash, request, timeout=10)) == [
            "argon2.time_cost",
            "argon2.memory_cost_kib",
            "argon2.parallelism",
            "argon2.hash_len",
        ]
        negative = task_pb2.TaskSpec(algorithm=SHA256, max_attempts=-1, priority=101)
        assert fields(
            refused(tasks.SubmitTask, task_pb2.SubmitTaskRequest(spec=negative), timeout=10)
        ) == ["spec.priority", "spec.max_attempts"]
        listing = task_pb2.ListTasksRequest(page_size=-1, statuses=[0, 99], client_id="\x00")
        assert fields(refused(tasks.ListTasks, listing, timeout=10)) == [
            "statuses[0]",
            "statuses[1]",
            "page_size",
            "client_id",
        ]
        # HashStream: a message with neither header nor chunk, and a chunk over the limit.
        header = hash_pb2.HashStreamRequest(header=hash_pb2.HashStreamHeader(algorithm=SHA256))
        empty = refused(hashes.HashStream, stream(header, hash_pb2.HashStreamRequest()), timeout=10)
        assert fields(empty) == ["chunk"]
        big = refused(
            hashes.HashStream,
            stream(header, hash_pb2.HashStreamRequest(chunk=b"c" * (LIMIT + 1))),
            timeout=10,
        )
        assert fields(big) == ["chunk"]
        at_limit = hashes.HashStream(
            stream(header, hash_pb2.HashStreamRequest(chunk=b"c" * LIMIT)), timeout=10
        )
        assert at_limit.total_bytes == LIMIT
        # An empty chunk is a chunk: allowed (a client may flush one).
        assert (
            hashes.HashStream(
                stream(header, hash_pb2.HashStreamRequest(chunk=b"")), timeout=10
            ).total_bytes
            == 0
        )

        # page_size over the maximum is read as the maximum (AIP-158).
        batch = [
            task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_MD5, data=b"%d" % i)
            for i in range(1005)
        ]
        tasks.SubmitTasks(task_pb2.SubmitTasksRequest(specs=batch), timeout=30)
        page = tasks.ListTasks(task_pb2.ListTasksRequest(page_size=5000), timeout=30)
        assert len(page.tasks) == 1000 and page.next_page_token
        rest = tasks.ListTasks(
            task_pb2.ListTasksRequest(page_size=5000, page_token=page.next_page_token), timeout=30
        )
        assert len(rest.tasks) == 5 and not rest.next_page_token

        # cached_algorithms is the enum; the deprecated names field is kept filled.
        stats = cache_pb2_grpc.CacheServiceStub(channel).GetCacheStats(
            cache_pb2.GetCacheStatsRequest(), timeout=10
        )
        assert list(stats.cached_algorithms) == [common_pb2.ALGORITHM_ARGON2ID]
        assert list(stats.cached_algorithm_names) == ["argon2id"]

    with grpc.insecure_channel(balancer.addresses["balancer admin"]) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        assert fields(
            refused(admin.GetStats, admin_pb2.GetStatsRequest(top_peers=-1), timeout=10)
        ) == ["top_peers"]
        assert admin.GetStats(admin_pb2.GetStatsRequest(top_peers=1_000_000), timeout=10).calls >= 0
        bad_burst = admin_pb2.SetRateLimitsRequest(
            default_limit=admin_pb2.RateLimit(rate_per_second=5, burst=-1)
        )
        assert fields(refused(admin.SetRateLimits, bad_burst, timeout=10)) == [
            "default_limit.burst"
        ]
        overrides = admin_pb2.SetRateLimitsRequest(
            disable=True,
            default_limit=admin_pb2.RateLimit(),
            upsert_overrides=[
                admin_pb2.ClientRateLimit(limit=admin_pb2.RateLimit(rate_per_second=0)),
                admin_pb2.ClientRateLimit(
                    client_id="ok", limit=admin_pb2.RateLimit(rate_per_second=1, burst=-3)
                ),
            ],
        )
        assert fields(refused(admin.SetRateLimits, overrides, timeout=10)) == [
            "default_limit",
            "default_limit.rate_per_second",
            "upsert_overrides[0].client_id",
            "upsert_overrides[0].limit.rate_per_second",
            "upsert_overrides[1].limit.burst",
        ]
