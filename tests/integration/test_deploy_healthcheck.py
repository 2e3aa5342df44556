"""deploy/healthcheck.py, the image's HEALTHCHECK, run as a process against a real GrpcServer:
exit 0 while SERVING, 1 once NOT_SERVING or unreachable, and it speaks mutual TLS from the
HASHMESH_TLS_* variables."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from hashmesh.core.rpc import GrpcServer
from hashmesh.core.tls import ServerTls
from tests.certs import make_pki

PROBE = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"
TLS_VARIABLES = ("CERT_FILE", "KEY_FILE", "CLIENT_CA_FILE", "CA_FILE", "CLIENT_CERT_FILE",
                 "CLIENT_KEY_FILE", "SERVER_NAME")


async def probe(target: str, env: dict[str, str] | None = None) -> int:
    clean = {k: v for k, v in os.environ.items()
             if k.removeprefix("HASHMESH_TLS_") not in TLS_VARIABLES}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(PROBE), target, env={**clean, **(env or {})},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), timeout=30)


def test_probe_follows_the_serving_status() -> None:
    async def scenario() -> None:
        server = GrpcServer("127.0.0.1:0")
        await server.start()
        try:
            await server.set_serving(True)
            assert await probe(server.address) == 0
            await server.set_serving(False)
            assert await probe(server.address) == 1
        finally:
            await server.stop(0)
        assert await probe(server.address) == 1

    asyncio.run(scenario())


def test_probe_speaks_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = ServerTls(str(pki.server_cert), str(pki.server_key), client_ca_file=str(pki.ca_cert))

    async def scenario() -> None:
        server = GrpcServer("127.0.0.1:0", credentials=tls.credentials())
        await server.start()
        await server.set_serving(True)
        try:
            with_cert = {"HASHMESH_TLS_CA_FILE": str(pki.ca_cert),
                         "HASHMESH_TLS_CLIENT_CERT_FILE": str(pki.client_cert),
                         "HASHMESH_TLS_CLIENT_KEY_FILE": str(pki.client_key)}
            assert await probe(server.address, with_cert) == 0
            assert await probe(server.address, {"HASHMESH_TLS_CA_FILE": str(pki.ca_cert)}) == 1
        finally:
            await server.stop(0)

    asyncio.run(scenario())
