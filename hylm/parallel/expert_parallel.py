"""Expert parallelism: each rank owns a contiguous slice of whole routed experts.

Every rank holds the same tokens (rank 0 broadcasts each step's inputs and the blocks before end in an
all-reduce or are replicated), so dispatch moves nothing: the router runs replicated on the full hidden
state, every rank makes the same choice, projects all tokens to the latent space with the replicated
fc1_latent_proj, and runs only the (token, expert) pairs whose expert it owns. Combining is a sum over
ranks of these partial outputs:
- with tensor parallelism the partial routed output (through fc2_latent_proj, which is linear) joins the
  shared expert's partial output in the block's one all-reduce;
- without it, the partial sums are all-reduced in the latent space, before fc2_latent_proj: per token
  and MoE layer moe_latent_size values cross ranks instead of hidden_size (Super: 1024 vs 4096), which
  is the point of LatentMoE. `combine_in_latent=False` sums after fc2 instead, to measure the difference.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..model.moe import Experts, MoE
from ..ops.moe import grouped_expert_mlp


def owned_expert_mlp(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, up: torch.Tensor,
                     down: torch.Tensor, first_expert: int) -> torch.Tensor:
    """The part of sum_k weights[:, k] * expert_{ids[:, k]}(x) that comes from experts first_expert ..
    first_expert + up.shape[0] - 1 (this rank's). x: [N, D_in]; weights, ids: [N, k] over all experts;
    up: [E_local, I, D_in]; down: [E_local, D_out, I]. Returns [N, D_out] in x's dtype (zero rows for
    tokens none of whose experts live here)."""
    owned = (ids >= first_expert) & (ids < first_expert + up.shape[0])  # [N, k]
    token, pick = owned.nonzero(as_tuple=True)  # [M] each: the assignments this rank computes
    local_ids = (ids[token, pick] - first_expert).unsqueeze(1)  # [M, 1]
    # each assignment as its own one-expert "token", so the grouped kernel runs one GEMM per expert
    partial = grouped_expert_mlp(x[token], weights[token, pick].unsqueeze(1), local_ids, up, down)  # [M, D_out]
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token, partial.float())  # a token's assignments on this rank, summed in fp32
    return out.to(x.dtype)


class ExpertParallelMoE(MoE):
    """The MoE block of one expert-parallel rank: replicated router, latent projections and (unless
    tensor parallelism splits it) shared expert; routed experts expert_range[0] .. expert_range[1] - 1.

    combine: the all-reduce that sums the ranks' routed outputs, or None when tensor parallelism's
    per-block all-reduce does it (the module then returns a partial sum, as every TP mixer does)."""

    def __init__(self, config: ModelConfig, expert_range: tuple[int, int],
                 combine: Callable[[torch.Tensor], torch.Tensor] | None, combine_in_latent: bool = True):
        super().__init__(config)
        lo, hi = expert_range
        self.first_expert = lo
        self.experts = Experts(hi - lo, config.moe_input_size, config.moe_intermediate_size)
        self.combine = combine
        self.combine_in_latent = combine_in_latent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] (the same on every rank) -> [N, D], or this rank's partial sum when combine is None."""
        weights, ids = self.gate(x)  # [N, k] each, identical on every rank
        h = self.fc1_latent_proj(x) if self.latent else x  # [N, latent or D]
        partial = owned_expert_mlp(h, weights, ids, self.experts.up_proj, self.experts.down_proj,
                                   self.first_expert)  # [N, latent or D]
        if not self.latent:
            routed = partial if self.combine is None else self.combine(partial)
        elif self.combine is None:
            routed = self.fc2_latent_proj(partial)  # its bias is held by rank 0 only (see sharding)
        elif self.combine_in_latent:
            routed = self.fc2_latent_proj(self.combine(partial))  # [N, D] from latent-size traffic
        else:
            fc2 = self.fc2_latent_proj
            routed = self.combine(F.linear(partial, fc2.weight))  # hidden-size traffic
            if fc2.bias is not None:
                routed = routed + fc2.bias
        if self.shared_experts is None:
            return routed
        return routed + self.shared_experts(x)
