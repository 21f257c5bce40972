"""The ``pase`` command line: typer commands that print rich tables, one module per command group.

Commands parse and validate their options and call library functions; user errors (``PaseError``)
print one clear line and exit with status 2, never a traceback. Command modules import the layers
below (all of which import torch) inside the commands, so ``pase --help`` and ``pase hw list`` answer
in a fraction of a second.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated

import typer
from rich.markup import escape

from pase._version import __version__
from pase.cli import graph, hw, plan, sample, train, verify, whatif
from pase.cli.console import console, err_console
from pase.errors import PaseError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="pase: plan and run parallel training of diffusion UNets.")


def _version(value: bool) -> None:
    if value:
        console.print(f"pase {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """pase: plan and run parallel training of diffusion UNets."""


graph.register(app)
plan.register(app)
app.add_typer(hw.hw_app, name="hw")
for module in (whatif, sample, verify, train):
    module.register(app)


def main() -> None:
    """Console-script entry point. typer reports usage errors itself (exit 2); user errors that
    pase detects (``PaseError``) become one red line and exit status 2 too; ``PASE_DEBUG=1`` prints the traceback
    (and the exception behind it, e.g. the one a user's factory raised) before that line."""
    try:
        app()
    except PaseError as exc:
        if os.environ.get("PASE_DEBUG"):
            traceback.print_exception(exc, file=sys.stderr)
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)


# Commands that only compute and print: once they have, nothing is left for the interpreter's teardown
# to do but free torch, the model and the layer graph, which takes 1-2 s of a 10 s `pase plan`.
_NOTHING_TO_TEAR_DOWN = {"plan", "whatif", "search", "graph", "models", "hw", "sample-plan"}


def run() -> None:
    """The process entry point (console script, ``python -m pase``): ``main``, then, for the commands that
    hold no files, processes or process groups open, exit without tearing the interpreter down."""
    code = 0
    try:
        main()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # sys.exit("message"): what the interpreter would print, with status 1
            err_console.print(str(exc.code))
            code = 1
    if len(sys.argv) > 1 and sys.argv[1] in _NOTHING_TO_TEAR_DOWN:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

