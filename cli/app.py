"""``hashctl``: the command tree, the global options, and the one place errors become an exit
code. Each command lives in a module of its group; this module only wires them."""

from __future__ import annotations

import re
from typing import Annotated, Any

import grpc
import typer
from typer.core import TyperGroup

from hashmesh.cli import admin_cmds, bench, hash_cmds, key_cmds, task_cmds, up
from hashmesh.cli.client import CliError, ExitCode, error_from_rpc
from hashmesh.cli.options import DEFAULT_ADMIN_TARGET, DEFAULT_TARGET, CliOptions
from hashmesh.cli.output import print_error
from hashmesh.cli.state import CliState
from hashmesh.core.settings import SettingsError
from hashmesh.core.tls import ClientTls


class HashctlGroup(TyperGroup):
    """Turns expected failures (``CliError``, a failed gRPC call) into one line on stderr and a
    distinct exit code, for every command below it; anything else is a bug and keeps its
    traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CliError as err:
            print_error(err.message)
            raise typer.Exit(int(err.exit_code)) from None
        except grpc.RpcError as err:
            state = ctx.obj if isinstance(ctx.obj, CliState) else None
            target = state.options.target if state else "?"
            failure = error_from_rpc(err, target)
            print_error(failure.message)
            raise typer.Exit(int(failure.exit_code)) from None


_METADATA_TEXT = re.compile(r"[\x20-\x7e]*")

app = typer.Typer(
    cls=HashctlGroup,
    name="hashctl",
    help="hashctl: hash now, queue hashing tasks, and run or operate a hashmesh.\n\n"
    "Start here: `hashctl up --demo` runs a whole mesh on this machine and tries it.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


@app.callback()
def global_options(
    ctx: typer.Context,
    target: Annotated[
        str,
        typer.Option(envvar="HASHMESH_TARGET", help="Public endpoint: the balancer, or one hashd."),
    ] = DEFAULT_TARGET,
    admin_target: Annotated[
        str, typer.Option(envvar="HASHMESH_ADMIN_TARGET", help="The balancer's admin endpoint.")
    ] = DEFAULT_ADMIN_TARGET,
    admin_token: Annotated[
        str | None,
        typer.Option(
            envvar="HASHMESH_ADMIN_TOKEN",
            show_default=False,
            help="Operator token: AdminService, cache clear, every tenant's tasks.",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="HASHMESH_API_KEY",
            show_default=False,
            help="API key sent as x-api-key (the balancer's HASHMESH_BALANCER_API_KEYS_FILE).",
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            envvar="HASHMESH_TIMEOUT", min=0.001, help="Deadline of each call, in seconds."
        ),
    ] = 10.0,
    client_id: Annotated[
        str | None,
        typer.Option(
            envvar="HASHMESH_CLIENT_ID",
            show_default=False,
            help="Sent as x-client-id: believed only from a trusted proxy.",
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON on every command (for scripts).")
    ] = False,
    tls_ca: Annotated[
        str | None,
        typer.Option(
            "--tls-ca",
            show_default=False,
            help="Use TLS; PEM CA that signed the server (else HASHMESH_TLS_CA_FILE).",
        ),
    ] = None,
    tls_cert: Annotated[
        str | None,
        typer.Option(
            "--tls-cert",
            show_default=False,
            help="PEM client certificate for mutual TLS (else HASHMESH_TLS_CLIENT_CERT_FILE).",
        ),
    ] = None,
    tls_key: Annotated[
        str | None,
        typer.Option(
            "--tls-key",
            show_default=False,
            help="PEM key of --tls-cert (else HASHMESH_TLS_CLIENT_KEY_FILE).",
        ),
    ] = None,
    tls_server_name: Annotated[
        str | None,
        typer.Option(
            "--tls-server-name",
            show_default=False,
            help="Name to check in the server certificate (else HASHMESH_TLS_SERVER_NAME).",
        ),
    ] = None,
) -> None:
    """hashctl: hash now, queue hashing tasks, and run or operate a hashmesh."""
    for flag, value in (("--target", target), ("--admin-target", admin_target)):
        if not value.strip():
            raise CliError(f"{flag} is empty: give HOST:PORT", ExitCode.USAGE)
    # Sent as metadata: gRPC refuses other characters only once a call is made, as INTERNAL.
    for flag, text in (
        ("--client-id", client_id),
        ("--admin-token", admin_token),
        ("--api-key", api_key),
    ):
        if text is not None and not _METADATA_TEXT.fullmatch(text):
            raise CliError(
                f"{flag} must be printable ASCII (it is sent as gRPC metadata)", ExitCode.USAGE
            )
    tls = client_tls(tls_ca, tls_cert, tls_key, tls_server_name)
    ctx.obj = CliState(
        CliOptions(
            target=target,
            admin_target=admin_target,
            admin_token=admin_token,
            api_key=api_key,
            timeout=timeout,
            client_id=client_id,
            json=json_out,
            tls=tls,
        )
    )
    ctx.call_on_close(ctx.obj.session.close)


def client_tls(
    ca: str | None, cert: str | None, key: str | None, server_name: str | None
) -> ClientTls | None:
    """The TLS options: each flag, else its ``HASHMESH_TLS_*`` variable; ``None`` (plaintext)
    when neither names anything."""
    try:
        env = ClientTls.from_env() or ClientTls()
        tls = ClientTls(
            ca_file=ca or env.ca_file,
            cert_file=cert or env.cert_file,
            key_file=key or env.key_file,
            server_name=server_name or env.server_name,
        )
    except SettingsError as exc:
        raise CliError(
            f"TLS: {exc} (--tls-cert and --tls-key go together)", ExitCode.USAGE
        ) from None
    return None if tls == ClientTls() else tls


app.command("hash")(hash_cmds.hash_command)
app.command("verify")(hash_cmds.verify_command)
app.command("submit")(task_cmds.submit_command)
app.add_typer(task_cmds.app, name="task")
app.add_typer(admin_cmds.lb_app, name="lb")
app.add_typer(admin_cmds.ratelimit_app, name="ratelimit")
app.add_typer(admin_cmds.cache_app, name="cache")
app.command("health")(admin_cmds.health_command)
app.add_typer(admin_cmds.db_app, name="db")
app.add_typer(key_cmds.keys_app, name="keys")
app.command("up")(up.up_command)
app.command("bench", context_settings={"help_option_names": ["--help"]})(bench.bench_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
