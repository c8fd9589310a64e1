"""``amp-edge prune``: score heads and neurons, remove the least important, save a compact checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from amp_edge.cli.app import app, flag, friendly, out
from amp_edge.cli.choices import (DEVICE_MAP_HELP, RATIO_OF_HELP, Allocation, Criterion, Gqa, Normalization, Precision, RatioOf, RecoverAdapter, RecoverMethod, Schedule, WeightDtype,
                                  value)
from amp_edge.models.sources import DEFAULT_MODEL

_PRUNE = "Pruning"
_CALIB = "Calibration"
_OUT = "Model and output"
_REFIT = "Refit (after pruning)"
_REC = "Recovery (after pruning)"


@app.command()
@friendly
def prune(
    model: str = typer.Argument(DEFAULT_MODEL, help="Short name, .gguf file, local folder or hub id."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the pruned checkpoint.", rich_help_panel=_OUT),
    dtype: Optional[WeightDtype] = typer.Option(None, help="Weights dtype (default: the source's when streamed, float32 in memory).", rich_help_panel=_OUT),
    no_stream: bool = flag("--no-stream", help="Load the whole model instead of pruning a safetensors folder layer by layer.", panel=_OUT),
    overwrite: bool = flag("--overwrite", help="Replace an existing output folder.", panel=_OUT),
    trust_remote_code: bool = flag("--trust-remote-code", help="Allow model code from the hub.", panel=_OUT),
    as_json: bool = flag("--json", help="Print the result as JSON on stdout.", panel=_OUT),
    device_map: Optional[str] = typer.Option(None, help=DEVICE_MAP_HELP, rich_help_panel=_OUT),
    ratio: float = typer.Option(0.3, help="Fraction of parameters to remove, in (0, 1); --ratio-of says of which.", rich_help_panel=_PRUNE),
    ratio_of: RatioOf = typer.Option("total", help=RATIO_OF_HELP, rich_help_panel=_PRUNE),
    criterion: Criterion = typer.Option("amp", help="Importance score (amp: the paper).", rich_help_panel=_PRUNE),
    allocation: Allocation = typer.Option("uniform", help="uniform: standard config | global: per-layer sizes.", rich_help_panel=_PRUNE),
    gqa: Gqa = typer.Option("query", help="query: the same query heads out of every KV group | group: whole KV groups.", rich_help_panel=_PRUNE),
    heads: str = typer.Option("auto", help="Head units removed per layer, the MLP taking the rest: auto (lowest calibration loss) | proportional (the paper's rule) | a number.", rich_help_panel=_PRUNE),
    min_keep: float = typer.Option(0.1, help="Fraction of heads and neurons every layer keeps at least.", rich_help_panel=_PRUNE),
    normalization: Normalization = typer.Option("mean", help="Per-layer score normalization for global allocation.", rich_help_panel=_PRUNE),
    plan: Optional[Path] = typer.Option(None, help="Apply a saved plan (JSON or a pruned folder) instead of scoring.", rich_help_panel=_PRUNE),
    seed: int = typer.Option(0, help="Seed for calibration sampling and the random criterion.", rich_help_panel=_PRUNE),
    calib: str = typer.Option("self", help="'self' (model-generated), a .txt/.jsonl/.json file, or a hub data set name.", rich_help_panel=_CALIB),
    calib_samples: int = typer.Option(32, help="Calibration samples.", rich_help_panel=_CALIB),
    calib_seq_len: int = typer.Option(128, help="Tokens per calibration sample.", rich_help_panel=_CALIB),
    calib_field: Optional[str] = typer.Option(None, help="Text field of .jsonl / data set records.", rich_help_panel=_CALIB),
    calib_split: str = typer.Option("train", help="Split of a hub data set.", rich_help_panel=_CALIB),
    batch_size: int = typer.Option(8, help="Calibration batch size.", rich_help_panel=_CALIB),
    refit: Optional[bool] = typer.Option(None, "--refit/--no-refit", metavar="", help="Refit o_proj and down_proj by least squares so the kept heads and neurons reproduce the dense layer outputs on calibration data (default: on with --recover distill, the recipe).", rich_help_panel=_REFIT),
    refit_samples: int = typer.Option(128, help="Calibration samples for the refit (from --calib).", rich_help_panel=_REFIT),
    refit_seq_len: int = typer.Option(256, help="Tokens per refit sample.", rich_help_panel=_REFIT),
    refit_damp: float = typer.Option(3e-4, help="Ridge term, a fraction of the mean input energy.", rich_help_panel=_REFIT),
    recover: Optional[RecoverMethod] = typer.Option(None, help="Train the pruned model to recover: distill (from the dense model) | lora.", rich_help_panel=_REC),
    recover_steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: 500 distill, the recipe; 100 lora).", rich_help_panel=_REC),
    recover_data: Optional[str] = typer.Option(None, help="'self', a .txt/.jsonl/Alpaca .json file, or a hub data set; several joined by commas are mixed (default: the --calib source, or with --calib self the data folder's C4 + Alpaca demo files where present).", rich_help_panel=_REC),
    recover_field: Optional[str] = typer.Option(None, help="Text field of .jsonl / data set records.", rich_help_panel=_REC),
    recover_self_samples: int = typer.Option(128, help="Sequences the dense model writes when --recover-data names 'self'.", rich_help_panel=_REC),
    recover_lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 1e-4 distill, 3e-4 lora).", rich_help_panel=_REC),
    recover_batch_size: Optional[int] = typer.Option(None, help="Sequences per step (default: 4 distill, 8 lora).", rich_help_panel=_REC),
    recover_micro_batch: Optional[int] = typer.Option(None, help="Sequences per forward pass (gradient accumulation; default: up to 4).", rich_help_panel=_REC),
    recover_seq_len: int = typer.Option(256, help="Tokens per sequence (documents packed, no padding).", rich_help_panel=_REC),
    recover_warmup: Optional[int] = typer.Option(None, help="Linear warmup steps (default 5% of the steps).", rich_help_panel=_REC),
    recover_schedule: Schedule = typer.Option("cosine", help="Decay after warmup.", rich_help_panel=_REC),
    recover_clip: float = typer.Option(1.0, help="Gradient norm clip (0: none).", rich_help_panel=_REC),
    recover_temperature: float = typer.Option(1.0, help="distill: softmax temperature.", rich_help_panel=_REC),
    recover_ce_weight: float = typer.Option(0.0, help="distill: add this times the cross-entropy on the data.", rich_help_panel=_REC),
    recover_hidden_weight: float = typer.Option(0.0, help="distill: add this times the relative squared error of each layer's output against the teacher's.", rich_help_panel=_REC),
    recover_precision: Optional[Precision] = typer.Option(None, help="bf16: bfloat16 autocast, fp32 master weights (~2.7x faster with AMX/AVX512-BF16; fp32 is used where bf16 has no native kernels) | auto: bf16 where fast, else fp32 (default: auto distill, fp32 lora).", rich_help_panel=_REC),
    recover_freeze_embeddings: bool = flag("--recover-freeze-embeddings", help="distill: keep the token embedding (and the LM head tied to it) fixed.", panel=_REC),
    recover_adapter: RecoverAdapter = typer.Option("auto", help="distill: full (every weight, fp32) | lora (adapters, merged after) | auto (full where it fits in memory, else LoRA on bf16 weights).", rich_help_panel=_REC),
    lora_r: int = typer.Option(8, help="lora: rank.", rich_help_panel=_REC),
    lora_alpha: float = typer.Option(16.0, help="lora: scale numerator (scale = alpha / r).", rich_help_panel=_REC),
    lora_dropout: float = typer.Option(0.05, help="lora: dropout on the adapter input.", rich_help_panel=_REC),
    recover_resume_dir: Optional[Path] = typer.Option(None, help="Keep resumable training state here (default: beside --out, removed after saving).", rich_help_panel=_REC),
    recover_save_minutes: float = typer.Option(5.0, help="Save the training state every M minutes (and on Ctrl-C).", rich_help_panel=_REC),
    recover_save_every: Optional[int] = typer.Option(None, help="Also save it every N steps.", rich_help_panel=_REC),
):
    """Score heads and neurons, remove the least important, save a compact checkpoint.

    Launched by torchrun, each rank calibrates on its share of the rows; rank 0 writes and prints."""
    from dataclasses import asdict

    from amp_edge.data.calibration import CalibrationSpec
    from amp_edge.errors import InvalidOptionError
    from amp_edge.pruning import distributed
    from amp_edge.pruning.pipeline import PruneOptions
    from amp_edge.pruning.pipeline import prune as run_prune
    from amp_edge.pruning.refit import RefitSpec
    from amp_edge.recovery.train import RECIPE, RecoverySpec

    recipe = RECIPE[value(recover)] if recover is not None else {"refit": False}  # what an option left out means
    refit = recipe["refit"] if refit is None else refit
    spec = CalibrationSpec(calib, calib_samples, calib_seq_len, seed, batch_size, calib_field, calib_split)
    opts = PruneOptions(ratio, value(criterion), value(allocation), value(gqa), min_keep, value(normalization), spec, seed,
                        RefitSpec(refit_damp, refit_samples, refit_seq_len) if refit else None, heads, value(ratio_of))
    recovery = None if recover is None else RecoverySpec(
        method=value(recover), steps=recipe["steps"] if recover_steps is None else recover_steps, data=recover_data, field=recover_field, lr=recover_lr,
        batch_size=recipe["batch_size"] if recover_batch_size is None else recover_batch_size, micro_batch_size=recover_micro_batch, seq_len=recover_seq_len, seed=seed,
        warmup_steps=recover_warmup, schedule=value(recover_schedule), max_grad_norm=recover_clip,
        temperature=recover_temperature, ce_weight=recover_ce_weight, hidden_weight=recover_hidden_weight, freeze_embeddings=recover_freeze_embeddings,
        precision=recipe["precision"] if recover_precision is None else value(recover_precision), lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        resume_dir=str(recover_resume_dir) if recover_resume_dir else None, save_every=recover_save_every,
        save_minutes=recover_save_minutes,
        self_samples=recover_self_samples, adapter=value(recover_adapter))
    world = distributed.init()
    if not world.main:  # one console: rank 0 shows the progress, the notices and the result
        distributed.quiet()
    if world.size > 1 and (refit or recover is not None):
        distributed.shutdown()
        raise InvalidOptionError("--refit and --recover run in one process; launch them without torchrun")
    try:
        distributed.require_same("source and options", {
            "model": model, "out": str(out_dir), "dtype": value(dtype), "plan": str(plan), "stream": not no_stream,
            "options": asdict(opts), "recovery": asdict(recovery) if recovery else None})
        result = run_prune(model, out_dir, opts, plan_path=plan, overwrite=overwrite, dtype=value(dtype),
                           trust_remote_code=trust_remote_code, recovery=recovery, stream=not no_stream,
                           device_map=device_map)
        distributed.barrier()  # the other ranks wait for rank 0's output
    finally:
        distributed.shutdown()
    if not world.main:
        return
    if as_json:
        print(json.dumps(result.to_dict(), indent=1))
        return
    print_summary(result)


def print_summary(result) -> None:
    table = Table(title=f"pruned with {result.plan.criterion} ({result.plan.allocation}, gqa={result.plan.gqa})")
    for col in ("layer", "heads", "kv heads", "ffn", "params"):
        table.add_column(col, justify="right")
    for row in result.layers:
        table.add_row(str(row["layer"]), *(f"{a} → {b}" for a, b in (row["heads"], row["kv_heads"], row["ffn"])), f"{row['params_after']:,}")
    out.print(table)
    removed = 1 - result.params_after / result.params_before
    how = " (streamed layer by layer)" if result.streamed else ""
    out.print(f"parameters {result.params_before:,} → {result.params_after:,} ({removed:.1%} removed) in {result.seconds:.1f} s{how}")
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
