from __future__ import annotations

import hashlib
import subprocess
import sys

import grpc

from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc
from tests.conftest import Processes


def test_hashd_serves_sha256_and_rejects_missing_algorithm(dsn: str, procs: Processes) -> None:
    replica = procs.hashd(dsn)
    with grpc.insecure_channel(replica.address) as channel:
        stub = hash_pb2_grpc.HashServiceStub(channel)
        reply = stub.Hash(
            hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"hello"), timeout=5
        )
        assert reply.result.encoded == hashlib.sha256(b"hello").hexdigest()
        try:
            stub.Hash(hash_pb2.HashRequest(data=b"hello"), timeout=5)
        except grpc.RpcError as err:
            assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "algorithm" in (err.details() or "")
        else:
            raise AssertionError("missing algorithm was accepted")


def test_daemons_without_a_usable_database_exit_with_one_line() -> None:
    for dsn in ("postgresql://nobody@127.0.0.1:1/none", "not-a-dsn"):
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "hashmesh.hashd",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                dsn,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 3, run.stderr
        assert "Traceback" not in run.stderr
        assert "hashd: error: cannot use the database" in run.stderr
    # workerd retries an unreachable database; a DSN that cannot parse ends it at once.
    run = subprocess.run(
        [sys.executable, "-m", "hashmesh.workerd", "--database-url", "not-a-dsn"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 3 and "Traceback" not in run.stderr, run.stderr
    assert "workerd: error: cannot use the database" in run.stderr


def test_daemons_that_cannot_listen_exit_with_one_line(dsn: str) -> None:
    for argv in (
        ["hashmesh.hashd", "--listen", "no-such-host.invalid:0", "--database-url", dsn],
        [
            "hashmesh.balancer",
            "--listen",
            "no-such-host.invalid:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--backends",
            "127.0.0.1:1",
        ],
    ):
        run = subprocess.run(
            [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 1, run.stderr
        assert "Traceback" not in run.stderr and "cannot listen on" in run.stderr
