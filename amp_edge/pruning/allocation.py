"""Turn scores into a plan: how many heads and neurons each layer loses, and which.

Head removal happens in *units* that keep GQA intact:
  gqa="group"  a unit is one KV group (its KV head and all its query heads);
  gqa="query"  a unit is one query head from every group (the lowest-scored left in each),
               so all groups keep the same number of query heads and the KV cache stays.
With one query head per KV head (MHA) both modes remove single heads.

uniform  the same number of head units and the same fraction of neurons in every layer, sized so that
         the whole model loses ``ratio`` of its parameters (embeddings included, as the paper's tables count:
         ``ratio_of="total"``) or of its prunable layer weights (attention projections and MLP: "layers");
         ``head_units`` fixes how many units each layer loses (the MLP absorbs the rest of the budget),
         None takes the fraction of units nearest the parameter fraction (the paper's rule; see split.py);
global   the same totals, spread over layers by one ranking of per-layer normalized scores,
         each layer keeping at least ``min_keep`` of its units and neurons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from amp_edge.models.adapters import Adapter, LayerShape
from amp_edge.errors import AllocationError, InvalidOptionError
from amp_edge.pruning.plan import LayerPlan, PruningPlan
from amp_edge.pruning.scoring import LayerScores
from amp_edge.pruning.surgery import count_parameters

ALLOCATIONS = ("uniform", "global")
RATIO_OF = ("total", "layers")
# A ratio of all parameters that removes more than this many times as much of the layer weights is mostly
# embedding: worth a warning (a 0.5B Qwen2 at 0.3 lost 53% of its layer weights, Gemma-3-270M would lose 80%).
LAYER_SHARE_WARN = 1.5
GQA_MODES = ("query", "group")
NORMALIZATIONS = ("mean", "zscore")


@dataclass
class HeadUnits:
    """One layer's head-removal units, in the order they would be removed (least important first)."""

    scores: list[float]
    q_heads: list[list[int]]  # query heads each unit removes
    kv_heads: list[list[int]]  # KV heads each unit removes
    cost: int  # parameters one unit removes
    max_remove: int


def unit_order(scores: torch.Tensor, shape: LayerShape, gqa: str, q_cost: int, kv_cost: int, min_keep: float) -> HeadUnits:
    g, n_kv = shape.group_size, shape.num_kv_heads
    per_group = scores.reshape(n_kv, g)
    if gqa == "group" or g == 1:
        order = per_group.sum(1).argsort(stable=True).tolist()
        return HeadUnits(
            scores=per_group.sum(1)[order].tolist(),
            q_heads=[list(range(k * g, (k + 1) * g)) for k in order],
            kv_heads=[[k] for k in order],
            cost=g * q_cost + kv_cost,
            max_remove=n_kv - max(1, math.ceil(min_keep * n_kv)),
        )
    ranked = per_group.argsort(dim=1, stable=True)  # (n_kv, g): heads of each group, weakest first
    heads = ranked + torch.arange(n_kv)[:, None] * g
    return HeadUnits(
        scores=[scores[heads[:, j]].sum().item() for j in range(g)],
        q_heads=[heads[:, j].tolist() for j in range(g)],
        kv_heads=[[] for _ in range(g)],
        cost=n_kv * q_cost,
        max_remove=g - max(1, math.ceil(min_keep * g)),
    )


