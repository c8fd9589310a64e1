"""ONNX export of (pruned) decoders with KV cache: trace, fuse, quantize, validate, package."""

from exporters.graph import GraphSpec
from exporters.package import MANIFEST, ExportOptions, ExportResult, export
from exporters.quantize import DTYPES, QuantSpec

__all__ = ["DTYPES", "MANIFEST", "ExportOptions", "ExportResult", "GraphSpec", "QuantSpec", "export"]
