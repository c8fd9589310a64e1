"""A package run one decoder layer at a time (exporters.segmented): the same logits as one ONNX Runtime session, one
layer's weights per piece, and the fp16 export validated that way (ONNX Runtime's CPU session would hold fp32 copies
of every fp16 weight)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from amp_edge.errors import ExportValidationError
from amp_edge_runtime.decoder import OnnxDecoder
from exporters import ExportOptions, QuantSpec, export
from exporters.segmented import SegmentedGraph, layer_of, teacher_forced
from tests.test_export import pruned
from tests.tiny import save_tiny


def _session_teacher_forced(pkg, ids, mask, tokens) -> np.ndarray:
    """The same calls through one session (exporters.validate's teacher forcing)."""
    decoder = OnnxDecoder(pkg)
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    logits, cache = decoder.step(ids, mask, positions, decoder.empty_cache(len(ids)))
    got, cur = [logits], mask
    for t in range(tokens.shape[1] - 1):
        cur = np.concatenate([cur, np.ones((len(ids), 1), dtype=np.int64)], 1)
        logits, cache = decoder.step(tokens[:, t:t + 1], cur, positions[:, -1:] + t + 1, cache)
        got.append(logits)
    return np.concatenate(got, 1).astype(np.float32)


def _batch(padding: str):
    ids = np.array([[5, 9, 33, 70, 12, 44, 7, 81, 3, 17], [8, 21, 40, 66, 90, 11, 0, 0, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    if padding == "left":
        ids[1], mask[1] = np.roll(ids[1], 4), np.roll(mask[1], 4)
    tokens = np.array([[14, 60, 72, 9, 30, 101, 55], [7, 7, 19, 88, 42, 3, 64]], dtype=np.int64)
    return ids, mask, tokens


@pytest.mark.parametrize("family, dtype", [("llama", "fp16"), ("qwen3-gqa", "int4"), ("gemma3", "fp32"), ("phi3", "fp16")])
def test_layer_by_layer_equals_one_session(tmp_path, family, dtype):
    src = save_tiny(family, tmp_path / "dense")
    result = export(str(src), tmp_path / "pkg", ExportOptions(ratio=0, quant=QuantSpec(dtype), validate=False))
    pkg = tmp_path / "pkg"
    ids, mask, tokens = _batch(result.manifest["graph"]["padding"])
    # gemma3's window is 8: the 10-token prompt and 6 cached steps run past it
    want = _session_teacher_forced(pkg, ids, mask, tokens)
    got = teacher_forced(pkg, [(ids, mask, tokens)])[0]
    valid = np.concatenate([mask, np.ones_like(tokens[:, :-1])], 1).astype(bool)
    assert got.shape == want.shape == (2, ids.shape[1] + tokens.shape[1] - 1, want.shape[-1])
    assert np.abs(got - want)[valid].max() <= 1e-5


def test_each_piece_holds_one_layers_weights(tmp_path):
    src = save_tiny("llama", tmp_path / "dense")
    export(str(src), tmp_path / "pkg", ExportOptions(ratio=0, quant=QuantSpec("fp16"), validate=False))
    seg = SegmentedGraph(tmp_path / "pkg")
    graph = seg.model.graph
    assert len(seg.pieces) == 3  # one per decoder layer
    inits = {i.name for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    made = {o: i for i, n in enumerate(graph.node) for o in n.output}

    def dynamic(i):  # reads a graph input, directly or through what it reads
        return any(x in graph_inputs or (x in made and dynamic(made[x])) for x in graph.node[i].input)

    placed = sorted(i for p in seg.pieces for i in p if dynamic(i))
    assert placed == [i for i in range(len(graph.node)) if dynamic(i)]  # every graph-input-dependent node once
    for k, nodes in enumerate(seg.pieces):
        layers = {layer_of(x) for i in nodes for x in graph.node[i].input if x in inits} - {None}
        assert layers == {k}  # and the constants it reads, repeated where needed
    # edges run forward only: a piece reads nothing a later piece makes
    where = {o: k for k, nodes in enumerate(seg.pieces) for i in nodes if dynamic(i) for o in graph.node[i].output}
    for k, nodes in enumerate(seg.pieces):
        assert all(where.get(x, -1) <= k for i in nodes for x in graph.node[i].input)


def test_fp16_export_validates_without_a_whole_package_session(tmp_path, monkeypatch):
    """No OnnxDecoder over the whole fp16 package is opened; the validation still judges it, and fails a broken one."""
    import exporters.package

    src = pruned(tmp_path, "llama", "uniform")

    def no_session(*_a, **_k):
        raise AssertionError("a whole-package session was opened")

    monkeypatch.setattr(exporters.package, "OnnxDecoder", no_session)
    ok = export(str(src), tmp_path / "pkg", ExportOptions(quant=QuantSpec("fp16")))
    parity = ok.manifest["parity"]
    assert ok.manifest["streamed"] and parity["ok"] and parity["top1_agreement"] >= 0.95
    assert all(s["decode_steps"] == 31 for s in parity["shapes"])

    # the same package with layer 1's down projection zeroed: the layer-by-layer run sees it
    import exporters.segmented

    real = exporters.segmented.SegmentedGraph.__init__

    def broken(self, folder, options=None):
        real(self, folder, options)
        for init in self.model.graph.initializer:
            if layer_of(init.name) == 1 and "down_proj" in init.name:
                init.ClearField("external_data")
                init.data_location = onnx.TensorProto.DEFAULT
                init.raw_data = np.zeros(list(init.dims), np.float16).tobytes()

    monkeypatch.setattr(exporters.segmented.SegmentedGraph, "__init__", broken)
    with pytest.raises(ExportValidationError, match="top-1 agreement"):
        export(str(src), tmp_path / "bad", ExportOptions(quant=QuantSpec("fp16"), min_top1=0.999))
    assert not (tmp_path / "bad").exists()
