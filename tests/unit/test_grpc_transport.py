"""The daemons' choice of grpc transport (``core.grpc_transport``): set before grpc is
imported, the operator's own experiments kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hashmesh.core.grpc_transport import (
    EVENT_ENGINE_EXPERIMENTS,
    VARIABLE,
    configure,
    experiments,
)
from hashmesh.core.settings import SettingsError

IOMGR = ",".join(f"-{name}" for name in EVENT_ENGINE_EXPERIMENTS)


def test_iomgr_by_default_turns_the_event_engine_experiments_off() -> None:
    environ: dict[str, str] = {}
    assert configure(environ) == "iomgr"
    assert environ["GRPC_EXPERIMENTS"] == IOMGR


def test_event_engine_leaves_grpcs_default_alone() -> None:
    environ = {VARIABLE: "event_engine"}
    assert configure(environ) == "event_engine"
    assert "GRPC_EXPERIMENTS" not in environ


def test_experiments_the_operator_set_are_kept_and_win() -> None:
    # Another experiment is kept; one of ours the operator turned on stays on.
    assert experiments("iomgr", "tcp_rcv_lowat, event_engine_listener") == (
        "tcp_rcv_lowat,event_engine_listener,-event_engine_client,"
        "-event_engine_for_all_other_endpoints"
    )
    assert experiments("event_engine", "tcp_rcv_lowat") == "tcp_rcv_lowat"


def test_an_unknown_transport_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match=VARIABLE):
        configure({VARIABLE: "epoll"})


@pytest.mark.parametrize("entry_point", ["hashmesh.balancer.__main__", "hashmesh.hashd.__main__"])
def test_the_entry_point_imports_no_grpc_before_configuring_it(entry_point: str) -> None:
    # grpc reads GRPC_EXPERIMENTS once, when imported: an import of grpc at the top of
    # __main__ (even through another module) would silently put the daemon back on the
    # EventEngine.
    probe = f"import sys, {entry_point}; print('grpc' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("module", ["hashmesh.balancer", "hashmesh.hashd"])
def test_the_daemon_reads_the_choice_before_anything_else(module: str) -> None:
    # A wrong value stops the daemon at once with the variable named: its main configured grpc.
    env = {**os.environ, VARIABLE: "epoll"}
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode != 0
    assert VARIABLE in result.stderr and "epoll" in result.stderr
