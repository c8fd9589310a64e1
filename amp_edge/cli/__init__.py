"""The ``amp-edge`` command line: one thin module per command (parse, call one library function, print)."""

from __future__ import annotations

import sys

from amp_edge.cli import bench, evaluate, export, fetch, ppl, prune, validate  # noqa: F401  (each registers its command)
from amp_edge.cli.app import app

__all__ = ["app", "run"]


def run() -> None:
    app()


if __name__ == "__main__":
    sys.exit(run())
