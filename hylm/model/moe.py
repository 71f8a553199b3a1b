"""LatentMoE: fp32 sigmoid router on the full hidden state, routed squared-ReLU experts that work in a
latent space (fc1_latent_proj in, fc2_latent_proj out) when moe_latent_size is set, plus one shared
expert on the full hidden state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.moe import grouped_expert_mlp, prepare_native_moe, route_sigmoid_topk
from . import fused
from .linear import Linear
from .mlp import MLP
from .norm import RMSNorm


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

    def _sources(self, norm_weight: torch.Tensor | None) -> tuple | None:
        """The tensors the native kernel reads, or None where it can't run this layer (quantized experts or
        projections, biases)."""
        if not isinstance(self.experts, Experts) or type(self).forward is not MoE.forward:
            return None  # quantized experts, or a subclass computing something else (expert parallelism's part)
        mods = [self.fc1_latent_proj, self.fc2_latent_proj] if self.latent else [None, None]
        mods += [self.shared_experts.up_proj, self.shared_experts.down_proj] if self.shared_experts is not None \
            else [None, None]
        if any(m is not None and (not isinstance(m, nn.Linear) or m.bias is not None) for m in mods):
            return None
        g = self.gate
        return (norm_weight, g.weight, g.e_score_correction_bias, self.experts.up_proj, self.experts.down_proj,
                *(m.weight if m is not None else None for m in mods))

    def _plan(self, norm: nn.Module | None, eps: float = 0.0):
        """The prepared one-call kernel for this layer (with norm: the whole block), or None."""
        if not hasattr(self, "_plans"):
            self._plans = {False: fused.PlanCache(), True: fused.PlanCache()}
        norm_weight = norm.weight if norm is not None else None
        cache = self._plans[norm is not None]
        sources = cache.sources(lambda: self._sources(norm_weight))
        g = self.gate

        def build():
            _, router, bias, up, down, fc1, fc2, shared_up, shared_down = sources
            return prepare_native_moe(router, bias, g.top_k, g.normalize, g.scaling, up, down, fc1, fc2, shared_up,
                                      shared_down, norm_weight, eps, g.n_group)

        return cache.get(sources, build)

    def native_block_plan(self, norm: nn.Module):
        """The prepared native kernel for the whole block x + self(norm(x)) (see fused.py), or None."""
        if type(norm).forward is not RMSNorm.forward:
            return None
        return self._plan(norm, norm.eps)

    @staticmethod
    def native_block_args(plan, x: torch.Tensor, out: torch.Tensor, step: fused.NativeStep) -> tuple:
        return plan.args(x, out, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] -> [N, D]."""
        if fused.applicable(x):
            plan = self._plan(None)
            if plan is not None:
                return plan(x)
        weights, ids = self.gate(x)
        h = self.fc1_latent_proj(x) if self.latent else x  # [N, latent or D]
        h = self.experts(h, weights, ids)
        routed = self.fc2_latent_proj(h) if self.latent else h  # [N, D]
        if self.shared_experts is None:
            return routed
        return routed + self.shared_experts(x)
