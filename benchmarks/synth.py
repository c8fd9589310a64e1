"""Random-weight checkpoints at real model shapes, for measuring memory and time at scale (not for accuracy).

    python -m benchmarks.synth --shape phi-3-mini --out /tmp/phi3-shape            # 32 layers, 3.9B, 7.9 GB bf16
    python -m benchmarks.synth --shape llama-3.1-8b --layers 8 --out /tmp/llama8   # the 8B's layers, fewer of them

The folder is what the hub would give: config.json, sharded bf16 safetensors with model.safetensors.index.json,
and a working tokenizer (SmolLM2's, from the embedded GGUF; a vocabulary smaller than the tokenizer's is widened to
it). Tensors are made and written one shard at a time, so memory stays at about one shard whatever the model size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from amp_edge.errors import AmpEdgeError, InvalidOptionError
from amp_edge.io import atomic_dir, check_output

# The published configs' shape fields (config.json of each model on the hub).
SHAPES: dict[str, dict] = {
    "phi-3-mini": dict(model_type="phi3", num_hidden_layers=32, hidden_size=3072, intermediate_size=8192,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3.1-8b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2.5-7b": dict(model_type="qwen2", num_hidden_layers=28, hidden_size=3584, intermediate_size=18944,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(model_type="qwen2", num_hidden_layers=24, hidden_size=896, intermediate_size=4864,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    # Tiny shapes of the same families, for tests
    "tiny-llama": dict(model_type="llama", num_hidden_layers=3, hidden_size=64, intermediate_size=160,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1000,
                       max_position_embeddings=512, tie_word_embeddings=False),
    "tiny-phi3": dict(model_type="phi3", num_hidden_layers=3, hidden_size=64, intermediate_size=160,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512,
                      tie_word_embeddings=False),
    "tiny-qwen2": dict(model_type="qwen2", num_hidden_layers=3, hidden_size=64, intermediate_size=160,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512,
                       tie_word_embeddings=True),
}
DEFAULT_SHARD_BYTES = 2 * 1024**3
INIT_STD = 0.02  # the families' own initializer_range


def build_config(shape: str, layers: int | None = None, vocab_size: int | None = None):
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise InvalidOptionError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    fields = dict(SHAPES[shape])
    if layers is not None:
        if layers < 1:
            raise InvalidOptionError(f"--layers must be >= 1, got {layers}")
        fields["num_hidden_layers"] = layers
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields, dtype="bfloat16")
    config.architectures = [{"phi3": "Phi3ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]]
    return config


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """Name and shape of every tensor the checkpoint holds, in the model's order (a tied head is not stored)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    return [(k, tuple(v.shape)) for k, v in state.items() if not (tied and k == "lm_head.weight")]


def make_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic per name: norms are ones, biases zeros, matrices N(0, 0.02) in bf16."""
    if len(shape) == 1:
        return (torch.ones if name.endswith("norm.weight") else torch.zeros)(shape, dtype=torch.bfloat16)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.empty(shape, dtype=torch.float32).normal_(0, INIT_STD, generator=gen).to(torch.bfloat16)


def plan_shards(specs, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, current, size = [], [], 0
    for name, shape in specs:
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    return shards + [current] if current else shards


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from amp_edge.models.sources import DEFAULT_MODEL, resolve

    where = resolve(DEFAULT_MODEL)
    return AutoTokenizer.from_pretrained(where["path"], gguf_file=where["gguf_file"])


def write(shape: str, out: Path, layers: int | None = None, seed: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES,
          overwrite: bool = False, progress=print, tokenizer=None) -> dict:
    """Write the checkpoint; ``tokenizer`` defaults to SmolLM2's (tests pass a small one)."""
    from safetensors.torch import save_file

    check_output(out, overwrite)
    tokenizer = tokenizer if tokenizer is not None else smollm2_tokenizer()
    vocab = max(SHAPES.get(shape, {}).get("vocab_size", 0), len(tokenizer))
    config = build_config(shape, layers, vocab)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    specs = tensor_specs(config)
    shards = plan_shards(specs, shard_bytes)
    total = sum(2 * int(torch.Size(s).numel()) for _, s in specs)
    start = time.perf_counter()
    weight_map = {}
    with atomic_dir(out, overwrite) as tmp:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for k, shard in enumerate(shards):
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: make_tensor(n, s, seed) for n, s in shard}
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            del tensors
            weight_map.update({n: name for n, _ in shard})
            progress(f"shard {k + 1}/{len(shards)} written ({time.perf_counter() - start:.0f} s)")
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    params = sum(int(torch.Size(s).numel()) for _, s in specs)
    return {"out": str(out), "shape": shape, "layers": config.num_hidden_layers, "vocab_size": vocab,
            "params": params, "bytes": total, "shards": len(shards), "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, help="decoder layers (default: the shape's own)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1024**3)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    try:
        info = write(args.shape, args.out, args.layers, args.seed, int(args.shard_gb * 1024**3), args.overwrite,
                     progress=lambda m: print(m, file=sys.stderr))
    except AmpEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{info['out']}: {info['shape']} x {info['layers']} layers, {info['params'] / 1e9:.2f}B parameters, "
              f"{info['bytes'] / 1e9:.2f} GB bf16 in {info['shards']} shards ({info['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
