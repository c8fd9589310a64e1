"""eval.json and eval.md for one evaluation, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from amp_edge.io import atomic_dir
from amp_edge.evaluation.tasks import PERPLEXITY_TASK


def markdown(report: dict) -> str:
    spec = report["spec"]
    lines = [f"# amp-edge eval: {report['source']} ({report['kind']})", ""]
    if report.get("params"):
        lines.append(f"Parameters: {report['params']:,}")
    limit = f"first {spec['limit']} documents of each validation split" if spec["limit"] else "full validation splits"
    lines += [f"Zero-shot, {limit}; lm-evaluation-harness {report['versions'].get('lm_eval')}.", "",
              "| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
    for task, row in report["tasks"].items():
        if task == PERPLEXITY_TASK:
            lines.append(f"| wikitext2 (test, window {row['window']}, stride {row['stride']}) | perplexity | "
                         f"{row['perplexity']:.2f} | | {row['tokens']:,} tokens |")
            continue
        for metric in ("acc", "acc_norm"):
            if metric in row:
                err = row.get(f"{metric}_stderr")
                lines.append(f"| {task} | {metric} | {100 * row[metric]:.2f} | {'' if err is None else f'{100 * err:.2f}'} | {row['n']} |")
    avg = report["average"]
    if avg["paper5_acc"] is not None:
        lines.append(f"| average (PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c) | acc | {100 * avg['paper5_acc']:.2f} | | |")
    if avg["all_acc"] is not None:
        lines.append(f"| average ({len(avg['tasks'])} tasks) | acc | {100 * avg['all_acc']:.2f} | | |")
    lines += ["", f"Wall time {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def write(report: dict, out: str | Path, overwrite: bool = False) -> Path:
    return write_folder(out, "eval", report, markdown(report), overwrite)


def write_folder(out: str | Path, stem: str, data: dict, text: str, overwrite: bool = False) -> Path:
    """``out``/stem.json and ``out``/stem.md, published together (atomically) or not at all."""
    with atomic_dir(out, overwrite) as tmp:
        (tmp / f"{stem}.json").write_text(json.dumps(data, indent=1))
        (tmp / f"{stem}.md").write_text(text)
    return Path(out)
