"""Recovery training data: token rows of shape (n, seq_len), packed (documents joined by EOS), no padding.

Sources: ``self`` (the dense model writes its own samples; works offline), a local file (.txt with
blank-line separated documents, .jsonl with a text field, Alpaca-style .json / .jsonl records formatted
with the Alpaca prompt template), or a Hugging Face data set name (read as calibration data is).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from amp_edge.data.calibration import SELF, CalibrationSpec, read_texts, self_generated
from amp_edge.data.text import TextSource, read_documents
from amp_edge.data.tokens import bos_prefix
from amp_edge.errors import CalibrationError, RecoveryError

# The Alpaca template (as the LLM-Pruner / AMP LoRA recipe formats its recovery data).
_ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}")
_ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
           "### Instruction:\n{instruction}\n\n### Response:\n{output}")


# The recovery recipe's text (docs/recovery.md#which-recipe), under the data folder (AMP_EDGE_DATA_DIR)
RECIPE_DATA = ("calibration/c4_demo.jsonl", "calibration/alpaca_en_demo.json")


def default_source(calibration: str) -> str:
    """Recovery data when --recover-data is not given: the calibration source, except that ``self`` calibration takes
    the recipe's C4 + Alpaca files where the data folder has them (measured better: 42.8 vs 42.1 avg5 at 20%, and
    128 self-written sequences would repeat 16 times over 500 steps)."""
    if calibration != SELF:
        return calibration
    from amp_edge.evaluation.tasks import default_data_dir

    files = [default_data_dir() / f for f in RECIPE_DATA]
    return ",".join(str(f) for f in files) if all(f.is_file() for f in files) else SELF


def _parts(source: str) -> list[str]:
    return [p.strip() for p in source.split(",") if p.strip()]


def wants_self(source: str) -> bool:
    """Whether ``source`` asks for samples written by the dense model (``self``, alone or among others)."""
    return SELF in _parts(source)


def is_file_source(source: str) -> bool:
    path = Path(source).expanduser()
    return path.is_file() or path.suffix in (".txt", ".jsonl", ".json") or source.startswith((".", "/", "~"))


def recovery_texts(source: str, field: str | None = None, max_docs: int | None = None) -> list[str] | None:
    """The documents of ``source``; None for ``self`` alone (generated later by the dense model).

    Several sources joined by commas are mixed (their documents pooled, then shuffled when packed); a ``self``
    among them adds the dense model's samples to those rows (see :func:`wants_self`)."""
    parts = _parts(source)
    if not parts:
        raise RecoveryError(f"recovery data is empty ({source!r}); give a file, a calibration data set name or 'self'")
    others = [p for p in parts if p != SELF]
    if not others:
        return None
    if others != [source]:  # several sources, or one beside 'self'
        return [t for part in others for t in recovery_texts(part, field, max_docs)]
    if is_file_source(source):
        texts = read_recovery_file(Path(source).expanduser(), field)
    else:
        try:
            texts = read_texts(CalibrationSpec(source, num_samples=max_docs or 1024, field=field))
        except CalibrationError as e:
            raise RecoveryError(f"recovery data: {e}") from None
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise RecoveryError(f"recovery data {source!r} holds no text")
    return texts


def _alpaca(row: dict) -> str:
    """An Alpaca record as the instruction-following template the reference trains on."""
    template = _ALPACA_INPUT if row.get("input") else _ALPACA
    return template.format(instruction=row["instruction"], input=row.get("input", ""), output=row.get("output", ""))


RECOVERY = TextSource("recovery data", RecoveryError, field_option="--recover-field", alpaca=_alpaca)


def read_recovery_file(path: Path, field: str | None = None) -> list[str]:
    """Documents from .txt (blank-line separated), .jsonl (one record a line) or .json (a list of records)."""
    return read_documents(path, RECOVERY, field)


def pack(texts: list[str], tokenizer, seq_len: int, seed: int, source: str = "") -> torch.Tensor:
    """Shuffle the documents (seeded), join them by EOS into one stream, cut it into rows of seq_len tokens."""
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += list(ids) + sep
    prefix = bos_prefix(tokenizer)  # every row starts with BOS where the tokenizer adds one
    span = seq_len - len(prefix)
    n = len(stream) // span
    if n == 0:
        raise RecoveryError(f"recovery data {source!r} has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    rows = torch.tensor(stream[: n * span], dtype=torch.long).reshape(n, span)
    return torch.cat([torch.tensor([prefix] * n, dtype=torch.long).reshape(n, len(prefix)), rows], dim=1)


def recovery_rows(texts: list[str] | None, tokenizer, seq_len: int, seed: int, source: str = "",
                  dense_model=None, self_samples: int = 128, batch_size: int = 8,
                  written: torch.Tensor | None = None) -> torch.Tensor:
    """Token rows for training: packed ``texts``, then ``self_samples`` rows ``dense_model`` writes when ``texts``
    is None or ``source`` names ``self`` among other sources (``written``: those rows, already written)."""
    packed = pack(texts, tokenizer, seq_len, seed, source) if texts is not None else None
    if packed is not None and not wants_self(source):
        return packed
    if written is None:
        written = write_samples(dense_model, tokenizer, seq_len, seed, self_samples, batch_size)
    return written if packed is None else torch.cat([packed, written])  # batches draw rows by a seeded permutation


def write_samples(dense_model, tokenizer, seq_len: int, seed: int, self_samples: int, batch_size: int) -> torch.Tensor:
    """``self_samples`` rows of ``seq_len`` tokens that ``dense_model`` writes itself (seeded)."""
    if dense_model is None:
        raise RecoveryError("self-generated recovery data needs a model to generate it")
    spec = CalibrationSpec(SELF, num_samples=self_samples, seq_len=seq_len, seed=seed, batch_size=batch_size)
    was_training = dense_model.training
    dense_model.eval()
    try:
        return self_generated(dense_model, tokenizer, spec, desc="generating recovery data")
    finally:
        dense_model.train(was_training)
