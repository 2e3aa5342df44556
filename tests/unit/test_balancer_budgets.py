"""Budgets (pure accounting), the per-attempt timeout and the admin state file, without sockets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hashmesh.balancer.budgets import (
    OTHER,
    UNARY,
    UPLOAD,
    WATCH,
    Budgets,
    BudgetSettings,
    OverBudget,
    PeerHolding,
    check_metadata,
)
from hashmesh.balancer.proxy import SERVER_STREAM, method_kinds
from hashmesh.balancer.state import StateFile
from hashmesh.core.errors import InvalidArgument
from hashmesh.core.settings import SettingsError


def small() -> Budgets:
    return Budgets(
        BudgetSettings(
            peer_calls=2,
            total_calls=3,
            peer_upload_streams=1,
            total_upload_streams=5,
            peer_watch_streams=1,
            total_watch_streams=5,
            peer_other_streams=1,
            total_other_streams=5,
            peer_bytes=100,
            total_bytes=150,
        )
    )


def test_a_peer_over_its_budget_is_refused_alone() -> None:
    budgets = small()
    budgets.take("a", UNARY)
    budgets.take("a", UNARY)
    with pytest.raises(OverBudget) as refused:
        budgets.take("a", UNARY)
    assert refused.value.reason == "PEER_BUDGET_EXCEEDED" and refused.value.retry_after > 0
    budgets.take("b", UNARY)  # another peer still gets in ...
    with pytest.raises(OverBudget) as total:
        budgets.take("c", UNARY)  # ... until the total is reached
    assert total.value.reason == "BALANCER_BUDGET_EXCEEDED"
    budgets.give_back("a", UNARY)
    budgets.take("c", UNARY)


def test_kinds_are_counted_apart() -> None:
    budgets = small()
    for kind in (UPLOAD, WATCH, OTHER):
        budgets.take("a", kind)
        with pytest.raises(OverBudget):
            budgets.take("a", kind)
    budgets.take("a", UNARY)  # held streams do not use up unary calls
    assert budgets.held_by("a") == (1, 1, 1, 1)


def test_bytes_in_flight_per_peer_and_in_total() -> None:
    budgets = small()
    budgets.take("a", UNARY, 90)
    with pytest.raises(OverBudget):
        budgets.take("a", UNARY, 20)
    budgets.take("b", UNARY, 50)
    with pytest.raises(OverBudget):
        budgets.take("c", UNARY, 20)
    assert budgets.bytes == 140


def test_peers_holding_nothing_are_forgotten() -> None:
    budgets = small()
    for peer in range(1000):
        budgets.take(str(peer), WATCH)
        budgets.give_back(str(peer), WATCH)
    assert len(budgets) == 0 and budgets.totals == [0, 0, 0, 0]
    with pytest.raises(OverBudget):  # a refusal leaves nothing behind either
        budgets.take("x", UNARY, 10_000)
    assert len(budgets) == 0


def test_disabled_budgets_still_check_metadata() -> None:
    budgets = Budgets(BudgetSettings(enabled=False, peer_calls=1))
    done: list[object] = []
    for _ in range(3):
        budgets.hold("a", UNARY, 0, [("x", "y")], done.append)
    assert budgets.totals == [0, 0, 0, 0] and not done
    with pytest.raises(InvalidArgument):
        budgets.hold("a", UNARY, 0, [("x-note", "é")], done.append)


def test_snapshot_shows_the_totals_and_the_heaviest_holders() -> None:
    budgets = small()
    budgets.take("ip:127.0.0.2", UPLOAD)
    budgets.take("ip:127.0.0.2", WATCH)
    budgets.take("ip:127.0.0.2", UNARY, 40)
    budgets.take("client-b", UNARY, 60)
    budgets.take("client-c", UNARY, 10)
    with pytest.raises(OverBudget):
        budgets.take("client-b", UNARY, 60)
    snap = budgets.snapshot(2)
    assert snap.enabled and snap.in_use == (3, 1, 1, 0) and snap.bytes == 110
    assert snap.limits.total_calls == 3 and snap.limits.peer_bytes == 100
    assert snap.refused == 1
    # Most held first; a tie (one call each) goes to the peer with more bytes in flight.
    assert snap.top == [
        PeerHolding("ip:127.0.0.2", (1, 1, 1, 0), 40),
        PeerHolding("client-b", (1, 0, 0, 0), 60),
    ]
    assert len(budgets.snapshot(1000).top) == 3  # bounded by the peers holding something
    assert budgets.snapshot(0).top == []  # the metrics exporter's reading: no sorting
    budgets.give_back("ip:127.0.0.2", UPLOAD)
    assert budgets.snapshot(1).top[0].counts == (1, 0, 1, 0)


def test_metadata_checks() -> None:
    check_metadata([("x-a", "plain ascii"), ("x-b-bin", b"\xff\x00")], 1024)
    with pytest.raises(InvalidArgument) as bad:
        check_metadata([("x-note", "tab\there")], 1024)
    assert bad.value.field == "metadata['x-note']"
    with pytest.raises(InvalidArgument) as big:
        check_metadata([("x-big", "a" * 2000)], 1024)
    assert big.value.field == "metadata"


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(SettingsError):
        BudgetSettings(peer_calls=0)
    with pytest.raises(SettingsError):
        BudgetSettings(stream_idle_seconds=-1)


def test_state_file_is_replaced_whole(tmp_path: Path) -> None:
    state = StateFile(str(tmp_path / "deep" / "state.json"))
    assert state.load() is None
    state.save({"version": 1, "a": 1})
    state.save({"version": 1, "a": 2})
    assert state.load() == {"version": 1, "a": 2}
    assert [p.name for p in state.path.parent.iterdir()] == ["state.json"]  # no temporary left
    state.path.write_text("[1, 2")
    with pytest.raises(SettingsError, match="not JSON"):
        state.load()
    state.path.write_text(json.dumps([1]))
    with pytest.raises(SettingsError, match="object"):
        state.load()


def test_attempt_timeout_applies_to_idempotent_methods_within_the_deadline() -> None:
    import time

    import grpc

    from hashmesh.balancer.timeouts import AttemptTimeout

    attempt = AttemptTimeout(2.0, ["/s/Idem"])
    assert attempt.cap("/s/Idem", None) == 2.0
    assert attempt.cap("/s/Idem", 0.5) == 0.5
    assert attempt.cap("/s/Other", 30.0) == 30.0
    expired = grpc.StatusCode.DEADLINE_EXCEEDED
    assert attempt.expired(expired, "/s/Idem", None)
    assert attempt.expired(expired, "/s/Idem", time.monotonic() + 5)
    assert not attempt.expired(expired, "/s/Idem", time.monotonic() - 1)  # the call's own deadline
    assert not attempt.expired(expired, "/s/Other", None)
    assert not attempt.expired(grpc.StatusCode.UNAVAILABLE, "/s/Idem", None)
    assert AttemptTimeout(0, ["/s/Idem"]).cap("/s/Idem", None) is None


def test_submit_and_watch_is_held_as_a_watch_stream() -> None:
    """The balancer picks each method's budget from its kind in the contract: SubmitAndWatchTask
    streams responses, so it counts against the watch budgets with WatchTask."""
    kinds = method_kinds()
    for method in ("WatchTask", "SubmitAndWatchTask"):
        assert kinds[f"/hashmesh.v1.TaskService/{method}"] == SERVER_STREAM
