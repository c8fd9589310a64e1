"""Scorers compute what their formulas say; allocation hits the parameter target and respects GQA."""

import pytest
import torch

from amp_edge import allocate, count_parameters, get_adapter, score
from amp_edge.errors import AllocationError, InvalidOptionError
from amp_edge.pruning.scoring import input_hooks

from .tiny import FAMILIES, sample_ids, tiny_model


def _captured_inputs(adapter, batches):
    """Inputs of every o_proj and down_proj, captured by an independent hook."""
    n = adapter.num_layers
    seen = {i: [] for i in range(2 * n)}
    modules = [adapter.o_proj(i) for i in range(n)] + [adapter.down_proj(i) for i in range(n)]
    with input_hooks(modules, lambda i, x: seen[i].append(x.reshape(-1, x.shape[-1]).double())), torch.no_grad():
        for b in batches:
            adapter.model(input_ids=b)
    return {i: torch.cat(v) for i, v in seen.items()}


@pytest.mark.parametrize("family", ["llama", "phi", "phi3-gqa"])
def test_amp_scores_match_the_formula(family):
    adapter = get_adapter(tiny_model(family))
    batches = [sample_ids(2, 10, seed=s) for s in range(2)]
    got = score("amp", adapter, batches)
    inputs = _captured_inputs(adapter, batches)
    hd, n = adapter.head_dim, adapter.num_layers
    for i in range(n):
        x, w = inputs[i], adapter.o_proj(i).weight.double()
        for h in range(adapter.layer_shape(i).num_heads):
            sl = slice(h * hd, (h + 1) * hd)
            expected = sum((x[t, sl] @ w[:, sl].T).abs().sum() for t in range(x.shape[0])) / x.shape[0]
            assert got[i].heads[h].item() == pytest.approx(expected.item(), rel=1e-5)
        assert torch.allclose(got[i].neurons, inputs[n + i].abs().mean(0), rtol=1e-6)


def test_wanda_sp_and_magnitude_match_their_formulas():
    adapter = get_adapter(tiny_model("qwen2"))
    batches = [sample_ids(2, 10)]
    inputs = _captured_inputs(adapter, batches)
    wanda, mag = score("wanda-sp", adapter, batches), score("magnitude", adapter)
    hd, n = adapter.head_dim, adapter.num_layers
    for i in range(n):
        norm = inputs[n + i].pow(2).sum(0).sqrt()
        down = adapter.down_proj(i).weight.double()
        assert torch.allclose(wanda[i].neurons, (down.abs() * norm).mean(0), rtol=1e-6)
        attn, mlp = adapter.attention(i), adapter.mlp(i)
        h = 3
        q_rows = attn.q_proj.weight[h * hd:(h + 1) * hd].double()
        o_cols = attn.o_proj.weight[:, h * hd:(h + 1) * hd].double()
        assert mag[i].heads[h].item() == pytest.approx(torch.cat([q_rows.flatten(), o_cols.flatten()]).norm().item())
        j = 7
        parts = [mlp.gate_proj.weight[j], mlp.up_proj.weight[j], mlp.down_proj.weight[:, j]]
        assert mag[i].neurons[j].item() == pytest.approx(torch.cat(parts).double().norm().item())


def test_random_scores_are_seeded():
    adapter = get_adapter(tiny_model("llama"))
    a, b, c = score("random", adapter, seed=1), score("random", adapter, seed=1), score("random", adapter, seed=2)
    assert torch.equal(a[0].neurons, b[0].neurons) and not torch.equal(a[0].neurons, c[0].neurons)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_allocation_hits_the_parameter_target(family, ratio):
    adapter = get_adapter(tiny_model(family))
    total = count_parameters(adapter.model)
    for allocation in ("uniform", "global"):
        plan = allocate(adapter, score("random", adapter), ratio, allocation, min_keep=0.1)
        removed = 1 - plan.params["after"] / total
        per_neuron = adapter.unit_costs(0).neuron * adapter.num_layers
        assert abs(removed - ratio) * total <= per_neuron  # off by at most one neuron per layer
        if allocation == "uniform":
            assert plan.is_uniform


def test_global_allocation_follows_scores_and_keeps_the_minimum():
    adapter = get_adapter(tiny_model("llama-mha"))
    scores = score("random", adapter)
    for i, s in enumerate(scores):  # layer 0 has a flat profile, layer 2 a steep one
        s.neurons = torch.linspace(1, 1.1, 96, dtype=torch.float64) if i == 0 else torch.linspace(0.01, 3, 96, dtype=torch.float64)
    plan = allocate(adapter, scores, 0.3, "global", min_keep=0.2)
    widths = [len(lp.neurons) for lp in plan.layers]
    assert widths[0] > widths[1] and min(widths) >= 0.2 * 96
    assert all(len(lp.q_heads) >= 1 for lp in plan.layers)


@pytest.mark.parametrize("ratio, match", [(0.0, r"in \(0, 1\)"), (1.0, r"in \(0, 1\)"), (0.95, "would remove|only")])
def test_impossible_ratios_are_refused(ratio, match):
    adapter = get_adapter(tiny_model("llama"))
    with pytest.raises((AllocationError, InvalidOptionError), match=match):
        allocate(adapter, score("random", adapter), ratio)


def test_unknown_options_list_the_choices():
    adapter = get_adapter(tiny_model("llama"))
    with pytest.raises(InvalidOptionError, match="amp, magnitude, random, wanda-sp"):
        score("taylor", adapter)
    with pytest.raises(InvalidOptionError, match="uniform, global"):
        allocate(adapter, score("random", adapter), 0.2, allocation="layerwise")
    with pytest.raises(InvalidOptionError, match="query, group"):
        allocate(adapter, score("random", adapter), 0.2, gqa="kv")
