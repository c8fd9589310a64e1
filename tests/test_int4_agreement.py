"""The agreement on the reference's own continuations (exporters.agreement) and the int4 quantizer choice."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from amp_edge.errors import InvalidOptionError
from amp_edge_runtime.decoder import OnnxDecoder
from exporters import ExportOptions, QuantSpec, export
from exporters.agreement import Continuations, agreement, model_forward, onnx_continuations, prompt_ids, torch_continuations

from .tiny import char_tokenizer, save_tiny, tiny_model


class _Fixed:
    """A decoder whose top-1 after any prefix is ``answer(prefix)``."""

    def __init__(self, answer, vocab=16):
        self.answer, self.vocab = answer, vocab

    def empty_cache(self, batch):
        return []

    def step(self, ids, mask, positions, cache):
        logits = np.zeros((*ids.shape, self.vocab), dtype=np.float32)
        for t in range(ids.shape[1]):
            logits[0, t, self.answer(ids[0, :t + 1].tolist())] = 1.0
        return logits, cache


def test_agreement_counts_the_continuation_positions_only():
    ref = Continuations(rows=[[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]], starts=[3, 2])  # 3 + 2 continuation tokens
    # the answer after a prefix of n tokens: row 1 scores n = 3, 4, 5; row 2 scores n = 2, 3
    right = _Fixed(lambda prefix: {3: 4, 4: 5, 5: 6}.get(len(prefix), 0) if prefix[0] == 1
                   else {2: 9, 3: 10}.get(len(prefix), 0))
    assert agreement(right, ref) == 1.0
    # wrong on the row's last token and everywhere in the prompt (never scored)
    partly = _Fixed(lambda prefix: {3: 4, 4: 5}.get(len(prefix), 0) if prefix[0] == 1 else {2: 9}.get(len(prefix), 0))
    assert agreement(partly, ref) == 3 / 5


def test_batched_cached_continuations_equal_one_prompt_at_a_time():
    model = tiny_model("gemma3")
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [20, 21, 22]]
    batched = torch_continuations(model_forward(model), prompts, steps=12)
    rows = []
    with torch.no_grad():
        for p in prompts:  # no cache, no padding: the whole row every step
            row = list(p)
            for _ in range(12):
                row.append(int(model(input_ids=torch.tensor([row])).logits[0, -1].argmax()))
            rows.append(row)
    assert batched.rows == rows and batched.starts == [4, 6, 3]


def test_exports_report_it_on_both_paths_and_fp32_agrees_fully(tmp_path):
    dense = save_tiny("llama", tmp_path / "dense")
    fp32 = export(str(dense), tmp_path / "fp32", ExportOptions(ratio=0))
    assert fp32.manifest["parity"]["continuation_agreement"] is None  # fp32 is held to a logits bound instead
    tokenizer = char_tokenizer()
    ref = onnx_continuations(OnnxDecoder(tmp_path / "fp32"), prompt_ids(tokenizer, 128))
    assert agreement(OnnxDecoder(tmp_path / "fp32"), ref) == 1.0
    got = {}
    for stream in (True, False):
        q = export(str(dense), tmp_path / f"int4-{stream}", ExportOptions(ratio=0, quant=QuantSpec("int4"), min_top1=0,
                                                                          stream=stream))
        assert bool(q.manifest.get("streamed")) == stream
        got[stream] = q.manifest["parity"]["continuation_agreement"]
        # the package against the fp32 package's continuations: the same measure, by ONNX Runtime alone
        assert got[stream] == pytest.approx(agreement(OnnxDecoder(tmp_path / f"int4-{stream}"), ref), abs=0.05)
    assert got[True] == got[False] and 0.2 < got[True] < 1.0


def test_hqq_writes_float_zero_points_and_a_separate_embedding(tmp_path):
    dense = save_tiny("llama", tmp_path / "dense")
    q = export(str(dense), tmp_path / "hqq", ExportOptions(ratio=0, quant=QuantSpec("int4", method="hqq"), min_top1=0))
    assert q.manifest["quantization"]["method"] == "hqq" and "streamed" not in q.manifest  # a whole-graph quantizer
    graph = onnx.load(str(tmp_path / "hqq" / "model.onnx"))
    inits = {t.name: t for t in graph.graph.initializer}
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(inits[n.input[3]].data_type == onnx.TensorProto.FLOAT for n in nbits)
    with pytest.raises(InvalidOptionError, match="--quant-method hqq applies to int4, not int8"):
        QuantSpec("int8", method="hqq").check(17)
    with pytest.raises(InvalidOptionError, match="unknown quantization method 'gptq'"):
        QuantSpec("int4", method="gptq").check(17)
