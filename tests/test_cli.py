"""The amp-edge CLI: the happy paths, and one readable line with a non-zero exit for every bad input."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from amp_edge import load_pruned

from tests.conftest import run_cli as run
from tests.tiny import sample_ids



def test_prune_json_and_plain_reload(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "pruned"
    res = run("prune", tiny_dir, "--ratio", 0.3, "--calib", calib_file, "--calib-samples", 8, "--calib-seq-len", 32, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["criterion"] == "amp" and info["uniform"] and not info["per_layer_config"]
    assert abs(info["params_removed_fraction"] - 0.3) < 0.01
    assert len(info["layers"]) == 3 and info["layers"][0]["heads"][0] == 8
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == info["params_after"]
    plan = json.loads((out / "amp_edge_plan.json").read_text())
    assert plan["criterion"] == "amp" and plan["calibration"]["source"] == str(calib_file)
    assert plan["versions"]["torch"] and plan["source"]["kind"] == "folder"


def test_prune_table_global_and_plan_replay(tiny_dir, tmp_path):
    out = tmp_path / "global"
    res = run("prune", tiny_dir, "--ratio", 0.25, "--allocation", "global", "--calib-samples", 4, "--calib-seq-len", 16, "--out", out)
    assert res.exit_code == 0, res.output
    assert "parameters" in res.output and "load_pruned" in res.output and "8 → " in res.output
    replay = tmp_path / "replay"
    res = run("prune", tiny_dir, "--plan", out / "amp_edge_plan.json", "--out", replay, "--json")
    assert res.exit_code == 0, res.output
    a, b = load_pruned(out), load_pruned(replay)
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_ppl_command(tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world, this is a small text. " * 20)
    res = run("ppl", tiny_dir, "--data", text, "--window", 64, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["tokens"] > 600 and 1 < info["perplexity"] < 1000


def _bad_inputs(tiny_dir, calib_file, tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    wrong_plan = tmp_path / "plan.json"
    wrong_plan.write_text(json.dumps({"format": 1, "model_type": "qwen2", "layers": [], "original_shapes": []}))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    small = ["--calib", calib_file, "--calib-samples", 2, "--calib-seq-len", 16]
    return {
        "missing model path": ([tmp_path / "no-such-model"] + small, "not found"),
        "missing gguf": ([tmp_path / "x.gguf"] + small, "GGUF file not found"),
        "unsupported architecture": ([gpt2] + small, "model_type='gpt2'.*supported: .*llama"),
        "ratio above 1": ([tiny_dir, "--ratio", 1.5] + small, r"ratio must be in \(0, 1\)"),
        "ratio zero": ([tiny_dir, "--ratio", 0] + small, r"ratio must be in \(0, 1\)"),
        "ratio that empties a layer": ([tiny_dir, "--ratio", 0.95] + small, "would remove|prunable"),
        "empty calibration file": ([tiny_dir, "--calib", empty], "holds no text"),
        "missing calibration file": ([tiny_dir, "--calib", tmp_path / "nope.jsonl"], "not found"),
        "plan for another model": ([tiny_dir, "--plan", wrong_plan], "model_type 'qwen2'"),
        "unknown criterion": ([tiny_dir, "--criterion", "taylor"] + small, "--criterion.*'taylor' is not one of 'amp'"),
        "bad gqa": ([tiny_dir, "--gqa", "kv"] + small, "--gqa.*'kv' is not one of 'query', 'group'"),
    }, existing


@pytest.mark.parametrize("case", [
    "missing model path", "missing gguf", "unsupported architecture", "ratio above 1", "ratio zero",
    "ratio that empties a layer", "empty calibration file", "missing calibration file", "plan for another model",
    "unknown criterion", "bad gqa", "existing output",
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_dir, calib_file, tmp_path, case):
    cases, existing = _bad_inputs(tiny_dir, calib_file, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    if case == "existing output":
        args, match, out = [tiny_dir, "--calib-samples", 2, "--calib-seq-len", 16], "--overwrite", existing
    else:
        (args, match), out = cases[case], tmp_path / "out"
    res = run("prune", *args, "--out", out)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "Traceback" not in res.output
    import re
    assert re.search(match, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing left behind
    assert (existing / "keep.txt").read_text() == "precious"


def test_cli_choices_are_the_library_s():
    """The enums --help lists are the values the library accepts, so neither can drift from the other."""
    from amp_edge.cli import choices
    from amp_edge.models.dtypes import DTYPES as WEIGHT_DTYPES
    from amp_edge.pruning.allocation import ALLOCATIONS, GQA_MODES, NORMALIZATIONS, RATIO_OF
    from amp_edge.pruning.scoring import criteria
    from amp_edge.recovery.train import ADAPTERS, METHODS, PRECISIONS, SCHEDULES
    from exporters.attention import ATTENTION_MODES
    from exporters.graph import OPTIMIZE_LEVELS
    from exporters.quantize import DTYPES, EMBEDDINGS, INT8_SCHEMES
    from exporters.quantize import METHODS as QUANT_METHODS
    from runtime_bench.bench import PROVIDERS

    pairs = [(choices.Criterion, criteria()), (choices.Allocation, ALLOCATIONS), (choices.Gqa, GQA_MODES),
             (choices.Normalization, NORMALIZATIONS), (choices.RatioOf, RATIO_OF), (choices.WeightDtype, [*WEIGHT_DTYPES, "auto"]),
             (choices.RecoverMethod, METHODS), (choices.RecoverAdapter, ADAPTERS), (choices.Schedule, SCHEDULES), (choices.Precision, PRECISIONS),
             (choices.ExportDtype, DTYPES), (choices.Optimize, OPTIMIZE_LEVELS), (choices.Attention, ATTENTION_MODES),
             (choices.Int8Scheme, INT8_SCHEMES), (choices.Embedding, EMBEDDINGS), (choices.Provider, PROVIDERS),
             (choices.QuantMethod, QUANT_METHODS)]
    for enum, allowed in pairs:
        assert sorted(c.value for c in enum) == sorted(allowed), enum.__name__


def test_version_and_help_panels():
    from amp_edge import __version__

    res = run("--version")
    assert res.exit_code == 0 and res.output.strip() == f"amp-edge {__version__}"
    from typer.testing import CliRunner

    from amp_edge.cli import app

    text = CliRunner().invoke(app, ["prune", "--help"], env={"COLUMNS": "200"}).output
    for panel in ("Model and output", "Pruning", "Calibration", "Refit (after pruning)", "Recovery (after pruning)"):
        assert panel in text, panel
    assert "<amp|wanda-sp|magnitude|random>" in text and "<query|group>" in text  # choices listed, not <str>
    assert "<bool>" not in text.split("Model and output")[1]  # our flags are shown as flags (--help is typer's own)
