"""Dense MLP with squared-ReLU (non-gated): down(relu(up(x))^2). Also the MoE's shared expert."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.moe import relu_square
from .linear import Linear


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu_square(self.up_proj(x)))  # in place on the fresh product at inference
