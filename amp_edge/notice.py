"""One-line notices on stderr: what a user should read before a long step starts (what --ratio removes), shown
without --verbose and without a log prefix. The CLI gives the logger its handler; library callers see plain logging."""

from __future__ import annotations

import logging
import sys

LOGGER = "amp_edge.notice"
log = logging.getLogger(LOGGER)


def notice(text: str) -> None:
    log.info(text)


class _Stderr(logging.StreamHandler):
    """Whatever sys.stderr is when a notice is written (a test runner or a redirect may swap it after set-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def show_notices() -> None:
    """Print notices as bare lines on stderr (idempotent)."""
    if any(isinstance(h, _Stderr) for h in log.handlers):
        return
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
