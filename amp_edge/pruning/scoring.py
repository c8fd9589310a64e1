"""Importance scorers: ``score(adapter, batches) -> list[LayerScores]``; higher means more important.

amp        the paper's criterion: a head's mean L1 contribution through the output projection,
           a neuron's mean |activation| into the down projection.
magnitude  L2 norm of the weights of the group (query rows + output columns; MLP rows + column).
wanda-sp   structured Wanda: |W_out| times the input activation norm, summed over the group.
random     seeded uniform scores, the floor every criterion must beat.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from amp_edge.models.adapters import Adapter
from amp_edge.errors import CalibrationError, InvalidOptionError

_SCORERS: dict[str, Callable] = {}
_TOKEN_CHUNK = 1024  # bounds the (tokens, heads, hidden) temporary of the AMP head score


@dataclass
class LayerScores:
    heads: torch.Tensor  # (num_heads,)
    neurons: torch.Tensor  # (intermediate_size,)


def scorer(name: str):
    def deco(fn):
        _SCORERS[name] = fn
        return fn
    return deco


def criteria() -> list[str]:
    return sorted(_SCORERS)


def needs_calibration(criterion: str) -> bool:
    return criterion in ("amp", "wanda-sp")


def score(criterion: str, adapter: Adapter, batches: Iterable[torch.Tensor] = (), seed: int = 0) -> list[LayerScores]:
    if criterion not in _SCORERS:
        raise InvalidOptionError(f"unknown criterion {criterion!r}; choose from {', '.join(criteria())}")
    with torch.no_grad():
        return _SCORERS[criterion](adapter, batches=batches, seed=seed)


@contextmanager
def input_hooks(modules: list[torch.nn.Module], fn: Callable[[int, torch.Tensor], torch.Tensor | None]):
    """Call ``fn(index, input)`` on each module's input during forward (a tensor it returns replaces the input);
    hooks always come off."""
    handles = [m.register_forward_pre_hook(lambda _m, args, i=i: fn(i, args[0])) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Accumulator:
    """One layer's running sums for a calibrated criterion, fed the inputs of its o_proj and down_proj.

    The in-memory pass (hooks on every layer) and the streamed pass (one filled layer at a time) use the same class,
    so both compute the same numbers. Sums are float64; ``reduce`` adds every torchrun rank's sums and token counts
    before ``finish`` turns them into scores (amp_edge.pruning.distributed)."""

    def __init__(self, criterion: str, head_dim: int, o_in: int, d_in: int):
        if not needs_calibration(criterion):
            raise InvalidOptionError(f"criterion {criterion!r} reads no activations")
        self.criterion, self.hd = criterion, head_dim
        self.attn_sum = torch.zeros(o_in // head_dim if criterion == "amp" else o_in, dtype=torch.float64)
        self.mlp_sum = torch.zeros(d_in, dtype=torch.float64)
        self.tokens = 0

    @classmethod
    def for_layer(cls, criterion: str, adapter: Adapter, i: int) -> Accumulator:
        return cls(criterion, adapter.head_dim, adapter.o_proj(i).in_features, adapter.down_proj(i).in_features)

    def attn(self, x: torch.Tensor, o_proj: torch.nn.Linear) -> None:
        """Add the o_proj input ``x`` (tokens are counted here)."""
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        if self.criterion == "wanda-sp":
            self.attn_sum += x.double().pow(2).sum(0)
            return
        hd = self.hd  # amp: per-head contribution through o_proj, L1 over hidden
        w = o_proj.weight.float()
        w = w.reshape(w.shape[0], -1, hd)  # (hidden, heads, hd)
        for chunk in x.split(_TOKEN_CHUNK):
            contrib = torch.einsum("nhd,ohd->nho", chunk.reshape(chunk.shape[0], -1, hd), w)
            self.attn_sum += contrib.abs().sum(dim=(0, 2)).double()

    def mlp(self, x: torch.Tensor) -> None:
        """Add the down_proj input ``x``."""
        x = x.reshape(-1, x.shape[-1])
        if self.criterion == "wanda-sp":
            self.mlp_sum += x.double().pow(2).sum(0)
        else:
            self.mlp_sum += x.float().abs().sum(0).double()

    def reduce(self) -> None:
        """Sum over the torchrun ranks (a no-op in one process); every rank calls it, in the same order."""
        from amp_edge.pruning.distributed import all_reduce_sum

        self.attn_sum = all_reduce_sum(self.attn_sum)
        self.mlp_sum = all_reduce_sum(self.mlp_sum)
        self.tokens = int(all_reduce_sum(torch.tensor([float(self.tokens)], dtype=torch.float64)).item())

    def finish(self, o_proj: torch.nn.Linear, down_proj: torch.nn.Linear) -> LayerScores:
        """The layer's scores (after ``reduce``); wanda-sp reads the weights, so they must be there."""
        _require_tokens(self.tokens)
        if self.criterion == "amp":
            return LayerScores(self.attn_sum / self.tokens, self.mlp_sum / self.tokens)
        col_o = (o_proj.weight.abs().double() * self.attn_sum.sqrt()).mean(0)
        col_d = (down_proj.weight.abs().double() * self.mlp_sum.sqrt()).mean(0)
        return LayerScores(col_o.reshape(-1, self.hd).sum(1), col_d)


