"""Starting a model split across ranks, from the CLI or Python.

Under torchrun (RANK / WORLD_SIZE in the environment; several machines through its rendezvous) every
process calls `start`: rank 0 gets its RankZeroModel back to run the engine or server on, the other ranks
serve rank 0's steps inside `start` and get None once rank 0 closes. Without torchrun, `start` spawns
the other world_size - 1 ranks itself on this machine (torch.multiprocessing, rendezvous on a free
local port) and returns rank 0's model.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import ModelConfig
from ..model import NemotronHModel
from .group import Communicator, free_port, init_group, leave_group, torchrun_env
from .load import load_parallel_model
from .sharding import ParallelLayout
from .worker import RankZeroModel, serve_rank_zero


def is_worker_rank() -> bool:
    """True in a torchrun process that is not rank 0 (it serves rank 0's steps and nothing else)."""
    env = torchrun_env()
    return env is not None and env.rank != 0


def start(model: str | os.PathLike | ModelConfig, tensor_parallel_size: int = 1, expert_parallel_size: int = 1,
          dtype: str | torch.dtype = "fp32", device: str = "cpu", seed: int = 0, combine_in_latent: bool = True,
          threads: int | None = None) -> RankZeroModel | None:
    """Rank 0's model (call `.close()` when done), or None on a torchrun worker rank after rank 0 closed.

    threads: torch threads per rank on CPU (default: this machine's cores shared among its ranks)."""
    layout = ParallelLayout.from_sizes(tensor_parallel_size, expert_parallel_size, combine_in_latent=combine_in_latent)
    env = torchrun_env()
    if env is not None and env.world_size > 1:
        if env.world_size != layout.world_size:
            raise ValueError(f"torchrun started {env.world_size} processes but the parallel layout needs "
                             f"{layout.world_size} (tensor parallel {tensor_parallel_size}, expert parallel "
                             f"{expert_parallel_size})")
        if threads is not None and torch.device(device).type == "cpu":
            torch.set_num_threads(threads)
        comm = init_group(env.rank, env.world_size, env.init_method, device, env.local_rank)
        return _run_rank(comm, model, layout.for_rank(env.rank), dtype, seed, processes=[])
    if layout.world_size == 1:
        raise ValueError("start() is for several ranks; load a single-rank model with hylm.load_model")
    local_ranks = layout.world_size
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // local_ranks)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    processes = [ctx.Process(target=_spawned_rank, name=f"hylm-rank-{r}", daemon=True,
                             args=(r, layout.world_size, init_method, model, layout.for_rank(r), dtype, device,
                                   seed, threads))
                 for r in range(1, layout.world_size)]
    for p in processes:
        p.start()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(threads)
    comm = init_group(0, layout.world_size, init_method, device)
    return _run_rank(comm, model, layout, dtype, seed, processes)


def _spawned_rank(rank: int, world_size: int, init_method: str, model, layout: ParallelLayout, dtype, device: str,
                  seed: int, threads: int) -> None:
    if torch.device(device).type == "cpu":
        torch.set_num_threads(threads)
    comm = init_group(rank, world_size, init_method, device)
    _run_rank(comm, model, layout, dtype, seed, processes=[])


def _run_rank(comm: Communicator, model, layout: ParallelLayout, dtype, seed: int, processes: list
              ) -> RankZeroModel | None:
    """Load this rank's shard; all ranks learn whether every rank loaded before any step is sent."""
    error: BaseException | None = None
    local = None
    try:
        local, _ = load_parallel_model(model, layout, comm, dtype, seed,
                                       model_class=RankZeroModel if layout.rank == 0 else NemotronHModel)
    except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
        error = e
    failed = torch.zeros(layout.world_size, dtype=torch.int64)  # [world]: 1 where a rank failed
    failed[layout.rank] = error is not None
    dist.all_reduce(failed, group=comm.control_group)
    if failed.any():
        bad = failed.nonzero().flatten().tolist()
        leave_group()
        if error is not None:
            raise error
        raise RuntimeError(f"rank(s) {bad} failed to load their shard of the model (see their error output)")
    if layout.rank == 0:
        local.attach(comm, processes)
        return local
    try:
        serve_rank_zero(local, comm)
    finally:
        leave_group()
    return None
