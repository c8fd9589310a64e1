"""Layers placed on several devices through accelerate (``--device-map``), for models larger than one device.

A map is ``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential`` (accelerate fills the GPUs there are, then the
CPU), one device (``cpu``, ``cuda:1``), or a JSON file of module name -> device, where a device may also be ``disk``
(weights read back from an offload folder as each module runs). accelerate's hooks move activations between devices,
so calibration, scoring and perplexity run unchanged on a placed model.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch

from amp_edge.errors import InvalidOptionError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_OFFLOAD_DIRS: list[str] = []


def parse_device_map(value: str | dict) -> str | dict:
    """The map ``value`` names, checked: every device it places something on exists here."""
    if isinstance(value, dict):
        mapping = value
    elif value in STRATEGIES:
        return value
    elif value.endswith(".json"):
        try:
            mapping = json.loads(Path(value).expanduser().read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidOptionError(f"--device-map {value}: not a readable JSON map ({type(e).__name__}: {e})") from None
        if not isinstance(mapping, dict) or not mapping:
            raise InvalidOptionError(f"--device-map {value}: expected a JSON object of module name -> device")
    else:
        _require_device(value)
        return {"": value}
    for device in mapping.values():
        if device != "disk":
            _require_device(device)
    return mapping


def _require_device(device) -> None:
    try:
        d = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    except (RuntimeError, TypeError):
        raise InvalidOptionError(f"--device-map: unknown device {device!r}; use cpu, cuda:N, disk or one of "
                                 f"{', '.join(STRATEGIES)}") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise InvalidOptionError(f"--device-map places layers on {device}, but this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s)")
    if d.type not in ("cpu", "cuda"):
        raise InvalidOptionError(f"--device-map: device {device!r} is not supported; use cpu, cuda:N or disk")


def offload_folder() -> str:
    """A scratch folder for ``disk`` placements, removed when the process ends."""
    path = tempfile.mkdtemp(prefix="amp-edge-offload-")
    _OFFLOAD_DIRS.append(path)
    return path


@atexit.register
def _remove_offload_dirs() -> None:
    for path in _OFFLOAD_DIRS:
        shutil.rmtree(path, ignore_errors=True)


def placement_kwargs(device_map: str | dict) -> dict:
    """``from_pretrained`` keyword arguments that place the model by ``device_map``."""
    mapping = parse_device_map(device_map)
    kwargs = {"device_map": mapping}
    if isinstance(mapping, str) or "disk" in mapping.values():
        kwargs["offload_folder"] = offload_folder()  # accelerate spills to disk only when the devices are full
    return kwargs


def dispatch(model: torch.nn.Module, device_map: str | dict) -> torch.nn.Module:
    """Place an already loaded ``model`` (a pruned checkpoint with per-layer sizes) by ``device_map``."""
    from accelerate import dispatch_model, infer_auto_device_map

    mapping = parse_device_map(device_map)
    if isinstance(mapping, str):
        no_split = getattr(model, "_no_split_modules", None) or []
        mapping = infer_auto_device_map(model, no_split_module_classes=no_split)
    if set(mapping.values()) == {"cpu"}:
        return model  # already there; accelerate's hooks would only cost time
    return dispatch_model(model, device_map=mapping, offload_dir=offload_folder() if "disk" in mapping.values() else None)


def devices_of(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per device (``meta`` counts those accelerate offloaded to disk)."""
    out: dict[str, int] = {}
    for p in model.parameters():
        out[str(p.device)] = out.get(str(p.device), 0) + p.numel()
    return out


def weight_of(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """``module``'s parameter, read back from accelerate's offload map when it lives on disk (it is ``meta`` outside
    the module's own forward, where scoring hooks and weight-based criteria look at it)."""
    t = getattr(module, name)
    if t.device.type == "meta" and hasattr(module, "_hf_hook"):
        weights = getattr(module._hf_hook, "weights_map", None)
        if weights is not None and name in weights:
            return weights[name]
    return t
