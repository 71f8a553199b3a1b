"""Random initialisation for models trained from scratch or benchmarked with random weights."""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig
from .mamba2 import Mamba2Mixer
from .norm import GatedRMSNorm, RMSNorm


@torch.no_grad()
def init_weights(model: torch.nn.Module, config: ModelConfig, seed: int = 0, std: float = 0.02) -> None:
    """Normal(0, std) projections and embeddings, unit norms, Mamba-2's S4D-real A and log-uniform dt, zero
    router correction biases. Every parameter and buffer is set: the model may come from `to_empty`."""
    gen = torch.Generator().manual_seed(seed)
    residual_scale = 1.0 / math.sqrt(2 * config.num_hidden_layers)
    for name, p in model.named_parameters():
        cpu = torch.empty(p.shape, dtype=torch.float32)
        if p.ndim >= 2:
            cpu.normal_(0.0, std, generator=gen)
            if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight", "down_proj")):
                cpu.mul_(residual_scale)  # keeps the residual stream's variance bounded with depth
        else:
            cpu.zero_()
        p.copy_(cpu)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()
    for module in model.modules():
        if isinstance(module, (RMSNorm, GatedRMSNorm)):
            module.weight.fill_(1.0)
        if isinstance(module, Mamba2Mixer):
            h = module.num_heads
            module.A_log.copy_(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
            module.D.fill_(1.0)
            lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
            dt = torch.exp(torch.rand(h, generator=gen) * (hi - lo) + lo).clamp(min=1e-4)
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            if module.conv1d.bias is not None:
                module.conv1d.bias.zero_()
            w = torch.empty(module.conv1d.weight.shape).uniform_(-1, 1, generator=gen)
            module.conv1d.weight.copy_(w / math.sqrt(module.conv1d.weight.shape[-1]))
