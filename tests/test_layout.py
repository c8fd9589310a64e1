"""The layering docs/layout.md promises, checked on the source: what an app copies stays torch-free and self-contained,
the library does not reach up into the exporters or the bench, and no package keeps a per-family table."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _roots(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def _files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_runtime_imports_nothing_of_amp_edge_or_torch():
    for f in _files("amp_edge_runtime"):
        assert not _roots(_imports(f)) & {"amp_edge", "torch", "transformers", "onnx", "exporters", "runtime_bench"}, f


def test_the_library_does_not_import_exporters_or_the_bench():
    for f in _files("amp_edge"):
        if "cli" in f.relative_to(ROOT / "amp_edge").parts:
            continue
        assert not _roots(_imports(f)) & {"exporters", "runtime_bench"}, f


def test_the_bench_loads_torch_and_amp_edge_only_inside_the_reference_worker():
    for f in _files("runtime_bench"):
        assert not _roots(_imports(f, top_level_only=True)) & {"torch", "transformers", "amp_edge", "onnx"} - (
            {"onnx"} if f.name == "graph_bytes.py" else set()), f


def test_no_per_family_tables_outside_the_adapters():
    # model type names belong to the adapters (and the tiny test configs); elsewhere a name is a per-family table
    families = ("\"llama\"", "\"mistral\"", "\"qwen2\"", "\"qwen3\"", "\"phi3\"")
    for package in ("exporters", "runtime_bench", "amp_edge_runtime", "amp_edge"):
        for f in _files(package):
            if "adapters" in f.parts:
                continue
            text = f.read_text()
            assert not [name for name in families if name in text], f


@pytest.mark.parametrize("module", ["amp_edge.errors", "amp_edge.io", "amp_edge_runtime.decoder"])
def test_leaf_modules_import_without_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_one_error_hierarchy():
    from amp_edge import errors
    from amp_edge_runtime.errors import AmpEdgeError

    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert errors.AmpEdgeError is AmpEdgeError and all(issubclass(c, AmpEdgeError) for c in classes)
    assert {errors.PackageError, errors.BenchError} <= set(classes)
