"""The surgery is exact: a pruned model computes what the dense model computes with the removed parts zeroed."""

import copy

import pytest
import torch

from amp_edge import PruningPlan, allocate, apply_plan, count_parameters, get_adapter, score
from amp_edge.models.adapters import LayerShape
from amp_edge.errors import PlanError, UnsupportedArchitectureError
from amp_edge.pruning.plan import LayerPlan

from .tiny import FAMILIES, sample_ids, tiny_model


def masked_copy(model, plan: PruningPlan):
    """Dense model with the output columns of removed heads and neurons set to zero."""
    masked = copy.deepcopy(model)
    adapter = get_adapter(masked)
    hd = adapter.head_dim
    with torch.no_grad():
        for i, (lp, shape) in enumerate(zip(plan.layers, adapter.shapes())):
            for h in set(range(shape.num_heads)) - set(lp.q_heads):
                adapter.o_proj(i).weight[:, h * hd:(h + 1) * hd] = 0
            for j in set(range(shape.intermediate_size)) - set(lp.neurons):
                adapter.down_proj(i).weight[:, j] = 0
    return masked


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_plan_reproduces_logits_exactly(family):
    model = tiny_model(family)
    ids = sample_ids()
    before = logits(model, ids)
    pruned = apply_plan(copy.deepcopy(model), PruningPlan.keep_all(get_adapter(model)))
    assert torch.equal(logits(pruned, ids), before)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("gqa", ["query", "group"])
def test_pruned_equals_masked_dense(family, allocation, gqa):
    model = tiny_model(family)
    adapter = get_adapter(model)
    plan = allocate(adapter, score("random", adapter, seed=3), 0.3, allocation, gqa, min_keep=0.25)
    pruned = apply_plan(copy.deepcopy(model), plan)
    ids = sample_ids()
    expected = logits(masked_copy(model, plan), ids)
    got = logits(pruned, ids)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
    assert count_parameters(pruned) == plan.params["after"]
    assert count_parameters(pruned) < count_parameters(model)
    shapes = get_adapter(pruned).shapes()
    assert [s.num_heads for s in shapes] == [len(lp.q_heads) for lp in plan.layers]
    assert [s.intermediate_size for s in shapes] == [len(lp.neurons) for lp in plan.layers]


@pytest.mark.parametrize("family", ["llama", "phi3-gqa", "qwen3"])
def test_pruned_kv_cache_decoding_matches_masked(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    plan = allocate(adapter, score("magnitude", adapter), 0.3, "global", "group", min_keep=0.25)
    pruned = apply_plan(copy.deepcopy(model), plan)
    masked = masked_copy(model, plan)
    prompt = sample_ids(1, 6)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(pruned.generate(prompt, **kw), masked.generate(prompt, **kw))


def test_gqa_modes_on_real_group_layout():
    model = tiny_model("llama")  # 8 query heads, 2 KV heads: groups of 4
    adapter = get_adapter(model)
    scores = score("random", adapter, seed=0)
    query = allocate(adapter, scores, 0.3, "uniform", "query")
    assert all(lp.kv_heads == [0, 1] for lp in query.layers)  # KV cache untouched
    for lp in query.layers:  # the same number of query heads out of each group
        assert sum(h < 4 for h in lp.q_heads) == sum(h >= 4 for h in lp.q_heads) < 4
    group = allocate(adapter, scores, 0.3, "uniform", "group")
    assert all(len(lp.kv_heads) == 1 and len(lp.q_heads) == 4 for lp in group.layers)


def test_plan_is_checked_before_any_weight_changes():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = PruningPlan.keep_all(adapter)
    plan.layers[2] = LayerPlan([0, 1, 4], [0, 1], list(range(96)))  # 2 heads in group 0, 1 in group 1
    with pytest.raises(PlanError, match="unequal"):
        apply_plan(model, plan)
    for bad, match in [
        (LayerPlan([], [], list(range(96))), "no query heads"),
        (LayerPlan([0, 1, 2, 3], [0, 1], list(range(96))), "KV groups"),
        (LayerPlan(list(range(8)), [0, 1], [0, 200]), "out of range"),
        (LayerPlan(list(range(8)), [0, 1], [5, 3]), "sorted"),
    ]:
        plan.layers[2] = bad
        with pytest.raises(PlanError, match=match):
            apply_plan(model, plan)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_plan_for_another_model_is_rejected():
    plan = PruningPlan.keep_all(get_adapter(tiny_model("llama")))
    with pytest.raises(PlanError, match="model_type 'llama'"):
        apply_plan(tiny_model("qwen2"), plan)
    plan.original_shapes = [LayerShape(9, 3, 100)] * 3
    with pytest.raises(PlanError, match="was made for layer 0"):
        apply_plan(tiny_model("llama"), plan)


def test_unknown_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama, mistral, phi, phi3, qwen2, qwen3"):
        get_adapter(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)))
