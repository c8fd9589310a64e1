"""The ``amp-edge`` command line: thin typed wrappers over the library."""

from __future__ import annotations

import functools
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import AmpEdgeError
from .memory import cap_heap_growth
from .sources import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, help="AMP structured pruning of small LLMs, to ONNX packages.")
err = Console(stderr=True)
out = Console()


def _friendly(fn):
    """User mistakes become one line on stderr and exit code 2; Ctrl-C exits 130. No tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AmpEdgeError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")):
    cap_heap_growth()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


_REC = "Recovery (after pruning)"
_REFIT = "Refit (after pruning)"


@app.command()
@_friendly
def prune(
    model: str = typer.Argument(DEFAULT_MODEL, help="Short name, .gguf file, local folder or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the pruned checkpoint."),
    ratio: float = typer.Option(0.3, help="Fraction of all parameters to remove, in (0, 1)."),
    criterion: str = typer.Option("amp", help="amp | wanda-sp | magnitude | random."),
    allocation: str = typer.Option("uniform", help="uniform (standard config) | global (per-layer sizes)."),
    gqa: str = typer.Option("query", help="query: same query heads out of every KV group | group: whole KV groups."),
    min_keep: float = typer.Option(0.1, help="Fraction of heads and neurons every layer keeps at least."),
    normalization: str = typer.Option("mean", help="Per-layer score normalization for global allocation: mean | zscore."),
    heads: str = typer.Option("auto", help="Head units removed per layer, the MLP taking the rest of the budget: auto (the count with the lowest calibration loss) | proportional (the paper's rule: the unit fraction nearest the ratio) | a number."),
    calib: str = typer.Option("self", help="'self' (model-generated), a .txt/.jsonl/.json file, or a hub data set name."),
    calib_samples: int = typer.Option(32, help="Calibration samples."),
    calib_seq_len: int = typer.Option(128, help="Tokens per calibration sample."),
    calib_field: Optional[str] = typer.Option(None, help="Text field of .jsonl / data set records."),
    calib_split: str = typer.Option("train", help="Split of a hub data set."),
    batch_size: int = typer.Option(8, help="Calibration batch size."),
    seed: int = typer.Option(0, help="Seed for calibration sampling and the random criterion."),
    plan: Optional[Path] = typer.Option(None, help="Apply a saved plan (JSON or a pruned folder) instead of scoring."),
    dtype: str = typer.Option("float32", help="Weights dtype: float32 | float16 | bfloat16 | auto."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub (off by default)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    refit: bool = typer.Option(False, "--refit", help="After pruning, refit o_proj and down_proj by least squares so the kept heads and neurons reproduce the dense layer outputs on calibration data.", rich_help_panel=_REFIT),
    refit_samples: int = typer.Option(128, help="Calibration samples for the refit (from --calib).", rich_help_panel=_REFIT),
    refit_seq_len: int = typer.Option(256, help="Tokens per refit sample.", rich_help_panel=_REFIT),
    refit_damp: float = typer.Option(3e-4, help="Ridge term, a fraction of the mean input energy.", rich_help_panel=_REFIT),
    recover: Optional[str] = typer.Option(None, help="Train the pruned model to recover: distill (from the dense model) | lora.", rich_help_panel=_REC),
    recover_steps: int = typer.Option(100, help="Optimizer steps.", rich_help_panel=_REC),
    recover_data: Optional[str] = typer.Option(None, help="'self', a .txt/.jsonl/Alpaca .json file, or a hub data set (default: the --calib source); several joined by commas are mixed.", rich_help_panel=_REC),
    recover_field: Optional[str] = typer.Option(None, help="Text field of .jsonl / data set records.", rich_help_panel=_REC),
    recover_self_samples: int = typer.Option(128, help="Sequences the dense model writes when --recover-data names 'self' (alone or mixed with files).", rich_help_panel=_REC),
    recover_lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 1e-4 distill, 3e-4 lora).", rich_help_panel=_REC),
    recover_batch_size: int = typer.Option(8, help="Sequences per step.", rich_help_panel=_REC),
    recover_micro_batch: Optional[int] = typer.Option(None, help="Sequences per forward pass (gradient accumulation; default: up to 4).", rich_help_panel=_REC),
    recover_seq_len: int = typer.Option(256, help="Tokens per sequence (documents packed, no padding).", rich_help_panel=_REC),
    recover_warmup: Optional[int] = typer.Option(None, help="Linear warmup steps (default 5% of the steps).", rich_help_panel=_REC),
    recover_schedule: str = typer.Option("cosine", help="Decay after warmup: cosine | linear.", rich_help_panel=_REC),
    recover_clip: float = typer.Option(1.0, help="Gradient norm clip (0: none).", rich_help_panel=_REC),
    recover_temperature: float = typer.Option(1.0, help="distill: softmax temperature.", rich_help_panel=_REC),
    recover_ce_weight: float = typer.Option(0.0, help="distill: add this times the cross-entropy on the data.", rich_help_panel=_REC),
    recover_precision: str = typer.Option("fp32", help="fp32 | bf16 (bfloat16 autocast, fp32 master weights: ~2.7x faster on CPUs with AMX/AVX512-BF16; fp32 is used where bf16 has no native kernels).", rich_help_panel=_REC),
    recover_freeze_embeddings: bool = typer.Option(False, "--recover-freeze-embeddings", help="distill: keep the token embedding (and the LM head tied to it) fixed.", rich_help_panel=_REC),
    lora_r: int = typer.Option(8, help="lora: rank.", rich_help_panel=_REC),
    lora_alpha: float = typer.Option(16.0, help="lora: scale numerator (scale = alpha / r).", rich_help_panel=_REC),
    lora_dropout: float = typer.Option(0.05, help="lora: dropout on the adapter input.", rich_help_panel=_REC),
    recover_resume_dir: Optional[Path] = typer.Option(None, help="Keep resumable training state here (default: beside --out, removed after saving).", rich_help_panel=_REC),
    recover_save_every: int = typer.Option(10, help="Save the training state every N steps.", rich_help_panel=_REC),
):
    """Score heads and neurons, remove the least important, save a compact checkpoint."""
    from .calibration import CalibrationSpec
    from .pipeline import PruneOptions
    from .pipeline import prune as run_prune
    from .recovery import RecoverySpec
    from .refit import RefitSpec

    spec = CalibrationSpec(calib, calib_samples, calib_seq_len, seed, batch_size, calib_field, calib_split)
    opts = PruneOptions(ratio, criterion, allocation, gqa, min_keep, normalization, spec, seed,
                        RefitSpec(refit_damp, refit_samples, refit_seq_len) if refit else None, heads)
    recovery = None if recover is None else RecoverySpec(
        method=recover, steps=recover_steps, data=recover_data, field=recover_field, lr=recover_lr, batch_size=recover_batch_size,
        micro_batch_size=recover_micro_batch, seq_len=recover_seq_len, seed=seed, warmup_steps=recover_warmup,
        schedule=recover_schedule, max_grad_norm=recover_clip, temperature=recover_temperature, ce_weight=recover_ce_weight,
        freeze_embeddings=recover_freeze_embeddings, precision=recover_precision, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        resume_dir=str(recover_resume_dir) if recover_resume_dir else None, save_every=recover_save_every,
        self_samples=recover_self_samples)
    result = run_prune(model, out, opts, plan_path=plan, overwrite=overwrite, dtype=dtype, trust_remote_code=trust_remote_code,
                       recovery=recovery)
    if as_json:
        print(json.dumps(result.to_dict(), indent=1))
        return
    _print_summary(result)


def _print_summary(result) -> None:
    table = Table(title=f"pruned with {result.plan.criterion} ({result.plan.allocation}, gqa={result.plan.gqa})")
    for col in ("layer", "heads", "kv heads", "ffn", "params"):
        table.add_column(col, justify="right")
    for row in result.layers:
        table.add_row(str(row["layer"]), *(f"{a} → {b}" for a, b in (row["heads"], row["kv_heads"], row["ffn"])), f"{row['params_after']:,}")
    out.print(table)
    removed = 1 - result.params_after / result.params_before
    out.print(f"parameters {result.params_before:,} → {result.params_after:,} ({removed:.1%} removed) in {result.seconds:.1f} s")
    split = result.plan.head_split
    if split.get("rule") == "auto":
        losses = ", ".join(f"{k} units {v:.4f}" for k, v in split["calibration_loss"].items())
        out.print(f"heads: {split['head_units']} units per layer removed, the lowest calibration loss ({losses})")
    if result.refit:
        f = result.refit
        out.print(f"refitted o_proj and down_proj on {f['tokens']:,} tokens of {f['source']} in {f['seconds']:.0f} s")
    if result.recovery:
        r = result.recovery
        resumed = f" (resumed from step {r['resumed_from_step']})" if r["resumed_from_step"] else ""
        out.print(f"recovered with {r['method']}: {r['steps']} steps on {r['data']}{resumed}, loss {r['first_loss']:.4f} → {r['final_loss']:.4f} in {r['seconds']:.0f} s")
    if result.out:
        out.print(f"saved to {result.out}" + (" (per-layer sizes: load with amp_edge.load_pruned)" if result.per_layer else ""))


@app.command()
@_friendly
def ppl(
    model: str = typer.Argument(DEFAULT_MODEL, help="Model source or pruned checkpoint."),
    data: Path = typer.Option(..., help="Text file, e.g. wikitext2/test.txt."),
    window: int = typer.Option(1024, help="Tokens each forward pass sees."),
    stride: Optional[int] = typer.Option(None, help="Tokens scored per window (default: window, disjoint windows)."),
    max_tokens: Optional[int] = typer.Option(None, help="Score only the first N tokens of the file."),
    dtype: str = typer.Option("float32", help="float32 | float16 | bfloat16 | auto."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Perplexity of a model on a text file (sliding window)."""
    from .perplexity import perplexity, read_eval_text
    from .sources import load_model

    text = read_eval_text(data)
    loaded = load_model(model, dtype=dtype)
    result = perplexity(loaded.model, loaded.tokenizer, text, window, stride, max_tokens)
    if as_json:
        print(json.dumps({"model": model, "data": str(data), **result.to_dict()}))
    else:
        out.print(f"perplexity {result.perplexity:.3f} over {result.tokens:,} tokens (window {result.window}, stride {result.stride})")


