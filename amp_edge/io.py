"""Outputs that appear whole or not at all. Torch-free, so every layer (the runtime bench included) can use it."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from amp_edge.errors import DiskSpaceError, OutputExistsError
from amp_edge.memory import libc_handle

_RENAME_EXCHANGE = 2  # linux/fs.h


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Fail early, before any work, if ``out`` exists and may not be replaced (after undoing an interrupted swap)."""
    out = Path(out).expanduser()
    recover_interrupted(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder")
    return out


def require_free_space(out: str | Path, needed: int, what: str = "the output") -> None:
    """Refuse, before writing, an output that the disk holding ``out`` cannot take (``needed`` bytes, plus 5% slack:
    scratch files and filesystem overhead)."""
    out = Path(out).expanduser()
    where = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(where).free
    if free < needed * 1.05:
        raise DiskSpaceError(f"{what} needs about {needed / 1e9:.2f} GB on {where}, which has {free / 1e9:.2f} GB free")


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; move it into place only if the body succeeds."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
        if out.exists():
            replace_dir(tmp, out)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, out: Path) -> None:
    """Put folder ``new`` where folder ``out`` is. One atomic exchange where the kernel offers it (Linux renameat2);
    elsewhere two renames, and a crash between them leaves ``.NAME.old-PID``, which the next run restores."""
    if _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # now holds the previous contents
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted(out: Path) -> list[Path]:
    """Undo what a crash in ``replace_dir``'s two-rename path left: restore the previous output if none is in place,
    and remove the stale copies. Returns the folders removed or restored."""
    stale = sorted(out.parent.glob(f".{out.name}.old-*")) if out.parent.is_dir() else []
    touched = []
    for old in stale:
        if not out.exists():
            os.replace(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)
        touched.append(old)
    return touched


def _exchange(a: Path, b: Path) -> bool:
    fn = getattr(libc_handle(), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0  # EINVAL etc.: fall back


def _publish_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files; the result is meant to be shared (umask applies)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)
