"""How many heads the budget takes: masked candidates equal pruned models, auto keeps the lowest loss."""

from __future__ import annotations

import copy

import pytest
import torch

from amp_edge.models.adapters import get_adapter
from amp_edge.pruning.allocation import allocate
from amp_edge.errors import InvalidOptionError
from amp_edge.pruning.scoring import score
from amp_edge.pruning.split import feasible_head_units, masked_loss, parse_heads, split_plan
from amp_edge.pruning.surgery import apply_plan
from tests.tiny import sample_ids, tiny_model


def _batches():
    return [sample_ids(4, 16, seed=s) for s in range(3)]


def _pruned_loss(model, plan, batches) -> float:
    pruned = copy.deepcopy(model).eval()
    apply_plan(pruned, plan)
    total = sum(float(pruned(input_ids=b, labels=b).loss) * b[:, 1:].numel() for b in batches)
    return total / sum(b[:, 1:].numel() for b in batches)


@pytest.mark.parametrize("family", ["llama", "phi", "phi3-gqa", "qwen2"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_masked_loss_is_the_pruned_models_loss(family, allocation):
    """Zeroing the removed heads' and neurons' inputs to o_proj/down_proj computes what the pruned model computes
    (biases included: phi's dense and qwen2's q/k/v)."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    plan = allocate(adapter, score("random", adapter, seed=2), 0.3, allocation, "query", min_keep=0.25, head_units=1)
    assert any(len(lp.q_heads) < s.num_heads for lp, s in zip(plan.layers, plan.original_shapes))
    batches = _batches()
    with torch.no_grad():
        before = float(model(input_ids=batches[0], labels=batches[0]).loss)
        assert masked_loss(adapter, plan, batches) == pytest.approx(_pruned_loss(model, plan, batches), rel=1e-5)
        assert float(model(input_ids=batches[0], labels=batches[0]).loss) == before  # the masking hooks came off


def test_auto_keeps_the_candidate_with_the_lowest_loss():
    model = tiny_model("llama")  # 8 query heads in 2 KV groups: units of 2 heads, up to 4 per layer
    adapter = get_adapter(model)
    scores = score("amp", adapter, _batches())
    plans = feasible_head_units(adapter, scores, 0.3, "uniform", "query", 0.1, "mean")
    assert list(plans) == [0, 1, 2, 3]  # removing all 4 units would empty the attention (min_keep)
    plan = split_plan(adapter, scores, "auto", 0.3, "uniform", "query", 0.1, "mean", _batches())
    losses = {int(k): v for k, v in plan.head_split["calibration_loss"].items()}
    assert set(losses) == set(plans) and plan.head_split["head_units"] == min(losses, key=losses.get)
    for k, p in plans.items():  # every candidate has the same parameter budget, within one neuron per layer
        assert abs(p.params["after"] - plan.params["after"]) <= adapter.num_layers * adapter.unit_costs(0).neuron
        assert losses[k] == pytest.approx(masked_loss(adapter, p, _batches()), abs=1e-4)
    assert plan.head_split["heads_removed"] == [8 - len(lp.q_heads) for lp in plan.layers]


def test_fixed_and_proportional_rules():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    scores = score("random", adapter)
    none = split_plan(adapter, scores, "0", 0.3, "uniform", "query", 0.1, "mean")
    assert all(len(lp.q_heads) == 8 for lp in none.layers) and none.head_split == {"rule": "fixed", "head_units": 0, "heads_removed": [0, 0, 0]}
    paper = split_plan(adapter, scores, "proportional", 0.3, "uniform", "query", 0.1, "mean")
    assert paper.layers == allocate(adapter, scores, 0.3).layers and paper.head_split["rule"] == "proportional"
    assert parse_heads(" 2 ") == 2
    for bad in ("some", "-1", "1.5"):
        with pytest.raises(InvalidOptionError, match="--heads must be auto, proportional or a number"):
            parse_heads(bad)
    with pytest.raises(InvalidOptionError, match="calibration data"):
        split_plan(adapter, scores, "auto", 0.3, "uniform", "query", 0.1, "mean", [])