@app.command("eval")
@_friendly
def eval_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="Model source, pruned checkpoint or exported ONNX package."),
    tasks: str = typer.Option("wikitext2,piqa,hellaswag,winogrande,arc_easy,arc_challenge,boolq,openbookqa",
                              help="Comma-separated tasks."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N documents of each zero-shot task."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder with the task files (default $AMP_EDGE_DATA_DIR or ../shared/data)."),
    batch_size: int = typer.Option(8, help="Requests per forward pass."),
    window: int = typer.Option(1024, help="WikiText-2: tokens each forward pass sees."),
    stride: Optional[int] = typer.Option(None, help="WikiText-2: tokens scored per window (default: window)."),
    max_tokens: Optional[int] = typer.Option(None, help="WikiText-2: score only the first N tokens of test.txt."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all)."),
    dtype: str = typer.Option("float32", help="PyTorch sources: float32 | float16 | bfloat16."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for eval.json and eval.md."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
):
    """Zero-shot accuracy (lm-evaluation-harness) and WikiText-2 perplexity of a model, checkpoint or ONNX package."""
    from .checkpoint import check_output
    from .evaluation.report import markdown, write
    from .evaluation.run import EvalSpec, evaluate

    spec = EvalSpec(tasks, limit, data_dir, batch_size, window, stride, max_tokens, threads)
    spec.check()
    if out is not None:
        check_output(out, overwrite)
    report = evaluate(model, spec, dtype=dtype)
    if out is not None:
        write(report, out, overwrite=True)
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        out_console = markdown(report)
        _console_print(out_console + (f"written to {out}\n" if out else ""))


