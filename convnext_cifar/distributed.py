"""Several processes under torchrun: PyTorch's own process group, nothing home-made.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; every process runs the same `train`. Rank 0 alone
writes files; evaluation counts and logged sums are added across ranks at the points where the
loop reads them anyway.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from convnext_cifar.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    torchrun: bool = False  # launched by torchrun: a process group even for one process

    @property
    def enabled(self) -> bool:
        """A process group: more than one process, or any torchrun launch (one process then
        runs DDP over NCCL/gloo too, as it would with more)."""
        return self.world > 1 or self.torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous share of n items (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is True on any (a collective: call it on all ranks)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())


def from_env() -> Dist:
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)), "TORCHELASTIC_RUN_ID" in os.environ)


def start(dist: Dist, device: torch.device) -> None:
    """Join the process group: NCCL for CUDA devices, gloo for the CPU."""
    if dist.enabled and not tdist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            tdist.init_process_group("nccl", device_id=device)
        else:
            tdist.init_process_group("gloo")


def stop() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def from_main(dist: Dist, work: Callable[[], T]) -> T:
    """`work()` on rank 0 alone, its result sent to every rank: what rank 0 decides (the state
    to resume, the work dir's checks) holds for all, whatever the other ranks' disks hold. A
    UserError it raises is raised on every rank, with the same line."""
    if not dist.enabled:
        return work()
    message: list[Any] = [None, None]
    if dist.is_main:
        try:
            message = [work(), None]
        except UserError as e:
            message = [None, str(e)]
    tdist.broadcast_object_list(message, src=0)
    if message[1] is not None:
        raise UserError(message[1])
    return message[0]


def together(dist: Dist, work: Callable[[], T]) -> T:
    """`work()` on every rank; a UserError on any rank is raised on all of them (the lowest
    rank's line), so that no rank waits alone in a collective the others never reach."""
    if not dist.enabled:
        return work()
    result, error = None, None
    try:
        result = work()
    except UserError as e:
        error = str(e)
    errors: list[Any] = [None] * dist.world
    tdist.all_gather_object(errors, error)
    if first := next((e for e in errors if e is not None), None):
        raise UserError(first)
    return result  # type: ignore[return-value]


def main_first(dist: Dist, work: Callable[[], None]) -> None:
    """Run `work` (a download, a cache to build) on rank 0 while the others wait, then on the
    first process of every other node (whose disk may not be rank 0's); a UserError on any of
    them is raised on every rank."""
    if not dist.enabled:
        return
    from_main(dist, work)
    together(dist, work if dist.local_rank == 0 and not dist.is_main else lambda: None)
