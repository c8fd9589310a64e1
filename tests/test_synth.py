"""benchmarks.synth: real-shape random checkpoints, written shard by shard."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import synth
from tests.tiny import char_tokenizer


def test_tiny_shape_is_a_standard_sharded_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m"
    # 64 KiB shards: the 3-layer model takes many, so the shard loop and the index are exercised
    info = synth.write("tiny-llama", out, layers=2, shard_bytes=64 * 1024, progress=lambda m: None, tokenizer=char_tokenizer())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert info["shards"] == len(files) > 3
    assert all((out / f).is_file() for f in files)
    assert index["metadata"]["total_size"] == info["bytes"] == 2 * info["params"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.vocab_size == 1000  # the shape's own, wider than the 100-token tokenizer
    w = model.model.layers[1].mlp.down_proj.weight
    assert w.dtype == torch.bfloat16 and 0.015 < w.float().std().item() < 0.025
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))
    again = synth.make_tensor("model.layers.1.mlp.down_proj.weight", tuple(w.shape), seed=0)
    assert torch.equal(again, w)  # deterministic per name and seed


def test_real_shapes_have_the_published_sizes():
    phi = synth.build_config("phi-3-mini", vocab_size=32064)
    params = sum(torch.Size(s).numel() for _, s in synth.tensor_specs(phi))
    assert abs(params - 3.821e9) < 0.005e9  # Phi-3-mini-4k: 3.82B
    llama = synth.build_config("llama-3.1-8b")
    params = sum(torch.Size(s).numel() for _, s in synth.tensor_specs(llama))
    assert abs(params - 8.03e9) < 0.01e9  # Llama-3.1-8B: 8.03B


def test_bad_shape_and_existing_output_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        synth.main(["--shape", "nope", "--out", str(tmp_path / "x")])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert synth.main(["--shape", "tiny-llama", "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
