"""The ``edge`` command line: a typer app, one module per group of commands, output helpers in
output.py. Every user error is one line on stderr and exit code 2 (``--debug`` shows the traceback).
Imports: the SDK, the layers below it, and cli.output; the command modules never import each other.
"""

from __future__ import annotations

import sys

import typer

from edge.cli import build, device, moe, peers, run, serve
from edge.cli.output import configure_logging, err
from edge.errors import EdgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Deploy and run Mixture-of-Experts language models on edge devices.")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and llama.cpp's log.")) -> None:
    configure_logging(debug)


for command in (build.inspect, build.build, run.run, run.chat, moe.trace, moe.locality, device.profile,
                device.plan, device.deploy, device.bench, serve.serve, serve.ps, serve.monitor):
    app.command()(command)
app.add_typer(peers.peer_app, name="peer")
app.add_typer(peers.peers_app, name="peers")


def main() -> None:
    """Entry point: run the app, turning EdgeError and OSError into one-line errors (exit 2)."""
    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=False)
    except (EdgeError, OSError) as e:
        if debug:
            raise
        msg = str(e) if isinstance(e, EdgeError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
        err.print(f"error: {msg}", markup=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # click's usage errors arrive here in non-standalone mode
        _click_error(e)


def _click_error(e: Exception) -> None:
    """Exit as click would for its own exceptions (from click, or the copy typer >= 0.26 vendors as
    typer._click); re-raise anything else."""
    import click

    kinds = [click.exceptions]
    try:
        from typer._click import exceptions as vendored

        kinds.append(vendored)
    except ImportError:
        pass
    for k in kinds:  # the vendored copy has no Exit or Abort of its own
        if isinstance(e, getattr(k, "Exit", ())):
            sys.exit(e.exit_code)
        if isinstance(e, k.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, getattr(k, "Abort", ())):
            sys.exit(130)
    raise e
