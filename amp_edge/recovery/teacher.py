"""The distillation teacher read from its checkpoint layer by layer, instead of a second copy of the model in memory.

Distillation needs the dense model's logits on every batch, and the pruned student is made from the dense model in
place; a copy for the teacher doubles the weights held (for the 3.8B shape the budget estimated 16 GiB of teacher and
student in bf16, and refused it).
The safetensors folder the model came from is the teacher already: ``StreamedTeacher`` runs it as a meta skeleton
whose layers are filled from the files just before they run and emptied after (amp_edge.models.layered), so it holds
one layer. Each step then reads the whole checkpoint again, from the page cache where it fits: slower per step,
bounded in memory.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from amp_edge.models.compat import pruned_heads_allowed
from amp_edge.models.layered import Checkpoint, skeleton, streamed_logits


class StreamedTeacher(nn.Module):
    """``teacher(input_ids=..., use_cache=False).logits`` computed from the checkpoint folder one layer at a time."""

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.ckpt = Checkpoint.open(Path(folder))
        with pruned_heads_allowed():
            self.model = skeleton(self.ckpt.config())
        self.weights_dtype = dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool = False,
                **_ignored) -> SimpleNamespace:
        with torch.no_grad():
            return SimpleNamespace(logits=streamed_logits(self.model, self.ckpt, input_ids, attention_mask,
                                                          self.weights_dtype))
