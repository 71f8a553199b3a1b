"""Tensor and expert parallelism on torch.distributed: one model split across processes (NCCL on GPUs,
gloo on CPUs), started under torchrun or spawning its own ranks. See sharding.py for who owns what."""

from .group import Communicator, init_group, leave_group
from .launch import start
from .layers import build_local_model, parameter_bytes, shard_model
from .load import load_parallel_model
from .sharding import ParallelLayout, local_config, shard_spec
from .worker import RankZeroModel, serve_rank_zero

__all__ = ["Communicator", "ParallelLayout", "RankZeroModel", "build_local_model", "init_group", "leave_group",
           "load_parallel_model", "local_config", "parameter_bytes", "serve_rank_zero", "shard_model", "shard_spec",
           "start"]
