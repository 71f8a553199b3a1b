"""Memory layout of weights for the CPU.

MKL runs skinny GEMMs (decode: few rows) about twice as fast when a Linear's weight [out, in] is stored
column-major, i.e. as a contiguous [in, out] buffer viewed transposed. The parameter keeps its shape and
name, so nothing else changes.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def use_column_major_linears(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.is_contiguous() and module.weight.ndim == 2:
            w = module.weight
            module.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=w.requires_grad)