@app.command("eval-compare")
@_friendly
def eval_compare_cmd(
    reports: list[Path] = typer.Argument(..., help="eval.json files, the folders `amp-edge eval --out` wrote, or "
                                         "TABLE.json#ROW: a row of an eval_comparison.json."),
    names: Optional[str] = typer.Option(None, help="Comma-separated row names (default: each report's folder name)."),
    ref: int = typer.Option(0, help="Which report (0-based) the others are compared against."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for compare.json and compare.md."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON on stdout."),
):
    """Eval reports side by side: accuracies, averages and each one's difference from a reference, with its error."""
    from .checkpoint import check_output
    from .errors import InvalidOptionError
    from .evaluation.compare import compare, load_report, markdown, report_label, write

    labels = names.split(",") if names else [report_label(p) for p in reports]
    if len(labels) != len(reports):
        raise InvalidOptionError(f"--names gives {len(labels)} names for {len(reports)} reports")
    if out is not None:
        check_output(out, overwrite)
    result = compare([(label, load_report(p)) for label, p in zip(labels, reports)], ref=ref)
    result["command"] = shlex.join(["amp-edge", *sys.argv[1:]])
    if out is not None:
        write(result, out, overwrite=True)
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        _console_print(markdown(result) + (f"written to {out}\n" if out else ""))


