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


def barrier() -> None:
    import torch.distributed as dist

    if world().size > 1:
        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
