"""The ``amp-edge`` command line: one thin module per command (parse, call one library function, print)."""

from __future__ import annotations

import signal
import sys

from amp_edge.cli import bench, evaluate, export, fetch, ppl, prune, validate  # noqa: F401  (each registers its command)
from amp_edge.cli.app import app

__all__ = ["app", "run"]


def _terminate(_signum, _frame) -> None:
    raise KeyboardInterrupt  # a kill or a CI timeout cleans up like Ctrl-C: temporary outputs removed, exit 130


def run() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app()


if __name__ == "__main__":
    sys.exit(run())
