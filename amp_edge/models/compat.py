"""What differs between the two transformers lines amp-edge runs on: 4.57 (beside optimum) and 5.x.

Everything version-dependent lives here, so the rest of the code reads one API:
- ``no_init_weights``: moved from ``transformers.modeling_utils`` to ``transformers.initialization`` in 5.0.
- rope settings: 4.57 keeps ``rope_scaling`` (None for plain rope) and ``partial_rotary_factor`` as config fields;
  5.x folds both into ``rope_parameters`` (always a dict, ``rope_type`` "default" for plain rope; ``rope_scaling``
  reads it) and drops ``partial_rotary_factor`` from some configs (Phi).
- the KV cache: ``DynamicCache`` layers hold ``keys``/``values`` in both; building one from tensors goes through
  ``update`` in both (5.x's constructor no longer takes a legacy tuple).
- head-pruned Llama configs: 5.x's ``LlamaConfig`` refuses a hidden_size that is not a multiple of
  ``num_attention_heads`` even with ``head_dim`` set (4.57 accepted it; Qwen2/Qwen3/Mistral configs still do), so a
  uniform head-pruned Llama (say 24 of Llama-3.2-1B's 32 heads, 2048 % 24 != 0) could be neither saved nor loaded.
  ``pruned_heads_allowed()`` relaxes exactly that rule, while amp-edge loads or saves: see its docstring.
- GGUF: 5.x loads through a GGUF quantizer that may keep weights packed and stays attached to the dequantized model
  (save_pretrained then refuses it): ``gguf_load_kwargs``, ``detach_gguf_quantizer``.
- saved folders: 5.x writes configs and tokenizers that 4.57 misreads or refuses: ``make_portable``.
Elsewhere: exporters/graph.py traces the rotary angles as 4.57 did (ORT's fusion matches that subgraph), and
sources._guard also catches 5.x's StrictDataclassError.
"""

from __future__ import annotations

import contextlib
import threading
from importlib import metadata

# read from the installed metadata: importing this module does not import transformers (adapters import it)
TRANSFORMERS_VERSION = metadata.version("transformers")
TRANSFORMERS_5 = int(TRANSFORMERS_VERSION.split(".")[0]) >= 5


def no_init_weights():
    """transformers' context manager that skips weight initialization (build a model whose weights come next)."""
    try:  # transformers >= 5
        from transformers.initialization import no_init_weights as ctx
    except ImportError:  # transformers 4.57
        from transformers.modeling_utils import no_init_weights as ctx
    return ctx()


def rope_parameters(config) -> dict:
    """The rope settings as one flat dict (rope_type, factors, partial_rotary_factor...), on either version."""
    params = getattr(config, "rope_parameters", None)  # 5.x
    if params is None:
        params = getattr(config, "rope_scaling", None)  # 4.57: None for plain rope
    params = dict(params or {})
    if "rope_type" not in params and "type" in params:  # configs saved by old transformers
        params["rope_type"] = params["type"]
    return params


def rope_scaling(config) -> dict | None:
    """The rope scaling in 4.57's sense: None for plain rope, else the dict with its ``rope_type``."""
    params = rope_parameters(config)
    return None if params.get("rope_type", "default") == "default" else params


def rope_type(config) -> str | None:
    """None for plain rope, else the scaling's type ("linear", "llama3", "longrope"...)."""
    scaling = rope_scaling(config)
    return None if scaling is None else scaling.get("rope_type")


def partial_rotary_factor(config) -> float:
    """The fraction of head_dim that rotary acts on (a config field in 4.57, inside rope_parameters in 5.x)."""
    value = rope_parameters(config).get("partial_rotary_factor")
    if value is None:
        value = getattr(config, "partial_rotary_factor", None)
    return float(value if value is not None else 1.0)


def rotary_call(decoder, layer_type: str | None = None):
    """(module, keywords) computing the rotary tables of ``layer_type``: 5.x's Gemma 3 has one rotary module called
    with ``layer_type``; 4.57's has ``rotary_emb`` (global) and ``rotary_emb_local`` (sliding layers)."""
    if layer_type is None:
        return decoder.rotary_emb, {}
    if hasattr(decoder, "rotary_emb_local"):
        return (decoder.rotary_emb_local if layer_type == "sliding_attention" else decoder.rotary_emb), {}
    return decoder.rotary_emb, {"layer_type": layer_type}


def cache_from_tensors(past) -> object:
    """A DynamicCache holding layer i's (key, value) = past[2i], past[2i + 1]."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(len(past) // 2):
        cache.update(past[2 * i], past[2 * i + 1], i)
    return cache


def cache_tensors(cache) -> list:
    """[key0, value0, key1, value1, ...] of a DynamicCache."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [t for i in range(len(cache.key_cache)) for t in (cache.key_cache[i], cache.value_cache[i])]


# --- head-pruned Llama configs on transformers 5 -------------------------------------------------------------------

_lock = threading.RLock()
_depth = 0
_saved: list | None = None


def _relaxed_architecture_check(cls):
    def validate_architecture(config) -> None:
        """4.57's rule, kept by Qwen2/Qwen3/Mistral configs in 5.x: the attention width is num_attention_heads *
        head_dim, which need not be hidden_size; only a config without head_dim must divide hidden_size evenly."""
        super(cls, config).validate_architecture()  # PreTrainedConfig's own checks
        if not getattr(config, "head_dim", None) and config.hidden_size % config.num_attention_heads:
            raise ValueError(f"The hidden size ({config.hidden_size}) is not a multiple of the number of attention "
                             f"heads ({config.num_attention_heads}) and no head_dim is set.")

    return validate_architecture


