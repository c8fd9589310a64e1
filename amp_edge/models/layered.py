"""A checkpoint read one module at a time: the model's skeleton without weights, filled and emptied per layer.

At the sizes people deploy (3.8B parameters are 15 GB in fp32) holding the whole model is what exhausts memory.
Everything that walks the model in order (calibration, surgery, saving, export) instead builds the model on the
``meta`` device (shapes, no storage; buffers such as rotary tables are real, as accelerate's init_empty_weights
makes them), fills one module from the safetensors files, uses it, and empties it again. Tensors are read with
plain file reads (``safe_open``), not kept mapped, so the page cache holds the checkpoint, not this process.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from amp_edge.errors import ModelLoadError, ModelNotFoundError
from amp_edge.memory import available_bytes
from amp_edge.models.checkpoint import check_safetensors, shape_to_config
from amp_edge.models.compat import pruned_heads_allowed

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass
class Checkpoint:
    """A safetensors checkpoint folder: which file holds each tensor, and reads of one tensor at a time."""

    path: Path
    files: dict[str, str]  # tensor name -> file name
    _handles: dict[str, object] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, folder: str | Path) -> Checkpoint:
        """Index the folder's tensors; a shard named by the index but absent, or unreadable, fails here in one line."""
        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"folder {path} has no config.json, so it is not a model")
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelLoadError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
            names = sorted(set(weight_map.values()))
        elif (path / SINGLE_FILE).is_file():
            names, weight_map = [SINGLE_FILE], None
        else:
            raise ModelLoadError(f"folder {path} holds no {SINGLE_FILE} or {INDEX_FILE} (pickled weights are not loaded)")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ModelLoadError(f"checkpoint {path} is missing {len(missing)} of its {len(names)} shards: {', '.join(missing[:3])}")
        for n in names:
            check_safetensors(path / n)
        if weight_map is None:
            with safe_open(path / SINGLE_FILE, framework="pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        return cls(path, dict(weight_map))

    def config(self):
        from transformers import AutoConfig

        with pruned_heads_allowed():
            return AutoConfig.from_pretrained(self.path)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read into memory of its own (cast to ``dtype`` if given)."""
        if name not in self.files:
            raise ModelLoadError(f"checkpoint {self.path} has no tensor {name!r}")
        self._handle(self.files[name])  # a readable file, or one ModelLoadError line
        # A handle of its own, closed after the read: safetensors maps the file, and pages read through a mapping kept
        # open stay in this process's RSS (measured: +226 MB per Phi-3-mini layer, 3 GB for 8 layers with cached handles).
        with safe_open(self.path / self.files[name], framework="pt") as f:
            t = f.get_tensor(name)
            return t.clone() if dtype is None or t.dtype == dtype else t.to(dtype)

    def _handle(self, file: str):
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = self._handles[file] = safe_open(self.path / file, framework="pt")
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f"{self.path / file} is not a readable safetensors file ({e})") from None
        return handle

    def dtype(self) -> torch.dtype:
        """The dtype most of the weights are stored in (what a pruned copy is written in)."""
        counts: dict[torch.dtype, int] = {}
        for name in self.files:
            if name.endswith(".weight"):
                sl = self._handle(self.files[name]).get_slice(name)
                dt = _DTYPES.get(sl.get_dtype(), torch.float32)
                counts[dt] = counts.get(dt, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32

    def module_bytes(self, prefix: str, dtype: torch.dtype | None = None) -> int:
        """Bytes of the tensors under ``prefix`` (e.g. "model.layers.3."), stored or as ``dtype``; headers only."""
        total = 0
        for name, file in self.files.items():
            if name.startswith(prefix):
                sl = self._handle(file).get_slice(name)
                width = dtype.itemsize if dtype is not None else _DTYPES.get(sl.get_dtype(), torch.float32).itemsize
                total += width * math.prod(sl.get_shape())
        return total

    def largest_module(self, dtype: torch.dtype | None = None) -> tuple[str, int]:
        """The biggest unit the streamed passes hold at once: a decoder layer, the embedding or the LM head."""
        prefixes = {name.rsplit(".", 1)[0] + "." if not _LAYER.match(name) else _LAYER.match(name).group(0)
                    for name in self.files}
        sizes = {p: self.module_bytes(p, dtype) for p in prefixes}
        name = max(sizes, key=sizes.get)
        return name.rstrip("."), sizes[name]

    def require_module_fits(self, dtype: torch.dtype | None = None, copies: float = 3.0) -> None:
        """Refuse, before any work, a model whose largest module (``copies`` of it: the weights, their cast and the
        work around them) does not fit in the memory available now."""
        free = available_bytes()
        if free is None:
            return
        name, size = self.largest_module(dtype)
        if size * copies > free:
            raise ModelLoadError(f"{name} of {self.path} takes {size / 1e9:.2f} GB and needs about {size * copies / 1e9:.1f} GB "
                                 f"to process; {free / 1e9:.1f} GB of memory is available")

    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in set(self.files.values()))

    def copy_side_files(self, out: Path) -> None:
        """Tokenizer and generation files (everything but weights, their index and config.json) into ``out``."""
        for p in self.path.iterdir():
            if p.is_file() and p.suffix != ".safetensors" and p.name not in (INDEX_FILE, "config.json"):
                shutil.copy2(p, out / p.name)


_LAYER = re.compile(r"^.*?layers\.\d+\.")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def skeleton(config) -> nn.Module:
    """The model of ``config`` with every parameter on the meta device (no memory), per-layer shapes applied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False), pruned_heads_allowed():
        model = AutoModelForCausalLM.from_config(config)
    shape_to_config(model, config)
    if getattr(config, "tie_word_embeddings", False):
        # transformers 5 leaves a meta model untied; tied, the LM head is counted and pruned once, as on a loaded model
        model.tie_weights()
    return model.eval()


