"""Whether a text starts with BOS: where the tokenizer adds one on its own, every sequence the model sees should.

Gemma 3 was trained with BOS at position 0 of every sequence: WikiText-2 perplexity of Gemma-3-270M is about twice
as high without it. SmolLM2's tokenizer adds no BOS (its GGUF says add_bos_token false): nothing changes there.
Perplexity, calibration rows and recovery rows all ask here.
"""

from __future__ import annotations


def adds_bos(tokenizer) -> bool:
    """True when ``tokenizer(text)`` (its default special tokens) starts with its BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and (not without or without[0] != bos)


def bos_prefix(tokenizer, bos: bool | None = None) -> list[int]:
    """[bos_token_id] or []: ``bos`` None follows the tokenizer (``adds_bos``), True/False force it (--bos/--no-bos)."""
    if bos is None:
        bos = adds_bos(tokenizer)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return [bos_id] if bos and bos_id is not None else []
