"""nn.Linear whose product goes through `ops.linear` (oneDNN for large fp32 products on CPU, see there).
Same parameters, names and state dict as nn.Linear."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.linear import linear


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
