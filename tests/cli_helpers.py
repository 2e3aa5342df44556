"""Shared by the hashctl tests: run hashctl in-process with Typer's CliRunner."""

from __future__ import annotations

import json
from typing import Any

from typer.testing import CliRunner

from hashmesh.cli.app import app


def hashctl(*args: str, input: str | bytes | None = None, env: dict[str, str] | None = None) -> Any:
    """Run ``hashctl ARGS`` in this process; stdout and stderr kept apart."""
    runner = CliRunner()
    return runner.invoke(app, list(args), input=input, env=env, catch_exceptions=False)


def hashctl_json(*args: str, input: str | bytes | None = None) -> Any:
    result = hashctl("--json", *args, input=input)
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return json.loads(result.stdout)
