"""The layer-streamed export (exporters.stream): the same graph and the same logits as the in-memory path."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from amp_edge.errors import DiskSpaceError
from amp_edge_runtime.decoder import OnnxDecoder
from exporters import ExportOptions, QuantSpec, export
from tests.test_export import pruned
from tests.tiny import save_tiny

IDS = np.array([[5, 9, 33, 70, 12, 44, 7, 81]])


def _logits(pkg) -> np.ndarray:
    decoder = OnnxDecoder(pkg)
    logits, _ = decoder.step(IDS, np.ones_like(IDS), np.arange(IDS.shape[1])[None], decoder.empty_cache(1))
    return logits


def _ops(pkg) -> list[tuple[str, str]]:
    return [(n.op_type, n.name) for n in onnx.load(str(pkg / "model.onnx"), load_external_data=False).graph.node]


@pytest.mark.parametrize("family, dtype", [("llama", "fp32"), ("qwen2", "int4"), ("phi3", "int4"), ("phi", "fp32"),
                                           ("qwen3", "fp16"), ("mistral", "int8"), ("gemma3", "fp32")])
def test_streamed_equals_in_memory(tmp_path, family, dtype):
    src = pruned(tmp_path, family, "global")  # per-layer shapes
    quant = QuantSpec(dtype)
    new = export(str(src), tmp_path / "new", ExportOptions(quant=quant, min_top1=0))
    old = export(str(src), tmp_path / "old", ExportOptions(quant=quant, min_top1=0, stream=False))
    assert new.manifest["streamed"] and "streamed" not in old.manifest
    assert _ops(tmp_path / "new") == _ops(tmp_path / "old")
    assert np.abs(_logits(tmp_path / "new") - _logits(tmp_path / "old")).max() == 0.0
    parity = new.manifest["parity"]
    # Gemma 3's sliding layers add a prompt longer than the window (its right-padded batch: each row alone)
    assert parity["ok"] and len(parity["shapes"]) == (3 if family == "gemma3" else 2)
    if dtype == "fp32":
        assert parity["max_abs_diff"] <= 1e-4 and all(s["greedy_equal"] for s in parity["shapes"])
    # the same weights, only aligned differently in model.onnx.data
    assert abs(new.manifest["onnx_bytes"] - old.manifest["onnx_bytes"]) < 64 * 1024


def test_streamed_gqa_graph_and_tied_int4(tmp_path):
    dense = save_tiny("qwen3-gqa", tmp_path / "dense")
    new = export(str(dense), tmp_path / "new", ExportOptions(ratio=0, quant=QuantSpec("int4"), min_top1=0))
    export(str(dense), tmp_path / "old", ExportOptions(ratio=0, quant=QuantSpec("int4"), min_top1=0, stream=False))
    assert new.manifest["graph"]["gqa_layers"] == [0, 1, 2] and new.manifest["streamed"]
    assert _ops(tmp_path / "new") == _ops(tmp_path / "old")
    assert np.abs(_logits(tmp_path / "new") - _logits(tmp_path / "old")).max() == 0.0


def test_streamed_fp32_bound_fails_and_dynamic_int8_keeps_memory_path(tmp_path):
    dense = save_tiny("llama", tmp_path / "dense")
    from amp_edge.errors import ExportValidationError

    with pytest.raises(ExportValidationError, match="max \\|Δlogits\\|"):
        export(str(dense), tmp_path / "strict", ExportOptions(ratio=0, max_abs_diff=1e-12))
    assert not (tmp_path / "strict").exists()
    from exporters.stream import streamable

    assert not streamable(QuantSpec("int8", int8_scheme="dynamic")) and streamable(QuantSpec("int8"))


def test_streamed_refuses_a_full_disk(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    dense = save_tiny("llama", tmp_path / "dense")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**6, 10**6, 1000))
    with pytest.raises(DiskSpaceError, match="the package needs about .* GB"):
        export(str(dense), tmp_path / "pkg", ExportOptions(ratio=0))
    assert not (tmp_path / "pkg").exists()
