"""The pruning plan: which heads and neurons each layer keeps, and how that was decided. Plain data."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from amp_edge.models.adapters import Adapter, LayerShape
from amp_edge.errors import PlanError

PLAN_FORMAT = 1
PLAN_FILE = "amp_edge_plan.json"


@dataclass
class LayerPlan:
    """Kept indices, in the layer's current numbering, sorted ascending."""

    q_heads: list[int]
    kv_heads: list[int]
    neurons: list[int]

    @property
    def shape(self) -> LayerShape:
        return LayerShape(len(self.q_heads), len(self.kv_heads), len(self.neurons))


@dataclass
class PruningPlan:
    model_type: str
    layers: list[LayerPlan]
    original_shapes: list[LayerShape]
    criterion: str = "amp"
    ratio: float = 0.0
    ratio_of: str = "total"  # what ratio counts: all parameters | the prunable layer weights (allocation.Budget)
    allocation: str = "uniform"
    gqa: str = "query"
    calibration: dict = field(default_factory=dict)
    head_split: dict = field(default_factory=dict)  # how the head/MLP share was chosen (amp_edge.pruning.split)
    source: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    @property
    def is_uniform(self) -> bool:
        """True when every layer ends with the same shape, so a standard config describes the model."""
        return len({lp.shape for lp in self.layers}) == 1

    @classmethod
    def keep_all(cls, adapter: Adapter, **meta) -> PruningPlan:
        shapes = adapter.shapes()
        layers = [LayerPlan(list(range(s.num_heads)), list(range(s.num_kv_heads)), list(range(s.intermediate_size))) for s in shapes]
        return cls(model_type=adapter.config.model_type, layers=layers, original_shapes=shapes, **meta)

    # --- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = PLAN_FORMAT
        d["original_shapes"] = [asdict(s) for s in self.original_shapes]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PruningPlan:
        try:
            if d.get("format") != PLAN_FORMAT:
                raise PlanError(f"plan format {d.get('format')!r} is not supported (expected {PLAN_FORMAT})")
            fields = {k: v for k, v in d.items() if k != "format"}
            fields["layers"] = [LayerPlan(**lp) for lp in d["layers"]]
            fields["original_shapes"] = [LayerShape(**s) for s in d["original_shapes"]]
            return cls(**fields)
        except (KeyError, TypeError, AttributeError) as e:
            raise PlanError(f"malformed plan: {e!r}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PlanError(f"cannot read plan {path}: {e}") from None
        if not isinstance(data, dict):
            raise PlanError(f"plan {path} is not a JSON object")
        return cls.from_dict(data)


def _check_indices(where: str, kind: str, idx: list, limit: int) -> None:
    if not idx:
        raise PlanError(f"{where}: keeps no {kind} (at least one is required)")
    if any(not isinstance(v, int) or isinstance(v, bool) for v in idx):
        raise PlanError(f"{where}: {kind} indices must be integers, got {idx[:5]}...")
    if sorted(set(idx)) != list(idx):
        raise PlanError(f"{where}: {kind} indices must be sorted and unique")
    if idx[0] < 0 or idx[-1] >= limit:
        raise PlanError(f"{where}: {kind} index out of range 0..{limit - 1}: {idx[0] if idx[0] < 0 else idx[-1]}")


def validate_plan(plan: PruningPlan, adapter: Adapter) -> None:
    """Check the whole plan against the model before any weight is touched."""
    model_type = adapter.config.model_type
    if plan.model_type != model_type:
        raise PlanError(f"plan is for model_type {plan.model_type!r}, the model is {model_type!r}")
    if len(plan.layers) != adapter.num_layers:
        raise PlanError(f"plan has {len(plan.layers)} layers, the model has {adapter.num_layers}")
    shapes = adapter.shapes()
    if plan.original_shapes and plan.original_shapes != shapes:
        i = next(i for i, (a, b) in enumerate(zip(plan.original_shapes, shapes)) if a != b)
        raise PlanError(f"plan was made for layer {i} of shape {plan.original_shapes[i]}, the model's is {shapes[i]}")
    for i, (lp, shape) in enumerate(zip(plan.layers, shapes)):
        where = f"layer {i}"
        _check_indices(where, "query heads", lp.q_heads, shape.num_heads)
        _check_indices(where, "KV heads", lp.kv_heads, shape.num_kv_heads)
        _check_indices(where, "neurons", lp.neurons, shape.intermediate_size)
        groups: dict[int, int] = {}
        for q in lp.q_heads:
            groups[q // shape.group_size] = groups.get(q // shape.group_size, 0) + 1
        if sorted(groups) != lp.kv_heads:
            raise PlanError(
                f"{where}: kept query heads {lp.q_heads} use KV groups {sorted(groups)}, but the plan keeps KV heads {lp.kv_heads}"
            )
        if len(set(groups.values())) != 1:
            raise PlanError(f"{where}: GQA groups keep unequal numbers of query heads {groups}; each kept group must keep the same count")
