"""A safetensors copy of each GGUF model, written on its first load and read instead of the GGUF file after that.

Loading a GGUF file through transformers parses it four times (config, weights, tokenizer) and walks the whole
vocabulary each time: 19 s for SmolLM2-135M on this project's CPU box, against about 1 s for the same model as
safetensors. The copy holds the dequantized weights exactly as the GGUF load produced them, plus the tokenizer
and configs it built. It lives under ``$AMP_EDGE_CACHE`` (default ``~/.cache/amp-edge``; ``off`` disables it),
keyed by the GGUF file's path, size and modification time, the dtype and the transformers version. Writing a copy
removes those of GGUF files that are gone or have changed since: each fresh virtual environment (a CI clone) installs
the model under a new path, and its 0.5 GB copy would otherwise stay after the environment is deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
CACHE_ENV = "AMP_EDGE_CACHE"
_FORMAT = 1
_DONE = "amp_edge_gguf_source.json"  # written last: a folder without it is incomplete


def cache_root() -> Path | None:
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() in ("off", "0", "none"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "amp-edge"


def _key(gguf: Path, dtype: str) -> dict:
    import transformers

    st = gguf.stat()
    return {"format": _FORMAT, "gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "dtype": dtype, "transformers": transformers.__version__}


def _folder(root: Path, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{Path(key['gguf']).stem}-{key['dtype']}-{digest}"


def lookup(gguf: Path, dtype: str) -> Path | None:
    """The cached copy of ``gguf`` loaded as ``dtype``, if one is complete."""
    root = cache_root()
    if root is None:
        return None
    key = _key(gguf, dtype)
    folder = _folder(root, key)
    try:
        if json.loads((folder / _DONE).read_text()) == key:
            return folder
    except (OSError, ValueError):
        pass
    return None


def store(gguf: Path, dtype: str, model, tokenizer) -> Path | None:
    """Save ``model`` and ``tokenizer`` (just loaded from ``gguf``) as the cached copy; None if it cannot be written."""
    root = cache_root()
    if root is None:
        return None
    key = _key(gguf, dtype)
    folder = _folder(root, key)
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(json.dumps(key))
        if folder.exists():  # an incomplete or stale copy under the same key
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        _remove_stale(root)
        return folder
    except OSError as e:  # a full or read-only disk costs speed, not correctness
        if lookup(gguf, dtype) is not None:  # another process stored the same copy first
            return folder
        log.warning("could not cache %s as safetensors in %s: %s", gguf.name, root, e)
        return None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(root: Path) -> None:
    """Remove the finished copies whose GGUF file is gone or has changed (another size or modification time).

    Copies made by another transformers version stay: two environments may read the same GGUF file."""
    for folder in root.iterdir():
        if folder.name.startswith("."):  # another writer's temporary folder
            continue
        try:
            key = json.loads((folder / _DONE).read_text())
            gguf, dtype, recorded = Path(key["gguf"]), key["dtype"], (key["size"], key["mtime_ns"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a finished copy of ours: leave it
        try:
            now = _key(gguf, dtype)
            stale = (now["size"], now["mtime_ns"]) != recorded
        except OSError:  # the GGUF file is gone
            stale = True
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed the copy of a GGUF file that is gone or has changed: %s", folder)