def fill(module: nn.Module, prefix: str, ckpt: Checkpoint, dtype: torch.dtype | None = None, tied: dict[str, str] | None = None) -> nn.Module:
    """Give every parameter of ``module`` its tensor from ``ckpt`` (``prefix`` + its name), in ``dtype``.

    ``tied`` maps a name the checkpoint does not store to the one it shares (lm_head.weight -> embed_tokens.weight).
    """
    for name, sub, pname in _params(module):
        full = prefix + name
        if full not in ckpt and tied and full in tied:
            full = tied[full]
        value = ckpt.tensor(full, dtype)
        old = sub._parameters[pname]
        if tuple(value.shape) != tuple(old.shape):
            raise ModelLoadError(f"checkpoint {ckpt.path}: tensor {full} has shape {tuple(value.shape)}, the config says {tuple(old.shape)}")
        sub._parameters[pname] = nn.Parameter(value, requires_grad=False)
    return module


def empty(module: nn.Module) -> None:
    """Drop the storage of every parameter of ``module`` (back to meta tensors of the same shapes)."""
    for _name, sub, pname in _params(module):
        old = sub._parameters[pname]
        sub._parameters[pname] = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False)


@contextmanager
def filled(module: nn.Module, prefix: str, ckpt: Checkpoint, dtype: torch.dtype | None = None, tied: dict[str, str] | None = None):
    """``fill`` for the duration of a block, then ``empty``."""
    fill(module, prefix, ckpt, dtype, tied)
    try:
        yield module
    finally:
        empty(module)


def tied_names(model: nn.Module) -> dict[str, str]:
    """Parameters the checkpoint stores under another name: a tied LM head is the embedding."""
    if getattr(model.config, "tie_word_embeddings", False):
        return {"lm_head.weight": "model.embed_tokens.weight"}
    return {}


def _params(module: nn.Module):
    for mod_name, sub in module.named_modules():
        for pname, p in list(sub._parameters.items()):
            if p is not None:
                yield (f"{mod_name}.{pname}" if mod_name else pname), sub, pname


def streamed_logits(model: nn.Module, ckpt: Checkpoint, ids: torch.Tensor, mask: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32, desc: str | None = None, cache=None) -> torch.Tensor:
    """Logits of one forward pass of the skeleton ``model`` over ``ids``: each decoder layer (and the embedding, the
    head) filled from ``ckpt`` in ``dtype`` just before it runs and emptied just after, so about one layer of weights
    is in memory. The caller chooses grad mode (the export's reference and the distillation teacher run no_grad).

    ``cache``: a transformers Cache extended in place (``ids`` are then the new tokens and ``mask`` covers the cache
    and them), for greedy decoding one step per pass."""
    from tqdm.auto import tqdm

    from amp_edge.models.adapters import get_adapter

    adapter = get_adapter(model)
    tied = tied_names(model)
    layers = list(adapter.layers())
    streamed = [*layers, model.get_input_embeddings(), model.get_output_embeddings()]
    inside = {id(sub) for s in streamed for sub in s.modules()}
    prefixes = {id(m): n + "." for n, m in model.named_modules()}
    bar = tqdm(total=len(layers), desc=desc, unit="layer", leave=False, disable=desc is None)

    def before(mod, _args):
        fill(mod, prefixes[id(mod)], ckpt, dtype, tied)

    def after(mod, _args, _out):
        empty(mod)
        if any(mod is layer for layer in layers):
            bar.update(1)

    handles = [h for m in streamed for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    rest = [m for m in model.modules() if m is not model and id(m) not in inside
            and any(p is not None for p in m._parameters.values())]
    try:
        for m in rest:
            fill(m, prefixes[id(m)], ckpt, dtype, tied)
        mask = torch.ones_like(ids) if mask is None else mask
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                     use_cache=cache is not None).logits
    finally:
        for h in handles:
            h.remove()
        for m in rest:
            empty(m)
        if tied:
            model.tie_weights()  # filling the head alone gave it its own tensor
        bar.close()
