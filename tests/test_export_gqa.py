"""GroupQueryAttention export: one GQA node per layer with that layer's heads, parity on right-padded batches,
per-layer fallback, --attention sdpa (the plain graph), bad option values, quantized GQA graphs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from amp_edge import CalibrationSpec, load_model
from amp_edge.models.adapters import LayerShape, get_adapter
from amp_edge.errors import InvalidOptionError
from amp_edge.pruning.pipeline import PruneOptions, prune
from exporters import ExportOptions, GraphSpec, QuantSpec, export
from exporters.attention import ineligible
from amp_edge_runtime.decoder import OnnxDecoder
from tests.conftest import SMALL_CALIB
from tests.tiny import matmul_bits, save_tiny, staggered_plan, tiny_model


def _pruned(tmp_path: Path, family: str, allocation: str = "global") -> Path:
    dense = save_tiny(family, tmp_path / "dense")
    out = tmp_path / "pruned"
    prune(str(dense), out, PruneOptions(ratio=0.3, criterion="random", allocation=allocation, min_keep=0.25,
                                          calibration=CalibrationSpec(**SMALL_CALIB)))
    return out


def _graph(pkg: Path) -> onnx.ModelProto:
    return onnx.load(str(pkg / "model.onnx"), load_external_data=False)


def _gqa_nodes(pkg: Path) -> list[dict]:
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            for n in _graph(pkg).graph.node if n.op_type == "GroupQueryAttention"]


def _right_padded(rows):
    width = max(len(r) for r in rows)
    ids, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def test_one_gqa_node_per_layer_with_its_own_heads(tmp_path):
    save_tiny("llama-gqa", tmp_path / "dense")
    staggered_plan(tiny_model("llama-gqa")).save(tmp_path / "plan.json")  # layers keep different heads and KV heads
    src = tmp_path / "pruned"
    prune(str(tmp_path / "dense"), src, PruneOptions(), plan_path=tmp_path / "plan.json")
    result = export(str(src), tmp_path / "pkg", ExportOptions())
    shapes = get_adapter(load_model(str(src)).model).shapes()
    assert len({(s.num_heads, s.num_kv_heads) for s in shapes}) > 1  # a per-layer plan
    nodes = _gqa_nodes(tmp_path / "pkg")
    assert [(n["num_heads"], n["kv_num_heads"]) for n in nodes] == [(s.num_heads, s.num_kv_heads) for s in shapes]
    assert all(n["do_rotary"] == 1 and n["scale"] == pytest.approx(16 ** -0.5) for n in nodes)
    m = result.manifest
    assert m["graph"]["attention"] == "auto" and m["graph"]["gqa_layers"] == [0, 1, 2] and m["graph"]["padding"] == "right"
    assert m["parity"]["ok"] and m["parity"]["max_abs_diff"] <= 1e-3 and all(s["greedy_equal"] for s in m["parity"]["shapes"])
    ops = Counter(n.op_type for n in _graph(tmp_path / "pkg").graph.node)
    assert ops["Softmax"] == 0 and ops["RotaryEmbedding"] == 0  # no plain attention left
    names = [n.name for n in _graph(tmp_path / "pkg").graph.node if n.op_type == "MatMul"]
    assert sum("qkv_proj" in n.split("/") for n in names) == 3 and not any("q_proj" in n.split("/") for n in names)
    # fp32 keeps gate and up apart (faster there); the quantized graphs pack them (test_int4 below)
    assert sum("gate_proj" in n.split("/") for n in names) == 3 and not any("gate_up_proj" in n.split("/") for n in names)
    assert m["graph"]["pack_mlp"] is False
    # positions come from the mask in a GQA graph: no position_ids input, and genai is told so
    assert "position_ids" not in {i.name for i in _graph(tmp_path / "pkg").graph.input}
    genai = json.loads((tmp_path / "pkg" / "genai_config.json").read_text())
    assert "position_ids" not in genai["model"]["decoder"]["inputs"] and genai["search"]["past_present_share_buffer"]


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-gqa", "qwen3-gqa", "phi3-gqa32"])
def test_fp32_parity_right_padded_prefill_and_decode(tmp_path, family):
    model = tiny_model(family)
    save_tiny(family, tmp_path / "dense")
    export(str(tmp_path / "dense"), tmp_path / "pkg", ExportOptions(ratio=0, validate=False))
    assert len(_gqa_nodes(tmp_path / "pkg")) == 3
    decoder = OnnxDecoder(tmp_path / "pkg")
    ids, mask = _right_padded([[5, 9, 33, 70, 12, 44, 7, 8, 9], [11, 12, 13, 14, 15]])
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos), use_cache=True)
    logits, cache = decoder.step(ids, mask, pos, decoder.empty_cache(2))
    worst = float(np.abs(logits - ref.logits.numpy())[mask.astype(bool)].max())
    past, nxt = ref.past_key_values, np.array([[3], [4]])
    for _ in range(4):
        mask, pos = np.concatenate([mask, np.ones((2, 1), np.int64)], 1), pos[:, -1:] + 1
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(nxt), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                        past_key_values=past, use_cache=True)
        logits, cache = decoder.step(nxt, mask, pos, cache)
        worst = max(worst, float(np.abs(logits - ref.logits.numpy()).max()))
        past, nxt = ref.past_key_values, ref.logits[:, -1:].argmax(-1).numpy()
    assert worst < 1e-4
    # greedy generation of a right-padded batch picks each row's last real position: PyTorch's tokens, row by row
    ids, mask = _right_padded([[5, 9, 33, 70, 12, 44], [11, 12, 13]])
    got = decoder.generate(ids, 6, attention_mask=mask)
    for row, n in enumerate(mask.sum(1)):
        seq = torch.tensor(ids[row:row + 1, :n])
        with torch.no_grad():
            for _ in range(6):  # PyTorch greedy without a cache or EOS handling: the plainest reference
                seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], 1)
        assert got[row, ids.shape[1]:].tolist() == seq[0, n:].tolist(), row
    # that generation decoded into one shared max-length buffer per layer (the package's genai_config says so);
    # appending to the cache instead gives the same tokens
    assert decoder.share_buffer and decoder.last_cache[0].shape() == [2, decoder.kv_heads[0], ids.shape[1] + 6, decoder.head_dim]
    appending = OnnxDecoder(tmp_path / "pkg", share_buffer=False)
    assert (appending.generate(ids, 6, attention_mask=mask) == got).all()
    assert appending.last_cache[0].shape()[2] == ids.shape[1] + 5  # the last token's keys are never computed


def test_layer_without_gqa_fallback_to_plain_attention(tmp_path, monkeypatch):
    import exporters.attention as attention

    # heads % kv_heads != 0 in one layer: that layer, and only that one, keeps the plain attention
    model = tiny_model("llama-gqa")
    adapter = get_adapter(model)
    real = type(adapter).layer_shape
    monkeypatch.setattr(type(adapter), "layer_shape", lambda self, i: LayerShape(8, 3, 96) if i == 1 else real(self, i))
    assert list(ineligible(model)) == [1] and "not a multiple of 3" in ineligible(model)[1]
    monkeypatch.undo()

    monkeypatch.setattr(attention, "ineligible", lambda model: {1: "8 query heads are not a multiple of 3 KV heads"})
    dense = save_tiny("llama-gqa", tmp_path / "dense")
    result = export(str(dense), tmp_path / "mixed", ExportOptions(ratio=0))
    assert result.manifest["graph"]["gqa_layers"] == [0, 2] and result.manifest["parity"]["ok"]
    assert len(_gqa_nodes(tmp_path / "mixed")) == 2
    ops = Counter(n.op_type for n in _graph(tmp_path / "mixed").graph.node)
    assert ops["Softmax"] == 1 and "position_ids" in {i.name for i in _graph(tmp_path / "mixed").graph.input}
    assert not json.loads((tmp_path / "mixed" / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
    with pytest.raises(InvalidOptionError, match="--attention gqa: 1 layer\\(s\\) cannot use GroupQueryAttention \\(layer 1: 8 query"):
        export(str(dense), tmp_path / "strict", ExportOptions(ratio=0, graph=GraphSpec(attention="gqa")))
    assert not (tmp_path / "strict").exists()


def test_head_dim_8_keeps_plain_attention_under_auto(tmp_path):
    model = tiny_model("llama")  # head_dim 8: ORT's GQA kernels take multiples of 16
    assert set(ineligible(model).values()) == {"head_dim 8 is not a multiple of 16"}
    dense = save_tiny("llama", tmp_path / "dense")
    result = export(str(dense), tmp_path / "pkg", ExportOptions(ratio=0))
    assert result.manifest["graph"]["gqa_layers"] == [] and result.manifest["graph"]["padding"] == "left"
    assert not _gqa_nodes(tmp_path / "pkg")


def test_sdpa_gives_the_plain_graph(tmp_path):
    dense = save_tiny("llama-gqa", tmp_path / "dense")
    result = export(str(dense), tmp_path / "pkg", ExportOptions(ratio=0, graph=GraphSpec(attention="sdpa")))
    m = result.manifest
    assert m["graph"]["attention"] == "sdpa" and m["graph"]["gqa_layers"] == [] and m["graph"]["padding"] == "left"
    assert m["parity"]["ok"] and all(s["greedy_equal"] for s in m["parity"]["shapes"])
    ops = Counter(n.op_type for n in _graph(tmp_path / "pkg").graph.node)
    assert ops["GroupQueryAttention"] == 0 and ops["Softmax"] == 3 and ops["RotaryEmbedding"] == 6
    assert "position_ids" in {i.name for i in _graph(tmp_path / "pkg").graph.input}


def test_bad_attention_value(tmp_path):
    from typer.testing import CliRunner

    from amp_edge.cli import app

    dense = save_tiny("llama-gqa", tmp_path / "dense")
    with pytest.raises(InvalidOptionError, match="unknown attention 'flash'; choose from auto, gqa, sdpa"):
        export(str(dense), tmp_path / "x", ExportOptions(ratio=0, graph=GraphSpec(attention="flash")))
    r = CliRunner().invoke(app, ["export", str(dense), "--ratio", "0", "--attention", "flash", "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "'flash' is not one of 'auto', 'gqa', 'sdpa'" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "p").exists()


def test_int4_gqa_graph_validates_and_keeps_8bit_by_packed_name(tmp_path):
    dense = save_tiny("llama-gqa", tmp_path / "dense")
    # measured top-1 agreement 0.482 (all-int4: 0.313)
    q = export(str(dense), tmp_path / "int4", ExportOptions(ratio=0, quant=QuantSpec("int4", method="rtn", keep_8bit=("qkv_proj", "lm_head")),
                                                            min_top1=0.43))
    assert q.manifest["parity"]["ok"] and q.manifest["graph"]["gqa_layers"] == [0, 1, 2]
    g = _graph(tmp_path / "int4")
    assert Counter(n.op_type for n in g.graph.node)["GroupQueryAttention"] == 3
    bits = matmul_bits(tmp_path / "int4")
    assert {b for n, b in bits.items() if "qkv_proj" in n or "lm_head" in n} == {8}
    assert {b for n, b in bits.items() if "qkv_proj" not in n and "lm_head" not in n} == {4}
    assert sum("gate_up_proj" in n.split("/") for n in bits) == 3 and q.manifest["graph"]["pack_mlp"] is True
    with pytest.raises(InvalidOptionError, match="no MatMul: q_proj; known: .*qkv_proj"):
        export(str(dense), tmp_path / "bad", ExportOptions(ratio=0, quant=QuantSpec("int4", keep_8bit=("q_proj",))))


def test_fp16_gqa_graph_validates(tmp_path):
    dense = save_tiny("llama-gqa", tmp_path / "dense")
    q = export(str(dense), tmp_path / "fp16", ExportOptions(ratio=0, quant=QuantSpec("fp16"), min_top1=0.95))  # measured 1.000
    assert q.manifest["parity"]["ok"] and len(_gqa_nodes(tmp_path / "fp16")) == 3
