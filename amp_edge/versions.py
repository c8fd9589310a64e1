"""Versions recorded in plans and manifests, so a result says what produced it."""

from importlib import metadata

__version__ = "0.1.0"


def versions() -> dict:
    out = {"amp_edge": __version__}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "optimum-onnx"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
