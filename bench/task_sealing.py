"""What sealing task inputs at rest costs per task: AES-256-GCM seal (hashd, at submit) plus
open (workerd, before hashing), per input size, next to the hash the task computes.

    python bench/task_sealing.py

One process, one core, no I/O; the median of five timed batches per figure."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable

from hashmesh.core.hashing import algorithms
from hashmesh.core.hashing.algorithms import Algorithm, Argon2Params
from hashmesh.core.queue.sealing import TaskKeyring, new_key_line

SIZES = (32, 1024, 64 * 1024, 1024 * 1024, 4 * 1024 * 1024)


def per_call(fn: Callable[[], object], budget: float = 0.5) -> float:
    """Median seconds per call over five timed batches."""
    fn()
    runs = []
    for _ in range(5):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < budget / 5:
            fn()
            count += 1
        runs.append((time.perf_counter() - started) / count)
    return statistics.median(runs)


def main() -> None:
    keys = TaskKeyring.parse(new_key_line("bench"), source="bench")
    task_id = str(uuid.uuid4())
    params = Argon2Params().to_json()
    print(f"{'input':>9} {'seal µs':>9} {'open µs':>9} {'md5 µs':>9} {'(seal+open)/md5':>16}")
    for size in SIZES:
        data = b"x" * size
        sealed = keys.seal(task_id, "md5", {}, data)
        seal = per_call(lambda: keys.seal(task_id, "md5", {}, data))  # noqa: B023
        opened = per_call(lambda: keys.open(sealed.key_id, task_id, "md5", {}, sealed.blob))  # noqa: B023
        md5 = per_call(lambda: algorithms.digest(Algorithm.MD5, data))  # noqa: B023
        print(
            f"{size:>9} {seal * 1e6:>9.1f} {opened * 1e6:>9.1f} {md5 * 1e6:>9.1f} "
            f"{(seal + opened) / md5:>16.2f}"
        )
    password = b"correct horse battery staple"
    sealed = keys.seal(task_id, "argon2id", params, password)
    seal = per_call(lambda: keys.seal(task_id, "argon2id", params, password))
    opened = per_call(lambda: keys.open(sealed.key_id, task_id, "argon2id", params, sealed.blob))
    argon2 = per_call(lambda: algorithms.argon2id(password, Argon2Params()), budget=2.0)
    print(
        f"argon2id (default parameters, 28-byte password): seal {seal * 1e6:.1f} µs + open "
        f"{opened * 1e6:.1f} µs against {argon2 * 1e3:.1f} ms of hashing "
        f"({(seal + opened) / argon2 * 100:.3f} %)"
    )


if __name__ == "__main__":
    main()
