"""Calibration split across processes: each rank scores its share of the calibration rows, the sums are all-reduced.

Launched with torchrun (``torchrun --nproc-per-node 2 -m amp_edge.cli prune ...``), which sets RANK, WORLD_SIZE and
the rendezvous address; gloo on CPUs, NCCL on GPUs. Every score is a sum over tokens divided by the token count, so
summing each rank's partial sums gives the one-process scores (up to float64 summation order) and the same plan.
Every rank computes the plan; rank 0 alone writes the output.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass

import torch

from amp_edge.errors import InvalidOptionError

_TIMEOUT = datetime.timedelta(minutes=30)  # a collective waiting on a rank that died: fail, don't hang for ever
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's items: every size-th, starting at its rank (disjoint, together all of them)."""
        return items[self.rank::self.size]


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """This process's place: from the initialized process group, else one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init(backend: str | None = None) -> World:
    """Join the process group torchrun describes in the environment; one process when not launched that way.

    A launch whose environment does not describe a world (a missing variable, a rank outside the world) is refused in
    one line before any collective could hang on it.
    """
    import torch.distributed as dist

    if not launched():
        return World()
    missing = [k for k in _ENV if not os.environ.get(k)]
    if missing:
        raise InvalidOptionError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset: launch with torchrun")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not 0 <= rank < size:
        raise InvalidOptionError(f"RANK={rank} is outside WORLD_SIZE={size}")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=_TIMEOUT)
    return world()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks (``t`` itself with one process), in float64 for the score sums."""
    import torch.distributed as dist

    if world().size == 1:
        return t
    out = t.detach().to(torch.float64).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.dtype)


def share_rows(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's calibration rows (every size-th row), in batches of the first batch's size; the batches unchanged in
    one process. Rows, not batches, are shared so that a few batches still spread over every rank."""
    w = world()
    if w.size == 1 or not batches:
        return list(batches)
    mine = torch.cat(list(batches))[w.rank::w.size]
    return list(mine.split(batches[0].shape[0])) if mine.shape[0] else []


def reduce_loss(total: float, tokens: int) -> float:
    """The mean of a loss summed over tokens on every rank (``total / tokens`` in one process; inf without tokens)."""
    sums = all_reduce_sum(torch.tensor([total, float(tokens)], dtype=torch.float64))
    return float(sums[0] / sums[1]) if sums[1] > 0 else float("inf")


def broadcast_rows(rows: torch.Tensor | None) -> torch.Tensor:
    """Rank 0's token rows on every rank (rows written by rank 0 alone: the model's own samples)."""
    import torch.distributed as dist

    if world().size == 1:
        return rows
    shape = [list(rows.shape) if rows is not None else None]
    dist.broadcast_object_list(shape, src=0)
    out = rows.to(torch.long).contiguous() if world().main else torch.empty(shape[0], dtype=torch.long)
    dist.broadcast(out, src=0)
    return out


def require_same(what: str, value) -> None:
    """Refuse a launch whose ranks were given different ``value`` (options, source, data): their sums would mix."""
    import torch.distributed as dist

    w = world()
    if w.size == 1:
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
    digests: list[str | None] = [None] * w.size
    dist.all_gather_object(digests, digest)
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise InvalidOptionError(f"ranks {odd} were launched with a different {what} than rank 0; every rank needs the same command")


def require_same_rows(batches: list[torch.Tensor]) -> None:
    """Refuse ranks that read different calibration rows (a data file that differs between machines)."""
    if world().size == 1:
        return
    rows = torch.cat(list(batches)) if batches else torch.zeros(0, dtype=torch.long)
    require_same("calibration data", hashlib.sha256(rows.to(torch.long).numpy().tobytes()).hexdigest())


def quiet() -> None:
    """Silence this process's progress bars and notices (the ranks other than 0)."""
    import logging

    os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads its defaults from TQDM_* variables
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("amp_edge.notice").setLevel(logging.ERROR)


def barrier() -> None:
    import torch.distributed as dist

    if world().size > 1:
        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
