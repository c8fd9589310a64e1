"""Architecture adapters: where each family keeps its attention and MLP weights.

An adapter names modules; the generic code here does the slicing, so a new family that
keeps Llama's layout is one subclass with a different ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from amp_edge.errors import UnsupportedArchitectureError

_REGISTRY: dict[str, type[Adapter]] = {}
_REFUSED: dict[str, str] = {}  # model types with no adapter on purpose, and the line that says why


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` the adapter for ``cls.model_type``."""
    _REGISTRY[cls.model_type] = cls
    return cls


def refuse(model_type: str, why: str) -> None:
    """Name a model type that must be refused with its own message (not the generic list)."""
    _REFUSED[model_type] = why


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def gguf_architectures() -> dict[str, str]:
    """GGUF ``general.architecture`` -> model_type, for every supported family."""
    return {cls.gguf_arch or t: t for t, cls in _REGISTRY.items()}


def adapter_class(model_type: str | None) -> type[Adapter]:
    """The registered adapter of ``model_type``; a miss lists the supported types."""
    cls = _REGISTRY.get(model_type)
    if cls is None and model_type in _REFUSED:
        raise UnsupportedArchitectureError(_REFUSED[model_type])
    if cls is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return cls


def get_adapter(model: nn.Module) -> Adapter:
    return adapter_class(getattr(model.config, "model_type", None))(model)


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one decoder layer: query heads, KV heads and MLP width."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class UnitCosts:
    """Parameters removed with one query head, one KV head (k and v), one MLP neuron."""

    query_head: int
    kv_head: int
    neuron: int


