"""Letting one user traverse a directory through a POSIX ACL entry (the Linux extended
attribute ``system.posix_acl_access``), rather than opening the directory to every user.

Used by the embedded PostgreSQL when run as root: its server user must reach a data directory
under, say, ``/root``. The entry grants execute (traverse, not listing) to that user alone."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

_XATTR = "system.posix_acl_access"
_VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")  # tag, permissions, id
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
_EXECUTE = 0o1
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}

Acl = dict[tuple[int, int], int]
"""(tag, id) -> permission bits (rwx = 0o7)."""


def parse(raw: bytes) -> Acl:
    (version,) = _HEADER.unpack_from(raw)
    if version != _VERSION or (len(raw) - _HEADER.size) % _ENTRY.size:
        raise ValueError(f"not a POSIX ACL (version {version}, {len(raw)} bytes)")
    return {(tag, ident): perm for tag, perm, ident in _ENTRY.iter_unpack(raw[_HEADER.size :])}


def encode(acl: Acl) -> bytes:
    # The kernel wants entries sorted by tag, then id.
    return _HEADER.pack(_VERSION) + b"".join(
        _ENTRY.pack(tag, perm, ident) for (tag, ident), perm in sorted(acl.items())
    )


def from_mode(mode: int) -> Acl:
    """The minimal ACL that a plain mode stands for."""
    return {
        (USER_OBJ, _NO_ID): (mode >> 6) & 0o7,
        (GROUP_OBJ, _NO_ID): (mode >> 3) & 0o7,
        (OTHER, _NO_ID): mode & 0o7,
    }


def with_traverse(acl: Acl, uid: int) -> Acl:
    """``acl`` plus execute for ``uid``. The mask (the most any named entry or the owning group
    gets) gains execute only: the owning group's own entry is unchanged, so it gains nothing."""
    granted = dict(acl)
    granted[(USER, uid)] = granted.get((USER, uid), 0) | _EXECUTE
    mask = granted.get((MASK, _NO_ID))
    if mask is None:  # a minimal ACL: the mask starts as the owning group's bits
        mask = acl[(GROUP_OBJ, _NO_ID)]
    granted[(MASK, _NO_ID)] = mask | _EXECUTE
    return granted


def grant_traverse(path: Path, uid: int) -> bool:
    """Let ``uid`` traverse ``path``; False when its filesystem has no POSIX ACLs."""
    try:
        raw = os.getxattr(path, _XATTR, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        if exc.errno != errno.ENODATA:
            raise
        raw = b""
    acl = parse(raw) if raw else from_mode(path.stat().st_mode)
    try:
        os.setxattr(path, _XATTR, encode(with_traverse(acl, uid)), follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    return True
