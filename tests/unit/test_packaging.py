"""The wheel carries every module and data file of the source tree (an explicit ``packages``
list silently drops a new subpackage from non-editable installs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {
    "core": "hashmesh/core",
    "hashd": "hashmesh/hashd",
    "workerd": "hashmesh/workerd",
    "balancer": "hashmesh/balancer",
    "cli": "hashmesh/cli",
    "protos/hashmesh/v1": "hashmesh/v1",
}
SHIPPED = {".py", ".pyi", ".sql", ".typed", ".proto", ".binpb"}
"""Client developers build from the .proto files in the wheel; reflection serves .binpb."""


@pytest.mark.timeout(180)
def test_wheel_contains_every_source_file(tmp_path: Path) -> None:
    # Build from a clean copy: a stale build/ folder in the work tree would hide a dropped package.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".*", "venv", "tests"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("hashmesh-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = []
    for folder, package in SOURCES.items():
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in SHIPPED and "__pycache__" not in path.parts:
                expected = f"{package}/{path.relative_to(ROOT / folder).as_posix()}"
                if expected not in names:
                    missing.append(expected)
    assert not missing, f"not in the wheel: {missing}"
    assert not any(name.startswith("hashmesh/__init__") for name in names), (
        "hashmesh must stay a namespace package"
    )
