"""Run a module inside given cgroup directories: ``python -m tests.in_cgroup DIR[,DIR...]
MODULE ARGS...`` joins each cgroup (writes its PID to ``cgroup.procs``), then becomes
``python -m MODULE ARGS...``, so the module reads its limits from the start."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    directories, module, *args = sys.argv[1:]
    for directory in directories.split(","):
        (Path(directory) / "cgroup.procs").write_text(str(os.getpid()))
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


if __name__ == "__main__":
    main()
