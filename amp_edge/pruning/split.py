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

Each candidate costs a forward pass, so auto compares at most ``AUTO_CANDIDATES`` head counts (evenly spread over the
feasible ones, both ends included) on at most ``AUTO_TOKENS`` calibration tokens (the first rows): at Phi-3-mini's
size (29 feasible counts at 30%) every count on every row would take hours on a CPU.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from amp_edge.models.adapters import Adapter
from amp_edge.pruning.allocation import allocate
from amp_edge.pruning.distributed import reduce_loss, share_rows
from amp_edge.errors import AllocationError, InvalidOptionError
from amp_edge.pruning.plan import PruningPlan
from amp_edge.pruning.scoring import LayerScores, input_hooks

HEAD_RULES = ("auto", "proportional")
AUTO_CANDIDATES = 5  # head counts auto compares at most
AUTO_TOKENS = 1024  # calibration tokens each candidate's loss is measured on at most


def parse_heads(value: str | int) -> str | int:
    """'auto' | 'proportional' | a number of head units to remove per layer (>= 0)."""
    text = str(value).strip()
    if text in HEAD_RULES:
        return text
    if text.isdigit():
        return int(text)
    raise InvalidOptionError(f"--heads must be auto, proportional or a number of head units per layer (>= 0), got {value!r}")


def feasible_head_units(adapter: Adapter, scores: list[LayerScores], ratio: float, allocation: str, gqa: str,
                        min_keep: float, normalization: str, ratio_of: str = "total") -> dict[int, PruningPlan]:
    """Every number of head units per layer that the budget allows, with its plan; {} when none fits."""
    plans, removed = {}, None
    for k in range(max(s.num_heads for s in adapter.shapes()) + 1):  # never more units than heads
        try:
            plan = allocate(adapter, scores, ratio, allocation, gqa, min_keep, normalization, head_units=k, ratio_of=ratio_of)
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
               min_keep: float, normalization: str, batches: Iterable[torch.Tensor] = (),
               losses: Callable[[dict[int, PruningPlan], list[torch.Tensor]], dict[int, float]] | None = None,
               ratio_of: str = "total") -> PruningPlan:
    """The plan for the chosen head rule; ``plan.head_split`` says what was chosen and, for auto, each candidate's loss.

    ``losses(plans, batches)`` measures auto's candidates (default: ``masked_losses`` on the model in memory; the
    streamed prune passes its own, layer by layer). ``batches`` are all calibration batches: the rows auto uses are
    bounded here, then shared among torchrun ranks.
    """
    rule = parse_heads(heads)
    if gqa == "group" and rule != 0:
        check_group_mode(adapter)
    if rule == "proportional":
        plan = allocate(adapter, scores, ratio, allocation, gqa, min_keep, normalization, ratio_of=ratio_of)
        plan.head_split = {"rule": "proportional", "heads_removed": _heads_removed(plan)}
        return plan
    if isinstance(rule, int):
        plan = allocate(adapter, scores, ratio, allocation, gqa, min_keep, normalization, head_units=rule, ratio_of=ratio_of)
        plan.head_split = {"rule": "fixed", "head_units": rule, "heads_removed": _heads_removed(plan)}
        return plan
    plans = feasible_head_units(adapter, scores, ratio, allocation, gqa, min_keep, normalization, ratio_of)
    if not plans:  # nothing fits: the proportional attempt raises the readable error
        return allocate(adapter, scores, ratio, allocation, gqa, min_keep, normalization, ratio_of=ratio_of)
    batches = list(batches)
    if not batches:
        raise InvalidOptionError("--heads auto compares candidates on calibration data, and there is none")
    plans = thin_candidates(plans)
    rows = auto_rows(batches)
    if losses is None:
        losses = lambda ps, bs: {k: masked_loss(adapter, p, bs, desc=f"head units {k}") for k, p in ps.items()}  # noqa: E731
    measured = losses(plans, share_rows(rows))
    best = min(measured, key=lambda k: (measured[k], k))
    plan = plans[best]
    plan.head_split = {"rule": "auto", "head_units": best, "heads_removed": _heads_removed(plan),
                       "calibration_loss": {str(k): round(v, 5) for k, v in measured.items()},
                       "tokens": sum(b.numel() for b in rows)}
    return plan


def thin_candidates(plans: dict[int, PruningPlan], most: int = AUTO_CANDIDATES) -> dict[int, PruningPlan]:
    """At most ``most`` of the feasible head counts, evenly spread, the smallest and the largest included."""
    keys = sorted(plans)
    if len(keys) <= most:
        return plans
    picks = sorted({keys[round(j * (len(keys) - 1) / (most - 1))] for j in range(most)})
    return {k: plans[k] for k in picks}


def auto_rows(batches: list[torch.Tensor], tokens: int = AUTO_TOKENS) -> list[torch.Tensor]:
    """The first calibration rows, ``tokens`` of them at most (one row at least), in the batches they came in."""
    out, left = [], tokens
    for b in batches:
        if left <= 0:
            break
        n = max(1, min(b.shape[0], left // b.shape[1])) if not out else min(b.shape[0], left // b.shape[1])
        if n == 0:
            break
        out.append(b[:n])
        left -= n * b.shape[1]
    return out


def masked_loss(adapter: Adapter, plan: PruningPlan, batches: list[torch.Tensor], desc: str = "loss") -> float:
    """Mean next-token cross-entropy of the model as ``plan`` would prune it, computed on the unpruned model
    (over every torchrun rank's batches)."""
    n = adapter.num_layers
    device = next(adapter.model.parameters()).device
    pairs = [layer_masks(adapter, layer, i, device) for i, layer in enumerate(plan.layers)]
    masks = [p[0] for p in pairs] + [p[1] for p in pairs]  # the order of the modules below
    modules = [adapter.o_proj(i) for i in range(n)] + [adapter.down_proj(i) for i in range(n)]
    total, tokens = 0.0, 0
    with torch.no_grad(), input_hooks(modules, lambda i, x: x * masks[i].to(x.dtype)):
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
            batch = batch.to(device)
            loss = adapter.model(input_ids=batch, labels=batch, use_cache=False).loss
            total += float(loss) * batch[:, 1:].numel()
            tokens += batch[:, 1:].numel()
    return reduce_loss(total, tokens)


def layer_masks(adapter: Adapter, layer, i: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's 0/1 masks on the inputs of o_proj (per head_dim column) and down_proj for the kept units of ``layer``."""
    hd = adapter.head_dim
    heads = torch.zeros(adapter.o_proj(i).in_features // hd, device=device)
    heads[layer.q_heads] = 1
    neurons = torch.zeros(adapter.down_proj(i).in_features, device=device)
    neurons[layer.neurons] = 1
    return heads.repeat_interleave(hd), neurons


def _heads_removed(plan: PruningPlan) -> list[int]:
    return [s.num_heads - len(layer.q_heads) for s, layer in zip(plan.original_shapes, plan.layers)]


