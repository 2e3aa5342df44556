"""The Node.js example of docs/clients.md, run as written against a real mesh (3 hashd, the
balancer, a workerd): hash, stream, a task watched to the end, and a batch's BadRequest
decoded from the status. npm installs @grpc/grpc-js, @grpc/proto-loader and protobufjs into a
temporary folder (its cache makes later runs offline); without node, npm or a registry the
test is skipped, saying which."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import google.rpc
import pytest

import hashmesh.v1
from tests.conftest import Mesh

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs")
NO_NETWORK = re.compile(r"ENOTFOUND|EAI_AGAIN|ETIMEDOUT|ECONNREFUSED|ENETUNREACH|network", re.I)


def example(language: str) -> str:
    text = (ROOT / "docs" / "clients.md").read_text()
    found = re.search(rf"<!-- example: {language} -->\n```\w+\n(.*?)\n```", text, re.S)
    assert found, f"no {language} example in docs/clients.md"
    return found.group(1)


def node_project(folder: Path) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--prefer-offline", "--silent", *PACKAGES],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        if NO_NETWORK.search(done.stderr):
            pytest.skip(f"npm cannot reach its registry: {done.stderr.strip()[:300]}")
        pytest.fail(f"npm install failed: {done.stderr}")
    script = folder / "example.js"
    script.write_text(example("node"))
    return script


def test_node_example_runs_against_the_mesh(mesh: Mesh, tmp_path: Path) -> None:
    script = node_project(tmp_path)
    protos = Path(hashmesh.v1.__file__).resolve().parents[2]  # holds hashmesh/v1/*.proto
    googleapis = Path(next(iter(google.rpc.__path__))).resolve().parent.parent
    env = {
        **os.environ,
        "HASHMESH_PROTOS": str(protos),
        "GOOGLEAPIS_PROTOS": str(googleapis),
        "HASHMESH_ADDRESS": mesh.address,
    }
    done = subprocess.run(
        ["node", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    steps = {line["step"]: line for line in map(json.loads, done.stdout.splitlines())}
    assert steps["hash"]["encoded"] == hashlib.sha256(b"hello").hexdigest()
    assert steps["stream"] == {
        "step": "stream",
        "total_bytes": str(3 << 20),
        "encoded": hashlib.sha256(b"a" * (3 << 20)).hexdigest(),
    }
    assert steps["task"] == {
        "step": "task",
        "status": "TASK_STATUS_SUCCEEDED",
        "encoded": hashlib.md5(b"hello").hexdigest(),
    }
    assert steps["error"] == {
        "step": "error",
        "code": "INVALID_ARGUMENT",
        "reason": "INVALID_FIELD",
        "domain": "hashmesh.dev",
        "fields": ["specs[0].algorithm", "specs[0].priority", "specs[1].argon2"],
    }
