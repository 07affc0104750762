"""Terminal output: one rich console, progress bars and result tables for every command."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)  # progress and logs go to stderr; tables a user may pipe go to stdout
stdout = Console()


def is_main_process() -> bool:
    """Only rank 0 of a torchrun job draws progress bars and tables."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def progress_bar(*extra_fields: str) -> Iterator[Progress]:
    """A rich Progress with count, rate fields and ETA; `extra_fields` name task fields shown as text."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{{task.fields[{name}]}}") for name in extra_fields]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not is_main_process(), transient=False) as progress:
        yield progress


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    if not is_main_process():
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(str(column))
    for row in rows:
        table.add_row(*(format_value(v) for v in row))
    stdout.print(table)


def print_mapping(title: str, values: Mapping[str, Any]) -> None:
    print_table(title, ("", "value"), [(k, v) for k, v in values.items()])


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)
