"""Least-squares refit of the output projections after pruning: the kept units take over what the removed ones did.

Removing heads and neurons drops their share of each layer's output. For a linear output projection that loss
has a closed-form fix: with ``a`` the projection's input on calibration tokens and ``K`` the kept input columns,
the new weight ``W'`` minimises ``sum_t ||W a_t - W' a_t[K]||^2``, so ``W' = W G[:, K] (G[K, K] + damp)^-1`` with
``G = sum_t a_t a_t^T``. It is applied to ``o_proj`` (kept heads' columns) and ``down_proj`` (kept neurons'
columns) of every layer, using the dense model's own activations (each layer fitted independently: on SmolLM2-135M
this beat fitting each layer on the already-pruned layers' outputs). A projection with a bias refits it too.

The Gram matrices are built one layer at a time from cached layer inputs, so memory is one layer's Grams
(not the whole model's) plus the calibration hidden states.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from amp_edge.models.adapters import Adapter
from amp_edge.models.adapters.base import head_rows
from amp_edge.errors import CalibrationError, InvalidOptionError
from amp_edge.pruning.plan import PruningPlan


@dataclass
class RefitSpec:
    damp: float = 3e-4  # ridge term as a fraction of the mean diagonal of G[K, K]
    num_samples: int = 128  # calibration rows used for the fit (G of a 1536-wide MLP needs well over 1536 tokens)
    seq_len: int = 256

    def check(self) -> None:
        if not self.damp > 0:
            raise InvalidOptionError(f"refit damp must be > 0, got {self.damp}")
        for name in ("num_samples", "seq_len"):
            if getattr(self, name) < 1:
                raise InvalidOptionError(f"refit {name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Refitted:
    """New weights (and biases) of one layer's output projections, in the pruned shapes."""

    o_weight: torch.Tensor
    o_bias: torch.Tensor | None
    down_weight: torch.Tensor
    down_bias: torch.Tensor | None


class _Stop(Exception):
    pass


def refit_weights(adapter: Adapter, plan: PruningPlan, batches: list[torch.Tensor], damp: float) -> list[Refitted]:
    """Fit the pruned output projections on the dense model (call before ``apply_plan``); nothing is changed."""
    if not batches:
        raise CalibrationError("refit needs calibration data; got no batches")
    with torch.no_grad():
        hidden, kwargs = _first_layer_inputs(adapter, batches)
        out = []
        for i in tqdm(range(adapter.num_layers), desc="refit", unit="layer", leave=False):
            o, down = adapter.o_proj(i), adapter.down_proj(i)
            grams = {id(o): _Gram(o.in_features), id(down): _Gram(down.in_features)}
            hooks = [m.register_forward_pre_hook(lambda m, args: grams[id(m)].add(args[0])) for m in (o, down)]
            try:
                layer = adapter.layers()[i]
                hidden = [_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
            finally:
                for h in hooks:
                    h.remove()
            lp = plan.layers[i]
            cols = head_rows(lp.q_heads, adapter.head_dim)
            ow, ob = grams[id(o)].solve(o, cols, damp)
            dw, db = grams[id(down)].solve(down, torch.as_tensor(lp.neurons, dtype=torch.long), damp)
            out.append(Refitted(ow, ob, dw, db))
    return out


def load_refitted(adapter: Adapter, weights: list[Refitted]) -> None:
    """Copy refitted weights into the pruned model (after ``apply_plan``)."""
    with torch.no_grad():
        for i, r in enumerate(weights):
            for lin, w, b in ((adapter.o_proj(i), r.o_weight, r.o_bias), (adapter.down_proj(i), r.down_weight, r.down_bias)):
                if lin.weight.shape != w.shape:
                    raise InvalidOptionError(f"layer {i}: refitted weight {tuple(w.shape)} does not fit {tuple(lin.weight.shape)}")
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)


class _Gram:
    """Running sums of a projection's inputs: sum a a^T (float64), sum a, and the token count."""

    def __init__(self, dim: int):
        self.g = torch.zeros(dim, dim, dtype=torch.float64)
        self.s = torch.zeros(dim, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.g += (x.T @ x).double()
        self.s += x.sum(0).double()
        self.n += x.shape[0]

    def solve(self, lin: torch.nn.Linear, keep: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W' (and b') minimising the squared error to the full projection's output over the seen inputs."""
        w = lin.weight.double()
        g_kk = self.g[keep][:, keep]
        ridge = damp * g_kk.diagonal().mean()
        cross = w @ self.g[:, keep]  # sum_t (W a_t) a_t[K]^T
        if lin.bias is not None:  # regress on [a_K, 1]: the bias absorbs the removed units' mean contribution
            b = lin.bias.double()
            s_k = self.s[keep]
            g_kk = torch.cat([torch.cat([g_kk, s_k[:, None]], 1), torch.cat([s_k, s_k.new_tensor([self.n])])[None]], 0)
            cross = torch.cat([cross + b[:, None] * s_k[None], (w @ self.s + self.n * b)[:, None]], 1)
        g_kk = g_kk + ridge * torch.eye(g_kk.shape[0], dtype=g_kk.dtype)
        solved = torch.linalg.solve(g_kk, cross.T).T.to(lin.weight.dtype)
        if lin.bias is not None:
            return solved[:, :-1].contiguous(), solved[:, -1].contiguous()
        return solved.contiguous(), None


def _first_layer_inputs(adapter: Adapter, batches) -> tuple[list[torch.Tensor], list[dict]]:
    """Each batch's hidden states and keyword arguments (positions, rotary tables, mask) at the first layer."""
    device = next(adapter.model.parameters()).device
    hidden, kwargs = [], []

    def grab(_m, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append(dict(kw))
        raise _Stop

    hook = adapter.layers()[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                adapter.decoder(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        hook.remove()
    return hidden, kwargs


def _output(out):
    return out[0] if isinstance(out, tuple) else out
