"""amp-edge eval-compare: differences from a reference row with paired (per-document) or unpaired standard errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from amp_edge.cli import app
from amp_edge.errors import DataError, InvalidOptionError
from amp_edge.evaluation.compare import compare, load_report, markdown

TASKS = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq"]


def report(outcomes: dict[str, str], per_doc: bool = True, limit: int | None = 4, ppl: float = 20.0) -> dict:
    """An eval.json as `amp-edge eval` writes it, from each task's per-document outcomes."""
    tasks = {"wikitext2": {"perplexity": ppl, "tokens": 1000, "window": 128, "stride": 128}}
    for task, docs in outcomes.items():
        n, acc = len(docs), docs.count("1") / len(docs)
        row = {"n": n, "acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc) / (n - 1))}
        if per_doc:
            row |= {"acc_per_doc": docs, "docs_sha256": "same-docs"}
        tasks[task] = row
    spec = {"limit": limit, "window": 128, "stride": None, "max_tokens": None}
    return {"source": "x", "kind": "onnx", "params": 1000, "spec": spec, "tasks": tasks}


DENSE = {t: "1100" for t in TASKS}
PRUNED = {t: "1010" for t in TASKS} | {"boolq": "1111"}


def test_paired_difference_and_its_error():
    result = compare([("dense", report(DENSE)), ("pruned", report(PRUNED))])
    assert result["tasks"] == TASKS and list(result["averages"]) == ["avg5", "avg6"]
    dense, pruned = result["rows"]
    assert dense["reference"] and "delta_tasks" not in dense
    assert dense["averages"]["avg5"] == pytest.approx(50.0) and pruned["averages"]["avg6"] == pytest.approx(50 * 5 / 6 + 100 / 6)
    piqa = pruned["delta_tasks"]["piqa"]
    # per-document differences (0, -1, +1, 0): mean 0, sample variance 2/3, error sqrt(2/3 / 4)
    assert piqa["paired"] and piqa["value"] == pytest.approx(0.0) and piqa["stderr"] == pytest.approx(100 * math.sqrt(2 / 3 / 4))
    boolq = pruned["delta_tasks"]["boolq"]  # (0, 0, +1, +1): mean 0.5, sample variance 1/3
    assert boolq["value"] == pytest.approx(50.0) and boolq["stderr"] == pytest.approx(100 * math.sqrt(1 / 3 / 4))
    avg5 = pruned["delta_averages"]["avg5"]  # five independent tasks, each with piqa's error
    assert avg5["value"] == pytest.approx(0.0) and avg5["stderr"] == pytest.approx(piqa["stderr"] / math.sqrt(5))
    avg6 = pruned["delta_averages"]["avg6"]
    assert avg6["value"] == pytest.approx(50 / 6)
    assert avg6["stderr"] == pytest.approx(math.sqrt(5 * piqa["stderr"] ** 2 + boolq["stderr"] ** 2) / 6)
    md = markdown(result)
    assert "| pruned | 1,000 | 20.00 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 100.0 | 50.00 | 58.33 | +0.00 ± 18.26 | +8.33 ± 15.96 |" in md
    assert "| pruned | +0.00 ± 40.82 |" in md and md.rstrip().splitlines()[-3].endswith("| paired |")


def test_identical_outcomes_have_zero_paired_error_but_not_unpaired():
    same = compare([("a", report(DENSE)), ("b", report(DENSE))])["rows"][1]["delta_averages"]["avg5"]
    assert same == {"value": 0.0, "stderr": 0.0, "paired": True}
    old = compare([("a", report(DENSE, per_doc=False)), ("b", report(DENSE))])["rows"][1]["delta_tasks"]["piqa"]
    # no per-document outcomes in one report: sqrt(se_a^2 + se_b^2), se = sqrt(0.25 / 3)
    assert not old["paired"] and old["stderr"] == pytest.approx(100 * math.sqrt(2 * 0.25 / 3))


def test_reference_row_can_be_any_report():
    result = compare([("pruned", report(PRUNED)), ("dense", report(DENSE))], ref=1)
    assert result["reference"] == "dense" and result["rows"][0]["delta_tasks"]["boolq"]["value"] == pytest.approx(50.0)


def test_bad_input(tmp_path):
    with pytest.raises(InvalidOptionError, match="different --limit: 4 in a, 1000 in b"):
        compare([("a", report(DENSE)), ("b", report(DENSE, limit=1000))])
    with pytest.raises(InvalidOptionError, match="different tasks"):
        compare([("a", report(DENSE)), ("b", report({t: "1100" for t in TASKS[:-1]}))])
    with pytest.raises(InvalidOptionError, match="piqa scored on 4 documents in a and 5 in b"):
        compare([("a", report(DENSE)), ("b", report(DENSE | {"piqa": "11001"}))])
    with pytest.raises(InvalidOptionError, match="--ref must index one of the 2 reports \\(0-1\\), got 2"):
        compare([("a", report(DENSE)), ("b", report(DENSE))], ref=2)
    with pytest.raises(DataError, match="no eval report"):
        load_report(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="is not an eval report"):
        load_report(tmp_path / "bad.json")


def _write(folder: Path, rep: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps(rep))
    return folder


def test_cli(tmp_path):
    a, b = _write(tmp_path / "dense-eval", report(DENSE)), _write(tmp_path / "pruned-eval", report(PRUNED))
    runner = CliRunner()
    out = tmp_path / "cmp"
    r = runner.invoke(app, ["eval-compare", str(a), str(b / "eval.json"), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.output)
    assert [row["name"] for row in printed["rows"]] == ["dense-eval", "pruned-eval"]
    assert json.loads((out / "compare.json").read_text()) == printed and "± 18.26" in (out / "compare.md").read_text()
    assert printed["command"].startswith("amp-edge") and "Command: `amp-edge" in (out / "compare.md").read_text()
    before = (out / "compare.md").read_text()
    for args, expected in [([str(a), str(b), "--out", str(out)], "already exists"),
                           ([str(a), str(b), "--names", "x"], "--names gives 1 names for 2 reports"),
                           ([str(a), str(tmp_path / "nope")], "no eval report"),
                           ([str(a)], "at least two reports")]:
        r = runner.invoke(app, ["eval-compare", *args])
        assert r.exit_code == 2 and expected in r.output and "Traceback" not in r.output, r.output
    assert (out / "compare.md").read_text() == before


def test_rows_of_an_eval_comparison_table(tmp_path):
    # benchmarks/eval_comparison.py embeds each row's report; TABLE.json#ROW compares them without the work folder.
    table = tmp_path / "eval_comparison.json"
    table.write_text(json.dumps({"rows": [{"name": "dense", "eval": report(DENSE)},
                                          {"name": "amp-0.2", "eval": report(PRUNED)}]}))
    assert load_report(f"{table}#amp-0.2")["tasks"]["boolq"]["acc"] == 1.0
    with pytest.raises(DataError, match="no row 'amp-0.3' in .*; its rows: dense, amp-0.2"):
        load_report(f"{table}#amp-0.3")
    with pytest.raises(DataError, match="not an eval_comparison.json"):
        load_report(_write(tmp_path / "one-eval", report(DENSE)) / "eval.json#dense")
    r = CliRunner().invoke(app, ["eval-compare", f"{table}#dense", f"{table}#amp-0.2", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["rows"]
    assert [row["name"] for row in rows] == ["dense", "amp-0.2"]
    assert rows[1]["delta_tasks"]["boolq"] == {"value": pytest.approx(50.0), "stderr": pytest.approx(28.87, abs=0.01),
                                                "paired": True}
