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
from collections.abc import Sequence
from dataclasses import replace

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from hashmesh.core.errors import HashmeshError, InvalidArgument
from hashmesh.core.queue.model import NewTask, Submitted, TaskStore

_KEY_LABEL = b"hashmesh-idempotency-fingerprint-v1"
KEY_ID_BYTES = 8


class IdempotencyKeyReused(HashmeshError):
    """ALREADY_EXISTS: the key was used for another request; carries the first task's id."""

    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, key: str, task_id: str, field: str) -> None:
        super().__init__(
            f"{field} {key!r} was already used for another request (task {task_id}); "
            "use a new key for a different request",
            reason="IDEMPOTENCY_KEY_REUSED",
            info={"idempotency_key": key[:200], "task_id": task_id},
        )
        self.key = key
        self.task_id = task_id

    def extra_details(self) -> list[any_pb2.Any]:
        info = any_pb2.Any()
        info.Pack(
            error_details_pb2.ResourceInfo(
                resource_type="hashmesh.v1.Task",
                resource_name=self.task_id,
                description=self.message,
            )
        )
        return [info]


class Fingerprinter:
    """Makes and compares request fingerprints under one secret."""

    def __init__(self, secret: str) -> None:
        self._key = hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()
        self._key_id = hashlib.sha256(b"key-id\x00" + self._key).digest()[:KEY_ID_BYTES]

    def of(self, task: NewTask) -> bytes:
        header = json.dumps(
            [
                task.algorithm,
                task.params,
                task.priority,
                task.max_attempts,
                task.run_after.isoformat() if task.run_after else None,
            ],
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        mac = hmac.new(self._key, len(header).to_bytes(4, "big") + header, hashlib.sha256)
        mac.update(task.data)
        return self._key_id + mac.digest()

    def same_request(self, stored: bytes | None, fresh: bytes | None) -> bool:
        """False only when both fingerprints were made with this key and differ."""
        if stored is None or fresh is None or stored[:KEY_ID_BYTES] != fresh[:KEY_ID_BYTES]:
            return True
        return hmac.compare_digest(stored, fresh)


class IdempotencyGuard:
    """The checks a keyed submission passes, around the store's insert."""

    def __init__(self, store: TaskStore, secret: str, *, window_seconds: float) -> None:
        self._store = store
        self._fingerprints = Fingerprinter(secret)
        self._window = window_seconds

    def fingerprinted(self, task: NewTask) -> NewTask:
        """``task`` with the fingerprint of its request, when it has a key (before the input
        is transformed in any way for storage)."""
        return (
            replace(task, fingerprint=self._fingerprints.of(task)) if task.idempotency_key else task
        )

    async def check(self, tasks: Sequence[NewTask], fields: Sequence[str], client_id: str) -> None:
        """Refuse, before anything is stored, a key reused for another request: earlier in this
        request (INVALID_ARGUMENT), or by a task of this client within the window."""
        same = self._fingerprints.same_request
        first: dict[str, NewTask] = {}
        for task, field in zip(tasks, fields, strict=True):
            if task.idempotency_key is None:
                continue
            earlier = first.setdefault(task.idempotency_key, task)
            if not same(earlier.fingerprint, task.fingerprint):
                raise InvalidArgument(
                    f"{field}.idempotency_key", "is used earlier in this request for another task"
                )
        if not first:
            return
        live = await self._store.live_keys(client_id, list(first), window_seconds=self._window)
        for task, field in zip(tasks, fields, strict=True):
            found = live.get(task.idempotency_key or "")
            if found is not None and not same(found[1], task.fingerprint):
                raise IdempotencyKeyReused(
                    task.idempotency_key or "", found[0].id, f"{field}.idempotency_key"
                )

    def check_answers(
        self, tasks: Sequence[NewTask], answers: Sequence[Submitted], fields: Sequence[str]
    ) -> None:
        """After the insert: a concurrent submission with the key and another request got in
        between ``check`` and the insert."""
        for task, answer, field in zip(tasks, answers, fields, strict=True):
            if not answer.created and not self._fingerprints.same_request(
                answer.fingerprint, task.fingerprint
            ):
                raise IdempotencyKeyReused(
                    task.idempotency_key or "", answer.task.id, f"{field}.idempotency_key"
                )
