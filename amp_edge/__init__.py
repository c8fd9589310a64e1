"""amp-edge: AMP structured pruning of small LLMs (attention heads and MLP neurons), ready for deployment.

The public API is imported on first use, so ``amp_edge.errors`` and ``amp_edge.io`` load without torch.

    models/     where models come from and go to (sources, GGUF cache, checkpoints, adapters per family)
    data/       calibration and recovery text
    pruning/    score -> allocate -> split -> plan -> surgery (-> refit); pipeline.py runs them
    recovery/   distillation and LoRA after pruning
    evaluation/ perplexity, zero-shot tasks, comparisons
    cli/        the ``amp-edge`` command, one module per command
"""

from __future__ import annotations

import importlib

from amp_edge.errors import AmpEdgeError
from amp_edge.versions import __version__

_API = {
    "get_adapter": "amp_edge.models.adapters", "supported_model_types": "amp_edge.models.adapters",
    "DEFAULT_MODEL": "amp_edge.models.sources", "load_model": "amp_edge.models.sources",
    "load_pruned": "amp_edge.models.checkpoint", "save_pruned": "amp_edge.models.checkpoint",
    "CalibrationSpec": "amp_edge.data.calibration", "calibration_batches": "amp_edge.data.calibration",
    "criteria": "amp_edge.pruning.scoring", "score": "amp_edge.pruning.scoring",
    "allocate": "amp_edge.pruning.allocation", "split_plan": "amp_edge.pruning.split",
    "LayerPlan": "amp_edge.pruning.plan", "PruningPlan": "amp_edge.pruning.plan",
    "apply_plan": "amp_edge.pruning.surgery", "count_parameters": "amp_edge.pruning.surgery",
    "PruneOptions": "amp_edge.pruning.pipeline", "PruneResult": "amp_edge.pruning.pipeline",
    "make_plan": "amp_edge.pruning.pipeline", "prune": "amp_edge.pruning.pipeline",
    "RecoveryResult": "amp_edge.recovery.train", "RecoverySpec": "amp_edge.recovery.train", "recover": "amp_edge.recovery.train",
    "perplexity": "amp_edge.evaluation.perplexity",
}
__all__ = sorted(["AmpEdgeError", "__version__", *_API])


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'amp_edge' has no attribute {name!r}")


def __dir__():
    return __all__
