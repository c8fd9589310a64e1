"""Gemma 3 (text): sliding-window layers, per-layer-type rope, q/k norms, head_dim != hidden/heads, one KV head at 270M.

Tiny random configs from tests/tiny.py; the real Gemma-3-270M (``amp-edge fetch gemma3-270m``) only under -m slow."""

from __future__ import annotations

import json

import pytest
import torch

from amp_edge import get_adapter, load_pruned
from amp_edge.errors import InvalidOptionError, UnsupportedArchitectureError
from amp_edge.models.adapters import adapter_class
from amp_edge.pruning.pipeline import PruneOptions, prune
from amp_edge.pruning.scoring import criteria

from .test_surgery import logits, masked_copy
from .tiny import sample_ids, save_tiny, tiny_model


def _opts(**kw) -> PruneOptions:
    return PruneOptions(**{"ratio": 0.3, "criterion": "amp", "gqa": "query", "min_keep": 0.25, **kw})


def test_adapter_reads_windows_and_rope_types():
    adapter = get_adapter(tiny_model("gemma3-kv1"))
    assert [adapter.sliding_window(i) for i in range(3)] == [8, None, 8]
    assert [adapter.rope_layer_type(i) for i in range(3)] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert adapter.head_dim == 32 != adapter.hidden_size // 4
    assert [(s.num_heads, s.num_kv_heads) for s in adapter.shapes()] == [(4, 1)] * 3


def test_multimodal_gemma3_is_refused_in_one_line():
    with pytest.raises(UnsupportedArchitectureError, match="multimodal.*gemma3_text"):
        adapter_class("gemma3")


@pytest.mark.parametrize("criterion", criteria())
def test_prune_single_kv_group_save_load_equals_masked_dense(tmp_path, criterion):
    """Query heads go inside the one KV group; the saved checkpoint loads and computes the masked dense model."""
    dense = save_tiny("gemma3-kv1", tmp_path / "dense")
    model = tiny_model("gemma3-kv1")
    result = prune(str(dense), tmp_path / "pruned", _opts(criterion=criterion, heads=1))
    plan = result.plan
    assert [len(lp.kv_heads) for lp in plan.layers] == [1, 1, 1]
    assert [len(lp.q_heads) for lp in plan.layers] == [3, 3, 3]  # 4 heads -> 3: hidden 64 % 3 != 0 must still load
    pruned = load_pruned(tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (3, 1, 32)
    ids = sample_ids(length=20)  # longer than the window (8): the sliding layers mask something
    expected = logits(masked_copy(model, plan), ids)
    got = logits(pruned, ids)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_heads_auto_on_a_single_kv_group(tmp_path):
    dense = save_tiny("gemma3-kv1", tmp_path / "dense")
    result = prune(str(dense), tmp_path / "pruned", _opts(heads="auto"))
    split = result.plan.head_split
    assert split["rule"] == "auto" and set(split["calibration_loss"]) >= {"0", "1"}
    assert load_pruned(tmp_path / "pruned") is not None


def test_gqa_group_refused_where_it_would_remove_the_only_kv_head(tmp_path):
    dense = save_tiny("gemma3-kv1", tmp_path / "dense")
    with pytest.raises(InvalidOptionError, match="only KV head of layer 0.*--gqa query") as e:
        prune(str(dense), tmp_path / "pruned", _opts(gqa="group", criterion="random", heads="proportional"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "pruned").exists()
    # MLP only is fine in group mode
    prune(str(dense), tmp_path / "mlp", _opts(gqa="group", criterion="random", heads=0))


def test_gqa_group_on_two_kv_groups_drops_a_whole_group(tmp_path):
    dense = save_tiny("gemma3", tmp_path / "dense")
    model = tiny_model("gemma3")
    result = prune(str(dense), tmp_path / "pruned", _opts(gqa="group", criterion="random", heads=1, ratio=0.35))
    assert [len(lp.kv_heads) for lp in result.plan.layers] == [1, 1, 1]
    ids = sample_ids(length=20)
    got, expected = logits(load_pruned(tmp_path / "pruned"), ids), logits(masked_copy(model, result.plan), ids)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
