"""hashctl's error translation, names and output, without sockets."""

from __future__ import annotations

import io
from typing import Any

import grpc
import pytest
import typer.main

from hashmesh.cli.app import app
from hashmesh.cli.client import CliError, ExitCode, error_from_rpc
from hashmesh.cli.naming import parse_algorithm, parse_status, parse_strategy
from hashmesh.cli.output import Output
from hashmesh.core.errors import ResourceExhausted, to_grpc_status
from hashmesh.v1 import admin_pb2, common_pb2, task_pb2
from tests.cli_helpers import hashctl


class FakeRpcError(grpc.RpcError):
    """What a failed call raises: code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Any = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.UNAVAILABLE, ExitCode.UNAVAILABLE),
        (grpc.StatusCode.INVALID_ARGUMENT, ExitCode.INVALID_ARGUMENT),
        (grpc.StatusCode.NOT_FOUND, ExitCode.NOT_FOUND),
        (grpc.StatusCode.PERMISSION_DENIED, ExitCode.DENIED),
        (grpc.StatusCode.INTERNAL, ExitCode.OTHER),
    ],
)
def test_each_kind_of_failure_has_its_exit_code(code: grpc.StatusCode, exit_code: ExitCode) -> None:
    failure = error_from_rpc(FakeRpcError(code, "why"), "t:1")
    assert failure.exit_code == exit_code
    assert failure.message == f"{code.name}: why"
    assert len({e.value for e in ExitCode}) == len(ExitCode)


def test_rate_limited_message_carries_the_retry_after() -> None:
    status = to_grpc_status(ResourceExhausted("slow down", retry_after=1.5))
    failure = error_from_rpc(
        FakeRpcError(status.code, status.details, status.trailing_metadata), "t:1"
    )
    assert failure.exit_code == ExitCode.RATE_LIMITED
    assert failure.message == "RESOURCE_EXHAUSTED: slow down (retry after 1.5s)"
    bare = error_from_rpc(
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", (("retry-after", "2"),)), "t"
    )
    assert bare.message.endswith("(retry after 2s)")
    assert bare.exit_code == ExitCode.RATE_LIMITED


def test_resource_exhausted_without_retry_info_is_not_a_rate_limit() -> None:
    """An input over the size limit: waiting cannot help, so it is not exit 6."""
    failure = error_from_rpc(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too big"), "t")
    assert failure.exit_code == ExitCode.INVALID_ARGUMENT


def test_unreachable_names_the_target() -> None:
    failure = error_from_rpc(
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"),
        "10.0.0.1:5",
    )
    assert failure.message.startswith("UNAVAILABLE: cannot reach 10.0.0.1:5")
    # A new user's first call with nothing running: say how to get a mesh.
    assert (
        "`hashctl up` starts one on this machine" in failure.message
        and "--target" in failure.message
    )


def test_the_ready_hint_carries_the_target_off_the_default_ports(tmp_path: Any) -> None:
    from hashmesh.cli.supervisor import MeshPlan, Supervisor
    from hashmesh.cli.up import _ready_hint

    supervisor = Supervisor(MeshPlan(state_dir=tmp_path, port=0, admin_port=0), lambda event: None)
    supervisor.target, supervisor.admin_target = "127.0.0.1:41234", "127.0.0.1:41235"
    hint = _ready_hint(supervisor)
    assert "hashctl --target 127.0.0.1:41234 hash sha256 hello" in hint
    assert "hashctl --target 127.0.0.1:41234 submit md5 hello --wait" in hint
    assert "hashctl --admin-target 127.0.0.1:41235 lb stats" in hint
    supervisor.target, supervisor.admin_target = "127.0.0.1:50050", "127.0.0.1:50060"
    assert "try: hashctl hash sha256 hello" in _ready_hint(supervisor)


def test_user_names_of_enums() -> None:
    assert parse_algorithm("SHA-256") == common_pb2.ALGORITHM_SHA256
    assert parse_algorithm("sha3-256") == common_pb2.ALGORITHM_SHA3_256
    assert parse_status("dead-letter") == task_pb2.TASK_STATUS_DEAD_LETTER
    assert parse_strategy("p2c-ewma") == admin_pb2.STRATEGY_P2C_EWMA
    with pytest.raises(CliError) as info:
        parse_algorithm("crc32")
    assert info.value.exit_code == ExitCode.INVALID_ARGUMENT


def test_plain_output_is_tab_separated_off_a_terminal() -> None:
    stream = io.StringIO()
    Output(stream=stream).table(["A", "B"], [[1, None], [True, 0.5]])
    assert stream.getvalue() == "A\tB\n1\t-\nyes\t0.5\n"


def _leaves(command: Any, path: str = "") -> list[tuple[str, Any]]:
    children = getattr(command, "commands", None)
    if not children:
        return [(path, command)]
    return [
        leaf
        for name, child in children.items()
        for leaf in _leaves(child, f"{path} {name}".strip())
    ]


def test_every_command_has_help_with_an_example() -> None:
    leaves = dict(_leaves(typer.main.get_command(app)))
    assert {
        "hash",
        "verify",
        "submit",
        "health",
        "up",
        "bench",
        "task submit",
        "task get",
        "task watch",
        "task list",
        "task cancel",
        "task requeue",
        "task stats",
        "lb stats",
        "lb backends",
        "lb strategy",
        "lb drain",
        "ratelimit get",
        "ratelimit set",
        "cache stats",
        "cache clear",
        "db migrate",
    } <= set(leaves)
    for name, command in leaves.items():
        assert command.help and "Example" in command.help and "hashctl " in command.help, name
    assert "Example" in hashctl("task", "watch", "--help").stdout


def test_usage_errors_exit_2_without_traceback() -> None:
    result = hashctl("ratelimit", "set")
    assert result.exit_code == ExitCode.USAGE and result.stderr.startswith(
        "error: nothing to change"
    )
    assert hashctl("bench", "-O", "xml").exit_code == ExitCode.USAGE
    assert hashctl("up", "--once").exit_code == ExitCode.USAGE


def test_empty_target_and_non_ascii_metadata_are_usage_errors() -> None:
    # Caught before any channel opens: gRPC would log C-core errors and answer INTERNAL/UNKNOWN.
    for args in (
        ("--target", "", "hash", "md5", "x"),
        ("--admin-target", " ", "lb", "stats"),
        ("--client-id", "é", "hash", "md5", "x"),
        ("--client-id", "a\nb", "hash", "md5", "x"),
        ("--admin-token", "tök", "lb", "stats"),
    ):
        result = hashctl(*args)
        assert result.exit_code == ExitCode.USAGE, (args, result.stderr)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_shell_completion_completes_command_names() -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(
        app,
        [],
        prog_name="hashctl",
        env={
            "_HASHCTL_COMPLETE": "complete_bash",
            "COMP_WORDS": "hashctl ratel",
            "COMP_CWORD": "1",
        },
    )
    assert result.stdout.split() == ["ratelimit"]


def test_up_refuses_a_busy_port_before_starting_anything(tmp_path: Any) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = hashctl("up", "--port", str(port), "--state-dir", str(tmp_path / "state"))
    assert result.exit_code == ExitCode.OTHER and f"port {port} is in use" in result.stderr
    assert not (tmp_path / "state").exists()
