"""Apply a pruning plan to a model: slice the coupled weights and write every new shape into the config."""

from __future__ import annotations

from torch import nn

from amp_edge.models.adapters import get_adapter
from amp_edge.pruning.plan import PruningPlan, validate_plan

PER_LAYER_KEY = "amp_edge_layers"


def needs_load_pruned(config) -> bool:
    return hasattr(config, PER_LAYER_KEY)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Prune ``model`` in place as ``plan`` says and return it.

    The result depends only on the weights and the plan, so a saved plan replays to identical weights.
    """
    adapter = get_adapter(model)
    adapter.check_prunable()
    validate_plan(plan, adapter)
    for i, (lp, shape) in enumerate(zip(plan.layers, adapter.shapes())):
        if (len(lp.q_heads), len(lp.kv_heads)) != (shape.num_heads, shape.num_kv_heads):
            adapter.prune_attention(i, lp.q_heads, lp.kv_heads)
        if len(lp.neurons) != shape.intermediate_size:
            adapter.prune_mlp(i, lp.neurons)
    write_shapes_to_config(model)
    return model


def write_shapes_to_config(model: nn.Module) -> None:
    """Record the model's shapes explicitly: standard fields when layers agree, per-layer lists when not.

    With per-layer lists the standard fields keep the original sizes, so plain transformers refuses the
    checkpoint with a size mismatch instead of loading it wrongly; ``load_pruned`` reads the lists.
    """
    adapter = get_adapter(model)
    config, shapes = model.config, adapter.shapes()
    config.head_dim = adapter.head_dim
    if len(set(shapes)) == 1 and adapter.standard_config_fits(shapes[0].num_heads):
        config.num_attention_heads = shapes[0].num_heads
        config.num_key_value_heads = shapes[0].num_kv_heads
        config.intermediate_size = shapes[0].intermediate_size
        if hasattr(config, PER_LAYER_KEY):
            delattr(config, PER_LAYER_KEY)
    else:
        setattr(config, PER_LAYER_KEY, {
            "num_attention_heads": [s.num_heads for s in shapes],
            "num_key_value_heads": [s.num_kv_heads for s in shapes],
            "intermediate_size": [s.intermediate_size for s in shapes],
        })
