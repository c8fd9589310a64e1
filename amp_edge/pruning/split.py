"""How much of the parameter budget comes out of attention heads, and how much out of the MLP.

Heads leave in whole units (a query head from every KV group, or a whole group), so a model with few heads has
few choices: SmolLM2-135M's 9 heads in 3 groups allow removing 0, 3 or 6 per layer. The paper's rule
("proportional") removes the fraction of units nearest the parameter fraction, which at 20% is a third of the
heads; the MLP absorbs the rest of the budget. Measured on SmolLM2-135M (WikiText-2, 32k tokens), the same 20%
budget gives perplexity 186 with 3 heads gone per layer and 47 with none gone.

``auto`` (the default) tries every feasible number of head units per layer, each with the MLP taking the rest,
and keeps the one whose pruned model has the lowest next-token loss on the calibration batches. The candidates
are evaluated without copying the model: zeroing the input columns of o_proj and down_proj that belong to the
removed heads and neurons computes exactly what the pruned model computes.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from tqdm.auto import tqdm

from amp_edge.models.adapters import Adapter
from amp_edge.pruning.allocation import allocate
from amp_edge.errors import AllocationError, InvalidOptionError
from amp_edge.pruning.plan import PruningPlan
from amp_edge.pruning.scoring import LayerScores, input_hooks

HEAD_RULES = ("auto", "proportional")


def parse_heads(value: str | int) -> str | int:
    """'auto' | 'proportional' | a number of head units to remove per layer (>= 0)."""
    text = str(value).strip()
    if text in HEAD_RULES:
        return text
    if text.isdigit():
        return int(text)
    raise InvalidOptionError(f"--heads must be auto, proportional or a number of head units per layer (>= 0), got {value!r}")


def feasible_head_units(adapter: Adapter, scores: list[LayerScores], ratio: float, allocation: str, gqa: str,
                        min_keep: float, normalization: str) -> dict[int, PruningPlan]:
    """Every number of head units per layer that the budget allows, with its plan; {} when none fits."""
    plans, removed = {}, None
    for k in range(max(s.num_heads for s in adapter.shapes()) + 1):  # never more units than heads
        try:
            plan = allocate(adapter, scores, ratio, allocation, gqa, min_keep, normalization, head_units=k)
        except AllocationError:  # too few units leave the MLP too much; too many exceed the budget
            continue
        if sum(_heads_removed(plan)) == removed:  # every layer is at its limit: more units change nothing
            break
        plans[k], removed = plan, sum(_heads_removed(plan))
    return plans


def check_group_mode(adapter: Adapter) -> None:
    """--gqa group removes whole KV groups: refuse it where the only KV head of a layer would be the unit to go."""
    single = [(i, s) for i, s in enumerate(adapter.shapes()) if s.num_kv_heads == 1 and s.num_heads > 1]
    if single:
        i, s = single[0]
        raise InvalidOptionError(
            f"--gqa group would remove the only KV head of layer {i} ({s.num_heads} query heads share 1 KV head, "
            f"{len(single)} layer(s) like it); use --gqa query (query heads inside the group) or --heads 0 (MLP only)")


def split_plan(adapter: Adapter, scores: list[LayerScores], heads: str | int, ratio: float, allocation: str, gqa: str,
               min_keep: float, normalization: str, batches: Iterable[torch.Tensor] = ()) -> PruningPlan:
    """The plan for the chosen head rule; ``plan.head_split`` says what was chosen and, for auto, each candidate's loss."""
    rule = parse_heads(heads)
    if gqa == "group" and rule != 0:
        check_group_mode(adapter)
    if rule == "proportional":
        plan = allocate(adapter, scores, ratio, allocation, gqa, min_keep, normalization)
        plan.head_split = {"rule": "proportional", "heads_removed": _heads_removed(plan)}
        return plan
    if isinstance(rule, int):
        plan = allocate(adapter, scores, ratio, allocation, gqa, min_keep, normalization, head_units=rule)
        plan.head_split = {"rule": "fixed", "head_units": rule, "heads_removed": _heads_removed(plan)}
        return plan
    plans = feasible_head_units(adapter, scores, ratio, allocation, gqa, min_keep, normalization)
    if not plans:  # nothing fits: the proportional attempt raises the readable error
        return allocate(adapter, scores, ratio, allocation, gqa, min_keep, normalization)
    batches = list(batches)
    if not batches:
        raise InvalidOptionError("--heads auto compares candidates on calibration data, and there is none")
    losses = {k: masked_loss(adapter, plan, batches, desc=f"head units {k}") for k, plan in plans.items()}
    best = min(losses, key=lambda k: (losses[k], k))
    plan = plans[best]
    plan.head_split = {"rule": "auto", "head_units": best, "heads_removed": _heads_removed(plan),
                       "calibration_loss": {str(k): round(v, 5) for k, v in losses.items()}}
    return plan


def masked_loss(adapter: Adapter, plan: PruningPlan, batches: list[torch.Tensor], desc: str = "loss") -> float:
    """Mean next-token cross-entropy of the model as ``plan`` would prune it, computed on the unpruned model."""
    n, hd = adapter.num_layers, adapter.head_dim
    device = next(adapter.model.parameters()).device
    head_masks, neuron_masks = [], []
    for i, layer in enumerate(plan.layers):
        heads = torch.zeros(adapter.o_proj(i).in_features // hd, device=device)
        heads[layer.q_heads] = 1
        head_masks.append(heads.repeat_interleave(hd))
        neurons = torch.zeros(adapter.down_proj(i).in_features, device=device)
        neurons[layer.neurons] = 1
        neuron_masks.append(neurons)
    masks = head_masks + neuron_masks  # the order of the modules below
    modules = [adapter.o_proj(i) for i in range(n)] + [adapter.down_proj(i) for i in range(n)]
    total, tokens = 0.0, 0
    with torch.no_grad(), input_hooks(modules, lambda i, x: x * masks[i].to(x.dtype)):
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
            batch = batch.to(device)
            loss = adapter.model(input_ids=batch, labels=batch, use_cache=False).loss
            total += float(loss) * batch[:, 1:].numel()
            tokens += batch[:, 1:].numel()
    return total / tokens if tokens else math.inf


def _heads_removed(plan: PruningPlan) -> list[int]:
    return [s.num_heads - len(layer.q_heads) for s, layer in zip(plan.original_shapes, plan.layers)]


