"""evaluate(): one source (model, pruned checkpoint or ONNX package) on zero-shot tasks and WikiText-2."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from amp_edge.errors import InvalidOptionError
from amp_edge.evaluation.tasks import PAPER_AVERAGE, PERPLEXITY_TASK, data_file, parse_tasks, task_config

log = logging.getLogger(__name__)
DEFAULT_TASKS = "wikitext2,piqa,hellaswag,winogrande,arc_easy,arc_challenge,boolq,openbookqa"


@dataclass
class EvalSpec:
    tasks: list[str] = field(default_factory=lambda: parse_tasks(DEFAULT_TASKS))
    limit: int | None = None  # documents per zero-shot task (the first N of the validation split)
    data_dir: Path | None = None
    batch_size: int = 8
    window: int = 1024  # WikiText-2: tokens each forward pass sees
    stride: int | None = None  # tokens scored per window; None = window (disjoint windows)
    max_tokens: int | None = None  # WikiText-2: score only the first N tokens of test.txt
    threads: int | None = None
    seed: int = 1234
    provider: str = "cpu"  # ONNX packages: the execution provider (amp_edge_runtime.providers)

    def check(self) -> None:
        self.tasks = parse_tasks(self.tasks)
        if self.limit is not None and self.limit < 1:
            raise InvalidOptionError(f"--limit must be a positive number of documents, got {self.limit}")
        if self.batch_size < 1:
            raise InvalidOptionError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise InvalidOptionError(f"--max-tokens must be >= 2, got {self.max_tokens}")
        # Missing local files fail here, before a model is loaded; a hub fallback needs a connection.
        for task in self.tasks:
            data_file(task, self.data_dir, required=task == PERPLEXITY_TASK or self.data_dir is not None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data_dir"] = str(self.data_dir) if self.data_dir else None
        return d


def evaluate(source: str, spec: EvalSpec, dtype: str = "float32") -> dict:
    """Zero-shot accuracies (lm-eval) and WikiText-2 perplexity of ``source``; returns the report as a dict."""
    spec.check()
    start = time.perf_counter()
    model = _load(source, spec, dtype)
    report: dict = {"source": str(source), "kind": model.kind, "params": model.params, "spec": spec.to_dict(), "tasks": {}}
    zero_shot = [t for t in spec.tasks if t != PERPLEXITY_TASK]
    if PERPLEXITY_TASK in spec.tasks:
        t0 = time.perf_counter()
        report["tasks"][PERPLEXITY_TASK] = model.perplexity(spec) | {"seconds": round(time.perf_counter() - t0, 1)}
    if zero_shot:
        report["tasks"].update(_zero_shot(model.lm, zero_shot, spec))
    report["average"] = averages(report["tasks"])
    report["seconds"] = round(time.perf_counter() - start, 1)
    from amp_edge.versions import versions

    report["versions"] = versions() | {"lm_eval": _version("lm_eval")}
    return report


def averages(tasks: dict) -> dict:
    """Mean acc over the paper's five tasks and over every zero-shot task run (None when one is missing)."""
    accs = {t: r["acc"] for t, r in tasks.items() if "acc" in r}
    paper = [accs[t] for t in PAPER_AVERAGE if t in accs]
    return {"paper5_acc": sum(paper) / len(paper) if len(paper) == len(PAPER_AVERAGE) else None,
            "all_acc": sum(accs.values()) / len(accs) if accs else None, "tasks": sorted(accs)}


