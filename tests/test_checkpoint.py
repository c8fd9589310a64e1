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
    # plain transformers refuses rather than loading wrongly (4.57 says "size mismatch", 5.x "ignore_mismatched_sizes")
    with pytest.raises(Exception, match="size mismatch|ignore_mismatched_sizes"):
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


def test_llama_with_heads_that_do_not_divide_hidden_size(tmp_path):
    """A uniform head-pruned Llama whose attention is narrower than hidden_size (6 heads of 8 for hidden 64; Llama-3.2-1B
    at 24 of 32 heads) keeps a standard config. transformers 5's LlamaConfig refuses such a config on its own;
    amp-edge saves it, loads it (load_model, load_pruned) and exports it on both transformers lines."""
    from amp_edge import LayerPlan, load_model
    from amp_edge.models.compat import TRANSFORMERS_5

    model = tiny_model("llama")  # 8 heads of 8 in 2 KV groups, hidden 64
    adapter = get_adapter(model)
    layers = [LayerPlan([0, 1, 2, 4, 5, 6], [0, 1], list(range(96))) for _ in range(adapter.num_layers)]
    plan = PruningPlan("llama", layers, original_shapes=adapter.shapes())
    pruned = apply_plan(copy.deepcopy(model), plan)
    save_pruned(pruned, char_tokenizer(), plan, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_attention_heads"], config["head_dim"], config["hidden_size"]) == (6, 8, 64)
    assert "amp_edge_layers" not in config
    ids = sample_ids()
    for reloaded in (load_model(str(tmp_path / "out")).model, load_pruned(tmp_path / "out")):
        assert reloaded.config.num_attention_heads == 6
        assert torch.allclose(_logits(reloaded, ids), _logits(pruned, ids), atol=1e-5)
    if TRANSFORMERS_5:  # plain transformers 5 refuses the config itself: an error, never a wrong model
        with pytest.raises(Exception, match="not a multiple of the number of attention"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
        assert torch.allclose(_logits(reloaded, ids), _logits(pruned, ids), atol=1e-5)
    from exporters import ExportOptions, export

    result = export(str(tmp_path / "out"), tmp_path / "pkg", ExportOptions())
    assert result.manifest["parity"]["ok"] and json.loads((tmp_path / "pkg" / "config.json").read_text())["num_attention_heads"] == 6
    from amp_edge.models.compat import pruned_heads_allowed  # the relaxed rule holds only inside the block
    from transformers import LlamaConfig
    if TRANSFORMERS_5:
        with pytest.raises(Exception, match="not a multiple"):
            LlamaConfig(hidden_size=64, num_attention_heads=6, head_dim=8)
    with pruned_heads_allowed():
        assert LlamaConfig(hidden_size=64, num_attention_heads=6, head_dim=8).num_attention_heads == 6
