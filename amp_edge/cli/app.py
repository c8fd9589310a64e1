"""The typer app every command module registers on, the error boundary, and the consoles."""

from __future__ import annotations

import functools
import logging
from typing import Optional

import typer
from rich.console import Console

from amp_edge.errors import AmpEdgeError
from amp_edge.memory import cap_heap_growth
from amp_edge.versions import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="AMP structured pruning of small LLMs, to validated ONNX packages.")
err = Console(stderr=True)
out = Console()


def flag(*names: str, help: str, panel: str | None = None, default: bool = False):
    """A boolean option shown as a flag in --help (no ``<bool>`` value column)."""
    return typer.Option(default, *names, help=help, metavar="", rich_help_panel=panel)


def friendly(fn):
    """User mistakes become one line on stderr and exit code 2; Ctrl-C exits 130. No tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AmpEdgeError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"amp-edge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = flag("--verbose", "-v", help="Log progress details."),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit."),
):
    cap_heap_growth()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def print_text(text: str) -> None:
    out.print(text, markup=False, highlight=False, soft_wrap=True)

