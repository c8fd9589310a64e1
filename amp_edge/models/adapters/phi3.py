"""Phi-3 / Phi-4-mini: fused ``qkv_proj`` (rows q | k | v) and ``gate_up_proj`` (rows gate | up)."""

import torch

from amp_edge.models.compat import rope_scaling
from amp_edge.models.adapters.base import Adapter, _row_cost, head_rows, keep_cols, keep_rows, register


@register
class Phi3Adapter(Adapter):
    model_type = "phi3"
    window_on_every_layer = True  # Phi-3-mini-4k: 2047 on every layer
    q_name = "qkv_proj"
    kv_names = ()
    mlp_in_names = ()

    def standard_config_fits(self, num_heads):
        # Phi3Config checks rope_scaling factors against hidden_size // num_attention_heads, not head_dim.
        return rope_scaling(self.config) is None or self.hidden_size // num_heads == self.head_dim

    def query_weight(self, i):
        return self.attention(i).qkv_proj.weight[: self.o_proj(i).in_features]

    def projections(self, i):
        attn, mlp = self.attention(i), self.mlp(i)
        return [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]

    def mlp_in_weights(self, i):
        gate, up = self.mlp(i).gate_up_proj.weight.chunk(2, dim=0)
        return [gate, up]

    def unit_costs(self, i):
        costs = super().unit_costs(i)
        kv_head = 2 * self.head_dim * _row_cost(self.attention(i).qkv_proj)
        return type(costs)(costs.query_head, kv_head, costs.neuron + 2 * _row_cost(self.mlp(i).gate_up_proj))

    def prune_attention(self, i, q_heads, kv_heads):
        attn, hd = self.attention(i), self.head_dim
        shape = self.layer_shape(i)
        q_end = shape.num_heads * hd
        rows = torch.cat([
            head_rows(q_heads, hd),
            head_rows(kv_heads, hd, offset=q_end),
            head_rows(kv_heads, hd, offset=q_end + shape.num_kv_heads * hd),
        ])
        attn.qkv_proj = keep_rows(attn.qkv_proj, rows)
        attn.o_proj = keep_cols(attn.o_proj, head_rows(q_heads, hd))
        self.set_attention_shape(i, len(q_heads), len(kv_heads))

    def prune_mlp(self, i, neurons):
        mlp = self.mlp(i)
        width = self.down_proj(i).in_features
        idx = torch.as_tensor(list(neurons), dtype=torch.long)
        mlp.gate_up_proj = keep_rows(mlp.gate_up_proj, torch.cat([idx, idx + width]))
        mlp.down_proj = keep_cols(mlp.down_proj, idx)
