"""Data-parallel training under ``torchrun``: which process this is, and the few collectives the
training loop needs.

``torchrun --nproc_per_node N -m mtkd distill CONFIG`` starts N copies of the engine with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (and the rendezvous address) in their environment.
Each copy joins one process group (NCCL on CUDA, gloo on the CPU), trains on its own shard of
every epoch's samples, and takes part in the gradient all-reduce of DistributedDataParallel.
Without those variables (or with ``WORLD_SIZE=1``) this is a single process and every
collective here is the identity, so the loop has one code path.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mtkd.errors import MTKDError

__all__ = ["Distributed", "shard_indices"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a (possibly one-process) data-parallel run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes the run folder."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Distributed:
        """Read torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (absent: one process)."""
        environ = os.environ if environ is None else environ
        try:
            world_size = int(environ.get("WORLD_SIZE", "1"))
            rank = int(environ.get("RANK", "0"))
            local_rank = int(environ.get("LOCAL_RANK", str(rank)))
        except ValueError as error:
            raise MTKDError(
                f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK are not numbers ({error})"
            ) from None
        if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
            raise MTKDError(
                f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world_size} "
                f"LOCAL_RANK={local_rank}"
            )
        return cls(rank, world_size, local_rank)

    # ---------------------------------------------------------------- set-up
    def device(self, requested: torch.device) -> torch.device:
        """This process's device: on CUDA the GPU of its local rank (``cuda`` -> ``cuda:L``)."""
        if not self.enabled or requested.type != "cuda":
            return requested
        if requested.index not in (None, self.local_rank):
            raise MTKDError(
                f"under torchrun each process uses the GPU of its local rank; "
                f"train.device '{requested}' names one GPU (use 'auto' or 'cuda')"
            )
        if self.local_rank >= torch.cuda.device_count():
            raise MTKDError(
                f"local rank {self.local_rank} has no GPU: this machine has "
                f"{torch.cuda.device_count()}; start at most that many processes per node"
            )
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def start(self, device: torch.device, timeout_minutes: float = 30.0) -> None:
        """Join the process group (NCCL for CUDA devices, gloo for the CPU); no-op alone."""
        if not self.enabled or dist.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_available() or (
            backend == "nccl" and not dist.is_nccl_available()
        ):  # pragma: no cover - builds without distributed support
            raise MTKDError(f"this PyTorch build cannot run {backend} process groups")
        dist.init_process_group(
            backend,
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )

    def stop(self) -> None:
        """Leave the process group (after the last collective)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # ----------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is true on any rank (e.g. a stop request)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def sum(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Sum each value over the ranks; every rank must pass the same keys."""
        if not self.enabled or not values:
            return dict(values)
        keys = sorted(values)
        tensor = torch.tensor([values[key] for key in keys], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return dict(zip(keys, tensor.tolist()))

    def gather(self, obj: object) -> list[object]:
        """``obj`` of every rank, in rank order (a one-element list alone)."""
        if not self.enabled:
            return [obj]
        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered


def shard_indices(count: int, seed: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of one epoch's sample order.

    The order is a permutation of ``range(count)`` drawn from ``seed`` (the same on every
    rank); it is padded by repeating its first indices to a multiple of ``world_size`` so that
    every rank runs the same number of steps, and rank r takes every world_size-th index from
    position r. The shards are disjoint except for at most ``world_size - 1`` padded samples.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(count, generator=generator).tolist()
    if world_size > 1 and count:
        padding = -count % world_size
        order += (order * (padding // count + 1))[:padding]
    return order[rank::world_size]
