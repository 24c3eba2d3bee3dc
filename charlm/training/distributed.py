"""Data-parallel training with PyTorch DDP, launched by ``torchrun`` (NCCL on CUDA, gloo on CPU).

``torchrun --nproc_per_node N -m charlm train CORPUS`` sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; ``from_env`` joins the process group they describe. A plain
``charlm train`` sees none of them and runs as a world of one, with no collective calls at all.

The trainer keeps one rule: every decision that ends a loop or saves a file is taken from values
that were reduced across ranks (loss, clock, stop requests), so all ranks take it at the same step.
A rank that dies makes the next collective fail (or time out) on the others, which then stop with
a ``DistributedError`` instead of hanging.
"""
from __future__ import annotations

import datetime
import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as torch_dist

from charlm.errors import DistributedError

T = TypeVar("T")

# Long enough for rank 0 to tokenize a large corpus while the others wait at a barrier.
DEFAULT_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run: a world of one unless launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (and return it); a no-op in a world of one."""
        if self.enabled:
            _collective(torch_dist.all_reduce, tensor)
        return tensor

    def all_gather_cat(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``tensor`` (equal shapes) concatenated along ``dim``, in rank order."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        _collective(torch_dist.all_gather, parts, tensor.contiguous())
        return torch.cat(parts, dim=dim)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (small picklable objects built by our own code only)."""
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        _collective(torch_dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            _collective(torch_dist.barrier)

    def main_first(self, build: Callable[[], T]) -> T:
        """``build()`` on rank 0 first, then on the others: rank 0 fills a cache they then read."""
        result: T | None = None
        for main_turn in (True, False):
            if self.is_main == main_turn:
                result = build()
            self.barrier()
        return result  # type: ignore[return-value]

    @contextmanager
    def main_outcome(self) -> Iterator[None]:
        """Around work rank 0 does alone (checkpoint and metrics writes, the weight check), entered
        by every rank: all of them learn how it ended, so an error on rank 0 stops the others at
        once with its message, instead of leaving them in their next collective (where NCCL holds
        them until its watchdog aborts the run)."""
        if not self.enabled:
            yield
            return
        failure: Exception | None = None
        try:
            yield
        except Exception as exc:  # shared first, raised below
            failure = exc
        try:
            message = self.broadcast_object(None if failure is None else str(failure) or type(failure).__name__)
        except DistributedError:
            if failure is None:
                raise
            message = None  # the others are gone already: rank 0's own error is the one to tell
        if failure is not None:
            raise failure
        if message is not None:
            raise DistributedError(f"the main process of the distributed run stopped: {message}")

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Around work with hidden collectives (DDP's gradient all-reduce): a dead peer becomes a
        ``DistributedError``; any other error passes through unchanged."""
        try:
            yield
        except RuntimeError as exc:
            if self.enabled and any(mark in str(exc) for mark in _PEER_FAILURE_MARKS):
                raise _peer_failure(exc) from None
            raise


# How gloo and NCCL word a dead or silent peer.
_PEER_FAILURE_MARKS = ("gloo", "Gloo", "NCCL", "Connection", "connection", "peer", "timed out", "Timeout")


def _peer_failure(exc: BaseException) -> DistributedError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DistributedError(f"another process of the distributed run failed or stopped responding "
                            f"({first_line[:160]})")


def _collective(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except (RuntimeError, ValueError) as exc:  # gloo/NCCL report a dead peer or a timeout this way
        raise _peer_failure(exc) from None


def launched_by_torchrun() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun") from None


def backend_for(use_cuda: bool) -> str:
    """gloo alone on CPU; on CUDA, NCCL for GPU tensors (DDP's gradients) and gloo for the CPU ones
    (the per-step loss and clock, object broadcasts), which NCCL cannot reduce."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def placement_from_env() -> Dist:
    """This process's place as torchrun's RANK / WORLD_SIZE / LOCAL_RANK give it, without joining
    the process group: a world of one when not launched by torchrun."""
    if not launched_by_torchrun():
        return Dist()
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as exc:
        raise DistributedError(f"WORLD_SIZE is set but RANK is missing or malformed ({exc}); "
                               f"launch with torchrun") from None
    return Dist(rank, world_size, local_rank)


def from_env(device_name: str) -> Dist:
    """Join the process group torchrun describes, or return a world of one."""
    dist = placement_from_env()
    if not dist.enabled:
        return dist
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(dist.local_rank)
    timeout = float(os.environ.get("CHARLM_DIST_TIMEOUT", DEFAULT_TIMEOUT_SECONDS))
    if not torch_dist.is_initialized():
        try:
            torch_dist.init_process_group(backend=backend_for(use_cuda), timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"cannot join the distributed run: {str(exc).strip().splitlines()[0]}") from None
    return dist


def shutdown(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        # DistributedDataParallel's reducer sits in reference cycles and still holds the group;
        # freed only at interpreter exit, after the group is gone, it can abort the process
        # ("terminate called without an active exception"). Free it first.
        gc.collect()
        torch_dist.destroy_process_group()


def device_for(dist: Dist, device: torch.device) -> torch.device:
    """Each rank drives its own GPU (LOCAL_RANK); CPU ranks share the CPU."""
    if dist.enabled and device.type == "cuda":
        return torch.device("cuda", dist.local_rank)
    return device
