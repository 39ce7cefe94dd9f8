"""What every command shares: the two consoles, the model argument, and how warnings reach the user."""

from __future__ import annotations

import logging

import typer
from rich.console import Console

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
