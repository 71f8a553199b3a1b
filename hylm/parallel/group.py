"""Process groups: joining them (under torchrun or from spawned processes) and the collectives the
sharded model calls, each counting the bytes of the tensors it moves.

Two groups over the same ranks: the data group runs the model's collectives (NCCL on CUDA, gloo on
CPU) and the control group (always gloo, on CPU) carries rank 0's step messages, so that a worker
waiting for the next request of an idle server blocks on a CPU socket with a long timeout, not on
a GPU collective.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

# collectives inside a step: a rank that does not answer within this is gone
STEP_TIMEOUT = datetime.timedelta(minutes=30)
# a worker waits this long for rank 0's next step: a server may sit idle for days
IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, as torchrun (or a spawning parent) describes it."""

    rank: int
    world_size: int
    local_rank: int
    init_method: str


def torchrun_env() -> LaunchEnv | None:
    """This process's place when started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set
    by its rendezvous); None otherwise."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return LaunchEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                     int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), "env://")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def device_for(device: str | torch.device, local_rank: int) -> torch.device:
    """CUDA ranks on one machine use one GPU each (their local rank); CPU ranks share the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.device("cuda", local_rank if device.index is None else device.index)
    return device


class Communicator:
    """The collectives of one rank, on the data group; `bytes` counts, per operation, the bytes of the
    tensors this rank handed to it (what the model asks to move, before the backend's own algorithm)."""

    def __init__(self, rank: int, world_size: int, device: torch.device, group=None, control_group=None):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.group, self.control_group = group, control_group
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def _count(self, op: str, t: torch.Tensor) -> None:
        self.bytes[op] += t.numel() * t.element_size()
        self.calls[op] += 1

    def reset_counts(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place; returns it."""
        self._count("all_reduce", t)
        dist.all_reduce(t, group=self.group)
        return t

    def gather_to_root(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `t` (same shape everywhere), on rank 0 only; None on the others."""
        self._count("gather", t)
        parts = [torch.empty_like(t) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(t.contiguous(), parts, dst=0, group=self.group)
        return parts

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._count("broadcast", t)
        dist.broadcast(t, src, group=self.group)
        return t

    def all_gather_equal(self, t: torch.Tensor) -> bool:
        """Whether every rank holds the same values in `t` (a check, not part of the model's traffic)."""
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return all(torch.equal(parts[0], p) for p in parts[1:])


def init_group(rank: int, world_size: int, init_method: str, device: str | torch.device = "cpu",
               local_rank: int | None = None) -> Communicator:
    """Join the ranks' process group (gloo on CPU, NCCL on CUDA) and its control group."""
    dev = device_for(device, rank if local_rank is None else local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=STEP_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return Communicator(rank, world_size, dev, group=None, control_group=control)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
