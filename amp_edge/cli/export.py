"""``amp-edge export``: a (pruned) model as a validated ONNX package with KV cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from amp_edge.cli.app import app, flag, friendly, out
from amp_edge.cli.choices import (RATIO_OF_HELP, Allocation, Attention, Criterion, Embedding, ExportDtype, Gqa, Int8Scheme, Optimize,
                                  QuantMethod, RatioOf, value)
from amp_edge.models.sources import DEFAULT_MODEL

_GRAPH = "Graph"
_QUANT = "Quantization"
_CHECK = "Validation"
_PRUNE = "Pruning first (with --ratio)"
_OUT = "Output"


@app.command("export")
@friendly
def export_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="Pruned checkpoint, or any model source with --ratio."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Package folder to create.", rich_help_panel=_OUT),
    overwrite: bool = flag("--overwrite", help="Replace an existing package folder.", panel=_OUT),
    trust_remote_code: bool = flag("--trust-remote-code", help="Allow model code from the hub.", panel=_OUT),
    as_json: bool = flag("--json", help="Print the manifest as JSON on stdout.", panel=_OUT),
    dtype: ExportDtype = typer.Option("fp32", help="Weights of the graph.", rich_help_panel=_QUANT),
    keep_8bit: Optional[str] = typer.Option(None, help="int4 only: MatMuls kept at 8 bits, e.g. down_proj,lm_head.", rich_help_panel=_QUANT),
    block_size: int = typer.Option(32, help="Quantization block size (int4/int8).", rich_help_panel=_QUANT),
    quant_method: Optional[QuantMethod] = typer.Option(None, help="int4: auto (default: a weight on a 4-bit grid, as read from a Q4 GGUF, keeps it exactly; the LM head and the MLP output projections on no grid take 8 bits, other weights on no grid get fitted offsets; SmolLM2 top-1 on its fp32's continuations: dense 0.97, recovered 30% 0.84) | grid (4 bits everywhere: a weight on a grid keeps it, the others round to nearest; the smallest) | grid-fit (grid with fitted offsets off-grid) | rtn (round to nearest everywhere, the fastest) | hqq (fitted float zero points, 16-24x slower decode on CPU) | k-quant. Sizes and speeds: docs/export.md.", rich_help_panel=_QUANT, show_default=False),
    accuracy_level: int = typer.Option(4, help="MatMulNBits accuracy level: 4 = int8 compute (fast on CPU), 0 = fp32 compute.", rich_help_panel=_QUANT),
    int8_scheme: Int8Scheme = typer.Option("weight-only", help="int8: weight-only (MatMulNBits) | dynamic (MatMulInteger).", rich_help_panel=_QUANT),
    embedding: Embedding = typer.Option("shared", help="Tied embeddings: shared (rows looked up in the LM head's weight, quantized in int4/int8) | fp16 (a separate table).", rich_help_panel=_QUANT),
    opset: int = typer.Option(17, help="ONNX opset.", rich_help_panel=_GRAPH),
    optimize: Optimize = typer.Option("fuse", help="fuse: ORT transformer fusions (RMSNorm, rotary) | none: the plain trace.", rich_help_panel=_GRAPH),
    attention: Attention = typer.Option("auto", help="auto: GroupQueryAttention where a layer allows it (right padding only) | gqa: every layer | sdpa: plain attention (any padding).", rich_help_panel=_GRAPH),
    external_data: bool = flag("--external-data/--single-file", help="Weights in model.onnx.data (less memory) or in model.onnx when under 2 GB.", panel=_GRAPH, default=True),
    stream: bool = flag("--stream/--no-stream", help="A checkpoint folder is exported layer by layer (no fp32 model in memory); --no-stream loads it whole.", panel=_GRAPH, default=True),
    validate: bool = flag("--validate/--no-validate", help="Check ONNX Runtime against PyTorch.", panel=_CHECK, default=True),
    min_top1: Optional[float] = typer.Option(None, help="fp16/int8/int4: top-1 agreement required (default 0.95/0.85/0.55).", rich_help_panel=_CHECK),
    max_abs_diff: Optional[float] = typer.Option(None, help="fp32: max |Δlogits| allowed (default max(1e-3, 4e-5 x max |logit|)).", rich_help_panel=_CHECK),
    ratio: Optional[float] = typer.Option(None, help="Prune first by this fraction of parameters; 0 exports the dense model.", rich_help_panel=_PRUNE),
    ratio_of: RatioOf = typer.Option("total", help=RATIO_OF_HELP, rich_help_panel=_PRUNE),
    criterion: Criterion = typer.Option("amp", help="Pruning criterion.", rich_help_panel=_PRUNE),
    allocation: Allocation = typer.Option("uniform", help="uniform | global.", rich_help_panel=_PRUNE),
    gqa: Gqa = typer.Option("query", help="query | group.", rich_help_panel=_PRUNE),
    heads: str = typer.Option("auto", help="Head units removed per layer: auto | proportional | a number (see prune --heads).", rich_help_panel=_PRUNE),
    calib: str = typer.Option("self", help="Calibration data.", rich_help_panel=_PRUNE),
    calib_samples: int = typer.Option(32, help="Calibration samples.", rich_help_panel=_PRUNE),
    calib_seq_len: int = typer.Option(128, help="Tokens per calibration sample.", rich_help_panel=_PRUNE),
    plan: Optional[Path] = typer.Option(None, help="Apply a saved plan instead of scoring.", rich_help_panel=_PRUNE),
    refit: bool = flag("--refit", help="Least-squares refit of o_proj/down_proj after pruning (see prune --refit).", panel=_PRUNE),
):
    """Export a (pruned) model as a validated ONNX package with KV cache."""
    from amp_edge.data.calibration import CalibrationSpec
    from amp_edge.pruning.pipeline import PruneOptions
    from amp_edge.pruning.refit import RefitSpec
    from exporters import ExportOptions, GraphSpec, QuantSpec, export

    keep = tuple(k.strip() for k in keep_8bit.split(",") if k.strip()) if keep_8bit else ()
    opts = ExportOptions(
        ratio=ratio,
        prune=PruneOptions(ratio or 0.3, value(criterion), value(allocation), value(gqa),
                           calibration=CalibrationSpec(calib, calib_samples, calib_seq_len),
                           refit=RefitSpec() if refit else None, heads=heads, ratio_of=value(ratio_of)),
        plan=str(plan) if plan else None,
        graph=GraphSpec(opset, value(optimize), value(attention)),
        quant=QuantSpec(value(dtype), block_size, accuracy_level, keep, value(int8_scheme), embedding=value(embedding),
                        **({"method": value(quant_method)} if quant_method is not None else {})),
        validate=validate, min_top1=min_top1, max_abs_diff=max_abs_diff, external_data=external_data,
        trust_remote_code=trust_remote_code, stream=stream,
    )
    result = export(model, out_dir, opts, overwrite=overwrite)
    if as_json:
        print(json.dumps(result.to_dict(), indent=1))
        return
    print_export(result)


def print_export(result) -> None:
    m = result.manifest
    parity = m["parity"]
    mb = m["onnx_bytes"] / 2**20
    out.print(f"package {result.out}: {m['quantization']['dtype']}, {mb:.1f} MiB graph, "
              f"{m['params']['after']:,} parameters (of {m['params']['before']:,}), {m['export_seconds']:.1f} s")
    if m["quantization"].get("matmuls"):
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(m["quantization"]["matmuls"].items()))
        out.print(f"weight MatMuls ({m['quantization'].get('method', m['quantization']['dtype'])}): {kinds}")
    if "skipped" in parity:
        out.print("validation skipped (--no-validate)")
    else:
        out.print(f"parity vs PyTorch: max |Δlogits| {parity['max_abs_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.3f}"
                  + ("" if m["quantization"]["dtype"] != "fp32" else
                     f", greedy {'identical' if all(s['greedy_equal'] for s in parity['shapes']) else 'DIFFERENT'} for 32 steps"))
        if parity.get("continuation_agreement") is not None:
            out.print(f"top-1 on PyTorch's own continuations of 4 prompts x 32 tokens: {parity['continuation_agreement']:.3f}")
