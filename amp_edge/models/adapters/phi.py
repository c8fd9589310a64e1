"""Phi-1.5 / Phi-2: biases everywhere, output projection ``dense``, MLP fc1 -> act -> fc2."""

from amp_edge.errors import UnsupportedArchitectureError
from amp_edge.models.adapters.base import Adapter, register


@register
class PhiAdapter(Adapter):
    model_type = "phi"
    o_name = "dense"
    mlp_in_names = ("fc1",)
    mlp_out_name = "fc2"
    gqa_export = False  # partial rotary on a dense/fc layout: exported with plain attention

    def check_prunable(self) -> None:
        # Its q/k layernorms are sized hidden // heads, which stops matching head_dim once heads go.
        if getattr(self.config, "qk_layernorm", False):
            raise UnsupportedArchitectureError("phi with qk_layernorm=True cannot be head-pruned (qk_layernorm must be False)")
