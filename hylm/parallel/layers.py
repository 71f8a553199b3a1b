"""A rank's model: an ordinary NemotronHModel built from the rank's local config, with the few modules
whose computation crosses ranks swapped in place:

- each block's mixer output (a partial sum under tensor parallelism) goes through one all-reduce;
- the embedding and lm_head are vocab-parallel (a rank holds a slice of the vocabulary's rows);
- the Mamba gated norm, when its channel group spans several ranks, all-reduces its statistics;
- the MoE blocks own a slice of the routed experts under expert parallelism.

hylm.model knows nothing of this package: the only hook is the block's optional `reduce_output`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MAMBA, MOE, ModelConfig
from ..model import NemotronHModel
from ..model.layout import use_column_major_linears
from ..model.norm import GatedRMSNorm
from .expert_parallel import ExpertParallelMoE
from .group import Communicator
from .sharding import (ParallelLayout, apply_shard, expert_range, local_config, mamba_part, shard_spec,
                       split_range)


class VocabParallelEmbedding(nn.Embedding):
    """Rows vocab_range[0] .. vocab_range[1] - 1 of the embedding; ids outside them give zeros, so the
    all-reduce of the ranks' outputs is the full lookup."""

    def __init__(self, vocab_range: tuple[int, int], embedding_dim: int, reduce: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(vocab_range[1] - vocab_range[0], embedding_dim)
        self.vocab_start = vocab_range[0]
        self.reduce = reduce

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [..., D]
        return self.reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class VocabParallelHead(nn.Linear):
    """lm_head rows (vocabulary entries) vocab_range[0] .. vocab_range[1] - 1. Rank 0 receives every
    rank's logits and returns the full [N, V]; the other ranks return their own slice [N, V_rank] (only
    rank 0 samples, so only it needs them all)."""

    def __init__(self, hidden_size: int, vocab_size: int, layout: ParallelLayout, comm: Communicator):
        self.ranges = [split_range(vocab_size, layout.tp_size, r) for r in range(layout.tp_size)]
        lo, hi = self.ranges[layout.tp_rank]
        super().__init__(hidden_size, hi - lo, bias=False)
        self.comm = comm
        self.padded = max(b - a for a, b in self.ranges)  # the gather wants equal shapes everywhere

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight)  # [N, V_rank]
        if local.shape[-1] < self.padded:
            local = F.pad(local, (0, self.padded - local.shape[-1]))  # [N, padded]
        parts = self.comm.gather_to_root(local)
        if parts is None:
            return local[..., : self.out_features]
        return torch.cat([p[..., : b - a] for p, (a, b) in zip(parts, self.ranges)], dim=-1)  # [N, V]


class GroupSplitGatedRMSNorm(GatedRMSNorm):
    """The Mamba gated norm when its channel group (d_inner / n_groups channels) spans several ranks
    (n_groups < tensor parallel size): each rank holds a slice of one group, so the group's sum of
    squares is all-reduced before normalising. One column per group: ranks add only into theirs."""

    def __init__(self, local_size: int, group_size: int, group: int, n_groups: int, eps: float,
                 reduce: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(local_size, 1, eps)
        self.full_group_size, self.group, self.n_groups = group_size, group, n_groups
        self.reduce = reduce

    def forward(self, y: torch.Tensor, z: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        h = y.float() * F.silu(z.float())  # [N, local_size]
        sums = torch.zeros(h.shape[0], self.n_groups, dtype=torch.float32, device=h.device)  # [N, G]
        sums[:, self.group] = h.pow(2).sum(-1)
        mean = self.reduce(sums)[:, self.group: self.group + 1] / self.full_group_size  # [N, 1]
        h = h * torch.rsqrt(mean + self.eps)
        return (self.weight.float() * h).to(out_dtype)


def parallelize_(model: NemotronHModel, config: ModelConfig, layout: ParallelLayout, comm: Communicator) -> None:
    """Swap in the cross-rank modules of a model built from local_config(config, layout) (on the meta
    device: the new modules are created there too, to be filled by the loader)."""
    tp = layout.tp_size
    if tp > 1:
        model.model.embeddings = VocabParallelEmbedding(split_range(config.vocab_size, tp, layout.tp_rank),
                                                        config.hidden_size, comm.all_reduce)
        model.lm_head = VocabParallelHead(config.hidden_size, config.vocab_size, layout, comm)
    local = model.config
    for block in model.model.layers:
        if tp > 1:
            block.reduce_output = comm.all_reduce
        if block.kind == MAMBA and tp > 1:
            part = mamba_part(config, tp, layout.tp_rank)
            if part.norm_split:
                block.mixer.norm = GroupSplitGatedRMSNorm(
                    local.mamba_d_inner, config.mamba_d_inner // config.n_groups, part.groups[0],
                    config.n_groups, config.layer_norm_epsilon, comm.all_reduce)
        if block.kind == MOE and layout.expert_parallel:
            combine = None if tp > 1 else comm.all_reduce  # with TP, the block's all-reduce sums it all
            block.mixer = ExpertParallelMoE(local, expert_range(config, layout), combine, layout.combine_in_latent)


def build_local_model(config: ModelConfig, layout: ParallelLayout, comm: Communicator,
                      model_class: type[NemotronHModel] = NemotronHModel) -> NemotronHModel:
    """The rank's model on the meta device (no memory yet): shapes of its shards, cross-rank modules in."""
    with torch.device("meta"):
        model = model_class(local_config(config, layout))
        parallelize_(model, config, layout, comm)
    return model


def fill_(model: NemotronHModel, tensors: dict[str, torch.Tensor]) -> None:
    """Give every parameter and buffer of a meta-device model its tensor (already the rank's shard)."""
    expected = dict(model.named_parameters())
    expected.update(model.named_buffers())
    for name, ref in expected.items():
        value = tensors[name]
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"{name}: shard has shape {list(value.shape)}, the rank's model wants {list(ref.shape)}")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._parameters:
            setattr(module, attr, nn.Parameter(value, requires_grad=False))
        else:
            setattr(module, attr, value)


def finish_(model: NemotronHModel) -> NemotronHModel:
    model.requires_grad_(False)
    if model.lm_head.weight.device.type == "cpu":
        use_column_major_linears(model)  # the same CPU layout as the single-process loader
    return model.eval()


def shard_model(full: NemotronHModel, layout: ParallelLayout, comm: Communicator,
                model_class: type[NemotronHModel] = NemotronHModel) -> NemotronHModel:
    """The rank's model cut from an in-memory full model (random presets, tests)."""
    model = build_local_model(full.config, layout, comm, model_class)
    state = full.state_dict()
    device = full.lm_head.weight.device
    local: dict[str, torch.Tensor] = {}
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        local[name] = apply_shard(state[name], shard_spec(name, full.config, layout)).to(device)
    fill_(model, local)
    return finish_(model)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers: what a rank holds of the weights."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
