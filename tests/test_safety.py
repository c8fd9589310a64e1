"""Nothing that existed is lost: corrupt weights are refused in one line, outputs appear whole or not at all (an
interrupted swap is undone on the next run, Ctrl-C writes nothing), and model code from a folder never runs unasked."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import amp_edge.io as io
from amp_edge.errors import ModelLoadError, OutputExistsError
from amp_edge.models.sources import load_model
from amp_edge.pruning.plan import PruningPlan
from tests.conftest import require_data, run_cli
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]


def _corrupt(tmp_path: Path, how: str) -> Path:
    folder = save_tiny("llama", tmp_path / how)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"garbage " * 64 if how == "garbage" else data[: len(data) // 2])
    return folder


@pytest.mark.parametrize("how, why", [("garbage", "header too large"), ("truncated", "not fully covered")])
@pytest.mark.parametrize("command", ["prune", "export", "eval", "ppl"])
def test_corrupt_weights_are_one_line_in_every_command(tmp_path, how, why, command):
    folder = _corrupt(tmp_path, how)
    text = tmp_path / "text.txt"
    text.write_text("some text to score " * 20)
    args = {"prune": ["--out", tmp_path / "out"], "export": ["--ratio", 0, "--out", tmp_path / "out"],
            "eval": ["--tasks", "wikitext2", "--data-dir", tmp_path, "--out", tmp_path / "out"],
            "ppl": ["--data", text]}[command]
    if command == "eval":
        (tmp_path / "wikitext2").mkdir()
        (tmp_path / "wikitext2" / "test.txt").write_text(text.read_text())
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run_cli(command, folder, *args)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: ") and "model.safetensors is not a readable safetensors file" in lines[0] and why in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_overwrite_is_one_swap_and_leaves_nothing_beside(tmp_path):
    out = tmp_path / "out"
    with io.atomic_dir(out) as tmp:
        (tmp / "v").write_text("1")
    with io.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_crash_between_the_two_renames_is_undone_on_the_next_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with io.atomic_dir(out) as tmp:
        (tmp / "v").write_text("good")
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # a kernel or filesystem without renameat2's exchange
    real, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after moving the old output aside, before the new one is in place
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "v").write_text("new")
    monkeypatch.setattr(io.os, "replace", real)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [f".out.old-{os.getpid()}"]
    with pytest.raises(OutputExistsError):  # the next run puts the previous output back, then refuses to replace it
        io.check_output(out, overwrite=False)
    assert (out / "v").read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["out"]
    stale = tmp_path / ".out.old-1"
    stale.mkdir()
    assert io.recover_interrupted(out) == [stale] and not stale.exists() and (out / "v").read_text() == "good"


def test_ctrl_c_while_saving_writes_nothing_and_keeps_the_old_output(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")

    def interrupted(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(PruningPlan, "save", interrupted)  # the weights are written by then, the plan is not
    res = run_cli("prune", tiny_dir, "--calib-samples", 2, "--calib-seq-len", 16, "--heads", "0", "--out", out, "--overwrite")
    assert res.exit_code == 130 and res.output.strip().splitlines()[-1] == "interrupted; nothing was written", res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_during_calibration_through_the_real_cli(sig, tiny_dir, tmp_path):
    """Ctrl-C, and a kill (a CI timeout, a scheduler): the same clean exit, nothing left behind."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "amp_edge.cli", "prune", str(tiny_dir), "--calib-samples", "100000", "--calib-seq-len", "64",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=ROOT)
    seen, deadline = b"", time.monotonic() + 120
    try:
        while b"%" not in seen and time.monotonic() < deadline:  # a progress bar: imports are over, work has begun
            if select.select([proc.stderr], [], [], 1)[0]:
                seen += os.read(proc.stderr.fileno(), 4096)
        assert b"%" in seen, seen
        proc.send_signal(sig)
        rest = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130 and b"interrupted; nothing was written" in rest and b"Traceback" not in rest
    assert list(tmp_path.iterdir()) == []


def _with_remote_code(tmp_path: Path) -> tuple[Path, Path]:
    folder = save_tiny("llama", tmp_path / "remote")
    marker = tmp_path / "code-ran"
    (folder / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n\nclass EvilConfig(LlamaConfig):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_model_code_in_a_folder_runs_only_when_asked(tmp_path):
    folder, marker = _with_remote_code(tmp_path)
    assert load_model(str(folder)).model.config.model_type == "llama" and not marker.exists()
    assert run_cli("ppl", folder, "--data", folder / "config.json", "--window", 64).exit_code == 0 and not marker.exists()
    with pytest.raises(ModelLoadError, match="EvilConfig"):  # asked: the folder's code runs (so the checks above can fail)
        load_model(str(folder), trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_a_configured_data_folder_that_is_missing_fails(monkeypatch):
    monkeypatch.setenv("AMP_EDGE_DATA_DIR", "/nonexistent/amp-edge-data")
    with pytest.raises(pytest.fail.Exception, match="AMP_EDGE_DATA_DIR=/nonexistent/amp-edge-data is set but lacks"):
        require_data("wikitext2/test.txt")
    monkeypatch.delenv("AMP_EDGE_DATA_DIR")
    monkeypatch.setattr("tests.conftest.DEFAULT_DATA", Path("/nonexistent/default"))
    with pytest.raises(pytest.skip.Exception):
        require_data("wikitext2/test.txt")


def test_missing_weights_file_is_refused(tmp_path):
    folder = save_tiny("llama", tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="holds no .safetensors weights"):
        load_model(str(folder))
