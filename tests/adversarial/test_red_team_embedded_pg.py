"""Red team (issue 10): the embedded PostgreSQL's own user against root.

As root, ``hashctl up`` runs the server as ``pgserver`` and hands it the data directory. Whoever
becomes ``pgserver`` (any database superuser can, with ``COPY ... TO PROGRAM``) owns
everything under it, including the names root writes at the next start (``pg_hba.conf``,
``password``). Before, root opened them following symlinks and then gave the file to
``pgserver`` (fchown): a symlink to ``/etc/shadow`` made the server's user its owner."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import psycopg
import pytest

from hashmesh.core.embedded_pg import PASSWORD_FILE, EmbeddedPostgres


@pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as another user only as root")
@pytest.mark.parametrize("planted", ["pgdata/pg_hba.conf", PASSWORD_FILE, "postgres.log"])
def test_the_server_user_cannot_redirect_roots_writes(tmp_path: Path, planted: str) -> None:
    server = EmbeddedPostgres(data_dir=tmp_path / "state" / "postgres")
    server.start()
    server.stop()
    # A root file the server's user must never own nor change (standing in for /etc/shadow).
    victim = tmp_path / "root-only"
    victim.write_text("root:$6$secret:19000:0:99999:7:::\n")
    victim.chmod(0o600)
    account = pwd.getpwnam("pgserver")
    link = server.data_dir / planted
    assert link.parent.stat().st_uid == account.pw_uid  # so pgserver may do what follows
    link.unlink()
    link.symlink_to(victim)
    if planted == PASSWORD_FILE:  # and have root make a new password file: a new cluster
        (server.data_dir / "pgdata" / "PG_VERSION").unlink()
    server.start()
    try:
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert (victim.stat().st_uid, victim.read_text()) == (0, "root:$6$secret:19000:0:99999:7:::\n"), \
            "root wrote through the server user's symlink"
        assert not link.is_symlink()
    finally:
        server.stop()
