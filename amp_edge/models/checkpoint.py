"""Saving pruned checkpoints atomically, and loading those whose layers differ in shape."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from amp_edge.models.adapters import get_adapter
from amp_edge.models.compat import make_portable, no_init_weights, pruned_heads_allowed
from amp_edge.errors import ModelLoadError, ModelNotFoundError
from amp_edge.io import atomic_dir
from amp_edge.pruning.plan import PLAN_FILE, LayerPlan, PruningPlan
from amp_edge.models.dtypes import torch_dtype
from amp_edge.pruning.surgery import PER_LAYER_KEY, apply_plan


def save_pruned(model, tokenizer, plan: PruningPlan, out: str | Path, overwrite: bool = False,
                extra: dict[str, dict] | None = None) -> Path:
    """safetensors + config (every shape explicit) + tokenizer + plan (+ ``extra`` JSON files), written atomically."""
    with atomic_dir(out, overwrite) as tmp, pruned_heads_allowed():
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        make_portable(tmp)  # written by transformers 5, read by 4.57 too
        plan.save(tmp / PLAN_FILE)
        for name, data in (extra or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=1))
    return Path(out)


def is_per_layer(path: str | Path) -> bool:
    try:
        return PER_LAYER_KEY in json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load_pruned(path: str | Path, dtype: str = "auto") -> torch.nn.Module:
    """Load a pruned checkpoint, including one whose layers have different head counts or MLP widths."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is not a pruned checkpoint (no config.json)")
    with pruned_heads_allowed():
        config = AutoConfig.from_pretrained(path)
    td = torch_dtype(dtype)
    if td == "auto":
        td = getattr(config, "dtype", None) or torch.float32
        td = torch_dtype(td) if isinstance(td, str) else td
    with no_init_weights(), pruned_heads_allowed():
        model = AutoModelForCausalLM.from_config(config, dtype=td)
    shape_to_config(model, config)
    state = _read_safetensors(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ModelLoadError(f"checkpoint {path} does not match its config: missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    get_adapter(model)  # fails clearly for an unsupported architecture
    return model.to(td).eval()


def shape_to_config(model, config) -> None:
    """Give a freshly built model the per-layer sizes its config records (a no-op for uniform configs).

    The modules are shaped by pruning them to those sizes; their weights come next (from a state dict, or layer by
    layer on a meta-device skeleton)."""
    sizes = getattr(config, PER_LAYER_KEY, None)
    if not sizes:
        return
    group = config.num_attention_heads // config.num_key_value_heads
    layers = [
        LayerPlan([g * group + j for g in range(kv) for j in range(h // kv)], list(range(kv)), list(range(n)))
        for h, kv, n in zip(sizes["num_attention_heads"], sizes["num_key_value_heads"], sizes["intermediate_size"])
    ]
    apply_plan(model, PruningPlan(config.model_type, layers, original_shapes=[]))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not (path / f).is_file():
            raise ModelLoadError(f"checkpoint {path} is missing {f}")
        check_safetensors(path / f)
        state.update(load_file(path / f))
    return state


def check_safetensors(file: Path) -> None:
    """Read the header only (cheap): a truncated or garbage file fails here, in one line, before any loading."""
    try:
        with safe_open(file, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{file} is not a readable safetensors file ({first})") from None
