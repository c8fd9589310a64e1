"""Export-time attention: each eligible layer's attention becomes one com.microsoft::GroupQueryAttention node.

`--attention auto` (default) uses GQA in every layer that allows it and keeps the traced eager attention
(separate q/k/v MatMuls, repeat_kv, MatMul-Softmax-MatMul, additive mask) elsewhere; `gqa` requires every layer
to allow it; `sdpa` keeps the traced eager attention everywhere (the graph amp-edge exported before).

A GQA layer: one packed q|k|v MatMul (``qkv_proj``), GQA with that layer's own ``num_heads``/``kv_num_heads``,
rotary inside GQA (``do_rotary=1``, cos/sin tables computed by the model's own rotary module), then ``o_proj``.
GQA reads positions from ``seqlens_k`` (valid tokens per row - 1) and keeps each row's cache as a left-aligned
prefix: it supports right padding, not left padding (the package's padding contract, see the README).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.onnx.operators
from torch import nn

from amp_edge.models.adapters import adapter_class, get_adapter, supported_model_types
from amp_edge.models.compat import partial_rotary_factor, rope_type, rotary_call
from amp_edge.errors import InvalidOptionError
from amp_edge.memory import trim_heap

ATTENTION_MODES = ("auto", "gqa", "sdpa")
STATIC_ROPE = (None, "default", "linear", "llama3")  # one cos/sin table serves every position


def check_mode(mode: str) -> None:
    if mode not in ATTENTION_MODES:
        raise InvalidOptionError(f"unknown attention {mode!r}; choose from {', '.join(ATTENTION_MODES)}")


def ineligible(model: nn.Module) -> dict[int, str]:
    """Layers that cannot use GroupQueryAttention, with the reason (empty: every layer can)."""
    adapter = get_adapter(model)
    config = model.config
    family, rope = config.model_type, rope_type(config)
    if not adapter.gqa_export:
        covered = ", ".join(t for t in supported_model_types() if adapter_class(t).gqa_export)
        reason = f"model_type {family!r} (GQA export covers {covered})"
        return {i: reason for i in range(adapter.num_layers)}
    if rope not in STATIC_ROPE:
        return {i: f"rope scaling {rope!r} changes with the sequence length" for i in range(adapter.num_layers)}
    if adapter.head_dim % 16:  # ONNX Runtime's kernels take head sizes in multiples of 16
        return {i: f"head_dim {adapter.head_dim} is not a multiple of 16" for i in range(adapter.num_layers)}
    rotary = int(adapter.head_dim * partial_rotary_factor(config))
    if rotary % 16:  # GQA's rotary takes cos/sin tables of a multiple of 8 columns
        return {i: f"rotary dimension {rotary} is not a multiple of 16" for i in range(adapter.num_layers)}
    out = {}
    for i, shape in enumerate(adapter.shapes()):
        if shape.num_kv_heads == 0 or shape.num_heads % shape.num_kv_heads:
            out[i] = f"{shape.num_heads} query heads are not a multiple of {shape.num_kv_heads} KV heads"
    return out


def gqa_layers(model: nn.Module, mode: str) -> list[int]:
    """Indices of the layers exported with GroupQueryAttention under ``mode``."""
    check_mode(mode)
    if mode == "sdpa":
        return []
    bad = ineligible(model)
    if mode == "gqa" and bad:
        first = ", ".join(f"layer {i}: {r}" for i, r in list(bad.items())[:3])
        raise InvalidOptionError(f"--attention gqa: {len(bad)} layer(s) cannot use GroupQueryAttention ({first}); "
                                 "use --attention auto (those layers keep the plain attention) or sdpa")
    return [i for i in range(get_adapter(model).num_layers) if i not in bad]


class _GroupQueryAttention(torch.autograd.Function):
    """Eager: the attention GQA computes for unpadded rows (enough for tracing); ONNX: the contrib op."""

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total_len, cos, sin, num_heads, kv_heads, hd,
                scale, window=-1):
        b, s, _ = query.shape
        if key is None:
            query, key, value = query.split([num_heads * hd, kv_heads * hd, kv_heads * hd], -1)
        q = query.reshape(b, s, num_heads, hd).transpose(1, 2)
        k = key.reshape(b, s, kv_heads, hd).transpose(1, 2)
        v = value.reshape(b, s, kv_heads, hd).transpose(1, 2)
        past = past_key.shape[2]
        pos = torch.arange(past, past + s)
        q, k = _rotate(q, cos[pos], sin[pos]), _rotate(k, cos[pos], sin[pos])
        k, v = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
        groups = num_heads // kv_heads
        kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = (q @ kk.transpose(-1, -2)) * scale
        causal = torch.arange(past + s)[None, :] <= pos[:, None]
        if window >= 0:  # GQA's local_window_size: a query sees the last ``window`` keys, itself included
            causal &= torch.arange(past + s)[None, :] > pos[:, None] - window
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        out = scores.softmax(-1) @ vv
        return out.transpose(1, 2).reshape(b, s, num_heads * hd), k, v

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total_len, cos, sin, num_heads, kv_heads, hd, scale,
                 window=-1):
        from torch.onnx.symbolic_helper import _optional_input_placeholder_tensor

        if key is None:
            key = value = _optional_input_placeholder_tensor(g)
        outs = g.op("com.microsoft::GroupQueryAttention", query, key, value, past_key, past_value, seqlens_k, total_len,
                    cos, sin, num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale, do_rotary_i=1,
                    rotary_interleaved_i=0, local_window_size_i=window, outputs=3)
        outs[0].setType(query.type().with_sizes([None, None, num_heads * hd]))
        for out, past in zip(outs[1:], (past_key, past_value)):
            out.setType(past.type().with_sizes([None, kv_heads, None, hd]))
        return outs


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary (rotate-half) on the first 2 * cos.shape[-1] channels of x (batch, heads, seq, head_dim)."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)


@dataclass
class GQAState:
    """What every GQA layer of one traced step shares: the mask-derived inputs, the rotary tables, the presents."""

    cos: torch.Tensor
    sin: torch.Tensor
    tables: dict = field(default_factory=dict)  # layer type -> (cos, sin) where layer types have their own rope
    seqlens_k: torch.Tensor | None = None
    total_len: torch.Tensor | None = None
    presents: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    pasts: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    replaced: list[nn.Module] = field(default_factory=list)  # the attention modules swapped out

    def begin(self, attention_mask: torch.Tensor, past: tuple[torch.Tensor, ...]) -> None:
        self.seqlens_k = (attention_mask.sum(1) - 1).to(torch.int32)
        self.total_len = torch.onnx.operators.shape_as_tensor(attention_mask)[1].to(torch.int32)
        self.pasts = {i: (past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)}
        self.presents = {}


class GQAAttention(nn.Module):
    """Drop-in for one layer's attention module while tracing: packed q|k|v, GroupQueryAttention, o_proj."""

    def __init__(self, attn: nn.Module, adapter, index: int, state: GQAState):
        super().__init__()
        shape = adapter.layer_shape(index)
        self.index, self.state = index, state
        self.num_heads, self.kv_heads = shape.num_heads, shape.num_kv_heads
        self.head_dim, self.scale = adapter.head_dim, float(attn.scaling)
        # a sliding layer attends to its last ``window`` tokens, itself included: GQA's local_window_size, measured
        # against transformers' mask (q - k < window) on a prompt longer than the window (tests/test_gemma3.py)
        window = adapter.sliding_window(index)
        self.local_window = window if window else -1
        self.rope_type = adapter.rope_layer_type(index)
        self.num_key_value_groups = shape.group_size  # what adapters read to size the layer
        self.qkv_proj = attn.qkv_proj if hasattr(attn, "qkv_proj") else _pack([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = getattr(attn, adapter.o_name)
        # Qwen3 normalizes q and k per head before rotary: those layers pass q, k, v separately
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)

    def forward(self, hidden_states, *args, **kwargs):
        st, hd = self.state, self.head_dim
        qkv = self.qkv_proj(hidden_states)
        key = value = None
        if self.q_norm is not None:
            b, s, _ = qkv.shape
            q, k, value = qkv.split([self.num_heads * hd, self.kv_heads * hd, self.kv_heads * hd], -1)
            qkv = self.q_norm(q.reshape(b, s, self.num_heads, hd)).reshape(b, s, -1)
            key = self.k_norm(k.reshape(b, s, self.kv_heads, hd)).reshape(b, s, -1)
        past_k, past_v = st.pasts[self.index]
        cos, sin = st.tables.get(self.rope_type, (st.cos, st.sin))
        out, present_k, present_v = _GroupQueryAttention.apply(qkv, key, value, past_k, past_v, st.seqlens_k, st.total_len,
                                                                cos, sin, self.num_heads, self.kv_heads, hd, self.scale,
                                                                self.local_window)
        st.presents[self.index] = (present_k, present_v)
        return self.o_proj(out), None


class PackedMLP(nn.Module):
    """Drop-in for a gate/up/down MLP while tracing: one gate|up MatMul (``gate_up_proj``), then act(gate) * up."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.width = mlp.down_proj.in_features
        self.gate_up_proj = _pack([mlp.gate_proj, mlp.up_proj])
        self.down_proj, self.act_fn = mlp.down_proj, mlp.act_fn

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split([self.width, self.width], -1)
        return self.down_proj(self.act_fn(gate) * up)


def _pack(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose rows are the given Linears' rows; their weights become views into it (no second copy)."""
    out = nn.Linear(linears[0].in_features, 1, bias=linears[0].bias is not None, device="meta")
    with torch.no_grad():
        out.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears], 0), requires_grad=False)
        if out.bias is not None:
            out.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears], 0), requires_grad=False)
        out.out_features = out.weight.shape[0]
        start = 0
        for m in linears:
            rows = slice(start, start + m.out_features)
            m.weight.data = out.weight.data[rows]
            if m.bias is not None:
                m.bias.data = out.bias.data[rows]
            start += m.out_features
    out.amp_parts = tuple(linears)  # where the packed rows come from (the streamed export reads them by name)
    return out.eval()


