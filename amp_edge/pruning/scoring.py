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


def _run(adapter: Adapter, batches: Iterable[torch.Tensor], hook_fn: Callable, desc: str) -> int:
    """Forward every batch with hooks on each layer's o_proj and down_proj inputs; returns tokens seen."""
    n = adapter.num_layers
    modules = [adapter.o_proj(i) for i in range(n)] + [adapter.down_proj(i) for i in range(n)]
    tokens = 0
    device = next(adapter.model.parameters()).device
    with input_hooks(modules, hook_fn):
        for batch in tqdm(list(batches), desc=desc, unit="batch", leave=False):
            # The decoder body only: the LM head's logits (tokens x vocab) are not needed for scoring.
            adapter.decoder(input_ids=batch.to(device), use_cache=False)
            tokens += batch.numel()
    return tokens


@scorer("amp")
def amp_scores(adapter: Adapter, batches, seed=0) -> list[LayerScores]:
    n, hd = adapter.num_layers, adapter.head_dim
    heads = [None] * n
    neurons = [None] * n

    def hook(i, x):
        x = x.reshape(-1, x.shape[-1]).float()
        if i < n:  # attention output-projection input: per-head contribution, L1 over hidden
            w = adapter.o_proj(i).weight.float()
            w = w.reshape(w.shape[0], -1, hd)  # (hidden, heads, hd)
            total = 0
            for chunk in x.split(_TOKEN_CHUNK):
                contrib = torch.einsum("nhd,ohd->nho", chunk.reshape(chunk.shape[0], -1, hd), w)
                total = total + contrib.abs().sum(dim=(0, 2)).double()
            heads[i] = total if heads[i] is None else heads[i] + total
        else:
            s = x.abs().sum(0).double()
            neurons[i - n] = s if neurons[i - n] is None else neurons[i - n] + s

    tokens = _run(adapter, batches, hook, "scoring (amp)")
    _require_tokens(tokens)
    return [LayerScores(h / tokens, a / tokens) for h, a in zip(heads, neurons)]


@scorer("wanda-sp")
def wanda_sp_scores(adapter: Adapter, batches, seed=0) -> list[LayerScores]:
    n, hd = adapter.num_layers, adapter.head_dim
    sq = [None] * (2 * n)

    def hook(i, x):
        s = x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
        sq[i] = s if sq[i] is None else sq[i] + s

    _require_tokens(_run(adapter, batches, hook, "scoring (wanda-sp)"))
    out = []
    for i in range(n):
        col_o = (adapter.o_proj(i).weight.abs().double() * sq[i].sqrt()).mean(0)
        col_d = (adapter.down_proj(i).weight.abs().double() * sq[n + i].sqrt()).mean(0)
        out.append(LayerScores(col_o.reshape(-1, hd).sum(1), col_d))
    return out


@scorer("magnitude")
def magnitude_scores(adapter: Adapter, batches=(), seed=0) -> list[LayerScores]:
    out, hd = [], adapter.head_dim
    for i in range(adapter.num_layers):
        q = adapter.query_weight(i).double().pow(2).sum(1).reshape(-1, hd).sum(1)
        o = adapter.o_proj(i).weight.double().pow(2).sum(0).reshape(-1, hd).sum(1)
        mlp = sum(w.double().pow(2).sum(1) for w in adapter.mlp_in_weights(i))
        down = adapter.down_proj(i).weight.double().pow(2).sum(0)
        out.append(LayerScores((q + o).sqrt(), (mlp + down).sqrt()))
    return out


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
