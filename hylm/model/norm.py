"""RMSNorm and the gated, grouped RMSNorm of the Mamba-2 mixer; both compute in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.decode_blocks import native_rmsnorm_ok, rmsnorm_rows
from . import fused


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.applicable(x) and native_rmsnorm_ok(x, self.weight):
            return rmsnorm_rows(x, self.weight, self.eps)  # a few tokens: one native call, not seven dispatches
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # the weight multiplies in fp32 before the cast back, as in NVIDIA's reference (in place on the fresh
        # product where autograd records nothing: the same values, one large temporary fewer in a prefill)
        out = self.weight.float() * x32 if x32.requires_grad else x32.mul_(self.weight.float())
        return out.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """y * silu(z) first, then RMSNorm over groups of size/group_count channels, then the weight."""

    def __init__(self, size: int, group_count: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size = size // group_count
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        h = y.float() * F.silu(z.float())
        groups = h.view(*h.shape[:-1], -1, self.group_size)  # [..., G, size/G]
        scale = torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)  # [..., G, 1]
        if h.requires_grad:
            h = (groups * scale).view(h.shape)  # [..., size]
            return (self.weight.float() * h).to(out_dtype)
        groups.mul_(scale)  # h is this call's own product: the same values in place, no more full-size temporaries
        return h.mul_(self.weight.float()).to(out_dtype)
