"""ONNX export of (pruned) decoders with KV cache: trace, fuse, quantize, validate, package."""

from .graph import GraphSpec
from .package import MANIFEST, ExportOptions, ExportResult, export
from .quantize import DTYPES, QuantSpec

__all__ = ["DTYPES", "MANIFEST", "ExportOptions", "ExportResult", "GraphSpec", "QuantSpec", "export"]
