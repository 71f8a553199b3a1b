"""Rank 0 drives, the other ranks follow: the engine (scheduler, sampler, server) runs on rank 0 only,
and every model call it makes is first announced to the other ranks, which make the same call on their
shards so that the collectives inside meet.

Per engine step rank 0 broadcasts, on the control group, the step's inputs: the packed token ids, the
batch (new tokens, context and slot per sequence) and the KV block tables of its slots (the state pool's
bookkeeping lives with the scheduler on rank 0; each rank's pool holds its own shard of the same slots
and blocks). For the logits of the sampled rows it broadcasts those hidden rows, and the ranks gather
their vocabulary slices to rank 0. Everything else (allocation, freeing, preemption) is bookkeeping on
rank 0 that the other ranks never need: a sequence that starts over starts with no context, and the
Mamba layers zero its state themselves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..engine.state_pool import PoolSizes, StatePool
from ..model import Batch, NemotronHModel
from .group import Communicator, leave_group
from .layers import VocabParallelHead

STOP, POOL, STEP, LOGITS = range(4)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEADER = 3  # kind, payload length, one extra int


class Channel:
    """Rank 0 -> all: a message is an int64 header [kind, n, extra] and an int64 payload of n values,
    broadcast on the control group (CPU, gloo)."""

    def __init__(self, comm: Communicator):
        self.comm = comm

    def send(self, kind: int, payload: list[int] | torch.Tensor = (), extra: int = 0) -> None:
        body = torch.as_tensor(payload, dtype=torch.int64).reshape(-1)  # [n]
        header = torch.tensor([kind, body.numel(), extra], dtype=torch.int64)
        self._broadcast(header)
        if body.numel():
            self._broadcast(body)

    def receive(self) -> tuple[int, int, torch.Tensor]:
        header = torch.empty(HEADER, dtype=torch.int64)
        self._broadcast(header)
        kind, n, extra = header.tolist()
        body = torch.empty(n, dtype=torch.int64)
        if n:
            self._broadcast(body)
        return kind, extra, body

    def _broadcast(self, t: torch.Tensor) -> None:
        self.comm.bytes["control"] += t.numel() * t.element_size()
        dist.broadcast(t, 0, group=self.comm.control_group)


def encode_step(input_ids: torch.Tensor, batch: Batch, state: StatePool | None) -> torch.Tensor:
    """[has_state, B, N, seq_lens(B), context_lens(B), slots(B), table_lens(B), ids(N), tables...]"""
    tables = [state.block_tables.get(s, []) for s in batch.slots] if state is not None else [[] for _ in batch.slots]
    head = [int(state is not None), batch.num_seqs, input_ids.numel()]
    lists = batch.seq_lens + batch.context_lens + batch.slots + [len(t) for t in tables]
    return torch.cat([torch.tensor(head + lists, dtype=torch.int64), input_ids.reshape(-1).cpu().long(),
                      torch.tensor([b for t in tables for b in t], dtype=torch.int64)])


def decode_step(body: torch.Tensor) -> tuple[torch.Tensor, Batch, dict[int, list[int]], bool]:
    values = body.tolist()
    has_state, b, n = values[:3]
    seq_lens, context_lens, slots, table_lens = (values[3 + i * b: 3 + (i + 1) * b] for i in range(4))
    at = 3 + 4 * b
    ids = body[at: at + n]
    at += n
    tables = {}
    for slot, k in zip(slots, table_lens):
        tables[slot] = values[at: at + k]
        at += k
    return ids, Batch(seq_lens, context_lens, slots), tables, bool(has_state)


class RankZeroModel(NemotronHModel):
    """Rank 0's shard of a model split across ranks. The engine uses it like any NemotronHModel; each
    hidden_states / logits call first tells the other ranks to make the same call. Supports the engine's
    state pool (or no state); speculative decoding and prefix caching are not mirrored to the ranks."""

    comm: Communicator | None = None
    # the engine's prefix cache copies states inside rank 0's pool, which the other ranks would not see
    supports_prefix_caching = False

    def attach(self, comm: Communicator, processes: list = ()) -> None:
        """Start driving the other ranks (serve_rank_zero on them); `processes` are spawned workers to
        join at close()."""
        self.comm, self.channel, self.processes = comm, Channel(comm), list(processes)
        self._announced_pool: StatePool | None = None
        self._ranks_stopped = False

    def hidden_states(self, input_ids: torch.Tensor, batch: Batch, state: StatePool | None = None) -> torch.Tensor:
        if self.comm is None:
            raise RuntimeError("this rank-0 model is not attached to its ranks (or was closed)")
        if state is not None and not isinstance(state, StatePool):
            raise TypeError(f"a model split across ranks runs on the engine's StatePool, not {type(state).__name__}")
        if batch.keep_states:
            raise ValueError("speculative decoding is not supported across ranks")
        if state is not None and state is not self._announced_pool:
            s = state.sizes
            self.channel.send(POOL, [s.num_slots, s.num_blocks, s.block_size, s.max_model_len, s.slot_bytes,
                                     s.block_bytes, DTYPES.index(state.dtype)])
            self._announced_pool = state
        self.channel.send(STEP, encode_step(input_ids, batch, state))
        return super().hidden_states(input_ids, batch, state)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if isinstance(self.lm_head, VocabParallelHead):  # a replicated head needs no other rank
            self.channel.send(LOGITS, extra=hidden.shape[0])
            self.comm.broadcast(hidden.to(self.dtype).contiguous())
        return super().logits(hidden)

    def stop_ranks(self) -> None:
        """Tell the other ranks to return from serve_rank_zero (the group stays up)."""
        if self.comm is not None and not self._ranks_stopped:
            self._ranks_stopped = True
            self.channel.send(STOP)

    def close(self) -> None:
        """Stop the other ranks, leave the group and join spawned ranks (idempotent)."""
        if self.comm is None:
            return
        try:
            self.stop_ranks()
        finally:
            self.comm = None
            leave_group()
            for p in self.processes:
                p.join(timeout=30)


@torch.inference_mode()
def serve_rank_zero(model: NemotronHModel, comm: Communicator) -> None:
    """A worker rank's life: make the model calls rank 0 announces, on this rank's shard, until STOP."""
    channel = Channel(comm)
    pool: StatePool | None = None
    dtype = model.dtype
    while True:
        kind, extra, body = channel.receive()
        if kind == STOP:
            return
        if kind == POOL:
            sizes = PoolSizes(*body[:6].tolist())
            pool = StatePool(model.config, sizes, dtype=DTYPES[int(body[6])], device=comm.device)
        elif kind == STEP:
            ids, batch, tables, has_state = decode_step(body)
            if has_state:
                pool.block_tables.update(tables)
            model.hidden_states(ids.to(comm.device), batch, pool if has_state else None)
        elif kind == LOGITS:
            hidden = torch.empty(extra, model.config.hidden_size, dtype=dtype, device=comm.device)
            model.logits(comm.broadcast(hidden))
        else:
            raise RuntimeError(f"unknown message {kind} from rank 0")
