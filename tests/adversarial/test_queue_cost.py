"""Attack 5: queued work counted in tasks, not cost, and priorities for anyone. A batch that
would queue more work than a client's cost budget is refused whole (RESOURCE_EXHAUSTED with
RetryInfo, nothing stored), cost adds up across batches, another client still gets its tasks
in, and a priority above the client's cap is refused naming the field."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hashmesh.v1 import common_pb2, task_pb2, task_pb2_grpc
from tests.conftest import Processes
from tests.stamps import channel_as

pytestmark = pytest.mark.timeout(120)

COSTLIEST = common_pb2.Argon2Params(time_cost=10, memory_cost_kib=256 * 1024, parallelism=1)
COSTLIEST_UNITS = 10 * 256 * 1024 * 1024 + 4096
"""``core.tasks.limits.task_cost`` of one such task."""


def argon2_batch(count: int, priority: int = 0) -> task_pb2.SubmitTasksRequest:
    return task_pb2.SubmitTasksRequest(
        specs=[
            task_pb2.TaskSpec(
                algorithm=common_pb2.ALGORITHM_ARGON2ID,
                data=b"pw%d" % i,
                argon2=COSTLIEST,
                priority=priority,
            )
            for i in range(count)
        ]
    )


def refusal(err: grpc.RpcError) -> tuple[grpc.StatusCode, set[str], str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    kinds = {d.type_url.rsplit(".", 1)[1] for d in status.details}
    return err.code(), kinds, status.message  # type: ignore[attr-defined]


def test_cost_budget_per_client_and_priority_caps(dsn: str, procs: Processes) -> None:
    budget = 120 * COSTLIEST_UNITS  # room for 120 of the costliest tasks per client
    replica = procs.hashd(
        dsn,
        env={
            "HASHMESH_MAX_PENDING_COST_PER_CLIENT": str(budget),
            "HASHMESH_PRIORITY_OVERRIDES": "ops=100",
        },
    )

    def tasks_of(client: str) -> task_pb2_grpc.TaskServiceStub:
        """Calls stamped as the balancer does for ``client``."""
        return task_pb2_grpc.TaskServiceStub(channel_as(replica.address, client))

    greedy = tasks_of("greedy")
    # One request of 10,000 costliest tasks (~25 TiB of work, the size of the attack).
    with pytest.raises(grpc.RpcError) as refused:
        greedy.SubmitTasks(argon2_batch(10_000), timeout=30)
    code, kinds, message = refusal(refused.value)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and {"RetryInfo", "ErrorInfo"} <= kinds
    assert "units of work" in message
    # Within budget it goes in; the cost adds up, so the next batch no longer fits.
    assert len(greedy.SubmitTasks(argon2_batch(100), timeout=30).tasks) == 100
    with pytest.raises(grpc.RpcError) as second:
        greedy.SubmitTasks(argon2_batch(100), timeout=30)
    assert refusal(second.value)[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    stored = greedy.ListTasks(task_pb2.ListTasksRequest(page_size=1000), timeout=10)
    assert len(stored.tasks) == 100  # refused batches stored nothing
    # Another client is not charged for the first one's work.
    assert len(tasks_of("modest").SubmitTasks(argon2_batch(100), timeout=30).tasks) == 100

    with pytest.raises(grpc.RpcError) as jumped:
        tasks_of("greedy-2").SubmitTasks(argon2_batch(1, priority=100), timeout=10)
    assert jumped.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    status = rpc_status.from_call(jumped.value)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert (
        any(d.Unpack(bad) for d in status.details)
        and bad.field_violations[0].field == "specs[0].priority"
    )
    granted = tasks_of("ops").SubmitTasks(argon2_batch(1, priority=100), timeout=10)
    assert granted.tasks[0].priority == 100
    assert "Traceback" not in replica.log()
