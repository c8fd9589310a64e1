"""Shared fixtures: the evaluation data folder, a saved tiny Llama, the CLI runner.

The data folder: ``AMP_EDGE_DATA_DIR`` when set, else ``../shared/data``. A folder the caller configured but that
is missing (or lacks a file a test reads) fails the test: a typo must not turn into a green run that tested nothing.
Only the unconfigured default may be absent, and then the tests that need it skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.tiny import save_tiny

DATA_ENV = "AMP_EDGE_DATA_DIR"
# Calibration for tests that prune on the way to something else: 4 self-written samples of 16 tokens (the default,
# 32 x 128, costs ~30 s per prune on a tiny model, most of it generation)
SMALL_CALIB = dict(num_samples=4, seq_len=16)
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)


def require_data(*files: str) -> Path:
    """The data folder, once every one of ``files`` is in it: skip if the default folder is absent, fail if a
    configured one is missing or incomplete."""
    root = data_dir()
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        if os.environ.get(DATA_ENV):
            pytest.fail(f"{DATA_ENV}={root} is set but lacks {', '.join(missing)}", pytrace=False)
        pytest.skip(f"no evaluation data in {root} (set {DATA_ENV})")
    return root


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama (GQA, 3 layers): the model of the CLI and recovery tests. Tests must not modify it."""
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A small calibration .jsonl (20 records)."""
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"Sample number {i}: the cat sat on the mat. " * 3}) for i in range(20)))
    return path


def run_cli(*args):
    """``run_cli("prune", path, "--ratio", 0.3)``: the amp-edge command in this process (arguments str()-ed)."""
    from amp_edge.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])