class LayerConfig:
    """A per-layer view of the model config: overrides a few fields, reads the rest live.

    Some attention modules (Phi-3) read head counts from ``self.config`` in forward; a layer
    whose head count differs from its neighbours gets this view instead of the shared config.
    """

    def __init__(self, base, **overrides):
        self.__dict__["_base"] = base
        self.__dict__["_overrides"] = overrides

    def __getattr__(self, name):
        fields = self.__dict__
        if "_base" not in fields:  # half-built during copy/deepcopy
            raise AttributeError(name)
        if name in fields["_overrides"]:
            return fields["_overrides"][name]
        return getattr(fields["_base"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["_base"], name, value)


def _linear_like(src: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    out.train(src.training)
    return out


def keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """A new Linear with only the given output rows (and their bias entries)."""
    bias = linear.bias[rows] if linear.bias is not None else None
    return _linear_like(linear, linear.weight[rows], bias)


def keep_cols(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    """A new Linear with only the given input columns (the bias is per output, so it stays)."""
    return _linear_like(linear, linear.weight[:, cols], linear.bias)


def head_rows(heads, head_dim: int, offset: int = 0) -> torch.Tensor:
    """Row indices of the given heads in a projection laid out head after head."""
    heads = torch.as_tensor(list(heads), dtype=torch.long)
    return (offset + heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _row_cost(linear: nn.Linear) -> int:
    return linear.in_features + (1 if linear.bias is not None else 0)


class Adapter:
    """Llama-style layout: separate q/k/v/o and gate/up/down projections.

    Subclasses override the module names, or the few methods a fused layout needs.
    """

    model_type: ClassVar[str] = ""
    attn_name: ClassVar[str] = "self_attn"
    mlp_name: ClassVar[str] = "mlp"
    q_name: ClassVar[str] = "q_proj"
    kv_names: ClassVar[tuple[str, ...]] = ("k_proj", "v_proj")
    o_name: ClassVar[str] = "o_proj"
    mlp_in_names: ClassVar[tuple[str, ...]] = ("gate_proj", "up_proj")
    mlp_out_name: ClassVar[str] = "down_proj"
    # Export traits: what the exporters need to know of the family, kept here so no per-family table lives elsewhere.
    gqa_export: ClassVar[bool] = True  # attention maps onto ONNX Runtime's GroupQueryAttention (Llama's q/k/v layout)
    genai_type: ClassVar[str] = ""  # onnxruntime-genai's model type name ("" = model_type)
    gguf_arch: ClassVar[str] = ""  # the GGUF file's general.architecture ("" = model_type)
    # transformers applies ``config.sliding_window`` to every layer (Mistral, Phi-3) instead of per layer type
    window_on_every_layer: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- structure ---------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        """The transformer body without the LM head."""
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def attention(self, i: int) -> nn.Module:
        return getattr(self.layers()[i], self.attn_name)

    def mlp(self, i: int) -> nn.Module:
        return getattr(self.layers()[i], self.mlp_name)

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    @property
    def head_dim(self) -> int:
        return self.attention(0).head_dim

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def o_proj(self, i: int) -> nn.Linear:
        return getattr(self.attention(i), self.o_name)

    def down_proj(self, i: int) -> nn.Linear:
        return getattr(self.mlp(i), self.mlp_out_name)

    def layer_shape(self, i: int) -> LayerShape:
        attn = self.attention(i)
        num_heads = self.o_proj(i).in_features // self.head_dim
        num_kv = num_heads // attn.num_key_value_groups
        return LayerShape(num_heads, num_kv, self.down_proj(i).in_features)

    def shapes(self) -> list[LayerShape]:
        return [self.layer_shape(i) for i in range(self.num_layers)]

    # --- weights the scorers read -------------------------------------------------------
    def query_weight(self, i: int) -> torch.Tensor:
        """(num_heads * head_dim, hidden) rows of the query projection."""
        return getattr(self.attention(i), self.q_name).weight

    def projections(self, i: int) -> list[nn.Linear]:
        """Every linear projection of layer i: attention in/out and MLP in/out (the modules LoRA adapts)."""
        attn, mlp = self.attention(i), self.mlp(i)
        return ([getattr(attn, n) for n in (self.q_name, *self.kv_names, self.o_name)]
                + [getattr(mlp, n) for n in (*self.mlp_in_names, self.mlp_out_name)])

    def mlp_in_weights(self, i: int) -> list[torch.Tensor]:
        """Each (intermediate, hidden) matrix whose row j feeds neuron j."""
        return [getattr(self.mlp(i), n).weight for n in self.mlp_in_names]

    def unit_costs(self, i: int) -> UnitCosts:
        attn, mlp, hd = self.attention(i), self.mlp(i), self.head_dim
        q = getattr(attn, self.q_name)
        kv = sum(_row_cost(getattr(attn, n)) for n in self.kv_names)
        neuron = sum(_row_cost(getattr(mlp, n)) for n in self.mlp_in_names)
        return UnitCosts(hd * (_row_cost(q) + self.o_proj(i).out_features), hd * kv, neuron + self.down_proj(i).out_features)

    # --- surgery -----------------------------------------------------------------------
    def prune_attention(self, i: int, q_heads: list[int], kv_heads: list[int]) -> None:
        attn, hd = self.attention(i), self.head_dim
        q_rows, kv_rows = head_rows(q_heads, hd), head_rows(kv_heads, hd)
        setattr(attn, self.q_name, keep_rows(getattr(attn, self.q_name), q_rows))
        for name in self.kv_names:
            setattr(attn, name, keep_rows(getattr(attn, name), kv_rows))
        setattr(attn, self.o_name, keep_cols(self.o_proj(i), q_rows))
        self.set_attention_shape(i, len(q_heads), len(kv_heads))

    def set_attention_shape(self, i: int, num_heads: int, num_kv_heads: int) -> None:
        attn = self.attention(i)
        attn.num_key_value_groups = num_heads // num_kv_heads
        for attr, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
        base = attn.config._base if isinstance(attn.config, LayerConfig) else attn.config
        attn.config = LayerConfig(base, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)

    def prune_mlp(self, i: int, neurons: list[int]) -> None:
        mlp = self.mlp(i)
        idx = torch.as_tensor(list(neurons), dtype=torch.long)
        for name in self.mlp_in_names:
            setattr(mlp, name, keep_rows(getattr(mlp, name), idx))
        setattr(mlp, self.mlp_out_name, keep_cols(self.down_proj(i), idx))
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(neurons)

    def sliding_window(self, i: int) -> int | None:
        """Layer i's attention window in tokens (a key at distance >= window is masked), None for full attention.

        A window no shorter than ``max_position_embeddings`` never masks a key the model can see (Phi-3-mini-128k's
        262144): None, so validation does not build a prompt longer than it."""
        source = self.config if self.window_on_every_layer else self.attention(i)
        window = getattr(source, "sliding_window", None)
        limit = getattr(self.config, "max_position_embeddings", None)
        return int(window) if window and not (limit and window >= limit) else None

    def rope_layer_type(self, i: int) -> str | None:
        """Layer i's type (``config.layer_types``) when layer types have their own rotary tables (Gemma 3's local
        rope base), else None: one table serves every layer."""
        types = getattr(self.config, "layer_types", None)
        if not types:
            return None
        params = getattr(self.config, "rope_parameters", None)  # 5.x: one dict per layer type
        per_type = isinstance(params, dict) and isinstance(params.get(types[i]), dict)
        return types[i] if per_type or hasattr(self.decoder, "rotary_emb_local") else None  # 4.57: a module per type

    def check_prunable(self) -> None:
        """Raise if this model has a feature the surgery cannot carry (overridden where needed)."""

    def standard_config_fits(self, num_heads: int) -> bool:
        """Whether the family's own config class accepts ``num_heads`` heads of this head_dim."""
        return True
