"""How hashctl prints: JSON for scripts (``--json``), rich tables and colours on a terminal,
plain tab-separated lines otherwise. Errors go to stderr as one line."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table


def message_to_dict(message: Message) -> dict[str, Any]:
    """A proto message as JSON-ready data: field names as in the .proto, enums by name,
    durations and timestamps in their JSON forms, defaults included."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


class Output:
    """Where one invocation prints. ``json_mode`` wins over terminal detection."""

    def __init__(self, json_mode: bool = False, stream: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.stream = stream or sys.stdout
        self.rich = not json_mode and self.stream.isatty()
        self.console = Console(file=self.stream, highlight=False)
        self.err_console = Console(file=sys.stderr, highlight=False)

    @property
    def interactive(self) -> bool:
        """True when live feedback (spinners, progress bars) may be drawn."""
        return not self.json_mode and sys.stderr.isatty()

    def json(self, data: Any) -> None:
        self.stream.write(json.dumps(data, indent=None, sort_keys=False, default=str) + "\n")
        self.stream.flush()

    def line(self, text: str, style: str | None = None) -> None:
        if self.rich:
            self.console.print(text, style=style, markup=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        """A remark for humans, on stderr so stdout stays parseable."""
        self.err_console.print(text, style="dim", markup=False, soft_wrap=True)

    def table(
        self, columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None
    ) -> None:
        if self.rich:
            table = Table(title=title, header_style="bold")
            for column in columns:
                table.add_column(column)
            for row in rows:
                table.add_row(*(_cell(value) for value in row))
            self.console.print(table)
            return
        self.stream.write("\t".join(columns) + "\n")
        for row in rows:
            self.stream.write("\t".join(_cell(value) for value in row) + "\n")
        self.stream.flush()

    def fields(self, values: Mapping[str, Any], title: str | None = None) -> None:
        """A record as ``key: value`` lines (a two-column table on a terminal)."""
        if self.rich:
            table = Table(title=title, show_header=False, box=None)
            table.add_column(style="bold")
            table.add_column()
            for key, value in values.items():
                table.add_row(key, _cell(value))
            self.console.print(table)
            return
        for key, value in values.items():
            self.stream.write(f"{key}: {_cell(value)}\n")
        self.stream.flush()


def print_error(message: str) -> None:
    """One line on stderr, red on a terminal."""
    if sys.stderr.isatty():
        Console(file=sys.stderr, highlight=False).print(
            f"error: {message}", style="bold red", markup=False
        )
    else:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)
