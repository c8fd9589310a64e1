"""Perplexity with a sliding window over a text file (e.g. WikiText-2 test)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from amp_edge.data.text import TextSource, read_text
from amp_edge.data.tokens import bos_prefix
from amp_edge.errors import DataError, InvalidOptionError

EVAL_TEXT = TextSource("text", DataError)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token
    tokens: int  # tokens scored
    window: int
    stride: int
    bos: bool = False  # each window started with the BOS token


    def to_dict(self) -> dict:
        return asdict(self)


def read_eval_text(path: str | Path) -> str:
    text = read_text(path, EVAL_TEXT)
    if not text.strip():
        raise DataError(f"text file {Path(path).expanduser()} is empty")
    return text


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 1024, stride: int | None = None,
               max_tokens: int | None = None, forward=None, context: int | None = None,
               bos: bool | None = None) -> PerplexityResult:
    """Each window sees up to ``window`` tokens and scores only the ``stride`` new ones past the previous window.

    stride == window gives disjoint windows; a smaller stride gives every scored token more context.
    ``forward(ids (1, T)) -> logits (1, T, vocab)`` replaces the PyTorch model (e.g. an ONNX package's graph).
    ``context``: the model's positions (default: its config's max_position_embeddings); a longer window is refused.
    ``bos``: start every window with the BOS token (None: where the tokenizer adds one, amp_edge.data.tokens). The
    window then holds BOS and ``window - 1`` text tokens (stride at most that), and the text's first token is scored
    too, with BOS as its context; BOS itself is never scored.
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
    prefix = torch.tensor(bos_prefix(tokenizer, bos), dtype=ids.dtype)
    span = window - prefix.numel()  # text tokens per window
    stride = min(stride, span)
    if forward is None:
        device = next(model.parameters()).device
        forward = lambda chunk: model(input_ids=chunk.to(device), use_cache=False).logits  # noqa: E731
    nll_sum, scored, prev_end = 0.0, 0, 0
    first = 1 - prefix.numel()  # the first text token has context only after a BOS
    for begin in tqdm(range(0, ids.numel() - first, stride), desc="perplexity", unit="window", leave=False):
        end = min(begin + span, ids.numel())
        new = end - max(prev_end, begin + first)  # tokens not scored before
        chunk = torch.cat([prefix, ids[begin:end]]).unsqueeze(0)
        logits = forward(chunk)[0, -new - 1 : -1].float().cpu()
        nll_sum += torch.nn.functional.cross_entropy(logits, chunk[0, -new:], reduction="sum").item()
        scored += new
        prev_end = end
        if end == ids.numel():
            break
    nll = nll_sum / scored
    return PerplexityResult(math.exp(nll), nll, scored, window, stride, bool(prefix.numel()))
