"""Running under ``torchrun``: PyTorch's own process groups (gloo on CPU, nccl on CUDA), one process per
rank; the same code runs unchanged in a single process without torchrun.

    with process_group(device) as ranks:      # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
        mine = ranks.shard(batches)           # rank r takes items r, r + world, r + 2·world, ...
        with ranks.main_first():              # e.g. a cache one process writes and the others read
            ...
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence) -> list:
        """This rank's share: every ``world_size``-th item starting at ``rank`` (the same share for
        the same rank and world size, whatever was done before)."""
        return list(items[self.rank::self.world_size])

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first; the others wait for it, then run it (and find its results)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def device(self, device: str | None) -> str | None:
        """Each rank's own GPU under torchrun (``cuda`` -> ``cuda:<local rank>``)."""
        if self.active and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (float64)."""
        tensor = torch.tensor(list(values), dtype=torch.float64)
        if self.active:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, values: Sequence[float]) -> list[list[float]]:
        """Every rank's ``values`` (equal lengths), in rank order."""
        tensor = torch.tensor(list(values), dtype=torch.float64)
        if not self.active:
            return [tensor.tolist()]
        gathered = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor)
        return [t.tolist() for t in gathered]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Ranks:
    """The ranks of the running process group (rank 0 of 1 when none is running)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks()


@contextlib.contextmanager
def process_group(device: str | None = None) -> Iterator[Ranks]:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA) for the block, or run as the
    only rank when not launched by torchrun."""
    if not launched_by_torchrun() or dist.is_initialized():
        yield current()
        return
    backend = "nccl" if (device or "").startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield current()
    finally:
        dist.destroy_process_group()
