"""Run-time admin state kept across restarts: strategy, rate limits and drains set through
AdminService, in one JSON file written atomically (temporary file, fsync, rename, fsync of
the directory), so a crash leaves either the old state or the new one, never half of one.

``capture`` reads the state from the replica set and the limiter, ``restore`` puts it back;
the file is read once at start and written after every change AdminService makes. Drains are
kept by address and also apply to a replica that appears later (found by DNS)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from hashmesh.balancer.backends import BackendSet
from hashmesh.balancer.config import STRATEGIES, RateLimitSettings, is_hash_key
from hashmesh.balancer.ratelimit import RateLimiter
from hashmesh.core.settings import SettingsError

log = logging.getLogger(__name__)

VERSION = 1


def _limit(spec: RateLimitSettings) -> dict[str, Any]:
    return {"rate": spec.rate, "burst": spec.burst}


def capture(backends: BackendSet, limiter: RateLimiter) -> dict[str, Any]:
    return {
        "version": VERSION,
        "strategy": backends.picker.name,
        "hash_key": backends.hash_key,
        "rate_limit": _limit(limiter.default) if limiter.default is not None else None,
        "rate_limit_overrides": {
            client: _limit(spec) for client, spec in sorted(limiter.overrides.items())
        },
        "drained": sorted(backends.drained),
    }


def restore(state: dict[str, Any], backends: BackendSet, limiter: RateLimiter) -> None:
    """Apply ``state`` (as ``capture`` made it); ``SettingsError`` if it cannot be used."""
    try:
        if state.get("version") != VERSION:
            raise ValueError(f"version {state.get('version')!r}, expected {VERSION}")
        strategy, hash_key = str(state["strategy"]), str(state["hash_key"])
        if strategy not in STRATEGIES or not is_hash_key(hash_key):
            raise ValueError(f"strategy {strategy!r} / hash key {hash_key!r}")
        default = state["rate_limit"]
        default_spec = (
            RateLimitSettings(float(default["rate"]), int(default["burst"])) if default else None
        )
        overrides = {
            str(client): RateLimitSettings(float(spec["rate"]), int(spec["burst"]))
            for client, spec in dict(state["rate_limit_overrides"]).items()
        }
        drained = [str(address) for address in state["drained"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SettingsError(f"balancer state file is not usable: {exc}") from exc
    backends.set_strategy(strategy, hash_key)
    limiter.configure(disable=True)
    limiter.configure(default=default_spec, upsert=overrides)
    for address in drained:
        backends.drain_address(address)


class StateFile:
    """The file behind ``HASHMESH_BALANCER_STATE_FILE``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any] | None:
        """The saved state, ``None`` when nothing was saved yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SettingsError(f"cannot read the balancer state file {self.path}: {exc}") from exc
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise SettingsError(f"balancer state file {self.path} is not JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise SettingsError(f"balancer state file {self.path} does not hold an object")
        return loaded

    def save(self, state: dict[str, Any]) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(state, out, indent=1, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        log.info("admin state saved", extra={"path": str(self.path)})
