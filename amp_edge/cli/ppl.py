"""``amp-edge ppl``: perplexity of a model on a text file (sliding window)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from amp_edge.cli.app import app, flag, friendly, out
from amp_edge.cli.choices import DEVICE_MAP_HELP, WeightDtype, value
from amp_edge.models.sources import DEFAULT_MODEL


@app.command()
@friendly
def ppl(
    model: str = typer.Argument(DEFAULT_MODEL, help="Model source or pruned checkpoint."),
    data: Path = typer.Option(..., help="Text file, e.g. wikitext2/test.txt."),
    window: int = typer.Option(1024, help="Tokens each forward pass sees."),
    stride: Optional[int] = typer.Option(None, help="Tokens scored per window (default: window, disjoint windows)."),
    max_tokens: Optional[int] = typer.Option(None, help="Score only the first N tokens of the file."),
    dtype: WeightDtype = typer.Option("float32", help="Weights dtype."),
    device_map: Optional[str] = typer.Option(None, help=DEVICE_MAP_HELP),
    bos: Optional[bool] = typer.Option(None, "--bos/--no-bos", show_default=False,
                                       help="Start every window with BOS (default: where the tokenizer adds one)."),
    as_json: bool = flag("--json", help="Print the result as JSON on stdout."),
):
    """Perplexity of a model on a text file (sliding window)."""
    from amp_edge.evaluation.perplexity import perplexity, read_eval_text
    from amp_edge.models.sources import load_model

    text = read_eval_text(data)
    loaded = load_model(model, dtype=value(dtype), device_map=device_map)
    result = perplexity(loaded.model, loaded.tokenizer, text, window, stride, max_tokens, bos=bos)
    if as_json:
        print(json.dumps({"model": model, "data": str(data), **result.to_dict()}))
    else:
        out.print(f"perplexity {result.perplexity:.3f} over {result.tokens:,} tokens (window {result.window}, stride {result.stride}"
                  f"{', BOS first' if result.bos else ''})")
