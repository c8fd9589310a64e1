"""Perplexity with a sliding window over a text file (e.g. WikiText-2 test)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from amp_edge.data.text import TextSource, read_text
from amp_edge.errors import DataError, InvalidOptionError

EVAL_TEXT = TextSource("text", DataError)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token
    tokens: int  # tokens scored
    window: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def read_eval_text(path: str | Path) -> str:
    text = read_text(path, EVAL_TEXT)
    if not text.strip():
        raise DataError(f"text file {Path(path).expanduser()} is empty")
    return text


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 1024, stride: int | None = None,
               max_tokens: int | None = None, forward=None, context: int | None = None) -> PerplexityResult:
    """Each window sees up to ``window`` tokens and scores only the ``stride`` new ones past the previous window.

    stride == window gives disjoint windows; a smaller stride gives every scored token more context.
    ``forward(ids (1, T)) -> logits (1, T, vocab)`` replaces the PyTorch model (e.g. an ONNX package's graph).
    ``context``: the model's positions (default: its config's max_position_embeddings); a longer window is refused.
    """
    stride = stride or window
    if window < 2 or not 0 < stride <= window:
        raise InvalidOptionError(f"need window >= 2 and 0 < stride <= window, got window={window} stride={stride}")
    context = context or getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context and window > context:
        raise InvalidOptionError(f"window {window} is longer than the model's context ({context} positions); "
                                 f"use --window {context} or less")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if max_tokens:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise DataError("text has fewer than 2 tokens")
    if forward is None:
        device = next(model.parameters()).device
        forward = lambda chunk: model(input_ids=chunk.to(device), use_cache=False).logits  # noqa: E731
    nll_sum, scored, prev_end = 0.0, 0, 0
    for begin in tqdm(range(0, ids.numel() - 1, stride), desc="perplexity", unit="window", leave=False):
        end = min(begin + window, ids.numel())
        new = end - max(prev_end, begin + 1)  # tokens not scored before; the first token has no context
        chunk = ids[begin:end].unsqueeze(0)
        logits = forward(chunk)[0, -new - 1 : -1].float().cpu()
        nll_sum += torch.nn.functional.cross_entropy(logits, chunk[0, -new:], reduction="sum").item()
        scored += new
        prev_end = end
        if end == ids.numel():
            break
    nll = nll_sum / scored
    return PerplexityResult(math.exp(nll), nll, scored, window, stride)
