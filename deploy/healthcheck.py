#!/usr/bin/env python3
"""Container health probe: grpc.health.v1 Check on one address; exit 0 only when SERVING.

    hashmesh-healthcheck [HOST:PORT] [--service NAME]

The address defaults to ``HASHMESH_HEALTH_TARGET`` (127.0.0.1:50051). TLS settings come from
``HASHMESH_TLS_CA_FILE`` / ``HASHMESH_TLS_CLIENT_CERT_FILE`` / ``HASHMESH_TLS_CLIENT_KEY_FILE``
/ ``HASHMESH_TLS_SERVER_NAME`` when set, as for every hashmesh client."""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hashmesh.core.tls import ClientTls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hashmesh-healthcheck")
    parser.add_argument("target", nargs="?",
                        default=os.environ.get("HASHMESH_HEALTH_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--service", default="", help="service name; empty: the whole server")
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    tls = ClientTls.from_env()
    if tls is None:
        channel = grpc.insecure_channel(args.target)
    else:
        channel = grpc.secure_channel(args.target, tls.credentials(), options=tls.channel_options())
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"{args.target}: {err.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{args.target}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
