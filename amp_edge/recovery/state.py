"""Resumable recovery: trainable weights, optimizer moments, step, losses and RNG state in one safetensors file.

The file is written beside its final name and moved into place (``os.replace``), so an interrupted write
leaves the previous state intact. It records what the run depends on (the spec, a hash of the starting
weights and of the data), and a folder holding another run's state is refused (or started over).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from amp_edge.errors import RecoveryError

log = logging.getLogger(__name__)
STATE_FILE = "recovery_state.safetensors"
ROWS_FILE = "recovery_rows.safetensors"  # the dense model's own samples, kept for a rerun
STATE_FORMAT = 1
_META_KEY = "amp_edge_recovery_state"


@dataclass
class ResumeState:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # what the run depends on: spec, weights hash, data hash
    optimizer: dict | None = None  # an optimizer state_dict, when resumed
    rng: torch.Tensor | None = None


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else b"")
    return h.hexdigest()[:32]


def save_state(folder: str | Path, params, optimizer: torch.optim.Optimizer, state: ResumeState) -> Path:
    """Write the state after ``state.step`` steps, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{n}": p.detach().contiguous() for n, p in params}  # no copies: written as they are
    opt = optimizer.state_dict()
    scalars = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt/{idx}/{k}"] = v.detach().contiguous()
            else:
                scalars[f"{idx}/{k}"] = v
    tensors["rng"] = torch.get_rng_state()
    info = {"format": STATE_FORMAT, "step": state.step, "losses": state.losses, "meta": state.meta,
            "param_groups": opt["param_groups"], "opt_scalars": scalars}
    return _write(folder / STATE_FILE, tensors, info)


def _write(path: Path, tensors: dict, info: dict) -> Path:
    """safetensors beside ``path``, then moved into place: an interrupted write leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(info)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_rows(folder: str | Path, rows: torch.Tensor, key: dict) -> Path:
    """Keep training rows in ``folder`` under ``key`` (what they were made from)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return _write(folder / ROWS_FILE, {"rows": rows.contiguous()}, {"key": key})


def load_rows(folder: str | Path, key: dict) -> torch.Tensor | None:
    """The rows kept in ``folder`` under the same ``key``; None when there are none, or they were made otherwise."""
    path = Path(folder) / ROWS_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(path, "pt") as f:
            if json.loads(f.metadata()[_META_KEY]).get("key") != json.loads(json.dumps(key)):
                return None
            return f.get_tensor("rows")
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        log.warning("cannot read kept recovery rows %s (%s); writing them again", path, e)
        return None


def load_state(folder: str | Path, params, meta: dict, restart_on_mismatch: bool = False) -> ResumeState:
    """The state saved in ``folder`` for this run, its weights copied into ``params``; a fresh state if none."""
    path = Path(folder) / STATE_FILE
    meta = json.loads(json.dumps(meta))  # compare in JSON's own types
    if not path.is_file():
        return ResumeState(meta=meta)
    try:
        with safe_open(path, "pt") as f:
            info = json.loads(f.metadata()[_META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise RecoveryError(f"cannot read recovery state {path}: {e}; remove it to start over") from None
    differs = _differences(info, meta, [n for n, _ in params], tensors)
    if differs:
        message = f"resume folder {folder} holds the state of a different recovery run (differs in: {', '.join(differs)})"
        if not restart_on_mismatch:
            raise RecoveryError(message + "; remove it or choose another resume folder")
        log.warning("%s; starting over", message)
        return ResumeState(meta=meta)
    with torch.no_grad():
        for n, p in params:
            p.copy_(tensors[f"param/{n}"])
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, idx, name = k.split("/", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    for k, v in info["opt_scalars"].items():
        idx, name = k.split("/", 1)
        opt_state.setdefault(int(idx), {})[name] = v
    return ResumeState(info["step"], info["losses"], meta, {"state": opt_state, "param_groups": info["param_groups"]}, tensors["rng"])


def _differences(info: dict, meta: dict, names: list[str], tensors: dict) -> list[str]:
    if info.get("format") != STATE_FORMAT:
        return [f"format {info.get('format')!r}"]
    saved = info.get("meta", {})
    # Where the data was read from is not compared (a relative and an absolute path to one file name the same rows):
    # the token rows themselves are, by fingerprint, under "data".
    keys = sorted((set(meta["spec"]) | set(saved.get("spec", {}))) - {"data"})
    differs = [f"spec.{k}" for k in keys if meta["spec"].get(k) != saved.get("spec", {}).get(k)]
    differs += [k for k in ("weights", "data") if meta.get(k) != saved.get(k)]
    if not differs and {f"param/{n}" for n in names} != {k for k in tensors if k.startswith("param/")}:
        differs.append("trainable parameters")
    return differs
