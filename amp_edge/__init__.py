"""amp-edge: AMP structured pruning of small LLMs (attention heads and MLP neurons), ready for deployment."""

from .adapters import get_adapter, supported_model_types
from .allocation import allocate
from .calibration import CalibrationSpec, calibration_batches
from .checkpoint import load_pruned, save_pruned
from .errors import AmpEdgeError
from .perplexity import perplexity
from .pipeline import PruneOptions, PruneResult, make_plan, prune
from .plan import LayerPlan, PruningPlan
from .recovery import RecoveryResult, RecoverySpec, recover
from .scoring import criteria, score
from .sources import DEFAULT_MODEL, load_model
from .split import split_plan
from .surgery import apply_plan, count_parameters
from .versions import __version__

__all__ = [
    "AmpEdgeError", "CalibrationSpec", "DEFAULT_MODEL", "LayerPlan", "PruneOptions", "PruneResult", "PruningPlan",
    "RecoveryResult", "RecoverySpec", "recover",
    "__version__", "allocate", "apply_plan", "calibration_batches", "count_parameters", "criteria", "get_adapter",
    "load_model", "load_pruned", "make_plan", "perplexity", "prune", "save_pruned", "score", "split_plan", "supported_model_types",
]
