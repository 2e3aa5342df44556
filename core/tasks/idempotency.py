"""Idempotency keys as Stripe has them: a key stands for one request, not just any request.

A keyed submission stores a fingerprint of its request: HMAC-SHA256 under a key derived from
the mesh's ``HASHMESH_IDENTITY_SECRET`` over the algorithm, parameters, priority, attempts,
start time and input. Never a bare hash: the input of an argon2 task is a password, and an
unkeyed digest of it in the database would let anyone who reads the table test guesses at
SHA-256 speed. A repeat with the same key and the same request gets the first task back; with
another request, ``IdempotencyKeyReused`` (ALREADY_EXISTS) naming the key and the first task.

The fingerprint starts with an 8-byte id of the key it was made with: after a secret rotation
the old fingerprints cannot be compared, and a repeat of such a key is taken as the same
request (as before fingerprints existed)."""

from __future__ import annotations

import hashlib
import hmac
import json

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from hashmesh.core.errors import ERROR_DOMAIN, HashmeshError
from hashmesh.core.tasks.model import NewTask

_KEY_LABEL = b"hashmesh-idempotency-fingerprint-v1"
KEY_ID_BYTES = 8


class IdempotencyKeyReused(HashmeshError):
    """ALREADY_EXISTS: the key was used for another request; carries the first task's id."""

    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, key: str, task_id: str, field: str) -> None:
        super().__init__(
            f"{field} {key!r} was already used for another request (task {task_id}); "
            "use a new key for a different request"
        )
        self.key = key
        self.task_id = task_id

    def details(self) -> list[any_pb2.Any]:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(
            reason="IDEMPOTENCY_KEY_REUSED", domain=ERROR_DOMAIN,
            metadata={"idempotency_key": self.key[:200], "task_id": self.task_id},
        ))
        return [info]


class Fingerprinter:
    """Makes and compares request fingerprints under one secret."""

    def __init__(self, secret: str) -> None:
        self._key = hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()
        self._key_id = hashlib.sha256(b"key-id\x00" + self._key).digest()[:KEY_ID_BYTES]

    def of(self, task: NewTask) -> bytes:
        header = json.dumps(
            [task.algorithm, task.params, task.priority, task.max_attempts,
             task.run_after.isoformat() if task.run_after else None],
            sort_keys=True, separators=(",", ":"),
        ).encode()
        mac = hmac.new(self._key, len(header).to_bytes(4, "big") + header, hashlib.sha256)
        mac.update(task.data)
        return self._key_id + mac.digest()

    def same_request(self, stored: bytes | None, fresh: bytes | None) -> bool:
        """False only when both fingerprints were made with this key and differ."""
        if stored is None or fresh is None or stored[:KEY_ID_BYTES] != fresh[:KEY_ID_BYTES]:
            return True
        return hmac.compare_digest(stored, fresh)
