"""How often a quantized package picks the reference's next token on the reference's own text.

The reference (the fp32 model) greedily continues four natural prompts for 32 tokens; the package is then
teacher-forced on those sequences and its top-1 is compared with the reference's token at each of the 4 x 32
continuation positions. Unlike the validation's shapes (the package generates, PyTorch is teacher-forced on the
package's tokens), the text here is the reference's, so one early divergence does not put every later position on
text neither model would write.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROMPTS = ("The capital of France is", "Once upon a time, in a small village,",
           "To make a cup of tea, first", "The three primary colors are")
STEPS = 32


@dataclass
class Continuations:
    """The reference's greedy continuations: prompt + continuation tokens per row, and each prompt's length."""

    rows: list[list[int]]
    starts: list[int]


def prompt_ids(tokenizer, vocab: int) -> list[list[int]]:
    """The prompts as the tokenizer encodes them (with BOS where it adds one); random ids without a tokenizer."""
    if tokenizer is not None:
        rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
        if all(len(r) >= 3 for r in rows):
            return rows
    rng = np.random.default_rng(1)
    return [rng.integers(min(4, vocab - 1), vocab, 6 + i).tolist() for i in range(len(PROMPTS))]


def onnx_continuations(decoder, prompts: list[list[int]], steps: int = STEPS) -> Continuations:
    """Greedy continuations of an ONNX package (one prefill, then cached steps)."""
    rows = []
    for prompt in prompts:
        ids = np.array([prompt], dtype=np.int64)
        tokens = decoder.generate(ids, steps, np.ones_like(ids))
        rows.append(list(prompt) + np.asarray(tokens).reshape(-1)[-steps:].tolist())
    return Continuations(rows, [len(p) for p in prompts])


def agreement(decoder, ref: Continuations) -> float:
    """The share of continuation positions where ``decoder``'s top-1 (teacher-forced, one prefill per row) is the
    reference's token."""
    hits = total = 0
    for row, start in zip(ref.rows, ref.starts):
        ids = np.array([row[:-1]], dtype=np.int64)
        logits, _ = decoder.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], decoder.empty_cache(1))
        predicted = logits[0, start - 1:].argmax(-1)
        hits += int((predicted == np.array(row[start:])).sum())
        total += len(row) - start
    return hits / total


def torch_continuations(forward, prompts: list[list[int]], pad_id: int = 0, steps: int = STEPS) -> Continuations:
    """Greedy continuations of a PyTorch model, all prompts in one left-padded batch (a prefill, then one cached step
    per token). ``forward(ids, mask, cache)`` returns the logits of ``ids``; ``mask`` covers the cache and ``ids``."""
    import torch
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cache, new = DynamicCache(), []
    with torch.no_grad():
        logits = forward(ids, mask, cache)
        for t in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            new.append(nxt)
            if t < steps - 1:
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                logits = forward(nxt, mask, cache)
    tokens = torch.cat(new, 1).tolist()
    return Continuations([list(p) + t for p, t in zip(prompts, tokens)], [len(p) for p in prompts])


def model_forward(model):
    """``forward`` for torch_continuations from an in-memory model."""
    def forward(ids, mask, cache):
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True).logits
    return forward
