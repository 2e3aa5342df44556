"""Attack 1: one peer holds thousands of streams. Its streams over its budget are refused at
once with RESOURCE_EXHAUSTED and RetryInfo; the streams it holds take no unary slot of any
replica, so another peer's calls go through, and the operator still gets in."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from hashmesh.core.identity import address_identity
from hashmesh.v1 import task_pb2, task_pb2_grpc
from tests.adversarial.raw_h2 import StreamResult, hold_streams, wait_answered
from tests.adversarial.victim import admin_answers, hash_codes, ok_share, stream_codes
from tests.conftest import Processes
from tests.stamps import channel_as

pytestmark = pytest.mark.timeout(120)

ATTACKER = "127.0.0.2"
STREAMS = 2000
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
CANCELLED = grpc.StatusCode.CANCELLED.value[0]


def _refused_with_retry_info(result: StreamResult) -> bool:
    details = result.details()
    return (
        result.status == RESOURCE_EXHAUSTED
        and details is not None
        and any(d.type_url.endswith("google.rpc.RetryInfo") for d in details.details)
    )


def _attack(
    address: str,
    method: str,
    held: int,
    message: bytes | None = None,
    others: Callable[[], None] | None = None,
) -> None:
    """Hold ``STREAMS`` streams of ``method``; all but ``held`` must be refused as over budget.
    ``others`` checks more of what other peers see while the streams are held."""
    connections, results = hold_streams(
        address, ATTACKER, method, STREAMS, message=message, end=message is not None
    )
    try:
        wait_answered(results, STREAMS - held)
        # What the others see, while the streams are held.
        codes = hash_codes(address, 300)
        assert ok_share(codes) >= 0.99, {c: codes.count(c) for c in set(codes)}
        assert ok_share(stream_codes(address, 10)) == 1.0
        if others is not None:
            others()
        answered = [r for r in results if r.ended.is_set()]
        assert len(answered) == STREAMS - held  # the rest are held open
        refused = [r for r in answered if _refused_with_retry_info(r)]
        # Under heavy load grpc.aio's server now and then ends a refused stream CANCELLED instead
        # (seen at 0-8% of them in full-suite runs, upload and watch streams alike, never in
        # isolation): a refusal all the same. Any other status — above all OK — fails the test.
        odd = [(r.status, r.message) for r in answered if r not in refused]
        assert all(status == CANCELLED for status, _ in odd), odd[:5]
        assert len(refused) >= 0.5 * len(answered), (len(refused), len(answered))
        assert "limit per client" in refused[0].message
    finally:
        for connection in connections:
            connection.close()


def test_held_hash_streams_leave_other_peers_alone(dsn: str, procs: Processes) -> None:
    replicas = [procs.hashd(dsn) for _ in range(2)]
    # Small per-replica caps: without separate stream slots 2,000 held streams would fill them.
    balancer = procs.balancer(
        [r.address for r in replicas], env={"HASHMESH_BALANCER_MAX_IN_FLIGHT": "64"}
    )
    _attack(balancer.addresses["balancer"], "/hashmesh.v1.HashService/HashStream", held=64)
    assert admin_answers(balancer.addresses["balancer admin"])


def test_held_watch_streams_leave_other_peers_alone(dsn: str, procs: Processes) -> None:
    replicas = [procs.hashd(dsn) for _ in range(2)]
    balancer = procs.balancer(
        [r.address for r in replicas], env={"HASHMESH_BALANCER_MAX_IN_FLIGHT": "64"}
    )
    address = balancer.addresses["balancer"]
    # The attacker's own task (tasks are private to their submitter), submitted to a replica
    # as the balancer would for 127.0.0.2; no worker runs, so it stays pending.
    with channel_as(replicas[0].address, address_identity(ATTACKER)) as channel:
        task = (
            task_pb2_grpc.TaskServiceStub(channel)
            .SubmitTask(
                task_pb2.SubmitTaskRequest(spec=task_pb2.TaskSpec(algorithm=1, data=b"pending")),
                timeout=10,
            )
            .task
        )
    watch = task_pb2.WatchTaskRequest(id=task.id).SerializeToString()
    _attack(address, "/hashmesh.v1.TaskService/WatchTask", held=256, message=watch)
    assert admin_answers(balancer.addresses["balancer admin"])


def test_held_submit_and_watch_streams_leave_other_peers_alone(dsn: str, procs: Processes) -> None:
    """SubmitAndWatchTask is a watch for the budgets: one peer holding thousands is refused
    beyond its watch budget, as with WatchTask, while other peers are served."""
    replicas = [procs.hashd(dsn) for _ in range(2)]
    balancer = procs.balancer(
        [r.address for r in replicas], env={"HASHMESH_BALANCER_MAX_IN_FLIGHT": "64"}
    )
    # One idempotency key: the streams let in share one task, which no worker runs.
    submit = task_pb2.SubmitAndWatchTaskRequest(
        spec=task_pb2.TaskSpec(algorithm=1, data=b"held", idempotency_key="held")
    ).SerializeToString()
    address = balancer.addresses["balancer"]

    def another_peer_submits_and_watches() -> None:
        with grpc.insecure_channel(address) as channel:
            call = task_pb2_grpc.TaskServiceStub(channel).SubmitAndWatchTask(
                task_pb2.SubmitAndWatchTaskRequest(
                    spec=task_pb2.TaskSpec(algorithm=1, data=b"not held")
                ),
                timeout=20,
            )
            first = next(call)
            call.cancel()
        assert first.created and first.task.client_id == "ip:127.0.0.1"

    _attack(
        address,
        "/hashmesh.v1.TaskService/SubmitAndWatchTask",
        held=256,
        message=submit,
        others=another_peer_submits_and_watches,
    )
    assert admin_answers(balancer.addresses["balancer admin"])
