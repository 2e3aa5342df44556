"""Red team (issue 10): the embedded PostgreSQL's own user against root.

As root, ``hashctl up`` runs the server as ``pgserver`` and hands it the data directory. Whoever
becomes ``pgserver`` (any database superuser can, with ``COPY ... TO PROGRAM``) owns
everything under it, including the names root writes at the next start (``pg_hba.conf``,
``password``). Before, root opened them following symlinks and then gave the file to
``pgserver`` (fchown): a symlink to ``/etc/shadow`` made the server's user its owner."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from hashmesh.core.queue.embedded_pg import PASSWORD_FILE, EmbeddedPostgres


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
        assert (victim.stat().st_uid, victim.read_text()) == (
            0,
            "root:$6$secret:19000:0:99999:7:::\n",
        ), "root wrote through the server user's symlink"
        assert not link.is_symlink()
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as another user only as root")
def test_as_root_the_binaries_parents_open_to_the_server_user_alone(tmp_path: Path) -> None:
    """PostgreSQL installed in a private place (a virtualenv under /root): before, every
    directory above the binaries silently became traversable by every user (g+x, o+x)."""
    home = tmp_path / "home"
    site = home / "venv" / "site-packages"
    site.mkdir(parents=True)
    home.chmod(0o700)
    spec = importlib.util.find_spec("pgserver")  # not imported: that has side effects
    assert spec is not None and spec.origin is not None
    installed = Path(spec.origin).parent
    shutil.copytree(installed / "pginstall", site / "pgserver" / "pginstall", symlinks=True)
    libs = installed.with_name("pgserver.libs")  # the wheel's bundled libraries (rpath)
    if libs.exists():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    (site / "pgserver" / "__init__.py").write_text("")
    script = (
        "import sys\nfrom pathlib import Path\nfrom hashmesh.core.queue.embedded_pg import EmbeddedPostgres\n"
        "server = EmbeddedPostgres(data_dir=Path(sys.argv[1]))\nserver.start()\nserver.stop()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "state")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # (with an ACL entry the group bits show its mask, --x: the owning group still gets nothing)
    assert not home.stat().st_mode & 0o007, "a private directory was opened to every user"
    probe = subprocess.run(
        [
            "setpriv",
            f"--reuid={pwd.getpwnam('pgserver').pw_uid}",
            "--clear-groups",
            "--regid=65534",
            "ls",
            str(site / "pgserver" / "pginstall" / "bin" / "postgres"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode == 0, probe.stderr  # pgserver alone reaches them (an ACL entry)