@app.command("export")
@_friendly
def export_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="Pruned checkpoint, or any model source with --ratio."),
    out: Path = typer.Option(..., "--out", "-o", help="Package folder to create."),
    ratio: Optional[float] = typer.Option(None, help="Prune first by this fraction of parameters; 0 exports the dense model."),
    dtype: str = typer.Option("fp32", help="fp32 | fp16 | int8 | int4."),
    opset: int = typer.Option(17, help="ONNX opset."),
    optimize: str = typer.Option("fuse", help="fuse: ORT transformer fusions (RMSNorm, rotary) | none: the plain trace."),
    attention: str = typer.Option("auto", help="auto: GroupQueryAttention where a layer allows it (right padding only) | gqa: every layer | sdpa: plain attention (any padding)."),
    keep_8bit: Optional[str] = typer.Option(None, help="int4 only: MatMuls kept at 8 bits, e.g. down_proj,lm_head."),
    block_size: int = typer.Option(32, help="Quantization block size (int4/int8)."),
    accuracy_level: int = typer.Option(4, help="MatMulNBits accuracy level: 4 = int8 compute (fast on CPU), 0 = fp32 compute."),
    int8_scheme: str = typer.Option("weight-only", help="int8: weight-only (MatMulNBits) | dynamic (MatMulInteger)."),
    embedding: str = typer.Option("shared", help="Tied embeddings: shared (one copy: rows looked up in the LM head's weight, quantized in int4/int8) | fp16 (a separate table: fp16 in int4/int8 graphs, as traced in fp32/fp16)."),
    external_data: bool = typer.Option(True, "--external-data/--single-file", help="Weights in model.onnx.data (default; less memory) or in model.onnx when under 2 GB."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Check ONNX Runtime against PyTorch (default on)."),
    min_top1: Optional[float] = typer.Option(None, help="fp16/int8/int4: top-1 agreement required (default 0.95/0.85/0.55)."),
    max_abs_diff: Optional[float] = typer.Option(None, help="fp32: max |Δlogits| allowed (default max(1e-3, 4e-5 x max |logit|))."),
    criterion: str = typer.Option("amp", help="Pruning criterion when --ratio > 0."),
    allocation: str = typer.Option("uniform", help="uniform | global, when --ratio > 0."),
    gqa: str = typer.Option("query", help="query | group, when --ratio > 0."),
    heads: str = typer.Option("auto", help="Head units removed per layer when --ratio > 0: auto | proportional | a number (see prune --heads)."),
    calib: str = typer.Option("self", help="Calibration data when --ratio > 0."),
    calib_samples: int = typer.Option(32, help="Calibration samples."),
    calib_seq_len: int = typer.Option(128, help="Tokens per calibration sample."),
    plan: Optional[Path] = typer.Option(None, help="Apply a saved plan instead of scoring."),
    refit: bool = typer.Option(False, "--refit", help="When --ratio > 0: least-squares refit of o_proj/down_proj after pruning (see prune --refit)."),
    overwrite: bool = typer.Option(False, help="Replace an existing package folder."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub (off by default)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout."),
):
    """Export a (pruned) model as a validated ONNX package with KV cache."""
    from exporters import ExportOptions, GraphSpec, QuantSpec, export

    from .calibration import CalibrationSpec
    from .pipeline import PruneOptions
    from .refit import RefitSpec

    keep = tuple(k.strip() for k in keep_8bit.split(",") if k.strip()) if keep_8bit else ()
    opts = ExportOptions(
        ratio=ratio,
        prune=PruneOptions(ratio or 0.3, criterion, allocation, gqa, calibration=CalibrationSpec(calib, calib_samples, calib_seq_len),
                           refit=RefitSpec() if refit else None, heads=heads),
        plan=str(plan) if plan else None,
        graph=GraphSpec(opset, optimize, attention),
        quant=QuantSpec(dtype, block_size, accuracy_level, keep, int8_scheme, embedding=embedding),
        validate=validate, min_top1=min_top1, max_abs_diff=max_abs_diff, external_data=external_data, trust_remote_code=trust_remote_code,
    )
    result = export(model, out, opts, overwrite=overwrite)
    if as_json:
        print(json.dumps(result.to_dict(), indent=1))
        return
    _print_export(result)


def _print_export(result) -> None:
    m = result.manifest
    parity = m["parity"]
    mb = m["onnx_bytes"] / 2**20
    out.print(f"package {result.out}: {m['quantization']['dtype']}, {mb:.1f} MiB graph, "
              f"{m['params']['after']:,} parameters (of {m['params']['before']:,}), {m['export_seconds']:.1f} s")
    if "skipped" in parity:
        out.print("validation skipped (--no-validate)")
    else:
        out.print(f"parity vs PyTorch: max |Δlogits| {parity['max_abs_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.3f}"
                  + ("" if m["quantization"]["dtype"] != "fp32" else
                     f", greedy {'identical' if all(s['greedy_equal'] for s in parity['shapes']) else 'DIFFERENT'} for 32 steps"))


@app.command()
@_friendly
def bench(
    packages: Optional[list[str]] = typer.Argument(None, help="Package folders; the first is the baseline for ratios."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for bench.json, bench.md and bench.png (required to run a bench)."),
    provider: str = typer.Option("cpu", help="cpu | cuda (needs onnxruntime-gpu and a GPU)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads (default: ONNX Runtime's choice)."),
    prompt_len: str = typer.Option("128,512", help="Prompt lengths, comma-separated."),
    gen_len: int = typer.Option(64, help="New tokens per run."),
    batch: int = typer.Option(1, help="Batch size."),
    repeat: int = typer.Option(10, help="Measured runs per package and prompt length."),
    warmup: int = typer.Option(2, help="Unmeasured runs first."),
    torch_ref: bool = typer.Option(False, "--torch", help="Add the PyTorch eager model (rebuilt from the first package's manifest)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    compare_json: Optional[list[Path]] = typer.Option(None, "--compare-json", help="Another bench.json (e.g. from a device) to put side by side; repeatable."),
    baseline_json: Optional[Path] = typer.Option(None, "--baseline-json", help="Compare this existing bench.json instead of running (no packages)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
):
    """Latency and memory of packages under ONNX Runtime, side by side (and with other machines' bench.json)."""
    from rich.progress import Progress

    from runtime_bench.bench import BenchError, BenchSpec, run_bench
    from runtime_bench.compare import compare, load_report
    from runtime_bench.report import markdown, write

    from .checkpoint import atomic_dir, check_output
    from .errors import InvalidOptionError

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
    spec = BenchSpec(provider, threads, lens, gen_len, batch, repeat, warmup)
    try:
        others = [(str(f), load_report(f)) for f in compare_json or []]  # bad files fail before the bench runs
        if baseline_json:
            report = load_report(baseline_json)
        else:
            with Progress(console=err, transient=True) as bar:
                task = bar.add_task("benchmarking", total=None)
                report = run_bench(packages, spec, torch_ref, progress=lambda d, t: bar.update(task, completed=d, total=t))
    except BenchError as e:
        raise InvalidOptionError(str(e)) from None
    if others:
        report["comparisons"] = [compare(report, other, label) for label, other in others]
    if out is not None:
        with atomic_dir(out, overwrite) as tmp:
            write(report, tmp)
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        _console_print(markdown(report))


def _console_print(text: str) -> None:
    out.print(text, markup=False, highlight=False, soft_wrap=True)


def run() -> None:
    app()


if __name__ == "__main__":
    sys.exit(run())
