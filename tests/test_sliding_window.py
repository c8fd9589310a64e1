"""Families whose config.sliding_window applies to every layer (Mistral, Phi-3): the window reaches the graph.

Gemma 3's per-layer-type windows are tested in tests/test_gemma3.py; here one window covers all layers and no
``layer_types`` exists, which the exporter once ignored (a Mistral 7B v0.1 package attended past 4096 tokens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import MistralConfig, Phi3Config

from amp_edge.models.adapters import get_adapter
from amp_edge_runtime.decoder import OnnxDecoder
from exporters import ExportOptions, QuantSpec, export

from .tiny import COMMON, char_tokenizer, model_from_config

WINDOW = 8


def _config(family: str, head_dim: int, window: int | None = WINDOW):
    if family == "mistral":
        return MistralConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, sliding_window=window, **COMMON)
    return Phi3Config(num_attention_heads=64 // head_dim, num_key_value_heads=64 // head_dim, sliding_window=window, **COMMON)


@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_every_layer_gets_the_configs_window(family):
    assert [get_adapter(model_from_config(_config(family, 16))).sliding_window(i) for i in range(3)] == [WINDOW] * 3
    assert get_adapter(model_from_config(_config(family, 16, None))).sliding_window(0) is None
    # a window past max_position_embeddings (256 here; Phi-3-mini-128k: 262144 of 131072) never masks anything
    assert get_adapter(model_from_config(_config(family, 16, 4096))).sliding_window(0) is None


@pytest.mark.parametrize("family, head_dim, stream", [("mistral", 16, True), ("mistral", 8, False), ("phi3", 16, False),
                                                      ("phi3", 8, True)])
def test_export_masks_past_the_window(tmp_path, family, head_dim, stream):
    """head_dim 16: GroupQueryAttention's local_window_size; 8: the plain attention graph's mask. The package's
    logits on a 40-token prompt equal transformers' (which applies the window) and differ from a window-less model's."""
    model = model_from_config(_config(family, head_dim))
    src = tmp_path / "src"
    model.save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    result = export(str(src), tmp_path / "pkg", ExportOptions(ratio=0, stream=stream, quant=QuantSpec("fp32")))
    manifest = result.manifest
    assert bool(manifest.get("streamed")) == stream
    assert bool(manifest["graph"].get("gqa_layers")) == (head_dim == 16)
    shapes = {s["name"]: s for s in manifest["parity"]["shapes"]}
    assert shapes[f"longer-than-window-{WINDOW}"]["greedy_equal"] and manifest["parity"]["max_abs_diff"] < 1e-4

    ids = np.random.default_rng(0).integers(4, 128, (1, 5 * WINDOW))
    decoder = OnnxDecoder(tmp_path / "pkg")
    got, _ = decoder.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], decoder.empty_cache(1))
    no_window = model_from_config(_config(family, head_dim, None))
    no_window.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits.numpy()
        unmasked = no_window(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got[0, WINDOW:] - unmasked[0, WINDOW:]).max() > 1e-2  # the window changes these positions
