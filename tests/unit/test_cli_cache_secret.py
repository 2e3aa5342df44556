"""``hashctl up``'s cache secret: made once, random, owner-only, the same on the next run."""

from __future__ import annotations

from pathlib import Path

from hashmesh.cli.supervisor import CACHE_SECRET_FILE, load_cache_secret


def test_the_secret_is_made_once_and_kept_owner_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_cache_secret(state)
    path = state / CACHE_SECRET_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(first) == 64 and int(first, 16) >= 0
    assert load_cache_secret(state) == first
    assert load_cache_secret(tmp_path / "other") != first


def test_an_empty_or_loose_file_is_repaired(tmp_path: Path) -> None:
    path = tmp_path / CACHE_SECRET_FILE
    path.write_text("")
    path.chmod(0o644)
    secret = load_cache_secret(tmp_path)
    assert secret and path.read_text().strip() == secret
    assert path.stat().st_mode & 0o777 == 0o600
