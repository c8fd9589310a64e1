"""How recovery trains within the memory there is: full fine-tuning in fp32 where it fits, LoRA on bf16 weights where not.

Full fine-tuning holds fp32 weights, gradients and two AdamW moments (16 bytes a parameter) beside the teacher: a
0.5B model peaked at 11.7 GB, a 3.8B one would need about 70 GB. LoRA trains a few million adapter parameters in
fp32 on frozen base weights, which can then stay in bf16 (2 bytes a parameter) under bf16 autocast. The distillation
teacher is a bf16 copy of the dense model, or, when the model came from a safetensors folder, that folder read layer
by layer (amp_edge.recovery.teacher: about one layer in memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from amp_edge.errors import InvalidOptionError
from amp_edge.hardware import half_is_fast
from amp_edge.memory import available_bytes

log = logging.getLogger(__name__)

_FULL_BYTES = 16  # fp32 weights + gradients + AdamW's two moments, a parameter
_ACTIVATIONS = 0.25  # room left, a fraction of the weights, for activations and logits at the default batch
_USABLE = 0.8  # of MemAvailable: what the page cache and the rest of the process leave


@dataclass(frozen=True)
class Budget:
    dtype: str  # the weights the model is loaded with for recovery
    adapter: str  # full | lora: what recovery trains
    precision: str  # fp32 | bf16 autocast
    need_bytes: int
    why: str = ""
    streamed_teacher: bool = False  # distill reads the teacher from the checkpoint layer by layer (no copy)


def footprint(params: int, adapter: str, dtype_bytes: int, teacher: bool) -> int:
    """Bytes recovery holds for a model of ``params`` parameters: weights (+ optimizer), teacher, activations."""
    weights = params * dtype_bytes
    train = params * _FULL_BYTES if adapter == "full" else weights
    return int(train + (weights if teacher else 0) + _ACTIVATIONS * weights)


def plan_budget(params: int | None, method: str, adapter: str, precision: str,
                available: int | None = None, teacher_streams: bool = False) -> Budget:
    """The cheapest way to recover a ``params``-parameter model that fits: fp32 as asked where it fits, else LoRA on bf16.

    ``adapter`` ``auto`` chooses; ``full`` or ``lora`` are kept (and refused when they cannot fit). Raises
    InvalidOptionError, before anything is loaded, when not even LoRA on bf16 weights fits. ``teacher_streams``: the
    source is a safetensors folder, so the bf16 path can read the teacher from it layer by layer instead of copying it.
    """
    teacher = method == "distill"
    want = "lora" if method == "lora" else adapter
    available = available_bytes() if available is None else available
    if params is None or available is None:  # nothing to go by: what was asked, as before
        return Budget("float32", "full" if want == "auto" else want, precision, 0)
    room = int(available * _USABLE)
    first = "full" if want in ("auto", "full") else "lora"
    need = footprint(params, first, 4, teacher)
    if need <= room:
        return Budget("float32", first, precision, need)
    streamed = teacher and teacher_streams
    need_bf16 = footprint(params, "lora", 2, teacher and not streamed)
    gib = 1024 ** 3
    if want == "full":
        raise InvalidOptionError(f"full fine-tuning of {params / 1e9:.2f}B parameters needs about {need / gib:.0f} GiB "
                                 f"(fp32 weights, gradients, AdamW), {room / gib:.0f} GiB is free: use --recover-adapter lora")
    if need_bf16 > room:
        raise InvalidOptionError(f"recovery of {params / 1e9:.2f}B parameters needs about {need_bf16 / gib:.0f} GiB even "
                                 f"with LoRA on bf16 weights; {room / gib:.0f} GiB is free")
    if not half_is_fast(torch.bfloat16, torch.device("cpu")) and not torch.cuda.is_available():
        raise InvalidOptionError(f"recovery of {params / 1e9:.2f}B parameters needs about {need / gib:.0f} GiB in fp32 "
                                 f"({room / gib:.0f} GiB free), and this CPU has no fast bf16 to hold it in half")
    why = (f"{first} training of {params / 1e9:.2f}B parameters in fp32 needs about {need / gib:.0f} GiB, "
           f"{room / gib:.0f} GiB is free: training LoRA adapters on bf16 weights (about {need_bf16 / gib:.0f} GiB"
           f"{', the teacher read from the checkpoint layer by layer' if streamed else ''})")
    return Budget("bfloat16", "lora", "bf16", need_bf16, why, streamed)


def source_params(source: str) -> int | None:
    """Parameters of a local safetensors folder from its headers (no weights read); None for other sources."""
    from amp_edge.models.sources import resolve

    where = resolve(source)
    if where["kind"] != "folder":
        return None
    from amp_edge.models.layered import Checkpoint

    return Checkpoint.open(Path(where["path"])).module_bytes("", torch.uint8)  # one byte an element: the count


def apply_budget(recovery, budget: Budget):
    """``recovery`` as the budget trains it; a notice in one line when it differs from what was asked."""
    if budget.why:
        log.warning("recovery: %s", budget.why)
    return replace(recovery, adapter=budget.adapter, precision=budget.precision)
