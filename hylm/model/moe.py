"""LatentMoE: fp32 sigmoid router on the full hidden state, routed squared-ReLU experts that work in a
latent space (fc1_latent_proj in, fc2_latent_proj out) when moe_latent_size is set, plus one shared
expert on the full hidden state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.moe import grouped_expert_mlp, route_sigmoid_topk
from .linear import Linear
from .mlp import MLP


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size))
        # the correction bias is kept in fp32 whatever the model dtype
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.normalize, self.scaling = config.norm_topk_prob, config.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        return route_sigmoid_topk(logits, self.e_score_correction_bias, self.top_k, self.n_group,
                                  self.topk_group, self.normalize, self.scaling)


class Experts(nn.Module):
    """Routed experts stored stacked: up_proj [E, I, D_in], down_proj [E, D_in, I]."""

    def __init__(self, num_experts: int, input_size: int, intermediate_size: int):
        super().__init__()
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, input_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, input_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return grouped_expert_mlp(x, weights, ids, self.up_proj, self.down_proj)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.gate = Router(c)
        self.experts = Experts(c.n_routed_experts, c.moe_input_size, c.moe_intermediate_size)
        self.shared_experts = (MLP(c.hidden_size, c.moe_shared_expert_intermediate_size, c.mlp_bias)
                               if c.moe_shared_expert_intermediate_size else None)
        self.latent = c.moe_latent_size is not None
        if self.latent:
            self.fc1_latent_proj = Linear(c.hidden_size, c.moe_latent_size, bias=c.mlp_bias)
            self.fc2_latent_proj = Linear(c.moe_latent_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] -> [N, D]."""
        weights, ids = self.gate(x)
        h = self.fc1_latent_proj(x) if self.latent else x  # [N, latent or D]
        h = self.experts(h, weights, ids)
        routed = self.fc2_latent_proj(h) if self.latent else h  # [N, D]
        if self.shared_experts is None:
            return routed
        return routed + self.shared_experts(x)
