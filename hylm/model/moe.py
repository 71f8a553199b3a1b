"""LatentMoE: fp32 sigmoid router on the full hidden state, routed squared-ReLU experts that work in a
latent space (fc1_latent_proj in, fc2_latent_proj out) when moe_latent_size is set, plus one shared
expert on the full hidden state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.moe import grouped_expert_mlp, native_moe_ok, native_moe_rows, route_sigmoid_topk
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

    def _native_weights(self, x: torch.Tensor) -> dict[str, torch.Tensor | None] | None:
        """The layer's tensors for ops.moe's one-call kernel, or None where it can't run them (quantized
        experts or projections, biases, grouped routing, more than a few tokens, training)."""
        if x.dim() != 2 or x.shape[0] > 8 or not isinstance(self.experts, Experts):
            return None
        mods = [self.fc1_latent_proj, self.fc2_latent_proj] if self.latent else []
        if self.shared_experts is not None:
            mods += [self.shared_experts.up_proj, self.shared_experts.down_proj]
        if any(not isinstance(m, nn.Linear) or m.bias is not None for m in mods):
            return None
        w = dict(router=self.gate.weight, up=self.experts.up_proj, down=self.experts.down_proj,
                 fc1=self.fc1_latent_proj.weight if self.latent else None,
                 fc2=self.fc2_latent_proj.weight if self.latent else None,
                 shared_up=self.shared_experts.up_proj.weight if self.shared_experts is not None else None,
                 shared_down=self.shared_experts.down_proj.weight if self.shared_experts is not None else None)
        return w if native_moe_ok(x, n_group=self.gate.n_group, **w) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] -> [N, D]."""
        native = self._native_weights(x)
        if native is not None:
            g = self.gate
            return native_moe_rows(x, correction_bias=g.e_score_correction_bias, top_k=g.top_k, normalize=g.normalize,
                                   scaling=g.scaling, **native).to(x.dtype)
        weights, ids = self.gate(x)
        h = self.fc1_latent_proj(x) if self.latent else x  # [N, latent or D]
        h = self.experts(h, weights, ids)
        routed = self.fc2_latent_proj(h) if self.latent else h  # [N, D]
        if self.shared_experts is None:
            return routed
        return routed + self.shared_experts(x)
