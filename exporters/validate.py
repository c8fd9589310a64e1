"""Parity of an exported graph with its PyTorch model: prefill + teacher-forced decode, and greedy tokens.

Two shapes: one prompt alone, and a padded batch of two: left-padded for the plain attention graph, right-padded
for a graph with GroupQueryAttention layers (GQA keeps each row's valid tokens as a prefix; it cannot express
left padding). Every mismatch is collected; the caller raises them together as one ExportValidationError.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from amp_edge_runtime.decoder import OnnxDecoder, last_real
from amp_edge_runtime.session import session_options

# Documented bounds. fp32 must match the PyTorch model numerically (max |Δlogits| and 32 greedy tokens).
# Lower precisions are judged by how often the most likely next token agrees with the fp32 PyTorch model
# (top-1 agreement over every checked position) and must give finite logits; max |Δlogits| and its ratio
# to the logit range are reported, not bounded: one outlier logit says little about generation quality.
FP32_MAX_ABS = 1e-3
# fp32 rounding differences grow with the logits: a 30%-pruned SmolLM2 (logits up to 36) measured 0.9-1.1e-3 on
# a padded batch (1e-4 unpadded), so the bound is max(1e-3, 4e-5 x max |logit|): 1e-3 up to logits of 25.
FP32_REL = 4e-5
MIN_TOP1 = {"fp16": 0.95, "int8": 0.85, "int4": 0.55}  # default int4 on dense SmolLM2-135M measured 0.57
GREEDY_STEPS = 32


@dataclass
class ShapeResult:
    name: str
    batch: int
    prompt_len: list[int]
    decode_steps: int
    max_abs_diff: float
    rel_diff: float
    top1_agreement: float
    positions: int
    logit_absmax: float = 0.0
    greedy_equal: bool | None = None
    greedy_first_mismatch: int | None = None


@dataclass
class Parity:
    dtype: str
    min_top1: float | None = None
    max_abs: float | None = None  # fp32: a fixed bound instead of max(1e-3, 4e-5 x max |logit|)
    shapes: list[ShapeResult] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    # quantized packages: top-1 on the reference's own greedy continuations of natural prompts (exporters.agreement)
    continuation_agreement: float | None = None

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict:
        worst = lambda key, fn: fn(getattr(s, key) for s in self.shapes) if self.shapes else None  # noqa: E731
        bound = {"max_abs_diff": max(fp32_bound(s.logit_absmax, self.max_abs) for s in self.shapes) if self.shapes else FP32_MAX_ABS,
                 "rule": "max(1e-3, 4e-5 * max|logit|)" if self.max_abs is None else "--max-abs-diff",
                 "greedy_steps": GREEDY_STEPS} if self.dtype == "fp32" else \
            {"min_top1_agreement": self.min_top1}
        return {"dtype": self.dtype, "ok": self.ok, "bound": bound,
                "max_abs_diff": worst("max_abs_diff", max), "rel_diff": worst("rel_diff", max),
                "top1_agreement": worst("top1_agreement", min), "continuation_agreement": self.continuation_agreement,
                "shapes": [asdict(s) for s in self.shapes], "mismatches": self.mismatches}


LONG_TEXT = ("Small language models run on phones, boards and laptops. Pruning removes the attention heads and MLP "
             "neurons that matter least, and the smaller model is exported to ONNX and checked against PyTorch. ")


def prompts(tokenizer, vocab: int, longer_than: int | None = None) -> list[tuple[str, list[list[int]]]]:
    """Two shapes: a single prompt, and a batch of two prompts of different lengths (padded). ``longer_than``: a
    sliding window; a third shape, one prompt 24 tokens longer than it, checks what the window masks."""
    out = None
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(min(4, vocab - 1), vocab, n).tolist()  # noqa: E731
    if tokenizer is not None:
        enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        single = [enc("The quick brown fox jumps over the lazy dog. Then it")]
        pair = [enc("Edge devices run small language models when"), enc("Pruning removes heads and")]
        if all(len(p) >= 3 for p in single + pair):
            out = [("single", single), ("padded-batch", pair)]
    out = out or [("single", [ids(11)]), ("padded-batch", [ids(9), ids(6)])]
    if longer_than:
        n = longer_than + 24
        long = enc(LONG_TEXT * (n // 8 + 1)) if tokenizer is not None else []
        out.append((f"longer-than-window-{longer_than}", [long[:n] if len(long) >= n else ids(n)]))
    return out


def sliding_window(model) -> int | None:
    """The widest sliding window of any layer (None: every layer attends to the whole context)."""
    from amp_edge.models.adapters import get_adapter

    adapter = get_adapter(model)
    windows = [w for w in (adapter.sliding_window(i) for i in range(adapter.num_layers)) if w]
    return max(windows) if windows else None


PADDING = ("left", "right")


def pad_token(tokenizer) -> int:
    """The id padded rows are filled with (0 without a tokenizer or pad token: the mask hides it)."""
    return tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0


def pad(rows: list[list[int]], pad_id: int, side: str = "left") -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = r
        mask[i, cols] = 1
    return ids, mask


@dataclass
class Reference:
    """What the PyTorch model computed for one shape: prompt, greedy continuation, logits at every position."""

    name: str
    ids: np.ndarray
    mask: np.ndarray
    continuation: np.ndarray
    logits: np.ndarray


def reference(model, tokenizer=None, steps: int = GREEDY_STEPS, padding: str = "left") -> list[Reference]:
    """Run the PyTorch side once, before export, so the model's weights can be released afterwards.

    ``padding``: the side the graph supports (left for the plain attention graph, right with GQA layers)."""
    model = model.float().eval()
    pad_id = pad_token(tokenizer)
    window = sliding_window(model)
    refs = []
    for name, rows in prompts(tokenizer, model.config.vocab_size, window):
        ids, mask = pad(rows, pad_id, padding)
        if window and padding == "right" and len(rows) > 1:
            refs.append(Reference(name, ids, mask, *_rows_alone(model, rows, ids.shape[1], steps)))
        else:
            refs.append(Reference(name, ids, mask, *_torch_greedy(model, ids, mask, steps)))
    return refs


def _rows_alone(model, rows: list[list[int]], width: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The right-padded batch's reference, row by row without padding. GQA keeps each row's tokens as a prefix of its
    cache, so a sliding window covers the row's own last tokens; transformers counts the pad slots of a right-padded
    row inside the window (its mask is by cache index), which is not what a row computes alone."""
    tokens, logits = [], []
    for row in rows:
        t, lg = _torch_greedy(model, np.array([row]), np.ones((1, len(row)), dtype=np.int64), steps)
        full = np.zeros((1, width + steps - 1, lg.shape[-1]), dtype=lg.dtype)
        full[:, :len(row)] = lg[:, :len(row)]
        full[:, width:] = lg[:, len(row):]
        tokens.append(t)
        logits.append(full)
    return np.concatenate(tokens), np.concatenate(logits)


