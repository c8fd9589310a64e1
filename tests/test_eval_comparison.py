"""benchmarks/eval_comparison.py: which rows it plans, and one small end-to-end table on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_data
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "eval_comparison.py"


def _module():
    spec = importlib.util.spec_from_file_location("eval_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(**kw):
    base = dict(criteria="amp,random", ratios="0.2,0.3", allocations="uniform,global", recover=[], recover_criteria="amp",
                recover_ratios="", global_criteria="", heads="auto", heads_criteria="amp")
    return type("Args", (), base | kw)


def test_rows_cover_the_grid_and_tag_the_recovery_recipe():
    plan = _module().plan_rows
    rows = plan(_args())
    assert [r["name"] for r in rows][:3] == ["dense", "amp-0.2-uniform", "amp-0.2-global"]
    assert len(rows) == 1 + 2 * 2 * 2 and not any(r["recovery"] for r in rows)

    recipes = ["--recover distill --recover-steps 30", "--recover lora --recover-steps 9 --recover-data a/alpaca.json"]
    rows = plan(_args(recover=recipes[:1], recover_ratios="0.3", global_criteria="amp"))
    rec = [r for r in rows if r["recovery"]]
    assert [(r["criterion"], r["ratio"], r["allocation"]) for r in rec] == [("amp", 0.3, "uniform"), ("amp", 0.3, "global")]
    assert not [r for r in rows if r["criterion"] == "random" and r["allocation"] == "global"]
    both = [r for r in plan(_args(recover=recipes, recover_ratios="0.3")) if r["recovery"]]
    assert len(both) == 4 and len({r["name"] for r in both}) == 4  # a recipe of its own: checkpoints of its own
    assert {r["name"] for r in rec} < {r["name"] for r in both}
    module = _module()
    assert [module.recipe_label(r) for r in recipes] == ["distill 30 x calib", "lora 9 x alpaca"]
    assert module.recipe_label("--refit --recover distill --recover-steps 5 --recover-data a/c4.jsonl,b/alpaca.json") == \
        "refit + distill 5 x c4+alpaca"
    assert module.recipe_label("--refit") == "refit"


def test_head_rules_are_rows_of_their_own():
    rows = _module().plan_rows(_args(heads="auto,proportional", ratios="0.3", allocations="uniform,global",
                                     recover=["--recover distill"]))
    names = [r["name"] for r in rows]
    assert names[:3] == ["dense", "amp-0.3-uniform", f"{rows[2]['name']}"] and rows[2]["recovery"] and rows[2]["heads"] == "auto"
    assert "amp-0.3-uniform-proportional" in names and "random-0.3-uniform" in names
    assert "random-0.3-uniform-proportional" not in names  # other rules only for --heads-criteria
    assert "amp-0.3-global" in names and "amp-0.3-global-proportional" not in names  # and uniform allocation
    assert {r["heads"] for r in rows if r["name"].startswith("amp-0.3-uniform-proportional")} == {"proportional"}


@pytest.mark.slow  # a dozen amp-edge processes (~3 min on 2 cores)
def test_table_end_to_end_on_a_tiny_model(tmp_path):
    dense = save_tiny("llama", tmp_path / "dense")
    calib = tmp_path / "calib.txt"
    calib.write_text((require_data("wikitext2/test.txt") / "wikitext2" / "test.txt").read_text()[:20000])
    out, work = tmp_path / "table", tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT), "--model", str(dense), "--criteria", "amp,random", "--ratios", "0.3",
           "--recover", "--recover distill --recover-steps 2 --recover-batch-size 2 --recover-seq-len 32",
           "--calib", str(calib), "--limit", "2", "--max-tokens", "512", "--window", "128", "--bench-prompt", "8", "--bench-repeat", "1",
           "--threads", "1", "--work", str(work), "--out", str(out)]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((out / "eval_comparison.json").read_text())
    rows = {r["name"].split("-rec-")[0] + ("+rec" if r["recovery"] else ""): r for r in report["rows"]}
    assert set(rows) == {"dense", "amp-0.3-uniform", "amp-0.3-uniform+rec", "random-0.3-uniform"}
    assert rows["amp-0.3-uniform"]["params"] == rows["amp-0.3-uniform+rec"]["params"] < rows["dense"]["params"]
    for r in rows.values():
        assert r["decode_ms"] > 0 and r["eval"]["tasks"]["piqa"]["n"] == 2
        assert r["eval"]["tasks"]["wikitext2"]["perplexity"] > 1
    assert rows["amp-0.3-uniform+rec"]["prune_seconds"] > 0
    gap = rows["amp-0.3-uniform"]["delta_avg5"]  # paired: both evals record each document's outcome
    dense5, amp5 = (100 * rows[k]["eval"]["average"]["paper5_acc"] for k in ("dense", "amp-0.3-uniform"))
    assert gap["paired"] and gap["value"] == pytest.approx(amp5 - dense5) and "delta_avg5" not in rows["dense"]
    text = (out / "eval_comparison.md").read_text()
    assert text.count("\n| ") == 1 + 4 and "Recovery `distill 2 x calib`: `amp-edge prune ... --recover distill" in text

    # a second run with one more row reuses the finished ones and benches the new set
    before = (work / "amp-0.3-uniform-pkg" / "amp_edge.json").stat().st_mtime
    cmd[cmd.index("amp,random")] = "amp,random,magnitude"
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (work / "amp-0.3-uniform-pkg" / "amp_edge.json").stat().st_mtime == before
    report = json.loads((out / "eval_comparison.json").read_text())
    assert all(r["decode_ms"] for r in report["rows"]) and len(report["rows"]) == 5

    # --finished-only builds nothing: the table holds the evaluated rows and names the missing one
    cmd[cmd.index("amp,random,magnitude")] = "amp,random,magnitude,wanda-sp"
    run = subprocess.run([*cmd, "--finished-only"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert not (work / "wanda-sp-0.3-uniform-ckpt").exists()
    assert len(json.loads((out / "eval_comparison.json").read_text())["rows"]) == 5
    assert "not run yet (left out): wanda-sp-0.3-uniform." in (out / "eval_comparison.md").read_text()


def test_a_row_in_progress_makes_a_second_process_wait(tmp_path):
    """Two runs of the table on one --work folder: the second waits for the row the first is building."""
    import threading
    import time

    lock = _module().row_lock
    order = []
    with lock(tmp_path, "amp-0.2-uniform"):
        other = threading.Thread(target=lambda: (lock(tmp_path, "amp-0.2-uniform").__enter__(), order.append("second")))
        other.start()
        time.sleep(0.3)
        order.append("first done")
    other.join(5)
    assert order == ["first done", "second"]
    with lock(tmp_path, "amp-0.3-uniform"):  # another row is not held up
        pass
