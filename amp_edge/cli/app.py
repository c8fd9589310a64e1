"""The typer app every command module registers on, the error boundary, and the consoles."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from amp_edge.errors import AmpEdgeError
from amp_edge.memory import cap_heap_growth
from amp_edge.versions import __version__

err = Console(stderr=True)
out = Console()


class OneLineErrors(TyperGroup):
    """Usage mistakes (an unknown choice, a missing option) get the same one ``error:`` line as the library's errors,
    not click's boxed panel."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
            if isinstance(code, int) and code:  # non-standalone click returns an Exit's code instead of raising it
                sys.exit(code)
            return code
        except typer.Exit as e:
            sys.exit(e.exit_code)
        except typer.TyperException as e:  # click's usage errors, as typer vendors them
            print_error(e.format_message().replace("Value error, ", ""))
            sys.exit(getattr(e, "exit_code", 2))
        except typer.Abort:
            err.print("interrupted; nothing was written")
            sys.exit(130)


def print_error(message: str) -> None:
    from rich.markup import escape  # messages carry user values such as "amp-edge[openvino]": not markup

    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, markup=True, soft_wrap=True)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="AMP structured pruning of small LLMs, to validated ONNX packages.")


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
            print_error(str(e))
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
    from amp_edge.notice import show_notices

    show_notices()
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # transformers 5 shows a "Loading weights" bar on every load


def print_text(text: str) -> None:
    out.print(text, markup=False, highlight=False, soft_wrap=True)

