"""The layering the README's architecture paragraph promises, read from the source's imports
(so a docstring such as "the only importer of psycopg" cannot quietly become false)."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"core": "hashmesh.core", "hashd": "hashmesh.hashd", "workerd": "hashmesh.workerd",
            "balancer": "hashmesh.balancer", "cli": "hashmesh.cli"}  # fmt: skip
DRIVER = ("psycopg", "psycopg_pool")
TASK_SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE)\b[\s\S]*\bhashmesh_(tasks|workers)\b", re.I)


def modules() -> Iterator[tuple[str, ast.Module]]:
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            yield relative, ast.parse(path.read_text(encoding="utf-8"), relative)


def imported(tree: ast.Module) -> set[str]:
    """Every module an ``import`` or ``from … import`` names, at any depth (lazy ones too)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def uses(names: set[str], *prefixes: str) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


SOURCES = list(modules())


def test_the_scan_sees_the_whole_tree() -> None:
    paths = {path for path, _ in SOURCES}
    assert {"core/queue/store.py", "hashd/server.py", "workerd/worker.py", "cli/app.py"} <= paths


@pytest.mark.parametrize(("path", "tree"), SOURCES, ids=[p for p, _ in SOURCES])
def test_layering(path: str, tree: ast.Module) -> None:
    names = imported(tree)
    if not path.startswith("core/queue/"):
        assert not uses(names, *DRIVER), f"{path} imports the database driver"
        assert not uses(names, "hashmesh.core.queue.store.queries"), f"{path} loads task SQL"
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not TASK_SQL.search(node.value), f"{path} holds task SQL"
    if path.startswith("balancer/"):
        assert not uses(
            names,
            "hashmesh.core.queue",
            "hashmesh.core.hashing",
            "hashmesh.hashd",
            "hashmesh.workerd",
        ), f"{path}: the balancer knows no queue or hashing"
    if not path.startswith("cli/"):
        assert not uses(names, "hashmesh.cli"), f"{path}: daemons and core never import the CLI"
    if path.startswith("core/"):
        assert not uses(names, "hashmesh.hashd", "hashmesh.workerd", "hashmesh.balancer"), path
    if path.startswith("workerd/"):
        assert not uses(names, "hashmesh.core.rpc"), f"{path}: workerd serves no gRPC"
    if path.startswith("core/hashing/"):
        # The cache's shared tier is a table it is handed (core/queue/cache_table.py).
        assert not uses(names, "hashmesh.core.queue"), f"{path}: hashing knows no PostgreSQL"
