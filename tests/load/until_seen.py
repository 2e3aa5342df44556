"""Loaded by the load test beside bench/locustfile.py: ends the run as soon as every method
the test looks for has answered once, so the run's length is a state reached, not a guess
at how fast a loaded machine is (the test still caps it with -t)."""

from __future__ import annotations

from typing import Any

import gevent
from locust import events
from locust.env import Environment

WANTED = {
    "/hashmesh.v1.HashService/ComputeHash",
    "/hashmesh.v1.HashService/HashStream",
    "/hashmesh.v1.TaskService/WatchTask",
}
_seen: set[str] = set()
_environment: list[Environment] = []


@events.init.add_listener
def _keep(environment: Environment, **_: Any) -> None:
    _environment.append(environment)


@events.request.add_listener
def _note(name: str, exception: BaseException | None = None, **_: Any) -> None:
    if exception is None and name not in _seen:
        _seen.add(name)
        runner = _environment[0].runner if _environment else None
        if _seen >= WANTED and runner is not None:  # the last one wanted: once
            gevent.spawn(runner.quit)
