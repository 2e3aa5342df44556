"""``hashctl hash`` and ``hashctl verify``: HashService from the command line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, BinaryIO

import typer

from hashmesh.cli.client import CliError, ExitCode
from hashmesh.cli.naming import ALGORITHMS, algorithm_name, parse_algorithm
from hashmesh.cli.options import (
    HashLen,
    JsonFlag,
    MemoryCost,
    Parallelism,
    Salt,
    TimeCost,
    argon2_params,
)
from hashmesh.cli.state import state_of
from hashmesh.v1 import common_pb2, hash_pb2

CHUNK_BYTES = 256 * 1024
# Argon2id inputs are passwords: read whole (they cannot be streamed), but within reason.
MAX_PASSWORD_BYTES = 1024 * 1024


def _chunks(source: BinaryIO) -> Iterator[bytes]:
    while chunk := source.read(CHUNK_BYTES):
        yield chunk


def _stream_requests(
    algorithm: common_pb2.Algorithm.ValueType, source: BinaryIO
) -> Iterator[hash_pb2.HashStreamRequest]:
    yield hash_pb2.HashStreamRequest(header=hash_pb2.HashStreamHeader(algorithm=algorithm))
    for chunk in _chunks(source):
        yield hash_pb2.HashStreamRequest(chunk=chunk)


def _read_bounded(source: BinaryIO, what: str) -> bytes:
    data = source.read(MAX_PASSWORD_BYTES + 1)
    if len(data) > MAX_PASSWORD_BYTES:
        raise CliError(
            f"{what} is larger than {MAX_PASSWORD_BYTES} bytes", ExitCode.INVALID_ARGUMENT
        )
    return data


def _open_source(text: str | None, file: Path | None) -> tuple[BinaryIO | None, str]:
    """The byte stream to hash (None when the input is ``text`` itself) and its label."""
    if file is not None and text is not None:
        raise CliError("give TEXT or --file, not both", ExitCode.USAGE)
    if file is not None:
        try:
            return open(file, "rb"), str(file)
        except OSError as exc:
            raise CliError(
                f"cannot read {file}: {exc.strerror}", ExitCode.INVALID_ARGUMENT
            ) from None
    if text == "-" or (text is None and not sys.stdin.isatty()):
        return sys.stdin.buffer, "-"
    if text is None:
        raise CliError("nothing to hash: give TEXT, --file PATH, or '-' for stdin", ExitCode.USAGE)
    return None, ""


def hash_command(
    ctx: typer.Context,
    algorithm: Annotated[
        str, typer.Argument(help=f"One of: {', '.join(ALGORITHMS)}.", show_default=False)
    ],
    text: Annotated[
        str | None,
        typer.Argument(help="Text to hash; '-' (or no TEXT with piped input) reads stdin."),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Hash this file (streamed).")
    ] = None,
    time_cost: TimeCost = 0,
    memory_cost: MemoryCost = 0,
    parallelism: Parallelism = 0,
    hash_len: HashLen = 0,
    salt: Salt = None,
    json_out: JsonFlag = False,
) -> None:
    """Hash TEXT, a file or stdin now, on one replica.

    Files and stdin are streamed in constant memory (HashStream); argon2id inputs are passwords
    and go in one call (Hash).

    Examples:

      hashctl hash sha256 hello

      hashctl hash md5 --file big.iso

      printf 'secret' | hashctl hash argon2id - --time-cost 2 --salt saltsalt
    """
    state = state_of(ctx)
    out = state.output(json_out)
    wire_algorithm = parse_algorithm(algorithm)
    source, label = _open_source(text, file)
    timeout = state.options.timeout
    stub = state.session.hash()
    metadata = state.session.metadata()
    size: int
    try:
        if source is None or wire_algorithm == common_pb2.ALGORITHM_ARGON2ID:
            data = (
                text.encode()
                if source is None and text is not None
                else _read_bounded(source, label)  # type: ignore[arg-type]
            )
            request = hash_pb2.HashRequest(algorithm=wire_algorithm, data=data)
            if wire_algorithm == common_pb2.ALGORITHM_ARGON2ID:
                request.argon2.CopyFrom(
                    argon2_params(time_cost, memory_cost, parallelism, hash_len, salt)
                )
            result = stub.ComputeHash(request, timeout=timeout, metadata=metadata).result
            size = len(data)
        else:
            # No deadline: a large file takes as long as it takes; the server answers at the end.
            reply = stub.HashStream(_stream_requests(wire_algorithm, source), metadata=metadata)
            result, size = reply.result, reply.total_bytes
    finally:
        if source is not None and source is not sys.stdin.buffer:
            source.close()
    if out.json_mode:
        out.json(
            {
                "algorithm": algorithm_name(result.algorithm),
                "encoded": result.encoded,
                "cached": result.cached,
                "bytes": size,
                **({"file": label} if label else {}),
            }
        )
        return
    out.line(f"{result.encoded}  {label}" if file is not None else result.encoded)
    if result.cached and out.rich:
        out.note("(from cache)")


def verify_command(
    ctx: typer.Context,
    algorithm: Annotated[
        str, typer.Argument(help="Algorithm of EXPECTED (argon2id for a PHC string).")
    ],
    expected: Annotated[
        str, typer.Argument(help="Hex digest or argon2id PHC string to check against.")
    ],
    text: Annotated[
        str | None, typer.Argument(help="Data to check; '-' or piped input reads stdin.")
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Check data against a digest or PHC string (constant time, on the server).

    Exits 0 on a match and 10 when the data does not match.

    Examples:

      hashctl verify sha256 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824 hello

      printf 'secret' | hashctl verify argon2id '$argon2id$v=19$m=65536,t=3,p=4$...' -
    """
    state = state_of(ctx)
    out = state.output(json_out)
    wire_algorithm = parse_algorithm(algorithm)
    source, label = _open_source(text, None)
    data = text.encode() if source is None and text is not None else _read_bounded(source, label)  # type: ignore[arg-type]
    reply = state.session.hash().Verify(
        hash_pb2.VerifyRequest(algorithm=wire_algorithm, data=data, encoded=expected),
        timeout=state.options.timeout,
        metadata=state.session.metadata(),
    )
    if out.json_mode:
        out.json({"match": reply.match, "needs_rehash": reply.needs_rehash})
    else:
        out.line("match" if reply.match else "no match", style="green" if reply.match else "red")
        if reply.match and reply.needs_rehash:
            out.note("the PHC string uses old parameters: rehash the password")
    if not reply.match:
        raise typer.Exit(ExitCode.MISMATCH)
