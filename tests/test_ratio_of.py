"""--ratio-of: what --ratio counts (all parameters, or the prunable layer weights), said before pruning, warned about
when the embeddings make a ratio of all parameters fall mostly on the layers."""

from __future__ import annotations

import json

import pytest

from amp_edge.errors import InvalidOptionError
from amp_edge.models.adapters import get_adapter
from amp_edge.pruning.allocation import budget
from amp_edge.pruning.plan import PruningPlan
from amp_edge.pruning.scoring import score
from amp_edge.pruning.split import split_plan
from amp_edge.pruning.surgery import count_parameters
from tests.conftest import run_cli
from tests.tiny import FAMILIES, save_tiny, tiny_model

PRUNABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "dense", "gate_proj", "up_proj", "down_proj",
            "gate_up_proj", "fc1", "fc2")


def _layer_weights(model) -> int:
    """The prunable weights counted from the modules themselves (the adapter's unit costs must sum to this)."""
    n = 0
    for name, p in model.named_parameters():
        parts = name.split(".")
        if "layers" in parts and parts[-2] in PRUNABLE:
            n += p.numel() if parts[-1] == "weight" or parts[-2] not in ("o_proj", "down_proj", "dense", "fc2") else 0
    return n


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_counts_the_layer_weights(family):
    model = tiny_model(family)
    b = budget(get_adapter(model), 0.3, "layers")
    assert b.total == count_parameters(model) and b.prunable == _layer_weights(model)
    assert b.of_layers == pytest.approx(0.3) and b.of_total == pytest.approx(0.3 * b.prunable / b.total)
    t = budget(get_adapter(model), 0.3, "total")
    assert t.of_total == pytest.approx(0.3) and t.of_layers == pytest.approx(0.3 * t.total / t.prunable)


@pytest.mark.parametrize("ratio_of", ["total", "layers"])
def test_plan_removes_the_ratio_of_what_it_counts(ratio_of):
    model = tiny_model("llama")
    adapter = get_adapter(model)
    b = budget(adapter, 0.3, ratio_of)
    plan = split_plan(adapter, score("magnitude", adapter), "proportional", 0.3, "uniform", "query", 0.1, "mean",
                      ratio_of=ratio_of)
    removed = plan.params["before"] - plan.params["after"]
    base = b.total if ratio_of == "total" else b.prunable
    neuron = adapter.unit_costs(0).neuron * adapter.num_layers  # one neuron per layer: the rounding step
    assert abs(removed - 0.3 * base) <= neuron and plan.ratio_of == ratio_of
    assert PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict()))).ratio_of == ratio_of


def test_warning_when_the_embeddings_dominate():
    model = tiny_model("llama")
    b = budget(get_adapter(model), 0.3, "total")
    assert b.warning() is None  # tiny llama: embeddings 16k of 145k parameters
    big = type(b)(0.3, "total", total=268_000_000, prunable=100_000_000)  # Gemma-3-270M's proportions
    assert "removes 80% of the layer weights" in big.warning() and "--ratio-of layers" in big.warning()
    assert type(b)(0.3, "layers", 268_000_000, 100_000_000).warning() is None
    with pytest.raises(InvalidOptionError, match="unknown --ratio-of 'weights'; choose from total, layers"):
        budget(get_adapter(model), 0.3, "weights")


def test_cli_says_what_the_ratio_removes_and_records_it(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    result = run_cli("prune", src, "--ratio", 0.2, "--ratio-of", "layers", "--criterion", "magnitude", "--heads",
                     "proportional", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    b = budget(get_adapter(tiny_model("llama")), 0.2, "layers")
    assert f"{b.of_total:.1%} of all" in result.output and "20.0% of the" in result.output
    plan = json.loads((tmp_path / "out" / "amp_edge_plan.json").read_text())
    assert plan["ratio"] == 0.2 and plan["ratio_of"] == "layers"
    bad = run_cli("prune", src, "--ratio-of", "weights", "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and not (tmp_path / "bad").exists()
