"""The ACL entry that lets the embedded PostgreSQL's user, and no one else, traverse a parent."""

from __future__ import annotations

from hashmesh.core import posix_acl
from hashmesh.core.posix_acl import GROUP_OBJ, MASK, OTHER, USER, USER_OBJ

NO_ID = 0xFFFFFFFF


def test_a_private_directory_gains_traverse_for_one_user_and_nothing_for_the_rest() -> None:
    acl = posix_acl.with_traverse(posix_acl.from_mode(0o700), 999)
    assert acl == {
        (USER_OBJ, NO_ID): 0o7,
        (USER, 999): 0o1,
        (GROUP_OBJ, NO_ID): 0o0,  # the owning group still gets nothing
        (MASK, NO_ID): 0o1,
        (OTHER, NO_ID): 0o0,
    }
    assert posix_acl.parse(posix_acl.encode(acl)) == acl


def test_an_existing_acl_keeps_its_entries_and_its_mask_only_gains_execute() -> None:
    existing = {
        (USER_OBJ, NO_ID): 0o7,
        (USER, 1000): 0o4,
        (GROUP_OBJ, NO_ID): 0o5,
        (MASK, NO_ID): 0o4,  # the admin limited named entries to read
        (OTHER, NO_ID): 0o0,
    }
    acl = posix_acl.with_traverse(existing, 999)
    assert acl[(USER, 1000)] == 0o4 and acl[(GROUP_OBJ, NO_ID)] == 0o5
    assert acl[(USER, 999)] == 0o1 and acl[(MASK, NO_ID)] == 0o5
    # Sorted by tag then id, as the kernel requires.
    raw = posix_acl.encode(acl)
    tags = [raw[4 + 8 * i] for i in range(len(acl))]
    assert tags == sorted(tags)


def test_granting_twice_changes_nothing() -> None:
    once = posix_acl.with_traverse(posix_acl.from_mode(0o750), 5)
    assert posix_acl.with_traverse(once, 5) == once