def _torch_greedy(model, ids: np.ndarray, mask: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy tokens and the logits of every step: a prefill, then one cached decode step per token, the same
    steps the ONNX graph takes (written out rather than generate(): no config-driven surprises)."""
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    positions = (mask_t.cumsum(1) - 1).clamp(min=0)
    tokens, logits = [], []
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions, use_cache=True)
        last = torch.from_numpy(last_real(mask))
        for step in range(steps):
            logits.append(out.logits)
            # a right-padded row's next token comes from its last real position
            step_logits = out.logits[torch.arange(len(last)), last] if step == 0 else out.logits[:, -1]
            nxt = step_logits.argmax(-1, keepdim=True)
            tokens.append(nxt)
            if step == steps - 1:
                break
            mask_t = torch.cat([mask_t, torch.ones_like(nxt)], 1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=nxt, attention_mask=mask_t, position_ids=positions, past_key_values=out.past_key_values,
                        use_cache=True)
    return torch.cat(tokens, 1).numpy(), torch.cat(logits, 1).numpy()


def compare(decoder: OnnxDecoder, refs: list[Reference], dtype: str, min_top1: float | None = None,
            max_abs: float | None = None) -> Parity:
    parity = Parity(dtype, None if dtype == "fp32" else (min_top1 if min_top1 is not None else MIN_TOP1[dtype]), max_abs)
    for ref in refs:
        result = _teacher_forced(decoder, ref)
        if dtype == "fp32":
            steps = ref.continuation.shape[1]
            onnx_tokens = decoder.generate(ref.ids, steps, attention_mask=ref.mask)[:, ref.ids.shape[1]:]
            equal = onnx_tokens.shape == ref.continuation.shape and bool((onnx_tokens == ref.continuation).all())
            result.greedy_equal = equal
            if not equal:
                col = np.nonzero((onnx_tokens != ref.continuation[:, :onnx_tokens.shape[1]]).any(0))[0]
                result.greedy_first_mismatch = int(col[0]) if len(col) else onnx_tokens.shape[1]
        parity.shapes.append(result)
        parity.mismatches += _judge(result, dtype, parity.min_top1, max_abs)
    return parity


def _teacher_forced(decoder: OnnxDecoder, ref: Reference) -> ShapeResult:
    """Prefill the prompt, then feed the PyTorch model's own tokens one by one; compare every step's logits."""
    ids, mask, continuation = ref.ids, ref.mask, ref.continuation
    full = np.concatenate([ids, continuation], 1)
    full_mask = np.concatenate([mask, np.ones_like(continuation)], 1)
    prompt_len = ids.shape[1]
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    logits, cache = decoder.step(ids, mask, positions, decoder.empty_cache(ids.shape[0]))
    got = [logits.astype(np.float32)]
    for t in range(continuation.shape[1] - 1):
        cur = prompt_len + t
        logits, cache = decoder.step(full[:, cur:cur + 1], full_mask[:, :cur + 1], positions[:, -1:] + t + 1, cache)
        got.append(logits.astype(np.float32))
    got = np.concatenate(got, 1)
    expected = ref.logits[:, :got.shape[1]]
    valid = full_mask[:, :got.shape[1]].astype(bool)  # padded positions have no meaningful logits
    if not np.isfinite(got[valid]).all():
        return ShapeResult(ref.name, ids.shape[0], mask.sum(1).tolist(), continuation.shape[1] - 1,
                           float("inf"), float("inf"), 0.0, int(valid.sum()))
    diff = np.abs(got - expected)[valid]
    span = float((expected[valid].max(-1) - expected[valid].min(-1)).mean())
    agree = (got.argmax(-1) == expected.argmax(-1))[valid]
    return ShapeResult(ref.name, ids.shape[0], mask.sum(1).tolist(), continuation.shape[1] - 1, float(diff.max()),
                       float(diff.max() / span) if span else 0.0, float(agree.mean()), int(valid.sum()),
                       float(np.abs(expected[valid]).max()))


def validation_options():
    """ONNX Runtime's defaults but for thread spinning (a one-off run on a possibly shared box). Prepacking stays on:
    without it MatMulNBits dequantizes every weight on every step. Measured on the 32-layer Phi-3-mini shape pruned
    30%, int4: 11.9 s per token and 2.35 GB peak without prepacking, 0.116 s and 2.42 GB with it."""
    return session_options(spin=False)


def fp32_bound(logit_absmax: float, override: float | None = None) -> float:
    return override if override is not None else max(FP32_MAX_ABS, FP32_REL * logit_absmax)


def _judge(r: ShapeResult, dtype: str, min_top1: float | None, max_abs: float | None = None) -> list[str]:
    out = []
    if not np.isfinite(r.max_abs_diff):
        return [f"{r.name}: non-finite logits ({dtype})"]
    if dtype == "fp32":
        bound = fp32_bound(r.logit_absmax, max_abs)
        if r.max_abs_diff > bound:
            # Top-1 agreement tells rounding (1.000, e.g. a badly conditioned pruned model) from a broken graph.
            out.append(f"{r.name}: max |Δlogits| {r.max_abs_diff:.2e} > {bound:.2e} (max |logit| {r.logit_absmax:.1f}, "
                       f"top-1 agreement {r.top1_agreement:.3f}; --max-abs-diff sets the bound)")
        if not r.greedy_equal:
            out.append(f"{r.name}: greedy tokens differ from PyTorch at step {r.greedy_first_mismatch} of {GREEDY_STEPS}")
    elif r.top1_agreement < min_top1:
        out.append(f"{r.name}: top-1 agreement {r.top1_agreement:.3f} < {min_top1} ({dtype}; max |Δlogits| {r.max_abs_diff:.2f})")
    return out
