"""One ``hashctl up`` per state directory: an exclusive ``flock`` on ``STATE/up.pid``, which
holds the owner's PID. The kernel drops the lock when its owner dies, however it dies (Ctrl-C,
``kill -9``, a closed terminal), so a stale file never blocks the next start."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_FILE = "up.pid"


class AlreadyRunning(RuntimeError):
    """Another live process holds the state directory."""

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        self.pid = pid
        owner = f"PID {pid}" if pid else "PID unknown"
        super().__init__(
            f"hashctl up is already running on {state_dir} ({owner}); stop it first "
            "(Ctrl-C in its terminal, or kill that PID), or pass another --state-dir"
        )


class StateLock:
    """Held from ``acquire()`` until ``release()`` or the process's end."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our PID; raises ``AlreadyRunning`` at once if it is held."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _pid_in(fd)
            os.close(fd)
            raise AlreadyRunning(self.state_dir, owner) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def check_free(self) -> None:
        """Raise ``AlreadyRunning`` if a live process holds the lock; creates nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(self.state_dir, _pid_in(fd)) from None
        finally:
            os.close(fd)

    def release(self) -> None:
        # The file stays: unlinking a locked file lets a second process lock a new one.
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)


def _pid_in(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
