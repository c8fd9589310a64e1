"""The one reader of text files: plain text, .txt documents, .jsonl and .json records (Alpaca included).

Calibration, recovery and evaluation read the same formats; they differ only in what they call the file in an
error, which error class they raise, the option that picks a record's field, and what an Alpaca record becomes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from amp_edge.errors import AmpEdgeError

TEXT_FIELDS = ("text", "content", "document")


def join_alpaca(row: dict) -> str:
    """The prompt and the answer, blank-line separated (how the reference calibrates on Alpaca)."""
    return "\n\n".join(str(row[k]) for k in ("instruction", "input", "output") if row.get(k))


@dataclass(frozen=True)
class TextSource:
    name: str  # "calibration", "recovery data", ...: the file is "<name> file", a record "<name> record"
    error: type[AmpEdgeError]
    field_option: str = "--calib-field"
    alpaca: Callable[[dict], str] = join_alpaca


def read_text(path: str | Path, source: TextSource) -> str:
    """A whole file as text; a missing or unreadable file is ``source.error`` naming it."""
    path = Path(path).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise source.error(f"{source.name} file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise source.error(f"cannot read {source.name} file {path}: {e}") from None


def read_documents(path: str | Path, source: TextSource, field: str | None = None) -> list[str]:
    """Documents from .txt (blank-line separated), .jsonl (one record a line) or .json (a list of records)."""
    path = Path(path).expanduser()
    raw = read_text(path, source)
    if path.suffix not in (".json", ".jsonl"):
        return raw.split("\n\n")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            rows = json.loads(raw) if raw.strip() else []
    except json.JSONDecodeError as e:
        raise source.error(f"{source.name} file {path} is not valid JSON: {e}") from None
    if not isinstance(rows, list):
        raise source.error(f"{source.name} file {path} must hold a JSON list of records")
    return [record_text(r, source, path, field) for r in rows]


def record_text(row, source: TextSource, where, field: str | None = None) -> str:
    """A record's text: ``field`` if given, an Alpaca record's prompt and answer, else the first of TEXT_FIELDS."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise source.error(f"{source.name} records in {where} must be objects or strings, got {type(row).__name__}")
    if field:
        if field not in row:
            raise source.error(f"{source.name} record in {where} has no field {field!r} (fields: {', '.join(row)})")
        return str(row[field])
    if "instruction" in row:
        return source.alpaca(row)
    for name in TEXT_FIELDS:
        if name in row:
            return str(row[name])
    raise source.error(f"{source.name} record in {where} has none of the fields {TEXT_FIELDS + ('instruction',)}; "
                       f"use {source.field_option}")
