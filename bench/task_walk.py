"""Which hashmesh modules a task walks through from ``hashctl submit --wait`` to its result,
run by hand (not by the tests): the measure of "fewer modules, less back-and-forth".

    .venv/bin/python bench/task_walk.py [--functions]

Starts an embedded PostgreSQL, one hashd and one workerd, warms them with one task, then:

  hashctl  runs ``hashctl --target <hashd> submit md5 <data> --wait`` in this process with a
           profile hook on: every hashmesh module with a function that ran (module-level
           code, i.e. imports, is not counted).
  hashd    the same hook inside hashd, switched on (SIGUSR1) just before that command and off
           (SIGUSR2) once it returned: the modules hashd ran while it took the submission,
           streamed WatchTask and heard the worker's notifications. The same window with no
           call in it is measured after, so that the background loops (the LISTEN
           connections, whose wake-ups are also part of the walk) are marked.

``--functions`` lists the functions instead of only their modules. workerd is not counted
(the walk is the client's and the replica's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve()
OUT_ENV = "TASK_WALK_OUT"
FUNCTIONS_ENV = "TASK_WALK_FUNCTIONS"


def _recorder(seen: set[str]) -> Any:
    functions = bool(os.environ.get(FUNCTIONS_ENV))

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name != "<module>":
            name = frame.f_globals.get("__name__", "")
            if name.startswith("hashmesh."):
                seen.add(f"{name}:{frame.f_code.co_qualname}" if functions else name)

    return hook


def serve_profiled_hashd(argv: list[str]) -> None:
    """hashd with the hook switched by SIGUSR1 (on) and SIGUSR2 (off, writes the list)."""
    out = Path(os.environ[OUT_ENV])
    seen: set[str] = set()

    def start(*_: object) -> None:
        seen.clear()
        sys.setprofile(_recorder(seen))
        (out.parent / (out.name + ".on")).write_text("on")

    def stop(*_: object) -> None:
        sys.setprofile(None)
        out.write_text("\n".join(sorted(seen)))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from hashmesh.hashd.__main__ import main

    main(argv)


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"hashd did not answer the signal ({path.name})")
        time.sleep(0.01)


def _hashd_window(process: subprocess.Popen[str], out: Path, during: Any) -> set[str]:
    out.unlink(missing_ok=True)
    (out.parent / (out.name + ".on")).unlink(missing_ok=True)
    process.send_signal(signal.SIGUSR1)
    _wait_for(out.parent / (out.name + ".on"))
    during()
    process.send_signal(signal.SIGUSR2)
    _wait_for(out)
    return set(filter(None, out.read_text().splitlines()))


def _hashctl(target: str, data: str) -> None:
    from hashmesh.cli.app import app

    try:
        app(["--target", target, "submit", "md5", data, "--wait"])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(f"hashctl submit exited {exit_.code}") from None


def main() -> None:
    if "--functions" in sys.argv[1:]:
        os.environ[FUNCTIONS_ENV] = "1"
    sys.path.insert(0, str(HERE.parent))
    from tasks_e2e import Daemon, postgres

    from hashmesh.core.queue import migrations
    from hashmesh.core.queue.embedded_pg import create_database

    os.environ.setdefault("HASHMESH_IDENTITY_SECRET", os.urandom(16).hex())
    with postgres(None) as admin_dsn, tempfile.TemporaryDirectory(prefix="task-walk-") as tmp:
        dsn = create_database(admin_dsn, f"walk_{uuid.uuid4().hex[:10]}")
        migrations.migrate(dsn)
        out = Path(tmp) / "hashd-modules"
        log = open(Path(tmp) / "hashd.log", "w")  # noqa: SIM115 - closed after hashd
        command = [sys.executable, str(HERE), "--profiled-hashd", "--listen", "127.0.0.1:0"]
        hashd = subprocess.Popen(
            [*command, "--database-url", dsn],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, OUT_ENV: str(out)},
        )
        worker = None
        try:
            assert hashd.stdout is not None
            target = ""
            for line in hashd.stdout:
                if " listening on " in line:
                    target = line.strip().rsplit(" ", 1)[1]
                    break
            if not target:
                raise RuntimeError("hashd did not start:\n" + (Path(tmp) / "hashd.log").read_text())
            worker = Daemon("hashmesh.workerd", ["--database-url", dsn, "--name", "walk"])
            _hashctl(target, "warm-up")  # first calls, lazy imports, pool connections

            client: set[str] = set()
            started = time.monotonic()

            def walk() -> None:
                sys.setprofile(_recorder(client))
                try:
                    _hashctl(target, "the-walk")
                finally:
                    sys.setprofile(None)

            served = _hashd_window(hashd, out, walk)
            took = time.monotonic() - started
            idle = _hashd_window(hashd, out, lambda: time.sleep(took))
        finally:
            if worker is not None:
                worker.stop()
            hashd.terminate()
            hashd.wait(30)
            log.close()

    print(f"hashctl: {len(client)}")
    for name in sorted(client):
        print(f"  {name}")
    print(f"hashd: {len(served)} ({len(served & idle)} of them ran in the idle window too)")
    for name in sorted(served):
        print(f"  {name}{'   (also idle)' if name in idle else ''}")
    print(f"hashd, idle window of {took:.2f} s: {len(idle)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--profiled-hashd"]:
        serve_profiled_hashd(sys.argv[2:])
    else:
        main()
