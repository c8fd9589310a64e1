"""``amp-edge bench``: latency and memory of packages under ONNX Runtime, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from amp_edge.cli.app import app, err, flag, friendly, print_text
from amp_edge.cli.choices import Provider, value

_RUN = "Run"
_CMP = "Compare"
_OUT = "Output"


@app.command()
@friendly
def bench(
    packages: Optional[list[str]] = typer.Argument(None, help="Package folders; the first is the baseline for ratios."),
    provider: Provider = typer.Option("cpu", help="Execution provider (cuda needs onnxruntime-gpu and a GPU; openvino and webgpu the [openvino]/[webgpu] extras).", rich_help_panel=_RUN),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads (default: ONNX Runtime's choice).", rich_help_panel=_RUN),
    prompt_len: str = typer.Option("128,512", help="Prompt lengths, comma-separated.", rich_help_panel=_RUN),
    gen_len: int = typer.Option(64, help="New tokens per run.", rich_help_panel=_RUN),
    batch: int = typer.Option(1, help="Batch size.", rich_help_panel=_RUN),
    repeat: int = typer.Option(10, help="Measured runs per package and prompt length.", rich_help_panel=_RUN),
    warmup: int = typer.Option(2, help="Unmeasured runs first.", rich_help_panel=_RUN),
    torch_ref: bool = flag("--torch", help="Add the PyTorch eager model (rebuilt from the first package's manifest).", panel=_RUN),
    compare_json: Optional[list[Path]] = typer.Option(None, "--compare-json", help="Another bench.json (e.g. from a device) to put side by side; repeatable.", rich_help_panel=_CMP),
    baseline_json: Optional[Path] = typer.Option(None, "--baseline-json", help="Compare this existing bench.json instead of running (no packages).", rich_help_panel=_CMP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for bench.json, bench.md and bench.png (required to run a bench).", rich_help_panel=_OUT),
    overwrite: bool = flag("--overwrite", help="Replace an existing output folder.", panel=_OUT),
    as_json: bool = flag("--json", help="Print the report as JSON on stdout.", panel=_OUT),
):
    """Latency and memory of packages under ONNX Runtime, side by side (and with other machines' bench.json)."""
    from rich.progress import Progress

    from amp_edge.errors import InvalidOptionError
    from amp_edge.io import atomic_dir, check_output
    from runtime_bench.bench import BenchSpec, run_bench
    from runtime_bench.compare import compare, load_report
    from runtime_bench.report import markdown, write

    if bool(packages) == bool(baseline_json):
        raise InvalidOptionError("give package folders to run a bench, or --baseline-json FILE to compare without running (not both)")
    if baseline_json and not compare_json:
        raise InvalidOptionError("--baseline-json needs at least one --compare-json FILE to compare with")
    if packages and out is None:
        raise InvalidOptionError("--out is required to run a bench")
    try:
        lens = tuple(int(x) for x in prompt_len.split(",") if x.strip())
    except ValueError:
        raise InvalidOptionError(f"--prompt-len must be integers separated by commas, got {prompt_len!r}") from None
    if out is not None:
        check_output(out, overwrite)
    spec = BenchSpec(value(provider), threads, lens, gen_len, batch, repeat, warmup)
    others = [(str(f), load_report(f)) for f in compare_json or []]  # bad files fail before the bench runs
    if baseline_json:
        report = load_report(baseline_json)
    else:
        with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:  # off a terminal: no stray newline
            task = bar.add_task("benchmarking", total=None)
            report = run_bench(packages, spec, torch_ref, progress=lambda d, t: bar.update(task, completed=d, total=t))
    if others:
        report["comparisons"] = [compare(report, other, label) for label, other in others]
    if out is not None:
        with atomic_dir(out, overwrite) as tmp:
            write(report, tmp)
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        print_text(markdown(report))
