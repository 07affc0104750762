"""Terminal output: one rich console, progress bars and result tables for every command."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
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
def progress_bar(*extra_fields: str) -> Iterator[Progress | LogProgress]:
    """On a terminal, a rich Progress with count, rate fields and ETA (`extra_fields` name task fields shown as
    text). Under a redirect, `tee`, `nohup`, SLURM or make, where a live bar only shows at the end, plain lines
    instead: one per task every DISTILLERY_PROGRESS_SECONDS (default 30) and when it finishes."""
    if not console.is_terminal:
        yield LogProgress(extra_fields, float(os.environ.get("DISTILLERY_PROGRESS_SECONDS", "30")),
                          enabled=is_main_process())
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{{task.fields[{name}]}}") for name in extra_fields]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not is_main_process(), transient=False) as progress:
        yield progress


@dataclass
class _LogTask:
    description: str
    total: float | None
    visible: bool
    fields: dict[str, Any]
    completed: float = 0
    start: float = field(default_factory=time.monotonic)
    printed: float = field(default_factory=time.monotonic)
    finished: bool = False


class LogProgress:
    """The part of rich's Progress the commands use (add_task, advance, update), as timestamped log lines:
    `description: step/total (pct) rate/s ETA .. elapsed .. fields`."""

    def __init__(self, extra_fields: Sequence[str], interval: float, enabled: bool = True):
        self.extra_fields, self.interval, self.enabled = tuple(extra_fields), interval, enabled
        self.tasks: list[_LogTask] = []

    def add_task(self, description: str, total: float | None = None, visible: bool = True, **fields: Any) -> int:
        self.tasks.append(_LogTask(description, total, visible, {name: fields.get(name, "") for name in self.extra_fields}))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, completed: float | None = None, advance: float | None = None,
               visible: bool | None = None, **fields: Any) -> None:
        task = self.tasks[task_id]
        task.completed = completed if completed is not None else task.completed + (advance or 0)
        task.visible = task.visible if visible is None else visible
        task.fields.update({k: v for k, v in fields.items() if k in task.fields})
        now = time.monotonic()
        done = task.total is not None and task.completed >= task.total
        if self.enabled and task.visible and not task.finished and (done or now - task.printed >= self.interval):
            task.printed, task.finished = now, done
            console.print(_log_line(task, now), highlight=False, markup=False, soft_wrap=True)


def _log_line(task: _LogTask, now: float) -> str:
    elapsed = now - task.start
    rate = task.completed / elapsed if elapsed > 0 else 0.0
    parts = [f"{task.description}: {task.completed:,.0f}" + (f"/{task.total:,.0f} ({100 * task.completed / task.total:.0f}%)"
                                                           if task.total else "")]
    parts.append(f"{rate:,.1f}/s")
    if task.total and rate > 0 and task.completed < task.total:
        parts.append(f"ETA {_clock((task.total - task.completed) / rate)}")
    parts.append(f"elapsed {_clock(elapsed)}")
    parts += [str(v) for v in task.fields.values() if v]
    return f"[{datetime.now().strftime('%H:%M:%S')}] " + " · ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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
