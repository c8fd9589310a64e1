"""Read a GGUF file's metadata keys without reading its tensors (or even its vocabulary, when the key comes first).

``gguf.GGUFReader`` parses every field and tensor description up front: 38 s for Gemma-3-270M's header on this
project's loaded 2-core box (its 262k-token vocabulary). Refusing an unsupported architecture needs one key, which
llama.cpp writes first, so this reads key by key and stops there.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from amp_edge.errors import ModelLoadError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int, keep: bool):
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        inner, n = _read(f, "<I"), _read(f, "<Q")
        if inner in _SCALARS and not keep:  # skip fixed-size arrays without decoding them
            f.seek(n * struct.calcsize(_SCALARS[inner]), 1)
            return None
        items = [_value(f, inner, keep) for _ in range(n)]  # strings have their own lengths: read to skip
        return items if keep else None
    raise ValueError(f"unknown value type {kind}")


def metadata(path: str | Path, wanted: str) -> object:
    """The value of metadata key ``wanted`` (None if the file has no such key); ModelLoadError if not a GGUF file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelLoadError(f"{path} is not a GGUF file (no GGUF magic)")
            version = _read(f, "<I")
            if version < 2:
                raise ModelLoadError(f"{path} is GGUF version {version}; versions 2 and 3 are read")
            _read(f, "<Q")  # tensor count
            for _ in range(_read(f, "<Q")):
                key, kind = _string(f), _read(f, "<I")
                value = _value(f, kind, keep=key == wanted)
                if key == wanted:
                    return value
    except (EOFError, ValueError, struct.error, OSError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or corrupt header: {e or 'end of file'})") from None
    return None
