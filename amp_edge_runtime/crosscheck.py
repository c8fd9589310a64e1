"""The same package on the CPU provider and on another one: do they compute the same thing?

Each prompt's prefill logits (every position) are compared, then a greedy continuation. Torch-free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amp_edge_runtime.decoder import OnnxDecoder
from amp_edge_runtime.errors import PackageError, ProviderMismatchError
from amp_edge_runtime.providers import check_name, describe, placement
from amp_edge_runtime.session import session_options

PROMPTS = ("The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who")


@dataclass
class Bounds:
    """None: the default for the package's dtype (fp32 graphs must match closely; quantized ops may be computed
    differently, e.g. MatMulNBits with fp32 instead of int8 activations, so only the argmax is held to a bound)."""

    min_top1: float | None = None
    max_abs_diff: float | None = None
    greedy: bool | None = None

    def resolve(self, fp32: bool, max_logit: float) -> "Bounds":
        return Bounds(self.min_top1 if self.min_top1 is not None else (0.98 if fp32 else 0.9),
                      self.max_abs_diff if self.max_abs_diff is not None else
                      (max(1e-3, 1e-3 * max_logit) if fp32 else max(1.0, 0.2 * max_logit)),
                      self.greedy if self.greedy is not None else fp32)


def _prompts(package: Path, vocab: int) -> list[np.ndarray]:
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(package / "tokenizer.json"))
        return [np.asarray([tok.encode(p).ids], np.int64) for p in PROMPTS]
    except Exception:  # no tokenizers or no tokenizer.json: fixed random ids
        rng = np.random.default_rng(0)
        return [rng.integers(4, vocab, (1, n)).astype(np.int64) for n in (6, 12, 16)]


def _open(package: Path, provider: str, threads: int | None) -> tuple[OnnxDecoder, float]:
    options = session_options(threads)
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    start = time.perf_counter()
    decoder = OnnxDecoder(package, options=options, provider=provider)
    return decoder, time.perf_counter() - start


def _prefill(decoder: OnnxDecoder, ids: np.ndarray) -> np.ndarray:
    cache = decoder.shared_cache(1, ids.shape[1] + 1) if decoder.share_buffer else decoder.empty_cache(1)
    logits, _ = decoder.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], cache, shared=decoder.share_buffer)
    return np.asarray(logits, np.float32)


def cross_check(package: str | Path, provider: str, bounds: Bounds = Bounds(), new_tokens: int = 16,
                threads: int | None = None) -> dict:
    """Runs the prompts on CPU and on ``provider``; returns the report; raises ProviderMismatchError (with the
    report attached as ``.report``) when ``provider`` falls outside the bounds."""
    check_name(provider)
    package = Path(package)
    if not (package / "model.onnx").is_file():
        raise PackageError(f"{package} has no model.onnx; not an exported package")
    other, open_s = _open(package, provider, threads)  # a missing provider fails before the CPU session is made
    cpu, _ = _open(package, "cpu", threads)
    rows, top1, worst, max_logit = [], [], 0.0, 0.0
    for ids in _prompts(package, cpu.vocab_size or 128):
        a, b = _prefill(cpu, ids), _prefill(other, ids)
        agree = float((a.argmax(-1) == b.argmax(-1)).mean())
        diff = float(np.abs(a - b).max())
        ga = cpu.generate(ids, new_tokens)[0, ids.shape[1]:].tolist()
        gb = other.generate(ids, new_tokens)[0, ids.shape[1]:].tolist()
        same = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), None)
        rows.append({"tokens": int(ids.shape[1]), "top1_agreement": agree, "max_abs_diff": diff,
                     "greedy_equal": same is None, "first_greedy_difference": same})
        top1.append(agree)
        worst = max(worst, diff)
        max_logit = max(max_logit, float(np.abs(a).max()))
    fp32 = cpu.logits_dtype == np.float32 and not _quantized(cpu)
    bound = bounds.resolve(fp32, max_logit)
    report = {"package": str(package), "provider": describe(provider), "open_seconds": round(open_s, 3),
              "placement": placement(other.session), "prompts": rows,
              "top1_agreement": min(top1), "max_abs_diff": worst, "max_abs_logit": max_logit,
              "greedy_equal": all(r["greedy_equal"] for r in rows), "new_tokens": new_tokens,
              "bounds": {"min_top1": bound.min_top1, "max_abs_diff": bound.max_abs_diff, "greedy": bound.greedy}}
    problems = []
    if report["top1_agreement"] < bound.min_top1:
        problems.append(f"top-1 agreement {report['top1_agreement']:.3f} < {bound.min_top1}")
    if worst > bound.max_abs_diff:
        problems.append(f"max |Δlogits| {worst:.3g} > {bound.max_abs_diff:.3g}")
    if bound.greedy and not report["greedy_equal"]:
        problems.append(f"greedy tokens differ within {new_tokens} steps")
    report["ok"] = not problems
    if problems:
        error = ProviderMismatchError(f"provider {provider} computes something else than cpu on {package}: "
                                      + "; ".join(problems))
        error.report = report
        raise error
    return report


def _quantized(decoder: OnnxDecoder) -> bool:
    ops = {op for entry in placement(decoder.session).values() for op in entry["ops"]}
    return bool(ops & {"MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear", "GatherBlockQuantized"})
