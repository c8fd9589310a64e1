"""Calibration batches: token ids of shape (batch, seq_len), no padding.

Sources: ``self`` (the model writes its own samples; works offline with no data set), a local file
(.txt, .jsonl with a text field, Alpaca-style .json), or a Hugging Face data set name.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from amp_edge.models.adapters import get_adapter
from amp_edge.data.text import TextSource, read_documents, record_text
from amp_edge.data.tokens import bos_prefix
from amp_edge.errors import CalibrationError, InvalidOptionError
from amp_edge.memory import heap_for_growing_cache

CALIBRATION = TextSource("calibration", CalibrationError)

log = logging.getLogger(__name__)
SELF = "self"
_GENERATE_ROWS_MAX = 128
_GENERATE_CACHE_BYTES = 2 << 30  # the KV cache one generate() call may fill


@dataclass
class CalibrationSpec:
    source: str = SELF
    num_samples: int = 32
    seq_len: int = 128
    seed: int = 0
    batch_size: int = 8
    field: str | None = None  # text field of .jsonl / data set rows; guessed when None
    split: str = "train"  # for hub data sets

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        for name in ("num_samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidOptionError(f"calibration {name} must be >= 1, got {getattr(self, name)}")


def calibration_batches(spec: CalibrationSpec, model, tokenizer) -> list[torch.Tensor]:
    spec.check()
    if spec.source == SELF:
        rows = self_generated(model, tokenizer, spec)
    else:
        rows = _chunk(_tokenize(read_texts(spec), tokenizer, spec.seed), spec, bos_prefix(tokenizer))
    return list(rows.split(spec.batch_size))


def read_texts(spec: CalibrationSpec) -> list[str]:
    path = Path(spec.source).expanduser()
    if path.is_dir():  # a data set folder: `datasets` reads local folders like hub repos
        texts = _hub_texts(spec)
    elif path.exists() or path.suffix in (".txt", ".jsonl", ".json") or spec.source.startswith((".", "/", "~")):
        texts = read_documents(path, CALIBRATION, spec.field)
    else:
        texts = _hub_texts(spec)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise CalibrationError(f"calibration source {spec.source!r} holds no text")
    return texts


def _hub_texts(spec: CalibrationSpec) -> list[str]:
    try:
        import datasets

        ds = datasets.load_dataset(spec.source, split=spec.split)
    except Exception as e:  # the hub client raises many unrelated types; all mean "cannot get it"
        raise CalibrationError(f"cannot load calibration data set {spec.source!r} (split {spec.split!r}): {str(e).splitlines()[0]}") from None
    rng = random.Random(spec.seed)
    picks = rng.sample(range(len(ds)), min(len(ds), spec.num_samples * 4))
    return [record_text(ds[i], CALIBRATION, spec.source, spec.field) for i in picks]


def _tokenize(texts: list[str], tokenizer, seed: int) -> list[int]:
    """Shuffled documents joined by EOS into one token stream."""
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + sep
    return stream


def _chunk(stream: list[int], spec: CalibrationSpec, prefix: list[int] = ()) -> torch.Tensor:
    """Rows of ``spec.seq_len`` tokens, each ``prefix`` (BOS where the tokenizer adds one) then the stream's next tokens."""
    span = spec.seq_len - len(prefix)
    n = min(spec.num_samples, len(stream) // span)
    if n == 0:
        raise CalibrationError(f"calibration source {spec.source!r} has {len(stream)} tokens, fewer than one sample of {spec.seq_len}")
    if n < spec.num_samples:
        log.warning("calibration source %s yields %d samples of %d tokens, not %d", spec.source, n, spec.seq_len, spec.num_samples)
    rows = torch.tensor(stream[: n * span], dtype=torch.long).reshape(n, span)
    return torch.cat([torch.tensor([list(prefix)] * n, dtype=torch.long).reshape(n, len(prefix)), rows], dim=1)


def generate_rows(model, seq_len: int) -> int:
    """Rows per generate() call: more rows write more tokens per second on a CPU (SmolLM2-135M, 2 cores, 256 tokens,
    through self_generated: 104 tok/s in rows of 32, 116 in rows of 128), so as many as keep the KV cache within
    2 GiB, at most 128: all 128 for SmolLM2-135M, 10 for Phi-3-mini in fp32."""
    adapter = get_adapter(model)
    width = next(model.parameters()).element_size()
    per_row = 2 * sum(s.num_kv_heads for s in adapter.shapes()) * adapter.head_dim * seq_len * width
    return max(1, min(_GENERATE_ROWS_MAX, _GENERATE_CACHE_BYTES // per_row))


def self_generated(model, tokenizer, spec: CalibrationSpec, desc: str = "generating calibration") -> torch.Tensor:
    """Samples the model writes itself, each from a random first token (data-free calibration)."""
    gen = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    device = next(model.parameters()).device
    vocab = min(len(tokenizer), model.config.vocab_size)
    rows = []
    step = max(spec.batch_size, min(spec.num_samples, generate_rows(model, spec.seq_len)))
    # One bar over every token written, moved at each generation step: a call writes all its rows at once and takes
    # minutes on a large model, so a bar per call would sit at 0/1 all that time.
    prompt = 1 + (tokenizer.bos_token_id is not None)
    bar = tqdm(total=spec.num_samples * max(0, spec.seq_len - prompt), desc=desc, unit="tok", leave=False)
    for start in range(0, spec.num_samples, step):
        n = min(step, spec.num_samples - start)
        first = torch.randint(0, vocab, (n, 1), generator=gen)
        if tokenizer.bos_token_id is not None:
            first = torch.cat([torch.full((n, 1), tokenizer.bos_token_id), first], dim=1)
        with heap_for_growing_cache():
            out = model.generate(
                input_ids=first.to(device), attention_mask=torch.ones_like(first).to(device),
                do_sample=True, top_p=0.95, temperature=1.0, max_length=spec.seq_len, min_length=spec.seq_len,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                stopping_criteria=[_Progress(bar, n, first.shape[1])],
            )
        rows.append(out[:, : spec.seq_len].cpu())
    bar.close()
    return torch.cat(rows)


class _Progress:
    """A stopping criterion that never stops: it moves ``bar`` by the ``rows`` tokens each generation step writes."""

    def __init__(self, bar, rows: int, prompt: int):
        self.bar, self.rows, self.seen = bar, rows, prompt

    def __call__(self, input_ids, scores, **kwargs):
        new = input_ids.shape[1] - self.seen
        self.seen = input_ids.shape[1]
        self.bar.update(new * self.rows)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
