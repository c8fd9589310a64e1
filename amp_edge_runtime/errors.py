"""The root of amp-edge's one error hierarchy, and the errors of its torch-free runtime.

It lives here, not in ``amp_edge``, because an app copies this package without amp-edge or torch;
``amp_edge.errors`` re-exports these and adds the library's own. The CLI turns every ``AmpEdgeError``
into one ``error:`` line and ``exit_code``.
"""


class AmpEdgeError(Exception):
    """Base class of every error that is the user's input, not a bug."""

    exit_code = 2


class PackageError(AmpEdgeError):
    """A folder given as a package is not one (no model.onnx, unreadable graph, missing tokenizer)."""


class BenchError(AmpEdgeError):
    """Bad benchmark input: an unknown provider, a count out of range, an unreadable bench.json."""


class ProviderError(AmpEdgeError):
    """An execution provider that is unknown, not installed, or has no device here."""


class ProviderMismatchError(AmpEdgeError):
    """A provider computes something else than the CPU provider on the same package (amp-edge validate)."""

    exit_code = 1
