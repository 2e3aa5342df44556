"""``hashctl keys``: the keys that seal task inputs at rest (README, "Task input at rest")."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from hashmesh.cli.client import CliError, ExitCode
from hashmesh.cli.options import JsonFlag
from hashmesh.cli.state import state_of
from hashmesh.core.queue.sealing import new_key_line
from hashmesh.core.settings import SettingsError

keys_app = typer.Typer(
    help="Keys sealing task inputs at rest (HASHMESH_TASK_KEY_FILE).", no_args_is_help=True
)


@keys_app.command("new")
def keys_new(
    key_id: Annotated[
        str, typer.Argument(help="Id stored in each row it seals (1-32 of A-Z a-z 0-9 . _ -).")
    ],
) -> None:
    """Print a new key line, ``<id>:<base64>``, to add to every key file (first line: active).

    Example:

      hashctl keys new 2026-07 >> task-keys.new
    """
    try:
        line = new_key_line(key_id)
    except SettingsError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None
    typer.echo(line)


@keys_app.command("usage")
def keys_usage(
    ctx: typer.Context,
    dsn: Annotated[
        str | None,
        typer.Option(
            "--dsn", envvar="HASHMESH_DATABASE_URL", help="PostgreSQL DSN (HASHMESH_DATABASE_URL)."
        ),
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Rows still holding an input sealed with each key id. A key may leave the key files once
    it has no unfinished task; finished ones only matter to RequeueTask (it would then fail,
    naming the key).

    Example:

      hashctl keys usage --dsn postgresql://hashmesh@db/hashmesh
    """
    from hashmesh.core.errors import Unavailable
    from hashmesh.core.queue.db import DatabaseError
    from hashmesh.core.queue.store import input_key_usage

    out = state_of(ctx).output(json_out)
    dsn = dsn or os.environ.get("HASHMESH_DATABASE_URL")
    if not dsn:
        raise CliError("no database: give --dsn or set HASHMESH_DATABASE_URL", ExitCode.USAGE)
    try:
        rows = input_key_usage(dsn)
    except Unavailable as exc:
        raise CliError(f"cannot reach the database: {exc}", ExitCode.UNAVAILABLE) from None
    except DatabaseError as exc:
        raise CliError(str(exc)) from None
    usage = [
        {"key_id": key_id, "unfinished": unfinished, "finished": finished}
        for key_id, unfinished, finished in rows
    ]
    if out.json_mode:
        out.json({"keys": usage})
        return
    if not usage:
        out.line("no row holds a sealed input")
        return
    out.table(
        ["KEY ID", "UNFINISHED", "FINISHED"],
        [[u["key_id"], u["unfinished"], u["finished"]] for u in usage],
    )
