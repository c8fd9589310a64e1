"""Saving pruned checkpoints atomically, and loading those whose layers differ in shape."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from .adapters import get_adapter
from .errors import ModelLoadError, ModelNotFoundError, OutputExistsError
from .plan import PLAN_FILE, LayerPlan, PruningPlan
from .sources import torch_dtype
from .surgery import PER_LAYER_KEY, apply_plan


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Fail early, before any work, if ``out`` exists and may not be replaced."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder")
    return out


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; move it into place only if the body succeeds."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files; the result is meant to be shared (umask applies)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)


def save_pruned(model, tokenizer, plan: PruningPlan, out: str | Path, overwrite: bool = False,
                extra: dict[str, dict] | None = None) -> Path:
    """safetensors + config (every shape explicit) + tokenizer + plan (+ ``extra`` JSON files), written atomically."""
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / PLAN_FILE)
        for name, data in (extra or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=1))
    return Path(out)


def is_pruned_checkpoint(source: str) -> bool:
    """A local folder that amp-edge saved (it holds the plan)."""
    from .sources import resolve

    where = resolve(source)
    return where["kind"] == "folder" and (Path(where["path"]) / PLAN_FILE).is_file()


def is_per_layer(path: str | Path) -> bool:
    try:
        return PER_LAYER_KEY in json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load_pruned(path: str | Path, dtype: str = "auto") -> torch.nn.Module:
    """Load a pruned checkpoint, including one whose layers have different head counts or MLP widths."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is not a pruned checkpoint (no config.json)")
    config = AutoConfig.from_pretrained(path)
    td = torch_dtype(dtype)
    if td == "auto":
        td = getattr(config, "dtype", None) or torch.float32
        td = torch_dtype(td) if isinstance(td, str) else td
    sizes = getattr(config, PER_LAYER_KEY, None)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=td)
    if sizes:
        # Shape the modules by pruning the freshly built model to the saved sizes; the weights come next.
        group = config.num_attention_heads // config.num_key_value_heads
        layers = [
            LayerPlan([g * group + j for g in range(kv) for j in range(h // kv)], list(range(kv)), list(range(n)))
            for h, kv, n in zip(sizes["num_attention_heads"], sizes["num_key_value_heads"], sizes["intermediate_size"])
        ]
        apply_plan(model, PruningPlan(config.model_type, layers, original_shapes=[]))
    state = _read_safetensors(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ModelLoadError(f"checkpoint {path} does not match its config: missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    get_adapter(model)  # fails clearly for an unsupported architecture
    return model.to(td).eval()


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
        state.update(load_file(path / f))
    return state