def _zero_shot(lm, tasks: list[str], spec: EvalSpec) -> dict:
    import lm_eval.evaluator
    from lm_eval import simple_evaluate

    # lm-eval asks git for the caller's commit and prints git's "fatal: not a git repository" outside one;
    # the report carries package versions instead.
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    configs = []
    for task in tasks:
        path = data_file(task, spec.data_dir, required=False)
        configs.append(task_config(task, path) if path else task)
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's thousands of built-in task files takes seconds: only done when a hub task is asked for.
    manager = TaskManager(include_defaults=any(isinstance(c, str) for c in configs))
    log.info("lm-eval on %s (limit %s)", tasks, spec.limit)
    out = {}
    for task, config in zip(tasks, configs):  # one at a time: each task's wall time is reported
        t0 = time.perf_counter()
        raw = simple_evaluate(model=lm, tasks=[config], limit=spec.limit, task_manager=manager, log_samples=True, verbosity="ERROR",
                              random_seed=spec.seed, numpy_random_seed=spec.seed, torch_random_seed=spec.seed,
                              fewshot_random_seed=spec.seed)
        res = raw["results"][task]
        row = {"n": raw["n-samples"][task]["effective"], "seconds": round(time.perf_counter() - t0, 1),
               "split": "validation", "source": config["metadata"]["source"] if isinstance(config, dict) else "hub"}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in res:
                row[metric] = res[f"{metric},none"]
                err = res.get(f"{metric}_stderr,none")
                row[f"{metric}_stderr"] = err if isinstance(err, float) and math.isfinite(err) else None
        out[task] = row | per_document(raw["samples"][task])
    return out


def per_document(samples: list[dict]) -> dict:
    """Each document's 0/1 outcome in document order ("0110..."), and a fingerprint of the documents: two reports
    on the same documents can then be compared pairwise (amp-edge eval-compare), which is far less noisy than
    comparing their accuracies."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    row = {"docs_sha256": hashlib.sha256("".join(s["doc_hash"] for s in samples).encode()).hexdigest()[:16]}
    for metric in ("acc", "acc_norm"):
        if samples and all(metric in s for s in samples):
            row[f"{metric}_per_doc"] = "".join("1" if s[metric] else "0" for s in samples)
    return row


class _TorchModel:
    kind = "pytorch"

    def __init__(self, source: str, spec: EvalSpec, dtype: str):
        from lm_eval.models.huggingface import HFLM

        from amp_edge.models.sources import load_model

        self.loaded = load_model(source, dtype=dtype)
        self.params = sum(p.numel() for p in self.loaded.model.parameters())
        self.lm = HFLM(pretrained=self.loaded.model, tokenizer=self.loaded.tokenizer, batch_size=spec.batch_size, device="cpu")

    def perplexity(self, spec: EvalSpec) -> dict:
        from amp_edge.evaluation.perplexity import perplexity, read_eval_text

        text = read_eval_text(data_file(PERPLEXITY_TASK, spec.data_dir, required=True))
        return perplexity(self.loaded.model, self.loaded.tokenizer, text, spec.window, spec.stride, spec.max_tokens).to_dict()


class _OnnxModel:
    kind = "onnx"

    def __init__(self, source: str, spec: EvalSpec):
        from amp_edge.evaluation.onnx_lm import OnnxLM

        self.lm = OnnxLM(source, batch_size=spec.batch_size, threads=spec.threads, provider=spec.provider)
        manifest = Path(source) / "amp_edge.json"
        self.params = json.loads(manifest.read_text()).get("params", {}).get("after") if manifest.is_file() else None

    def perplexity(self, spec: EvalSpec) -> dict:
        import torch

        from amp_edge.evaluation.perplexity import perplexity, read_eval_text

        text = read_eval_text(data_file(PERPLEXITY_TASK, spec.data_dir, required=True))
        forward = lambda chunk: torch.from_numpy(self.lm.forward([chunk[0].tolist()]))  # noqa: E731
        return perplexity(None, self.lm.tokenizer, text, spec.window, spec.stride, spec.max_tokens, forward=forward,
                          context=self.lm.max_length).to_dict()


def _load(source: str, spec: EvalSpec, dtype: str) -> _TorchModel | _OnnxModel:
    from amp_edge.evaluation.onnx_lm import is_onnx_package

    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    if is_onnx_package(source):
        return _OnnxModel(source, spec)
    if spec.provider != "cpu":
        raise InvalidOptionError(f"--provider {spec.provider} runs ONNX packages only; {source} is a PyTorch model")
    return _TorchModel(source, spec, dtype)


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return None