@dataclass
class Budget:
    """What ``ratio`` removes, in both measures: of all parameters and of the prunable layer weights."""

    ratio: float
    ratio_of: str
    total: int  # all parameters (a tied embedding counted once)
    prunable: int  # attention projections and MLP weights of every decoder layer, the only ones pruning removes

    @property
    def target(self) -> float:
        return self.ratio * (self.total if self.ratio_of == "total" else self.prunable)

    @property
    def of_total(self) -> float:
        return self.target / self.total

    @property
    def of_layers(self) -> float:
        return self.target / self.prunable

    def describe(self) -> str:
        return (f"removing {self.target / 1e6:,.1f}M parameters: {self.of_total:.1%} of all {self.total / 1e6:,.1f}M, "
                f"{self.of_layers:.1%} of the {self.prunable / 1e6:,.1f}M prunable layer weights")

    def warning(self) -> str | None:
        """One line when a ratio of all parameters falls mostly on the layers (large embeddings)."""
        if self.ratio_of == "total" and self.of_layers > LAYER_SHARE_WARN * self.of_total:
            return (f"--ratio {self.ratio} of all parameters removes {self.of_layers:.0%} of the layer weights (the "
                    f"embeddings are {1 - self.prunable / self.total:.0%} of the model and are not pruned); "
                    f"--ratio-of layers makes the ratio count the layer weights only")
        return None

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, "ratio_of": self.ratio_of, "total": self.total, "prunable": self.prunable,
                "of_total": round(self.of_total, 6), "of_layers": round(self.of_layers, 6)}


def budget(adapter: Adapter, ratio: float, ratio_of: str = "total") -> Budget:
    """Shapes only: known before any calibration."""
    check_ratio_of(ratio_of)
    prunable = 0
    for i, sh in enumerate(adapter.shapes()):
        c = adapter.unit_costs(i)
        prunable += sh.num_heads * c.query_head + sh.num_kv_heads * c.kv_head + sh.intermediate_size * c.neuron
    return Budget(ratio, ratio_of, count_parameters(adapter.model), prunable)


