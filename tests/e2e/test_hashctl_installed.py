"""The installed ``hashctl`` entry point, run as a subprocess the way a user runs it (the other
hashctl tests drive the Typer app in-process, which would not notice a broken console script,
a missing package in the install or an import that only works from the source tree)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import Mesh

HASHCTL = Path(sys.executable).with_name("hashctl")


def run_hashctl(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    assert HASHCTL.is_file(), f"{HASHCTL} is missing: install hashmesh (pip install -e '.[dev]')"
    return subprocess.run(
        [str(HASHCTL), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_installed_hashctl_shows_its_commands() -> None:
    result = run_hashctl("--help")
    assert result.returncode == 0, result.stderr
    for command in ("hash", "submit", "task", "lb", "up"):
        assert command in result.stdout


def test_installed_hashctl_hashes_and_waits_for_a_task_through_a_real_mesh(mesh: Mesh) -> None:
    hashed = run_hashctl("--target", mesh.address, "hash", "sha256", "hello")
    assert hashed.returncode == 0, hashed.stderr
    assert hashed.stdout.strip() == (
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    )
    waited = run_hashctl(
        "--target", mesh.address, "submit", "md5", "hello", "--wait", "--wait-timeout", "30"
    )
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.strip().splitlines()[-1].endswith("5d41402abc4b2a76b9719d911017c592")


def test_installed_hashctl_reports_an_unreachable_mesh_in_one_line() -> None:
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    result = run_hashctl("--target", "127.0.0.1:1", "--timeout", "5", "hash", "md5", "x")
    assert result.returncode == 3, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: UNAVAILABLE"), result.stderr
