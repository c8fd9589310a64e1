"""Calibration split over torchrun ranks (gloo) gives the plan of one process; bad launches are refused in one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amp_edge.pruning import distributed
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--ratio", "0.3", "--allocation", "global", "--calib-samples", "6", "--calib-seq-len", "24", "--batch-size", "4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _prune(args: list[str], nproc: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "amp_edge.cli", "prune", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(_free_port()), "-m", "amp_edge.cli", "prune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=300, cwd=ROOT)


@pytest.mark.parametrize("stream", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_two_gloo_ranks_give_the_one_process_plan(tmp_path, stream):
    """One torchrun launch of two processes (~20 s: each imports torch); the one-process plan is made in this one."""
    from amp_edge.data.calibration import CalibrationSpec
    from amp_edge.pruning.pipeline import PruneOptions, prune

    src = save_tiny("llama", tmp_path / "src")
    flags = [] if stream else ["--no-stream"]
    spec = CalibrationSpec(num_samples=6, seq_len=24, batch_size=4)
    prune(str(src), tmp_path / "one", PruneOptions(ratio=0.3, allocation="global", calibration=spec), stream=stream)
    two = _prune([str(src), "--out", str(tmp_path / "two"), *ARGS, *flags], nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    p1, p2 = (json.loads((tmp_path / n / "amp_edge_plan.json").read_text()) for n in ("one", "two"))
    assert p1["layers"] == p2["layers"] and p1["head_split"]["head_units"] == p2["head_split"]["head_units"]
    assert p2["calibration"]["world_size"] == 2 and "world_size" not in p1["calibration"]
    assert two.stdout.count("saved to") == 1  # rank 0 alone prints


def test_world_size_without_rank_is_refused(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    r = _prune([str(src), "--out", str(tmp_path / "out"), *ARGS], env=_env(WORLD_SIZE="2"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "RANK" in lines[0] and "torchrun" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_share_rows_and_reduce_in_one_process():
    batches = [torch.arange(12).reshape(3, 4), torch.arange(8).reshape(2, 4)]
    assert distributed.share_rows(batches) == batches
    assert distributed.reduce_loss(6.0, 3) == 2.0
    assert distributed.reduce_loss(0.0, 0) == float("inf")
    assert distributed.World(1, 2).share(list(range(5))) == [1, 3]