def normalize(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Put one layer's scores on a scale comparable across layers."""
    if how == "zscore":
        return (scores - scores.mean()) / scores.std().clamp_min(1e-12) if scores.numel() > 1 else scores * 0
    return scores / scores.mean().clamp_min(1e-30)


def allocate(
    adapter: Adapter,
    scores: list[LayerScores],
    ratio: float,
    allocation: str = "uniform",
    gqa: str = "query",
    min_keep: float = 0.1,
    normalization: str = "mean",
    head_units: int | None = None,
    ratio_of: str = "total",
) -> PruningPlan:
    check_options(ratio, allocation, gqa, min_keep, normalization)
    shapes = adapter.shapes()
    costs = [adapter.unit_costs(i) for i in range(adapter.num_layers)]
    if allocation == "global":
        scores = [LayerScores(normalize(s.heads, normalization), normalize(s.neurons, normalization)) for s in scores]
    units = [unit_order(s.heads, sh, gqa, c.query_head, c.kv_head, min_keep) for s, sh, c in zip(scores, shapes, costs)]
    need = budget(adapter, ratio, ratio_of)
    total = need.total
    n_heads, n_neurons = _uniform_counts(units, shapes, costs, need.target, ratio, min_keep, head_units)
    if allocation == "global":
        n_heads = _global_counts([u.scores for u in units], [u.max_remove for u in units], sum(n_heads))
        max_neurons = [sh.intermediate_size - _min_neurons(sh, min_keep) for sh in shapes]
        ranked = [s.neurons.sort().values.tolist() for s in scores]
        n_neurons = _global_counts(ranked, max_neurons, sum(n_neurons))
    layers = [_layer_plan(u, k, s.neurons, m, sh) for u, k, s, m, sh in zip(units, n_heads, scores, n_neurons, shapes)]
    removed = sum(k * u.cost for u, k in zip(units, n_heads)) + sum(m * c.neuron for m, c in zip(n_neurons, costs))
    return PruningPlan(
        model_type=adapter.config.model_type, layers=layers, original_shapes=shapes, ratio=ratio,
        allocation=allocation, gqa=gqa, params={"before": total, "after": total - removed}, ratio_of=ratio_of,
    )


def check_ratio_of(ratio_of: str) -> None:
    if ratio_of not in RATIO_OF:
        raise InvalidOptionError(f"unknown --ratio-of {ratio_of!r}; choose from {', '.join(RATIO_OF)}")


def check_options(ratio, allocation, gqa, min_keep, normalization) -> None:
    if not 0.0 < ratio < 1.0:
        raise InvalidOptionError(f"ratio must be in (0, 1), got {ratio}")
    if allocation not in ALLOCATIONS:
        raise InvalidOptionError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    if gqa not in GQA_MODES:
        raise InvalidOptionError(f"unknown gqa mode {gqa!r}; choose from {', '.join(GQA_MODES)}")
    if not 0.0 <= min_keep < 1.0:
        raise InvalidOptionError(f"min_keep must be in [0, 1), got {min_keep}")
    if normalization not in NORMALIZATIONS:
        raise InvalidOptionError(f"unknown normalization {normalization!r}; choose from {', '.join(NORMALIZATIONS)}")


def _min_neurons(shape: LayerShape, min_keep: float) -> int:
    return max(1, math.ceil(min_keep * shape.intermediate_size))


def _uniform_counts(units, shapes, costs, target, ratio, min_keep, head_units=None) -> tuple[list[int], list[int]]:
    """Head units and neurons removed per layer: ``head_units`` (or one fraction) everywhere, neurons absorbing the rest."""
    full = [len(u.scores) * u.cost + sh.intermediate_size * c.neuron for u, sh, c in zip(units, shapes, costs)]
    frac = target / sum(full)
    if frac >= 1.0:
        raise AllocationError(f"ratio {ratio} asks for {target:.0f} parameters but the layers hold only {sum(full)} prunable ones")
    if head_units is not None:
        n_heads = [min(head_units, u.max_remove) for u in units]
        if sum(k * u.cost for k, u in zip(n_heads, units)) > target:
            raise AllocationError(f"removing {head_units} head units per layer takes more than ratio {ratio} of the parameters")
    else:
        n_heads = [min(round(frac * len(u.scores)), u.max_remove) for u in units]
        if sum(k * u.cost for k, u in zip(n_heads, units)) > target:  # rounding up overshot: round down instead
            n_heads = [min(math.floor(frac * len(u.scores)), u.max_remove) for u in units]
    rest = target - sum(k * u.cost for k, u in zip(n_heads, units))
    mlp_total = sum(sh.intermediate_size * c.neuron for sh, c in zip(shapes, costs))
    n_neurons = []
    for i, (sh, c) in enumerate(zip(shapes, costs)):
        m = round(rest * sh.intermediate_size / mlp_total)
        limit = sh.intermediate_size - _min_neurons(sh, min_keep)
        if m > limit:
            raise AllocationError(
                f"ratio {ratio} would remove {m} of {sh.intermediate_size} MLP neurons in layer {i} "
                f"(at most {limit} with min_keep={min_keep}); use a smaller ratio"
            )
        n_neurons.append(m)
    return n_heads, n_neurons


def _global_counts(ranked: list[list[float]], max_remove: list[int], budget: int) -> list[int]:
    """How many of each layer's (ascending) items fall among the ``budget`` lowest overall."""
    pool = [(s, layer, j) for layer, items in enumerate(ranked) for j, s in enumerate(items[: max_remove[layer]])]
    pool.sort()
    counts = [0] * len(ranked)
    for _, layer, _ in pool[:budget]:
        counts[layer] += 1
    return counts


def _layer_plan(units: HeadUnits, k: int, neuron_scores: torch.Tensor, m: int, shape: LayerShape) -> LayerPlan:
    drop_q = {h for hs in units.q_heads[:k] for h in hs}
    drop_kv = {h for hs in units.kv_heads[:k] for h in hs}
    drop_n = set(neuron_scores.argsort(stable=True)[:m].tolist())
    return LayerPlan(
        q_heads=[h for h in range(shape.num_heads) if h not in drop_q],
        kv_heads=[h for h in range(shape.num_kv_heads) if h not in drop_kv],
        neurons=[j for j in range(shape.intermediate_size) if j not in drop_n],
    )