def _strict_config_classes() -> list:
    """The 5.x config classes whose validate_architecture refuses hidden_size % num_attention_heads != 0 although
    their attention is sized by head_dim: LlamaConfig, and Gemma3TextConfig (which checks it even with head_dim set)."""
    import transformers

    out = []
    for name in ("LlamaConfig", "Gemma3TextConfig"):
        cls = getattr(transformers, name, None)
        validators = getattr(cls, "__class_validators__", None)
        if validators is not None and any(v.__name__ == "validate_architecture" for v in validators):
            out.append(cls)  # absent on 4.57 (no strict validation) or on a 5.x that dropped the rule
    return out


@contextlib.contextmanager
def pruned_heads_allowed():
    """While the block runs, transformers 5's LlamaConfig (and Gemma3TextConfig) accepts num_attention_heads * head_dim != hidden_size.

    A uniform head-pruned Llama checkpoint keeps the standard config fields (num_attention_heads, head_dim
    explicit) so that plain transformers 4.57 loads it and the format does not depend on the transformers that
    wrote it. transformers 5.x's LlamaConfig has a strict class validator (validate_architecture, run on
    construction and again on save_pretrained) that refuses such a config although LlamaAttention sizes its
    projections from head_dim. amp-edge's own loaders and savers (load_model, load_pruned, save_pruned, the
    exporter's package writer) run inside this block, where that one validator is swapped for 4.57's rule; every
    other validator still runs, and outside the block LlamaConfig is untouched. Plain ``from_pretrained`` on 5.x
    still refuses such a checkpoint (a clear ValueError, never a wrong model). Re-entrant; a no-op on 4.57.
    """
    global _depth, _saved
    classes = _strict_config_classes()
    if not classes:
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = [list(cls.__class_validators__) for cls in classes]
            for cls, saved in zip(classes, _saved):
                relaxed = _relaxed_architecture_check(cls)
                cls.__class_validators__ = [relaxed if v.__name__ == "validate_architecture" else v for v in saved]
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for cls, saved in zip(classes, _saved):
                    cls.__class_validators__ = saved
                _saved = None


# --- GGUF ----------------------------------------------------------------------------------------------------------

def gguf_load_kwargs() -> dict:
    """from_pretrained keywords that load a GGUF file as a plain dense model.

    transformers 5 loads GGUF through a quantizer that keeps the weights in their GGUF blocks (GgufLinear) when the
    ``kernels`` package has a matmul kernel for them; surgery slices nn.Linear weights, so amp-edge asks for the
    dequantized model, as 4.57 always gave."""
    try:
        from transformers import GgufConfig
    except ImportError:  # 4.57: GGUF weights are always dequantized
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def detach_gguf_quantizer(model):
    """Make a model dequantized from GGUF a plain model: transformers 5 leaves its GGUF quantizer attached, which
    makes save_pretrained refuse ("quantized with gguf and is not serializable") though every weight is dense."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf":
        return model
    packed = [name for name, m in model.named_modules() if type(m).__name__.lower().startswith("gguf")]
    if packed:
        raise RuntimeError(f"GGUF weights were left packed ({packed[0]}...); amp-edge needs them dequantized")
    quantizer.remove_quantization_config(model)
    return model


# --- folders that both transformers lines read ---------------------------------------------------------------------

_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def make_portable(folder) -> None:
    """Make a config and tokenizer saved by transformers 5 read the same in transformers 4.57 (a no-op on 4.57).

    - config.json: 5.x writes rope_theta/rope_scaling/partial_rotary_factor only inside ``rope_parameters``, which
      4.57 ignores: it would build the model with its default rope_theta (10000; SmolLM2's is 100000), a silently
      wrong model. The 4.57 fields are added beside ``rope_parameters``; 5.x reads them as the same settings.
    - tokenizer_config.json: 5.x names the generic fast tokenizer ``TokenizersBackend``, a class 4.57 lacks
      (AutoTokenizer refuses the folder); it is written as ``PreTrainedTokenizerFast``, which both load from
      tokenizer.json. special_tokens_map.json, which 5.x no longer writes, is written as 4.57 does.
    """
    from pathlib import Path

    if not TRANSFORMERS_5:
        return
    folder = Path(folder)
    _portable_config(folder / "config.json")
    _portable_tokenizer(folder)


def _read(path):
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path, data) -> None:
    import json

    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _portable_config(path) -> None:
    config = _read(path)
    params = (config or {}).get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" not in params:  # absent, or one dict per layer type
        return
    config.setdefault("rope_theta", params["rope_theta"])
    if "partial_rotary_factor" in params:
        config.setdefault("partial_rotary_factor", params["partial_rotary_factor"])
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", "default") == "default":
        config.setdefault("rope_scaling", None)
    else:
        scaling.setdefault("type", scaling["rope_type"])  # 4.57's Phi-3 reads "type"
        config.setdefault("rope_scaling", scaling)
        if "original_max_position_embeddings" in scaling:  # Phi-3 longrope reads it from the config itself
            config.setdefault("original_max_position_embeddings", scaling["original_max_position_embeddings"])
    _write(path, config)


def _portable_tokenizer(folder) -> None:
    path = folder / "tokenizer_config.json"
    config = _read(path)
    if config is None:
        return
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        _write(path, config)
    special = {k: config[k] for k in _SPECIAL if isinstance(config.get(k), (str, dict))}
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if isinstance(extra, list) and extra:
        special["additional_special_tokens"] = extra
    if special and not (folder / "special_tokens_map.json").exists():
        _write(folder / "special_tokens_map.json", special)
