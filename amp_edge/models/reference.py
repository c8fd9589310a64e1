"""The PyTorch model behind an exported package, rebuilt from its manifest (for reference measurements)."""

from __future__ import annotations

import json
from pathlib import Path

from amp_edge.models.sources import is_pruned_checkpoint
from amp_edge.errors import PackageError
from amp_edge.pruning.plan import PruningPlan
from amp_edge.models.sources import load_model
from amp_edge.pruning.surgery import apply_plan


def model_from_package(package: str | Path):
    """Load the package's source and replay its plan when the source is the dense model."""
    manifest = Path(package) / "amp_edge.json"
    if not manifest.is_file():
        raise PackageError(f"{package} has no amp_edge.json, so its PyTorch source is unknown")
    m = json.loads(manifest.read_text())
    source = m["source"]["argument"]
    if m.get("refit"):
        raise PackageError(f"{package} was refitted while exporting (export --ratio --refit), so replaying its plan "
                           "does not give its weights; prune with --refit to a checkpoint and export that instead")
    model = load_model(source, dtype="float32").model
    if m.get("plan") and not is_pruned_checkpoint(source):
        apply_plan(model, PruningPlan.from_dict(m["plan"]))
    return model
