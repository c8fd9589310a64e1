"""Run an amp-edge package with optimum's ORTModelForCausalLM.

optimum sizes the empty KV cache of the first step as hidden_size // num_attention_heads and uses one KV
head count for all layers. After pruning neither holds (SmolLM2 at 30%: 576 // 6 = 96, the heads are 64
wide; global plans give every layer its own KV head count). This subclass builds the empty cache from the
graph's own input shapes instead; everything else is optimum's code path.
"""

from __future__ import annotations

import torch
from optimum.onnxruntime import ORTModelForCausalLM


class PrunedORTModelForCausalLM(ORTModelForCausalLM):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self._empty_cache_shapes = {name: inputs[name] for name in self.key_value_input_names}
        self.embed_size_per_head = getattr(self.config, "head_dim", None) or self.embed_size_per_head

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
        if past_key_values is None and self.key_value_input_names:
            batch = input_ids.shape[0]
            flat = [torch.zeros((batch, shape[1], 0, shape[3]), dtype=self.dtype, device=self.device)
                    for shape in self._empty_cache_shapes.values()]
            past_key_values = tuple(zip(flat[::2], flat[1::2]))  # ((key, value) per layer), as optimum expects
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
