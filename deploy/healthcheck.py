#!/usr/bin/env python3
"""Container health probe for every role of the image; exit 0 only when healthy.

    hashmesh-healthcheck [HOST:PORT] [--service NAME] [--liveness]

With an address (or ``HASHMESH_HEALTH_TARGET``): a grpc.health.v1 Check there. Without one, it
finds the hashmesh daemon running in this container and checks what that role offers:
hashd and the balancer over grpc.health.v1 on their listening port (``--listen`` or
``HASHMESH_HASHD_LISTEN`` / ``HASHMESH_BALANCER_LISTEN``); workerd, which serves no gRPC, over
its Prometheus endpoint when it has one (``--metrics-port`` / ``HASHMESH_WORKERD_METRICS_PORT``),
else by being alive. A container running no daemon (``hashctl db migrate``) has nothing to
check and passes. The empty service (the default) means "can serve"; ``--liveness`` asks
``hashmesh.liveness``, SERVING for as long as the process runs. TLS settings come from
``HASHMESH_TLS_CA_FILE`` / ``HASHMESH_TLS_CLIENT_CERT_FILE`` / ``HASHMESH_TLS_CLIENT_KEY_FILE``
/ ``HASHMESH_TLS_SERVER_NAME`` when set, as for every hashmesh client."""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hashmesh.core.rpc import LIVENESS_SERVICE
from hashmesh.core.tls import ClientTls

# role → (module, console script, listen variable, default port)
ROLES = {
    "hashd": ("hashmesh.hashd", "hashd", "HASHMESH_HASHD_LISTEN", 50051),
    "balancer": ("hashmesh.balancer", "hashmesh-balancer", "HASHMESH_BALANCER_LISTEN", 50050),
    "workerd": ("hashmesh.workerd", "workerd", "", 0),
}


def find_daemon(proc: Path = Path("/proc")) -> tuple[str, list[str]] | None:
    """The role and argv of the hashmesh daemon running here (the lowest PID wins)."""
    for pid in sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit()):
        try:
            argv = (proc / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        for role, (module, script, _, _) in ROLES.items():
            scripts = {Path(arg).name for arg in argv[:2]}
            if script in scripts or module in argv[1:3]:
                return role, argv
    return None


def flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``argv``."""
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def target_of(role: str, argv: list[str]) -> str:
    _, _, variable, port = ROLES[role]
    listen = flag(argv, "--listen") or os.environ.get(variable) or f"0.0.0.0:{port}"
    return f"127.0.0.1:{listen.rsplit(':', 1)[1]}"


def check_grpc(target: str, service: str, timeout: float) -> int:
    tls = ClientTls.from_env()
    if tls is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, tls.credentials(), options=tls.channel_options())
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            print(f"{target}: {err.code().name}", file=sys.stderr)
            return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"{target}: {status}", file=sys.stderr)
        return 1
    return 0


def check_workerd(argv: list[str], timeout: float) -> int:
    port = flag(argv, "--metrics-port") or os.environ.get("HASHMESH_WORKERD_METRICS_PORT")
    if not port:
        return 0  # alive (found running) and nothing else to ask
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout):
            return 0
    except OSError as err:
        print(f"workerd metrics on port {port}: {err}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hashmesh-healthcheck")
    parser.add_argument("target", nargs="?", default=os.environ.get("HASHMESH_HEALTH_TARGET"))
    parser.add_argument("--service", default="", help="service name; empty: the whole server")
    parser.add_argument(
        "--liveness",
        action="store_true",
        help=f"ask {LIVENESS_SERVICE!r}: alive, whether or not it can serve",
    )
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    service = LIVENESS_SERVICE if args.liveness else args.service
    if args.target:
        return check_grpc(args.target, service, args.timeout)
    daemon = find_daemon()
    if daemon is None:
        return 0
    role, daemon_argv = daemon
    if role == "workerd":
        return check_workerd(daemon_argv, args.timeout)
    return check_grpc(target_of(role, daemon_argv), service, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
