"""amp-edge eval: lm-eval tasks on local files, PyTorch vs the exported ONNX package, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from amp_edge.cli import app
from amp_edge import CalibrationSpec
from amp_edge.errors import DataError, InvalidOptionError, PackageError
from amp_edge.evaluation.run import EvalSpec, evaluate
from amp_edge.evaluation.tasks import KNOWN_TASKS, TASK_FILES, WIKITEXT_FILE, parse_tasks
from amp_edge.pruning.pipeline import PruneOptions, prune
from exporters import ExportOptions, export
from tests.conftest import SMALL_CALIB, require_data
from tests.tiny import save_tiny

DOCS = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The first few rows of every real validation file (their real field names), and a slice of WikiText-2."""
    shared = require_data(*TASK_FILES.values(), WIKITEXT_FILE)
    root = tmp_path_factory.mktemp("data")
    for rel in TASK_FILES.values():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(shared / rel) as f:
            (root / rel).write_text("".join(next(f) for _ in range(DOCS)))
    (root / WIKITEXT_FILE).parent.mkdir(parents=True, exist_ok=True)
    (root / WIKITEXT_FILE).write_text((shared / WIKITEXT_FILE).read_text()[:3000])
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A pruned tiny Llama checkpoint with per-layer shapes and its fp32 ONNX package (GroupQueryAttention layers:
    right-padded batches are the graph's contract)."""
    tmp = tmp_path_factory.mktemp("models")
    dense = save_tiny("llama-gqa", tmp / "dense")
    ckpt = tmp / "pruned"
    prune(str(dense), ckpt, PruneOptions(ratio=0.3, criterion="random", allocation="global", min_keep=0.25,
                                       calibration=CalibrationSpec(**SMALL_CALIB)))
    assert export(str(ckpt), tmp / "pkg", ExportOptions()).manifest["graph"]["gqa_layers"] == [0, 1, 2]
    return ckpt, tmp / "pkg"


def test_package_scores_equal_its_pytorch_source(models, data_dir):
    ckpt, pkg = models
    spec = dict(tasks=KNOWN_TASKS, limit=4, data_dir=data_dir, batch_size=3, window=128, stride=64)
    torch_report = evaluate(str(ckpt), EvalSpec(**spec))
    onnx_report = evaluate(str(pkg), EvalSpec(**spec))
    assert torch_report["kind"] == "pytorch" and onnx_report["kind"] == "onnx"
    assert onnx_report["params"] == torch_report["params"]
    for task in TASK_FILES:
        a, b = torch_report["tasks"][task], onnx_report["tasks"][task]
        assert a["n"] == b["n"] == 4 and a["split"] == "validation"
        assert a["acc"] == b["acc"], task
        assert a.get("acc_norm") == b.get("acc_norm"), task
        # each document's outcome, in order, for paired comparisons: the same documents, the same mean
        assert a["docs_sha256"] == b["docs_sha256"] and a["acc_per_doc"] == b["acc_per_doc"], task
        assert len(a["acc_per_doc"]) == 4 and a["acc_per_doc"].count("1") / 4 == pytest.approx(a["acc"]), task
    ppl_a, ppl_b = torch_report["tasks"]["wikitext2"], onnx_report["tasks"]["wikitext2"]
    assert ppl_a["window"] == 128 and ppl_a["stride"] == 64 and ppl_a["tokens"] == ppl_b["tokens"] > 1000
    assert abs(ppl_a["perplexity"] - ppl_b["perplexity"]) <= 1e-4 * ppl_a["perplexity"]
    assert onnx_report["average"]["paper5_acc"] is not None and len(onnx_report["average"]["tasks"]) == 7


def test_onnx_requests_match_lm_evals_hf_model(models):
    """Request by request: log-likelihoods, rolling log-likelihoods and greedy generations."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from amp_edge import load_model
    from amp_edge.evaluation.onnx_lm import OnnxLM

    ckpt, pkg = models
    loaded = load_model(str(ckpt))
    hf = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=2, device="cpu")
    ox = OnnxLM(pkg, batch_size=3)
    pairs = [("The cat sat on", " the mat"), ("", "no context at all"), ("A longer context that goes on " * 12, " end"),
             ("Question: why?\nAnswer:", " because"), ("Yes or no?", "y"), ("Yes or no?", "n")]  # the last two share a row
    ll = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    for (a, ga), (b, gb) in zip(hf.loglikelihood(ll, disable_tqdm=True), ox.loglikelihood(ll, disable_tqdm=True)):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)) and ga == gb
    text = "Some words to score with rolling windows. " * 10  # longer than the tiny model's 256 positions
    roll = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    assert hf.loglikelihood_rolling(roll, disable_tqdm=True)[0] == pytest.approx(ox.loglikelihood_rolling(roll, disable_tqdm=True)[0], rel=1e-4)
    gen = [Instance("generate_until", {}, ("Once upon", {"until": ["zz"], "max_gen_toks": 12, "do_sample": False}), 0)]
    assert hf.generate_until(gen, disable_tqdm=True) == ox.generate_until(gen, disable_tqdm=True)


def test_bad_input(models, data_dir, tmp_path):
    ckpt, pkg = models
    with pytest.raises(InvalidOptionError, match="known tasks: wikitext2, piqa"):
        parse_tasks("piqa,mmlu")
    with pytest.raises(InvalidOptionError, match="limit"):
        EvalSpec(limit=0).check()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="hellaswag/validation.jsonl"):
        EvalSpec(tasks=["hellaswag"], data_dir=empty).check()
    no_tok = tmp_path / "no_tok"
    shutil.copytree(pkg, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json", "chat_template*"))
    with pytest.raises(PackageError, match="no tokenizer"):
        evaluate(str(no_tok), EvalSpec(tasks=["piqa"], limit=1, data_dir=data_dir))

    runner = CliRunner()
    for args, expected in [(["--tasks", "piqa,mmlu"], "unknown task"), (["--limit", "0"], "--limit"),
                           (["--tasks", "boolq", "--data-dir", str(empty)], "boolq/validation.jsonl")]:
        r = runner.invoke(app, ["eval", str(pkg), *args])
        assert r.exit_code == 2 and expected in r.output and "Traceback" not in r.output, r.output
    r = runner.invoke(app, ["eval", str(no_tok), "--tasks", "piqa", "--data-dir", str(data_dir)])
    assert r.exit_code == 2 and "no tokenizer" in r.output
    for source in (ckpt, pkg):  # the tiny models have 256 positions: a longer WikiText-2 window is refused
        r = runner.invoke(app, ["eval", str(source), "--tasks", "wikitext2", "--window", "512", "--data-dir", str(data_dir)])
        assert r.exit_code == 2 and "window 512 is longer than the model's context (256 positions)" in r.output, r.output


def test_cli_writes_json_and_markdown(models, data_dir, tmp_path):
    _, pkg = models
    out = tmp_path / "ev"
    runner = CliRunner()
    args = ["eval", str(pkg), "--tasks", "wikitext2,arc_easy,boolq", "--limit", "3", "--data-dir", str(data_dir),
            "--window", "128", "--out", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "eval.json").read_text())
    assert set(report["tasks"]) == {"wikitext2", "arc_easy", "boolq"} and report["tasks"]["boolq"]["n"] == 3
    assert 0 <= report["tasks"]["arc_easy"]["acc"] <= 1 and report["tasks"]["wikitext2"]["perplexity"] > 1
    md = (out / "eval.md").read_text()
    assert "| arc_easy | acc_norm |" in md and "perplexity" in md
    r = runner.invoke(app, args)  # the folder exists now
    assert r.exit_code == 2 and "already exists" in r.output
