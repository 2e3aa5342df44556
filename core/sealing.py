"""Task inputs sealed at rest: AES-256-GCM under a keyring that only hashd and workerd hold.

hashd seals every task input before the row is written; workerd opens it right before hashing.
PostgreSQL (its heap, WAL, backups, replicas, logs) only ever sees ``nonce || ciphertext || tag``
and the id of the key that sealed it (``hashmesh_tasks.input_key_id``), so keys can rotate:
the first key of the ring seals, every key of the ring opens.

The associated data binds a sealed input to its row: task id, algorithm and parameters. A
ciphertext copied into another row, or a row whose algorithm or argon2 parameters were edited
in the database (say, to a fast digest of the password), fails authentication instead of
hashing the secret under terms its owner never asked for.

Keys come from ``HASHMESH_TASK_KEY_FILE`` (a file readable by its owner only) or
``HASHMESH_TASK_KEYS`` (the same text inline): one ``<id>:<base64 of 32 random bytes>`` per line
(or comma-separated), ``#`` starts a comment. ``hashctl up`` makes such a file in its state
directory. Nothing here logs, and no message or repr holds a key or an input."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hashmesh.core.settings import ENV_PREFIX, SettingsError, env_optional

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_FILE_ENV = ENV_PREFIX + "TASK_KEY_FILE"
KEYS_ENV = ENV_PREFIX + "TASK_KEYS"
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
_AAD_DOMAIN = b"hashmesh-task-input-v1\x00"


class SealingError(Exception):
    """A sealed input cannot be opened here. The message names the key id, never the data."""


class UnknownKey(SealingError):
    """The input was sealed with a key this process does not hold."""


class TamperedInput(SealingError):
    """The ciphertext, or the row it is bound to, was changed (or the key is not the one used)."""


@dataclass(frozen=True)
class TaskKey:
    id: str
    """Stored in each row it seals; 1-32 characters of ``A-Z a-z 0-9 . _ -``."""
    secret: bytes = field(repr=False)
    """32 random bytes (AES-256)."""

    def __post_init__(self) -> None:
        if not _KEY_ID.match(self.id):
            raise SettingsError(f"task key id {self.id!r}: use 1-32 of A-Z a-z 0-9 . _ -")
        if len(self.secret) != KEY_BYTES:
            raise SettingsError(
                f"task key {self.id!r} must be {KEY_BYTES} bytes (base64), got {len(self.secret)}"
            )


@dataclass(frozen=True)
class SealedInput:
    key_id: str
    blob: bytes
    """``nonce (12 bytes) || ciphertext || tag (16 bytes)``."""


def associated_data(task_id: str, algorithm: str, params: Mapping[str, Any]) -> bytes:
    """What a sealed input is bound to. Parameters are canonical JSON: the row keeps them as
    ``jsonb``, which normalises spacing and key order, so the text itself cannot be used."""
    canonical = json.dumps(dict(params), sort_keys=True, separators=(",", ":"))
    return b"\x00".join([_AAD_DOMAIN, task_id.encode(), algorithm.encode(), canonical.encode()])


@dataclass(frozen=True)
class TaskKeyring:
    """The keys of one mesh: ``keys[0]`` seals new inputs, any of them opens."""

    keys: tuple[TaskKey, ...]
    _ciphers: dict[str, AESGCM] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise SettingsError(f"{KEY_FILE_ENV} / {KEYS_ENV}: no key found")
        ids = [k.id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise SettingsError(f"task keys: duplicate key id in {', '.join(ids)}")
        object.__setattr__(self, "_ciphers", {k.id: AESGCM(k.secret) for k in self.keys})

    @property
    def active_id(self) -> str:
        return self.keys[0].id

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(k.id for k in self.keys)

    def seal(
        self, task_id: str, algorithm: str, params: Mapping[str, Any], data: bytes
    ) -> SealedInput:
        nonce = os.urandom(NONCE_BYTES)  # random 96-bit nonces: rotate well before 2^32 seals
        cipher = self._ciphers[self.active_id]
        blob = nonce + cipher.encrypt(nonce, data, associated_data(task_id, algorithm, params))
        return SealedInput(self.active_id, blob)

    def open(
        self,
        key_id: str,
        task_id: str,
        algorithm: str,
        params: Mapping[str, Any],
        blob: bytes,
    ) -> bytes:
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise UnknownKey(
                f"task input sealed with key {key_id!r}, which this process does not hold "
                f"(it has {', '.join(self.ids)}; add the key to {KEY_FILE_ENV})"
            )
        if len(blob) < NONCE_BYTES + TAG_BYTES:
            raise TamperedInput(f"sealed task input (key {key_id!r}) is truncated")
        try:
            return cipher.decrypt(
                blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data(task_id, algorithm, params)
            )
        except InvalidTag:
            raise TamperedInput(
                f"sealed task input (key {key_id!r}) failed authentication: the row was changed "
                "or the key with this id is not the one that sealed it"
            ) from None

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, *, source: str) -> TaskKeyring:
        """``<id>:<base64>`` entries, one per line or comma-separated; ``#`` comments."""
        keys = []
        for raw_line in text.splitlines():
            line = raw_line.split("#", 1)[0]
            for entry in line.split(","):
                entry = entry.strip()
                if not entry:
                    continue
                key_id, sep, encoded = entry.partition(":")
                if not sep:
                    raise SettingsError(
                        f"{source}: expected <id>:<base64 key>, got an entry "
                        f"without ':' (key id {key_id[:32]!r}?)"
                    )
                try:
                    secret = base64.b64decode(encoded.strip(), validate=True)
                except (binascii.Error, ValueError):
                    raise SettingsError(f"{source}: key {key_id.strip()!r} is not base64") from None
                keys.append(TaskKey(key_id.strip(), secret))
        if not keys:
            raise SettingsError(f"{source}: no key found")
        return cls(tuple(keys))

    @classmethod
    def load_file(cls, path: Path) -> TaskKeyring:
        """Refused unless only its owner (this process's user, or root as with a Kubernetes
        Secret volume) and group may touch it: whoever can rewrite the keys reads new inputs."""
        try:
            info = path.stat()
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{KEY_FILE_ENV}={path}: cannot read: {exc}") from None
        mode = info.st_mode
        if info.st_uid not in (0, os.geteuid()):
            raise SettingsError(
                f"{KEY_FILE_ENV}={path} belongs to uid {info.st_uid}, neither this process's "
                "user nor root; whoever owns it can replace the keys"
            )
        if mode & (stat.S_IRWXO):
            raise SettingsError(
                f"{KEY_FILE_ENV}={path} is accessible to other users (mode "
                f"{stat.S_IMODE(mode):o}); run: chmod 600 {path}"
            )
        return cls.parse(text, source=f"{KEY_FILE_ENV}={path}")

    @classmethod
    def from_env(cls) -> TaskKeyring | None:
        """The keyring named by the environment, or ``None`` when neither variable is set."""
        path = env_optional("TASK_KEY_FILE")
        inline = env_optional("TASK_KEYS")
        if path and inline:
            raise SettingsError(f"set {KEY_FILE_ENV} or {KEYS_ENV}, not both")
        if path:
            return cls.load_file(Path(path))
        if inline:
            return cls.parse(inline, source=KEYS_ENV)
        return None


def new_key_line(key_id: str) -> str:
    """A fresh ``<id>:<base64>`` line for a key file."""
    key = TaskKey(key_id, secrets.token_bytes(KEY_BYTES))
    return f"{key.id}:{base64.b64encode(key.secret).decode()}"


def ensure_key_file(path: Path, key_id: str = "k1") -> Path:
    """``path`` holding a key ring (mode 0600): kept if it exists, else made with one new key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        if path.read_text(encoding="ascii").strip():
            return path
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # empty (an interrupted first write): redo
    with os.fdopen(fd, "w", encoding="ascii") as sink:
        sink.write(
            "# hashmesh task input keys: <id>:<base64>; the first one seals, all of them open.\n"
            + new_key_line(key_id)
            + "\n"
        )
    return path
