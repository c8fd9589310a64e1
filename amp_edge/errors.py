"""Typed errors. Each message names the bad value and what is allowed, so the CLI can print one line.

One hierarchy: every class here derives from ``AmpEdgeError``, which lives in the torch-free runtime package."""


from amp_edge_runtime.errors import AmpEdgeError, BenchError, PackageError, ProviderError, ProviderMismatchError  # noqa: F401  (the root lives torch-free)


class ModelNotFoundError(AmpEdgeError):
    """A model source that does not exist (path, short name or hub id)."""


class ModelLoadError(AmpEdgeError):
    """A model source that exists but cannot be loaded."""


class UnsupportedArchitectureError(AmpEdgeError):
    """A model_type with no registered adapter."""


class InvalidOptionError(AmpEdgeError):
    """An option value outside its allowed range or set."""


class AllocationError(AmpEdgeError):
    """A ratio the model cannot reach without emptying a layer or breaking a GQA group."""


class CalibrationError(AmpEdgeError):
    """Calibration data that is missing, unreadable or empty."""


class PlanError(AmpEdgeError):
    """A pruning plan that is malformed or does not match the model."""


class RecoveryError(AmpEdgeError):
    """Recovery data that is missing or empty, or a resume folder that holds another run's state."""


class OutputExistsError(AmpEdgeError):
    """An output folder that exists and --overwrite was not given."""


class DataError(AmpEdgeError):
    """An evaluation data file that is missing or empty."""


class DiskSpaceError(AmpEdgeError):
    """Not enough free disk for an output; raised before anything is written."""


class ExportError(AmpEdgeError):
    """The graph could not be built or written (tracing failure, full disk)."""


class ExportValidationError(ExportError):
    """The exported graph does not compute what the PyTorch model computes; lists every mismatch."""

    def __init__(self, mismatches: list[str]):
        self.mismatches = mismatches
        super().__init__(f"export validation failed ({len(mismatches)} mismatches): " + "; ".join(mismatches))