def _calibrated(criterion: str, adapter: Adapter, batches: Iterable[torch.Tensor]) -> list[LayerScores]:
    """Forward every batch with hooks on each layer's o_proj and down_proj inputs, then finish each layer."""
    n = adapter.num_layers
    accs = [Accumulator.for_layer(criterion, adapter, i) for i in range(n)]
    modules = [adapter.o_proj(i) for i in range(n)] + [adapter.down_proj(i) for i in range(n)]

    def hook(i, x):
        if i < n:
            accs[i].attn(x, modules[i])
        else:
            accs[i - n].mlp(x)

    device = next(adapter.model.parameters()).device
    with input_hooks(modules, hook):
        for batch in tqdm(list(batches), desc=f"scoring ({criterion})", unit="batch", leave=False):
            # The decoder body only: the LM head's logits (tokens x vocab) are not needed for scoring.
            adapter.decoder(input_ids=batch.to(device), use_cache=False)
    out = []
    for i, acc in enumerate(accs):
        acc.reduce()
        out.append(acc.finish(adapter.o_proj(i), adapter.down_proj(i)))
    return out


@scorer("amp")
def amp_scores(adapter: Adapter, batches, seed=0) -> list[LayerScores]:
    return _calibrated("amp", adapter, batches)


@scorer("wanda-sp")
def wanda_sp_scores(adapter: Adapter, batches, seed=0) -> list[LayerScores]:
    return _calibrated("wanda-sp", adapter, batches)


def magnitude_layer(adapter: Adapter, i: int) -> LayerScores:
    """Layer i's magnitude scores (its weights must be there)."""
    hd = adapter.head_dim
    q = adapter.query_weight(i).double().pow(2).sum(1).reshape(-1, hd).sum(1)
    o = adapter.o_proj(i).weight.double().pow(2).sum(0).reshape(-1, hd).sum(1)
    mlp = sum(w.double().pow(2).sum(1) for w in adapter.mlp_in_weights(i))
    down = adapter.down_proj(i).weight.double().pow(2).sum(0)
    return LayerScores((q + o).sqrt(), (mlp + down).sqrt())


@scorer("magnitude")
def magnitude_scores(adapter: Adapter, batches=(), seed=0) -> list[LayerScores]:
    return [magnitude_layer(adapter, i) for i in range(adapter.num_layers)]


@scorer("random")
def random_scores(adapter: Adapter, batches=(), seed=0) -> list[LayerScores]:
    gen = torch.Generator().manual_seed(seed)
    return [
        LayerScores(torch.rand(s.num_heads, generator=gen, dtype=torch.float64),
                    torch.rand(s.intermediate_size, generator=gen, dtype=torch.float64))
        for s in adapter.shapes()
    ]


def _require_tokens(tokens: int) -> None:
    if tokens == 0:
        raise CalibrationError("calibration produced no tokens; the criterion needs calibration data")
