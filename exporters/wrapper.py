"""The traced module: a decoder step with explicit KV-cache tensors, one graph for prefill and decode.

Inputs  input_ids (batch, seq), attention_mask (batch, past+seq), position_ids (batch, seq),
        past_key_values.{i}.key|value (batch, kv_heads_i, past, head_dim)
Outputs logits (batch, seq, vocab), present.{i}.key|value (batch, kv_heads_i, past+seq, head_dim)
These are the names optimum's ORTModelForCausalLM and onnxruntime-genai look for. A graph whose every layer is
GroupQueryAttention (exporters.attention) has no position_ids: GQA takes positions from the attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amp_edge.models.adapters import get_adapter
from amp_edge.models.compat import cache_from_tensors, cache_tensors


@dataclass(frozen=True)
class KVLayout:
    """What the graph's cache inputs look like: one (kv_heads, head_dim) per layer."""

    kv_heads: tuple[int, ...]
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.kv_heads)

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids"] + [
            f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")
        ]

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {
            "input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"},
        }
        for i in range(self.num_layers):
            for kv in ("key", "value"):
                axes[f"past_key_values.{i}.{kv}"] = {0: "batch_size", 2: "past_sequence_length"}
                axes[f"present.{i}.{kv}"] = {0: "batch_size", 2: "total_sequence_length"}
        return axes

    def uniform(self) -> bool:
        return len(set(self.kv_heads)) == 1

    def to_dict(self) -> dict:
        return {"kv_heads": list(self.kv_heads), "head_dim": self.head_dim}


def kv_layout(model: torch.nn.Module) -> KVLayout:
    adapter = get_adapter(model)
    return KVLayout(tuple(s.num_kv_heads for s in adapter.shapes()), adapter.head_dim)


def layer_type_windows(model: torch.nn.Module) -> dict[str, int | None] | None:
    """{layer type: sliding window or None} for a model with sliding-window layers that takes one mask per layer
    type (``config.layer_types``: Gemma 3, Qwen2 with use_sliding_window); None when one mask serves every layer."""
    adapter = get_adapter(model)
    types = getattr(model.config, "layer_types", None)
    windows = [adapter.sliding_window(i) for i in range(adapter.num_layers)]
    if not types or not any(windows):
        return None
    return dict(zip(types, windows))


def shared_window(model: torch.nn.Module) -> int | None:
    """The window every layer has where one mask serves them all (Mistral, Phi-3: no layer types), else None."""
    if getattr(model.config, "layer_types", None):
        return None
    adapter = get_adapter(model)
    windows = {adapter.sliding_window(i) for i in range(adapter.num_layers)}
    return windows.pop() if len(windows) == 1 else None


def additive_mask(attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """(batch, 1, seq, total) mask: 0 where a query may attend (causal and not padding), dtype-min elsewhere.
    ``window``: a sliding-window layer's mask, where a query also sees only the last ``window`` positions.

    Built here from plain tensor ops so the trace does not depend on transformers' mask helpers.
    """
    total = attention_mask.shape[1]
    q_pos = torch.arange(seq_len, device=attention_mask.device) + (total - seq_len)
    k_pos = torch.arange(total, device=attention_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]
    if window:
        causal = causal & (k_pos[None, :] > q_pos[:, None] - window)
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, low)


class DecoderStep(torch.nn.Module):
    """``gqa``: the shared state of the layers swapped for GroupQueryAttention (exporters.attention), or None."""

    def __init__(self, model: torch.nn.Module, gqa=None):
        super().__init__()
        self.model = model
        self.num_layers = kv_layout(model).num_layers
        self.gqa = gqa
        self.windows = layer_type_windows(model)  # one mask per layer type where some layers slide
        self.window = shared_window(model)  # or one sliding mask for every layer
        if gqa is not None:  # registered here so the graph's initializers get these names
            self.register_buffer("gqa_cos_cache", gqa.cos)
            self.register_buffer("gqa_sin_cache", gqa.sin)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = cache_from_tensors(past)
        if self.gqa is not None:
            self.gqa.begin(attention_mask, past)
        if self.windows:
            mask = {t: additive_mask(attention_mask, input_ids.shape[1], self.model.dtype, w) for t, w in self.windows.items()}
        else:
            mask = additive_mask(attention_mask, input_ids.shape[1], self.model.dtype, self.window)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        traced = cache_tensors(out.past_key_values)
        present = []
        for i in range(self.num_layers):
            swapped = self.gqa.presents.get(i) if self.gqa is not None else None
            present += list(swapped) if swapped is not None else traced[2 * i:2 * i + 2]
        return (out.logits, *present)


def example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 4, past: int = 3) -> tuple[torch.Tensor, ...]:
    """Tracing inputs with a non-empty past, so every dynamic axis is exercised."""
    layout = kv_layout(model)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).unsqueeze(0).expand(batch, -1).contiguous()
    kv = []
    for h in layout.kv_heads:
        kv += [torch.zeros(batch, h, past, layout.head_dim, dtype=model.dtype)] * 2
    return (ids, mask, pos, *kv)
