"""What every command receives through ``ctx.obj``: the options, the connections, the output."""

from __future__ import annotations

from dataclasses import dataclass, field

import typer

from hashmesh.cli.client import Session
from hashmesh.cli.options import CliOptions
from hashmesh.cli.output import Output


@dataclass
class CliState:
    options: CliOptions
    session: Session = field(init=False)

    def __post_init__(self) -> None:
        self.session = Session(self.options)

    def output(self, json_flag: bool = False) -> Output:
        """Output honouring both the global ``--json`` and a command's own ``--json``."""
        return Output(json_mode=self.options.json or json_flag)


def state_of(ctx: typer.Context) -> CliState:
    root = ctx.find_root()
    if not isinstance(root.obj, CliState):
        root.obj = CliState(CliOptions())
    return root.obj
