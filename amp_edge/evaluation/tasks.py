"""lm-eval task configs that read the local JSON Lines copies of the validation sets (Hugging Face field names).

The prompts, targets and metrics are those of lm-evaluation-harness's own task files (piqa, hellaswag, winogrande,
boolq, arc_easy, arc_challenge, openbookqa), so the numbers are comparable with papers; only the data source
differs. Without a local file the task falls back to lm-eval's registered hub version.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from amp_edge.errors import DataError, InvalidOptionError

PERPLEXITY_TASK = "wikitext2"
# name -> file under the data dir
TASK_FILES = {
    "piqa": "piqa/validation.jsonl",
    "hellaswag": "hellaswag/validation.jsonl",
    "winogrande": "winogrande/validation.jsonl",
    "boolq": "boolq/validation.jsonl",
    "arc_easy": "arc_easy/validation.jsonl",
    "arc_challenge": "arc_challenge/validation.jsonl",
    "openbookqa": "openbookqa/validation.jsonl",
}
WIKITEXT_FILE = "wikitext2/test.txt"
KNOWN_TASKS = [PERPLEXITY_TASK, *TASK_FILES]
# The paper's 5-task average (PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c).
PAPER_AVERAGE = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge"]

_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_ACC_NORM = _ACC + [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


def default_data_dir() -> Path:
    env = os.environ.get("AMP_EDGE_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def parse_tasks(text: str | list[str]) -> list[str]:
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise InvalidOptionError("no tasks given; known tasks: " + ", ".join(KNOWN_TASKS))
    unknown = [t for t in names if t not in KNOWN_TASKS]
    if unknown:
        raise InvalidOptionError(f"unknown task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(KNOWN_TASKS)}")
    return list(dict.fromkeys(names))


def data_file(task: str, data_dir: Path | None, required: bool) -> Path | None:
    """The local file of a task, or None when there is none and the hub version may be used."""
    rel = WIKITEXT_FILE if task == PERPLEXITY_TASK else TASK_FILES[task]
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    path = root / rel
    if path.is_file():
        return path
    if required:
        raise DataError(f"task {task!r} needs {path}, which does not exist (set --data-dir or AMP_EDGE_DATA_DIR)")
    return None


def task_config(task: str, path: Path) -> dict:
    """lm-eval task config (the dict form of its YAML) reading ``path``."""
    base = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(path)}},
        "validation_split": "validation",
        "output_type": "multiple_choice",
        "metric_list": _ACC_NORM,
        "metadata": {"version": 1.0, "source": str(path)},
    }
    return base | _PROMPTS[task]


def _hellaswag_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(one)


def _hellaswag_clean(text: str) -> str:
    # WikiHow artifacts, removed as lm-eval's hellaswag task does.
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _winogrande_choices(doc):
    cut = doc["sentence"].index("_")
    return [doc["sentence"][:cut] + opt for opt in (doc["option1"], doc["option2"])]


def _winogrande_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


_ARC = {"doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}"}
# WinoGrande scores the shared continuation after each filled-in context (partial evaluation): the "text" is the
# gold option's index and the choices are the contexts.
_PROMPTS = {
    "piqa": {"doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label", "doc_to_choice": "{{[sol1, sol2]}}"},
    "hellaswag": {"process_docs": _hellaswag_docs, "doc_to_text": "{{query}}", "doc_to_target": "{{label}}",
                  "doc_to_choice": "choices"},
    "winogrande": {"doc_to_text": lambda doc: {"1": 0, "2": 1}[doc["answer"]], "doc_to_target": _winogrande_target,
                   "doc_to_choice": _winogrande_choices, "metric_list": _ACC},
    "boolq": {"doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "{{1 if answer else 0}}",
              "doc_to_choice": ["no", "yes"], "metric_list": _ACC},
    "arc_easy": _ARC,
    "arc_challenge": _ARC,
    "openbookqa": {"doc_to_text": "question_stem", "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
                   "doc_to_choice": "{{choices.text}}"},
}