def rotary_tables(model: nn.Module, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, rotary_dim / 2) cos and sin, from the model's own rotary module (scaling included); ``layer_type``
    picks the tables of one layer type where types have their own rope (Gemma 3's local base)."""
    rotary, kwargs = rotary_call(get_adapter(model).decoder, layer_type)
    positions = int(getattr(model.config, "max_position_embeddings", 4096))
    probe = torch.zeros(1, dtype=model.dtype)
    with torch.no_grad():
        cos, sin = rotary(probe, torch.arange(positions)[None], **kwargs)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].to(model.dtype).contiguous(), sin[0, :, :half].to(model.dtype).contiguous()


@contextlib.contextmanager
def gqa_attention(model: nn.Module, layers: list[int], pack_mlp: bool = True):
    """Swap the given layers' attention for GQAAttention (and a gate/up MLP for PackedMLP when ``pack_mlp``) while
    the block runs; yields the shared state (None if no layer)."""
    if not layers:
        yield None
        return
    adapter = get_adapter(model)
    types = sorted({adapter.rope_layer_type(i) for i in layers}, key=str)
    tables = {t: rotary_tables(model, t) for t in types if t is not None}
    cos, sin = tables[types[0]] if tables else rotary_tables(model)
    state = GQAState(cos, sin, tables)
    originals = []  # (layer, attribute, module)
    try:
        for i in layers:
            layer = adapter.layers()[i]
            originals.append((layer, adapter.attn_name, adapter.attention(i)))
            setattr(layer, adapter.attn_name, GQAAttention(adapter.attention(i), adapter, i, state))
            mlp = adapter.mlp(i)
            if pack_mlp and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                originals.append((layer, adapter.mlp_name, mlp))
                setattr(layer, adapter.mlp_name, PackedMLP(mlp))
            trim_heap()  # packing freed this layer's per-projection tensors (heap-sized): return them now
        state.replaced = [m for _, _, m in originals]
        yield state
    finally:
        for layer, name, module in reversed(originals):
            setattr(layer, name, module)
