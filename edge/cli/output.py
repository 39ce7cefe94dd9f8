"""What every command shares: the two consoles, the model argument, and how warnings reach the user."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from edge.units import format_bytes

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

ModelArg = typer.Argument(None, help="Checkpoint folder, .gguf file or bundle; omit for the embedded default model.")
ModelOpt = typer.Option(None, "--model", "-m", help="Checkpoint folder, .gguf file or bundle (default: embedded model).")


class _OneLine(logging.Handler):
    """edge's warnings (a slower path taken, a fallback) as one 'warning: ...' line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"{record.levelname.lower()}: {record.getMessage()}", markup=False, soft_wrap=True)


def configure_logging(debug: bool) -> None:
    """Warnings (and with --debug everything, llama.cpp's own log lines included) go to stderr."""
    root = logging.getLogger("edge")
    if not any(isinstance(h, _OneLine) for h in root.handlers):
        root.addHandler(_OneLine())
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    root.propagate = False


def say_notes(notes) -> None:
    """What a deployed bundle's plan set and what the caller overrode: one line each, on stderr."""
    for line in notes:
        err.print(line, markup=False, soft_wrap=True)


class _Amount(ProgressColumn):
    """done/total in bytes (binary units) or as a count, as the task's ``unit`` says."""

    def render(self, task) -> Text:
        if task.total is None:
            return Text("")
        if task.fields.get("unit") == "B":
            return Text(f"{format_bytes(task.completed)} / {format_bytes(task.total)}")
        return Text(f"{int(task.completed):,} / {int(task.total):,} {task.fields.get('unit', '')}".rstrip())


@contextmanager
def reporting(title: str):
    """A Progress callable for long jobs (edge.formats.bundle.Progress): messages become a status
    line, phases with a total become a bar with the amount done and the time left."""
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _Amount(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=True,
                   disable=not err.is_terminal)  # off a terminal it would only leave a blank line
    tasks: dict[str, int] = {}
    status = bar.add_task(title, total=None)

    def report(msg: str, done: int | None = None, total: int | None = None) -> None:
        if done is None or total is None:
            bar.update(status, description=msg)
            return
        phase = msg.split(" (")[0]
        unit = "tokens" if "tokens" in phase else "B"
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total, unit=unit)
        bar.update(tasks[phase], completed=done, total=total, description=msg)

    with bar:
        yield report
