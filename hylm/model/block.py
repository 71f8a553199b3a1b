"""A pre-norm residual block with exactly one mixer: x + mixer(norm(x))."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import ATTENTION, MAMBA, MLP as MLP_KIND, MOE, ModelConfig
from . import fused
from .attention import Attention
from .batch import Batch, State
from .mamba2 import Mamba2Mixer
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm


def make_mixer(config: ModelConfig, kind: str, layer_idx: int) -> nn.Module:
    if kind == MAMBA:
        return Mamba2Mixer(config, layer_idx)
    if kind == ATTENTION:
        return Attention(config, layer_idx)
    if kind == MOE:
        return MoE(config)
    if kind == MLP_KIND:
        return MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
    raise ValueError(f"unknown layer kind {kind!r}")


class Block(nn.Module):
    def __init__(self, config: ModelConfig, kind: str, layer_idx: int):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = make_mixer(config, kind, layer_idx)
        self.stateful = kind in (MAMBA, ATTENTION)
        # Set by tensor parallelism: the all-reduce that sums the ranks' partial mixer outputs (one per
        # block). None on a single device.
        self.reduce_output: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, batch: Batch, state: State | None) -> torch.Tensor:
        if self.reduce_output is None and fused.applicable(x):
            # a few tokens at inference: the whole block in one native call where the mixer has one
            out = fused.run_block(self, fused.block_plan(self), x, batch, state)
            if out is not None:
                return out
        h = self.norm(x)
        h = self.mixer(h, batch, state) if self.stateful else self.mixer(h)
        if self.reduce_output is not None:
            h = self.reduce_output(h)
        return x + h
