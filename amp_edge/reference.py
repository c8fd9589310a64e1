"""The PyTorch model behind an exported package, rebuilt from its manifest (for reference measurements)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import PackageError
from .plan import PLAN_FILE, PruningPlan
from .sources import load_model, resolve
from .surgery import apply_plan


def model_from_package(package: str | Path):
    """Load the package's source and replay its plan when the source is the dense model."""
    manifest = Path(package) / "amp_edge.json"
    if not manifest.is_file():
        raise PackageError(f"{package} has no amp_edge.json, so its PyTorch source is unknown")
    m = json.loads(manifest.read_text())
    source = m["source"]["argument"]
    model = load_model(source, dtype="float32").model
    where = resolve(source)
    already_pruned = where["kind"] == "folder" and (Path(where["path"]) / PLAN_FILE).is_file()
    if m.get("plan") and not already_pruned:
        apply_plan(model, PruningPlan.from_dict(m["plan"]))
    return model
