"""``amp-edge eval`` and ``amp-edge eval-compare``: zero-shot accuracy and perplexity, and reports side by side."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from amp_edge.cli.app import app, flag, friendly, print_text
from amp_edge.cli.choices import Provider, WeightDtype, value
from amp_edge.models.sources import DEFAULT_MODEL

_WIKI = "WikiText-2"
_OUT = "Output"


@app.command("eval")
@friendly
def eval_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="Model source, pruned checkpoint or exported ONNX package."),
    tasks: str = typer.Option("wikitext2,piqa,hellaswag,winogrande,arc_easy,arc_challenge,boolq,openbookqa",
                              help="Comma-separated tasks."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N documents of each zero-shot task."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder with the task files (default $AMP_EDGE_DATA_DIR or ../shared/data)."),
    batch_size: int = typer.Option(8, help="Requests per forward pass."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all)."),
    dtype: WeightDtype = typer.Option("float32", help="PyTorch sources: weights dtype."),
    provider: Provider = typer.Option("cpu", help="ONNX packages: execution provider."),
    window: int = typer.Option(1024, help="Tokens each forward pass sees.", rich_help_panel=_WIKI),
    stride: Optional[int] = typer.Option(None, help="Tokens scored per window (default: window).", rich_help_panel=_WIKI),
    max_tokens: Optional[int] = typer.Option(None, help="Score only the first N tokens of test.txt.", rich_help_panel=_WIKI),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for eval.json and eval.md.", rich_help_panel=_OUT),
    overwrite: bool = flag("--overwrite", help="Replace an existing output folder.", panel=_OUT),
    as_json: bool = flag("--json", help="Print the report as JSON on stdout.", panel=_OUT),
):
    """Zero-shot accuracy (lm-evaluation-harness) and WikiText-2 perplexity of a model, checkpoint or ONNX package."""
    from amp_edge.evaluation.report import markdown, write
    from amp_edge.evaluation.run import EvalSpec, evaluate
    from amp_edge.io import check_output

    spec = EvalSpec(tasks, limit, data_dir, batch_size, window, stride, max_tokens, threads, provider=value(provider))
    spec.check()
    if out is not None:
        check_output(out, overwrite)
    report = evaluate(model, spec, dtype=value(dtype))
    _emit(report, out, as_json, write, markdown)


@app.command("eval-compare")
@friendly
def eval_compare_cmd(
    reports: list[Path] = typer.Argument(..., help="eval.json files, the folders `amp-edge eval --out` wrote, or "
                                         "TABLE.json#ROW: a row of an eval_comparison.json."),
    names: Optional[str] = typer.Option(None, help="Comma-separated row names (default: each report's folder name)."),
    ref: int = typer.Option(0, help="Which report (0-based) the others are compared against."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for compare.json and compare.md.", rich_help_panel=_OUT),
    overwrite: bool = flag("--overwrite", help="Replace an existing output folder.", panel=_OUT),
    as_json: bool = flag("--json", help="Print the comparison as JSON on stdout.", panel=_OUT),
):
    """Eval reports side by side: accuracies, averages and each one's difference from a reference, with its error."""
    from amp_edge.errors import InvalidOptionError
    from amp_edge.evaluation.compare import compare, load_report, markdown, report_label, write
    from amp_edge.io import check_output

    labels = names.split(",") if names else [report_label(p) for p in reports]
    if len(labels) != len(reports):
        raise InvalidOptionError(f"--names gives {len(labels)} names for {len(reports)} reports")
    if out is not None:
        check_output(out, overwrite)
    result = compare([(label, load_report(p)) for label, p in zip(labels, reports)], ref=ref)
    result["command"] = shlex.join(["amp-edge", *sys.argv[1:]])
    _emit(result, out, as_json, write, markdown)


def _emit(report: dict, out: Path | None, as_json: bool, write, markdown) -> None:
    """Write the report's folder (already checked to be writable), then print it as JSON or Markdown."""
    if out is not None:
        write(report, out, overwrite=True)
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        print_text(markdown(report) + (f"written to {out}\n" if out else ""))
