"""Client API keys: random secrets stored only as SHA-256 digests.

A key is 32 random bytes (``hm_`` + urlsafe base64), so a plain SHA-256 digest is enough to
store it safely (no dictionary to attack, unlike a password) and cheap enough to check on every
call. The keys file holds one ``client_id sha256:<hex>`` line per key; a client may have
several keys at once, which is how keys are rotated. The file is re-read when it changes."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path

from hashmesh.core.identity import ADDRESS_PREFIX, valid_identity
from hashmesh.core.settings import SettingsError

log = logging.getLogger(__name__)

PREFIX = "sha256:"


def generate_key() -> str:
    return "hm_" + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return PREFIX + hashlib.sha256(key.encode()).hexdigest()


def key_line(client_id: str, key: str) -> str:
    """The line to append to the keys file for ``key``."""
    return f"{client_id} {digest(key)}"


def parse(text: str, source: str = "keys file") -> dict[str, str]:
    """digest -> client id."""
    table: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith(PREFIX) or len(parts[1]) != len(PREFIX) + 64:
            raise SettingsError(f"{source}:{number}: expected 'client_id sha256:<64 hex digits>'")
        if not valid_identity(parts[0]) or parts[0].startswith(ADDRESS_PREFIX):
            raise SettingsError(
                f"{source}:{number}: a client id is 1-200 printable ASCII characters, "
                f"not starting with {ADDRESS_PREFIX!r} (kept for peer addresses)"
            )
        table[parts[1].lower()] = parts[0]
    return table


class ApiKeys:
    """Who a key belongs to; ``reload_if_changed()`` picks up an edited file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._mtime = 0.0
        self._table: dict[str, str] = {}
        self.reload_if_changed()

    def reload_if_changed(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as exc:
            if not self._table:
                raise SettingsError(f"cannot read API keys file {self.path}: {exc}") from exc
            log.warning(
                "API keys file unreadable; keeping the keys loaded", extra={"path": str(self.path)}
            )
            return
        if mtime == self._mtime:
            return
        self._table = parse(self.path.read_text(), str(self.path))
        self._mtime = mtime
        log.info("API keys loaded", extra={"path": str(self.path), "keys": len(self._table)})

    def client_for(self, key: str) -> str | None:
        return self._table.get(digest(key))
