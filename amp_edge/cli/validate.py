"""``amp-edge validate PKG --provider X``: the package on the CPU provider and on X, compared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from amp_edge.cli.app import app, flag, friendly, print_error, print_text
from amp_edge.cli.choices import Provider, value


@app.command("validate")
@friendly
def validate_cmd(
    package: Path = typer.Argument(..., help="Exported package folder."),
    provider: Provider = typer.Option(..., help="Provider compared with the CPU provider."),
    min_top1: Optional[float] = typer.Option(None, help="Top-1 agreement required (default 0.98 fp32, 0.9 quantized)."),
    max_abs_diff: Optional[float] = typer.Option(None, help="Max |Δlogits| allowed (default fp32: max(1e-3, 1e-3 x max |logit|); quantized: max(1, 0.2 x max |logit|))."),
    greedy: Optional[bool] = typer.Option(None, "--greedy/--no-greedy", help="Require equal greedy tokens (default: fp32 packages only).", show_default=False),
    new_tokens: int = typer.Option(16, help="Greedy tokens generated per prompt."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads."),
    as_json: bool = flag("--json", help="Print the report as JSON on stdout."),
):
    """Run the same prompts on the CPU provider and on --provider: top-1 agreement, max |Δlogits|, greedy tokens."""
    from amp_edge.errors import InvalidOptionError, ProviderMismatchError
    from amp_edge_runtime.crosscheck import Bounds, cross_check

    if min_top1 is not None and not 0 <= min_top1 <= 1:
        raise InvalidOptionError(f"--min-top1 must be in [0, 1], got {min_top1}")
    if max_abs_diff is not None and not max_abs_diff > 0:
        raise InvalidOptionError(f"--max-abs-diff must be > 0, got {max_abs_diff}")
    if new_tokens < 1:
        raise InvalidOptionError(f"--new-tokens must be >= 1, got {new_tokens}")
    try:
        report = cross_check(package, value(provider), Bounds(min_top1, max_abs_diff, greedy), new_tokens, threads)
    except ProviderMismatchError as e:
        _emit(e.report, as_json)
        print_error(str(e))
        raise typer.Exit(e.exit_code) from None
    _emit(report, as_json)


def _emit(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=1))
        return
    p = report["provider"]
    lines = [f"{report['package']}: cpu vs {p['provider']} ({p.get('device', p['ep'])}), session opened in {report['open_seconds']:.2f} s",
             f"top-1 agreement {report['top1_agreement']:.3f}, max |Δlogits| {report['max_abs_diff']:.3g} "
             f"(max |logit| {report['max_abs_logit']:.3g}), greedy {report['new_tokens']} tokens "
             f"{'identical' if report['greedy_equal'] else 'DIFFERENT'}"]
    for ep, entry in report["placement"].items():
        ops = ", ".join(f"{op} {n}" for op, n in sorted(entry["ops"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  {ep}: {entry['nodes']} nodes in {entry['subgraphs']} subgraphs ({ops})")
    print_text("\n".join(lines))
