"""Saved checkpoints reload anywhere, and a saved plan replays to identical weights."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from amp_edge import PruningPlan, allocate, apply_plan, get_adapter, load_pruned, save_pruned, score
from amp_edge.io import atomic_dir
from amp_edge.errors import OutputExistsError

from .tiny import char_tokenizer, sample_ids, tiny_model


def _pruned(family, allocation, gqa="query"):
    model = tiny_model(family)
    adapter = get_adapter(model)
    plan = allocate(adapter, score("magnitude", adapter), 0.3, allocation, gqa, min_keep=0.25)
    return model, plan, apply_plan(copy.deepcopy(model), plan)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi", "phi3-gqa"])
def test_uniform_checkpoint_loads_with_plain_transformers(tmp_path, family):
    _, plan, pruned = _pruned(family, "uniform")
    save_pruned(pruned, char_tokenizer(), plan, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    shape = get_adapter(pruned).layer_shape(0)
    assert config["num_attention_heads"] == shape.num_heads and config["intermediate_size"] == shape.intermediate_size
    assert config["head_dim"] == get_adapter(pruned).head_dim and "amp_edge_layers" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = sample_ids()
    assert torch.allclose(_logits(reloaded, ids), _logits(pruned, ids), atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["amp_edge_plan.json", "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json"])


@pytest.mark.parametrize("family", ["llama-mha", "mistral", "qwen3", "phi", "phi3"])
def test_per_layer_checkpoint_loads_with_load_pruned(tmp_path, family):
    _, plan, pruned = _pruned(family, "global")
    assert not plan.is_uniform
    save_pruned(pruned, None, plan, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["amp_edge_layers"]["intermediate_size"] == [len(lp.neurons) for lp in plan.layers]
    reloaded = load_pruned(tmp_path / "out")
    ids = sample_ids()
    assert torch.allclose(_logits(reloaded, ids), _logits(pruned, ids), atol=1e-5)
    with pytest.raises(Exception, match="size mismatch"):  # plain transformers refuses rather than loading wrongly
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_plan_replays_to_identical_weights(tmp_path):
    model, plan, pruned = _pruned("phi3-gqa", "global", "group")
    plan.save(tmp_path / "plan.json")
    replayed = apply_plan(copy.deepcopy(model), PruningPlan.load(tmp_path / "plan.json"))
    a, b = pruned.state_dict(), replayed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_atomic_dir_leaves_nothing_on_failure_and_keeps_existing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "good").write_text("keep")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            raise RuntimeError("boom")
    assert (out / "good").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("n")
    assert [p.name for p in out.iterdir()] == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
