"""Sealing task inputs: what a database reader or writer can and cannot do with a sealed row."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from hashmesh.core.hashing import Argon2Params
from hashmesh.core.sealing import (
    KEY_FILE_ENV,
    KEYS_ENV,
    NONCE_BYTES,
    TAG_BYTES,
    TamperedInput,
    TaskKey,
    TaskKeyring,
    UnknownKey,
    ensure_key_file,
    new_key_line,
)
from hashmesh.core.settings import SettingsError
from hashmesh.core.tasks.model import ClaimedTask
from hashmesh.workerd import handlers

PASSWORD = b"correct horse battery staple"
TASK = "6f1c2a52-4c1e-4d55-9a43-0a3e2c1b9d10"
PARAMS = Argon2Params(time_cost=1, memory_cost_kib=8, parallelism=1, salt=b"saltsalt").to_json()


def ring(*ids: str) -> TaskKeyring:
    return TaskKeyring.parse("\n".join(new_key_line(i) for i in ids), source="test")


def test_a_sealed_input_opens_with_its_row_and_holds_no_clear_bytes() -> None:
    keys = ring("k1")
    sealed = keys.seal(TASK, "argon2id", PARAMS, PASSWORD)
    assert sealed.key_id == "k1"
    assert PASSWORD not in sealed.blob
    assert len(sealed.blob) == NONCE_BYTES + len(PASSWORD) + TAG_BYTES
    assert keys.open("k1", TASK, "argon2id", PARAMS, sealed.blob) == PASSWORD
    # Fresh nonce per seal: the same password never gives the same bytes twice.
    assert keys.seal(TASK, "argon2id", PARAMS, PASSWORD).blob != sealed.blob


@pytest.mark.parametrize(
    ("task_id", "algorithm", "params"),
    [
        ("00000000-0000-4000-8000-000000000000", "argon2id", PARAMS),  # copied to another row
        (TASK, "md5", PARAMS),  # downgraded to a fast digest of the password
        (TASK, "argon2id", {**PARAMS, "time_cost": 2}),  # parameters edited
        (TASK, "argon2id", {**PARAMS, "salt": base64.b64encode(b"known-salt").decode()}),
    ],
)
def test_a_row_edited_in_the_database_does_not_open(
    task_id: str, algorithm: str, params: dict[str, object]
) -> None:
    keys = ring("k1")
    sealed = keys.seal(TASK, "argon2id", PARAMS, PASSWORD)
    with pytest.raises(TamperedInput, match="failed authentication") as caught:
        keys.open("k1", task_id, algorithm, params, sealed.blob)
    assert PASSWORD.decode() not in str(caught.value)


def test_a_flipped_bit_or_a_truncated_blob_does_not_open() -> None:
    keys = ring("k1")
    blob = bytearray(keys.seal(TASK, "argon2id", PARAMS, PASSWORD).blob)
    blob[NONCE_BYTES + 3] ^= 1
    with pytest.raises(TamperedInput):
        keys.open("k1", TASK, "argon2id", PARAMS, bytes(blob))
    with pytest.raises(TamperedInput, match="truncated"):
        keys.open("k1", TASK, "argon2id", PARAMS, bytes(blob[:20]))


def test_parameter_order_does_not_matter_as_jsonb_reorders_keys() -> None:
    keys = ring("k1")
    sealed = keys.seal(TASK, "argon2id", PARAMS, PASSWORD)
    reordered = dict(reversed(list(PARAMS.items())))
    assert keys.open("k1", TASK, "argon2id", reordered, sealed.blob) == PASSWORD


def test_rotation_the_first_key_seals_and_every_key_opens() -> None:
    old = ring("k1")
    sealed_before = old.seal(TASK, "argon2id", PARAMS, PASSWORD)
    # Step 2 of the procedure: the new key first, the old one still listed.
    rotated = TaskKeyring((ring("k2").keys[0], old.keys[0]))
    assert rotated.seal(TASK, "argon2id", PARAMS, PASSWORD).key_id == "k2"
    assert rotated.open("k1", TASK, "argon2id", PARAMS, sealed_before.blob) == PASSWORD
    # Step 4: the old key dropped; a row still sealed with it is refused by name.
    dropped = TaskKeyring((rotated.keys[0],))
    with pytest.raises(UnknownKey, match=r"'k1'.*HASHMESH_TASK_KEY_FILE"):
        dropped.open("k1", TASK, "argon2id", PARAMS, sealed_before.blob)


def test_a_key_with_a_reused_id_but_other_bytes_is_caught_as_tampering() -> None:
    sealed = ring("k1").seal(TASK, "argon2id", PARAMS, PASSWORD)
    with pytest.raises(TamperedInput):
        ring("k1").open("k1", TASK, "argon2id", PARAMS, sealed.blob)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no key"),
        ("# only a comment\n", "no key"),
        ("k1", "without ':'"),
        ("k1:not base64!", "not base64"),
        (f"k1:{base64.b64encode(b'short').decode()}", "must be 32 bytes"),
        (f"bad id:{base64.b64encode(bytes(32)).decode()}", "key id"),
        (f"{new_key_line('k1')}\n{new_key_line('k1')}", "duplicate"),
    ],
)
def test_a_bad_key_ring_is_refused_by_name_without_echoing_key_bytes(
    text: str, message: str
) -> None:
    with pytest.raises(SettingsError, match=message) as caught:
        TaskKeyring.parse(text, source="HASHMESH_TASK_KEYS")
    for line in text.splitlines():
        secret = line.partition(":")[2]
        if len(secret) > 8:
            assert secret not in str(caught.value)


def test_inline_entries_may_be_comma_separated_and_repr_hides_the_keys() -> None:
    first, second = new_key_line("a"), new_key_line("b")
    keys = TaskKeyring.parse(f"{first} , {second}  # rotation in progress", source="x")
    assert keys.ids == ("a", "b") and keys.active_id == "a"
    shown = repr(keys) + repr(keys.keys[0]) + str(keys)
    assert first.partition(":")[2] not in shown and second.partition(":")[2] not in shown


def test_key_file_is_made_private_kept_and_refused_when_others_can_read_it(
    tmp_path: Path,
) -> None:
    path = ensure_key_file(tmp_path / "state" / "task-keys")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = TaskKeyring.load_file(path)
    assert first.ids == ("k1",)
    ensure_key_file(path)  # a second `hashctl up` keeps the keys (pending rows need them)
    assert TaskKeyring.load_file(path).keys == first.keys
    os.chmod(path, 0o644)
    with pytest.raises(SettingsError, match="chmod 600"):
        TaskKeyring.load_file(path)


def test_from_env_reads_one_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    monkeypatch.delenv(KEYS_ENV, raising=False)
    assert TaskKeyring.from_env() is None
    monkeypatch.setenv(KEYS_ENV, new_key_line("inline"))
    keys = TaskKeyring.from_env()
    assert keys is not None and keys.ids == ("inline",)
    monkeypatch.setenv(KEY_FILE_ENV, str(ensure_key_file(tmp_path / "keys")))
    with pytest.raises(SettingsError, match="not both"):
        TaskKeyring.from_env()


def test_workerd_opens_right_before_hashing_and_names_a_missing_key() -> None:
    keys = ring("k1")
    sealed = keys.seal(TASK, "md5", {}, b"hello")
    task = ClaimedTask(
        id=TASK, algorithm="md5", data=sealed.blob, params={}, attempts=1, max_attempts=3,
        lease_id=1, input_key_id=sealed.key_id,
    )  # fmt: skip
    digest, _ = handlers.run(task, keys)
    assert digest == bytes.fromhex("5d41402abc4b2a76b9719d911017c592")
    with pytest.raises(UnknownKey, match=r"'k1'.*HASHMESH_TASK_KEY_FILE is not set") as caught:
        handlers.run(task, None)
    assert handlers.describe_error(caught.value).startswith("UnknownKey: ")
    # A row stored before sealing (no key id) is hashed as stored.
    clear = ClaimedTask(
        id=TASK, algorithm="md5", data=b"hello", params={}, attempts=1, max_attempts=3, lease_id=1
    )
    assert handlers.run(clear, None)[0] == digest


def test_task_key_rejects_wrong_sizes_directly() -> None:
    with pytest.raises(SettingsError):
        TaskKey("k", b"x" * 16)


def test_hashctl_keys_new_prints_a_line_a_key_file_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.cli_helpers import hashctl

    made = hashctl("keys", "new", "2026-07")
    assert made.exit_code == 0, made.stderr
    keys = TaskKeyring.parse(made.stdout, source="stdout")
    assert keys.ids == ("2026-07",)
    assert hashctl("keys", "new", "bad id").exit_code == 2
    monkeypatch.delenv("HASHMESH_DATABASE_URL", raising=False)
    missing = hashctl("keys", "usage")
    assert missing.exit_code == 2 and "--dsn" in missing.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_a_key_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = ensure_key_file(tmp_path / "task-keys")
    os.chown(path, 65534, 65534)  # nobody could now rewrite the keys
    with pytest.raises(SettingsError, match="belongs to uid 65534"):
        TaskKeyring.load_file(path)
