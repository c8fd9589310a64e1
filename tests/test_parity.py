"""Independent parity: ONNX Runtime against PyTorch, computed here (not by exporters/validate.py), for every family
with plans that remove whole KV groups, per layer and uniformly, so each layer's KV cache shape is exported and
checked. And the registry rule: every supported model type has a tiny config, an export test and this parity test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from amp_edge import load_pruned, supported_model_types
from amp_edge.models.adapters import get_adapter
from amp_edge.pruning.pipeline import PruneOptions, prune
from amp_edge_runtime.decoder import OnnxDecoder
from exporters import ExportOptions, export
from tests import test_export
from tests.tiny import FAMILIES, save_tiny, staggered_plan, tiny_model

PROMPT = np.array([[5, 9, 33, 70, 12, 44, 7, 81]])
# (tiny config, plan): "staggered" is a hand-written plan whose layers keep different KV groups (every family, and
# the GQA-graph configs with head_dim 16); "global" and "uniform" come from the pruning pipeline with --gqa group.
CASES = [(f, "staggered") for f in FAMILIES + ["llama-gqa", "qwen3-gqa"]] + [("mistral", "global")] + \
        [(f, "uniform") for f in ("llama", "qwen2", "phi3-gqa")]
PER_LAYER_KV = {case for case in CASES if case[1] != "uniform"}


def _kv_heads(model) -> list[int]:
    return [s.num_kv_heads for s in get_adapter(model).shapes()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    def build(family: str, allocation: str) -> tuple[Path, Path, list[int]]:
        root = tmp_path_factory.mktemp(f"{family}-{allocation}")
        dense = save_tiny(family, root / "dense")
        opts = PruneOptions(ratio=0.3, criterion="random", allocation=allocation, gqa="group", min_keep=0.25, heads="proportional")
        plan = None
        if allocation == "staggered":
            plan = root / "plan.json"
            staggered_plan(tiny_model(family)).save(plan)
        prune(str(dense), root / "pruned", opts, plan_path=plan)
        export(str(root / "pruned"), root / "pkg", ExportOptions(validate=False))  # the check is this test's own
        return root / "pruned", root / "pkg", _kv_heads(tiny_model(family))

    return build


@pytest.mark.parametrize("family, allocation", CASES)
def test_onnx_matches_pytorch_with_whole_kv_groups_removed(exported, family, allocation):
    ckpt, pkg, dense_kv = exported(family, allocation)
    model = load_pruned(ckpt).eval()
    kv = _kv_heads(model)
    assert sum(kv) < sum(dense_kv)  # KV groups are gone: the cache itself is smaller
    if (family, allocation) in PER_LAYER_KV:
        assert len(set(kv)) > 1, kv  # layers keep different numbers of KV heads
    if (family, allocation) in PER_LAYER_KV:
        config = json.loads((ckpt / "config.json").read_text())
        assert config["amp_edge_layers"]["num_key_value_heads"] == kv
    decoder = OnnxDecoder(pkg, share_buffer=False)
    assert decoder.kv_heads == kv and decoder.head_dim == get_adapter(model).head_dim
    ids, mask = PROMPT, np.ones_like(PROMPT)
    pos = np.arange(ids.shape[1])[None]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), use_cache=True)
    logits, cache = decoder.step(ids, mask, pos, decoder.empty_cache(1))
    worst = float(np.abs(logits - ref.logits.numpy()).max())
    past, token = ref.past_key_values, ref.logits[:, -1:].argmax(-1).numpy()
    for _ in range(4):  # decode steps through the exported KV cache
        mask, pos = np.concatenate([mask, [[1]]], 1), pos[:, -1:] + 1
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(token), past_key_values=past, use_cache=True)
        logits, cache = decoder.step(token, mask, pos, cache)
        worst = max(worst, float(np.abs(logits - ref.logits.numpy()).max()))
        assert (logits[:, -1].argmax(-1) == ref.logits[:, -1].argmax(-1).numpy()).all()
        past, token = ref.past_key_values, ref.logits[:, -1:].argmax(-1).numpy()
    assert [c.shape()[1] for c in cache[::2]] == kv and all(c.shape()[2] == PROMPT.shape[1] + 4 for c in cache)
    assert worst < 1e-4, worst


def _model_type(name: str) -> str:
    return tiny_model(name).config.model_type


def test_every_supported_model_type_has_a_tiny_config_an_export_test_and_a_parity_test():
    supported = set(supported_model_types())
    assert supported <= {_model_type(f) for f in FAMILIES}, "add a tiny config to tests/tiny.py"
    exported = set(test_export.test_fp32_parity_per_layer_every_family.pytestmark[0].args[1])
    assert supported <= {_model_type(f) for f in exported}, "tests/test_export.py must export every family"
    assert supported <= {_model_type(f) for f, _ in CASES}, "CASES above must cover every family"
