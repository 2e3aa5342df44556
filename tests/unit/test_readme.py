"""The README documents every setting the code reads."""

from __future__ import annotations

import re
from pathlib import Path

from hashmesh.balancer.config import UPSTREAM_TLS_ENV

ROOT = Path(__file__).resolve().parents[2]
READ_WITH_PREFIX = re.compile(
    r"""env_(?:str|int|float|bool|list|optional)\(\s*["']([A-Z0-9_]+)["']"""
)
SPELLED_OUT = re.compile(r"""["'](HASHMESH_[A-Z0-9_]*[A-Z0-9])["']""")


def settings_read_by_code() -> set[str]:
    names = {f"HASHMESH_{name}" for name in UPSTREAM_TLS_ENV.values()}
    for folder in ("core", "hashd", "workerd", "balancer", "cli"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            names |= {f"HASHMESH_{name}" for name in READ_WITH_PREFIX.findall(text)}
            names |= set(SPELLED_OUT.findall(text))
    return names


def test_every_setting_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = settings_read_by_code()
    assert len(found) > 40, "the scan found too few settings: is the pattern still right?"
    missing = sorted(name for name in found if f"`{name}`" not in readme)
    assert not missing, f"settings missing from the README's table: {missing}"


def test_ci_runs_the_readmes_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(
        r"\*\*Run the whole test suite\*\*.*?```sh\n(.+?)\n```", readme, flags=re.DOTALL
    )
    assert found, "the README lost its 'Run the whole test suite' command"
    command = found.group(1).strip()
    assert "pytest" in command
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in (line.strip() for line in ci_lines), (command, ".ci/run")
