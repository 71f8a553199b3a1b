"""Which part of every weight a rank owns: pure functions of the model config and the rank's place.

All parallel ranks form one group of `world_size` ranks.
- Tensor parallelism (TP) splits every layer across the ranks: attention by q heads (kv heads split
  along, or replicated when there are fewer kv heads than ranks), Mamba by heads together with the
  B/C groups they read (replicated when there are fewer groups than ranks), the conv channels and
  gated-norm channels of those heads, dense MLP / shared expert / routed experts by intermediate
  channels (column-parallel up, row-parallel down), embedding and lm_head by vocabulary rows. Each
  block's mixer then yields a partial sum: one all-reduce per block output.
- Expert parallelism (EP) gives each rank a contiguous slice of whole routed experts instead; the
  router, and with it the choice of experts, is replicated.
- Both: TP for everything but the routed experts, EP for those, over the same ranks.

A rank's model is an ordinary NemotronHModel built from `local_config` (its head, group and channel
counts), so its state pool, KV cache and kernels need no change; `shard_spec` says, per parameter
name, which rows/columns of the checkpoint's full tensor it holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import ATTENTION, MAMBA, MLP, MOE, ModelConfig


@dataclass(frozen=True)
class ParallelLayout:
    """One rank's place: `world_size` ranks, tensor parallel and/or expert parallel over all of them.

    combine_in_latent (expert parallelism without tensor parallelism): the ranks' partial routed
    outputs are summed in the latent space, before fc2_latent_proj, so latent-size vectors cross
    ranks; False sums them after it, at hidden size (kept to measure what the latent space saves).
    """

    world_size: int
    rank: int
    tensor_parallel: bool
    expert_parallel: bool
    combine_in_latent: bool = True

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a group of {self.world_size}")
        if self.world_size > 1 and not (self.tensor_parallel or self.expert_parallel):
            raise ValueError("several ranks need tensor parallelism, expert parallelism or both")

    @classmethod
    def from_sizes(cls, tensor_parallel_size: int, expert_parallel_size: int, rank: int = 0,
                   combine_in_latent: bool = True) -> "ParallelLayout":
        """--tensor-parallel-size N and --expert-parallel-size M: M in (1, N) when N > 1."""
        tp, ep = tensor_parallel_size, expert_parallel_size
        if tp < 1 or ep < 1:
            raise ValueError("parallel sizes must be >= 1")
        if tp > 1 and ep > 1 and tp != ep:
            raise ValueError(f"expert parallelism spans the tensor-parallel ranks: expert parallel size {ep} "
                             f"must be 1 or equal the tensor parallel size {tp}")
        return cls(max(tp, ep), rank, tp > 1, ep > 1, combine_in_latent)

    @property
    def tp_size(self) -> int:
        return self.world_size if self.tensor_parallel else 1

    @property
    def tp_rank(self) -> int:
        return self.rank if self.tensor_parallel else 0

    @property
    def ep_size(self) -> int:
        return self.world_size if self.expert_parallel else 1

    @property
    def ep_rank(self) -> int:
        return self.rank if self.expert_parallel else 0

    def for_rank(self, rank: int) -> "ParallelLayout":
        return ParallelLayout(self.world_size, rank, self.tensor_parallel, self.expert_parallel,
                              self.combine_in_latent)

    def describe(self) -> str:
        parts = ([f"tensor parallel {self.tp_size}"] if self.tensor_parallel else []) + \
                ([f"expert parallel {self.ep_size}"] if self.expert_parallel else [])
        return " + ".join(parts) or "single rank"


def split_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """[lo, hi) of part `index` when `size` items are cut into `parts` contiguous near-equal parts
    (the first size % parts parts get one more)."""
    base, extra = divmod(size, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


# ---- per-kind partitions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class MambaPart:
    heads: tuple[int, int]  # [h0, h1) of mamba_num_heads
    channels: tuple[int, int]  # [h0 * P, h1 * P) of d_inner: the heads' x, z and norm channels
    groups: tuple[int, int]  # B/C groups the heads read (one replicated group when groups < ranks)
    norm_split: bool  # the gated norm's group spans several ranks: its statistics need an all-reduce


def mamba_part(config: ModelConfig, tp: int, rank: int) -> MambaPart:
    """Heads split evenly; head h reads group h // (H / G), so a rank's heads read G / tp whole groups
    when tp divides G, or all lie in group rank * G // tp when G divides tp (that group's B and C are
    then replicated on the tp / G ranks that share it, and so is the gated norm's group)."""
    h, g, p = config.mamba_num_heads, config.n_groups, config.mamba_head_dim
    if h % tp:
        raise ValueError(f"mamba_num_heads={h} is not divisible by the tensor parallel size {tp}")
    if g % tp and tp % g:
        raise ValueError(f"n_groups={g} and the tensor parallel size {tp}: one must divide the other")
    h0, h1 = rank * h // tp, (rank + 1) * h // tp
    if g >= tp:
        groups = (rank * g // tp, (rank + 1) * g // tp)
    else:
        groups = (rank * g // tp, rank * g // tp + 1)
    return MambaPart((h0, h1), (h0 * p, h1 * p), groups, norm_split=g < tp)


def kv_heads(config: ModelConfig, tp: int, rank: int) -> tuple[int, int]:
    """[k0, k1) of the kv heads a rank's q heads attend with: Hkv / tp of them, or (tp / Hkv ranks
    sharing) the single kv head of its q heads when there are fewer kv heads than ranks."""
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    if hq % tp:
        raise ValueError(f"num_attention_heads={hq} is not divisible by the tensor parallel size {tp}")
    if hkv % tp == 0:
        return rank * hkv // tp, (rank + 1) * hkv // tp
    if tp % hkv:
        raise ValueError(f"num_key_value_heads={hkv} and the tensor parallel size {tp}: one must divide the other")
    k = rank * hkv // tp
    return k, k + 1


def local_config(config: ModelConfig, layout: ParallelLayout) -> ModelConfig:
    """The config a rank's model is built from: its own head, group and channel counts. The vocabulary
    and expert count stay whole (the vocab-parallel and expert-parallel modules hold their slices).
    The MTP block is left out: speculative decoding is not supported across ranks."""
    c, tp, r = config, layout.tp_size, layout.tp_rank
    kinds = set(c.pattern)
    changes: dict = {"num_nextn_predict_layers": 0, "mtp_pattern": ""}

    def part(name: str, size: int) -> int:
        if size < tp:
            raise ValueError(f"{name}={size} cannot be split over {tp} tensor-parallel ranks")
        lo, hi = split_range(size, tp, r)
        return hi - lo

    if tp > 1:
        if ATTENTION in kinds:
            k0, k1 = kv_heads(c, tp, r)
            changes.update(num_attention_heads=c.num_attention_heads // tp, num_key_value_heads=k1 - k0)
        if MAMBA in kinds:
            mp = mamba_part(c, tp, r)
            changes.update(mamba_num_heads=mp.heads[1] - mp.heads[0], n_groups=mp.groups[1] - mp.groups[0])
        if MLP in kinds:
            changes["intermediate_size"] = part("intermediate_size", c.intermediate_size)
        if MOE in kinds:
            if c.moe_shared_expert_intermediate_size:
                changes["moe_shared_expert_intermediate_size"] = part(
                    "moe_shared_expert_intermediate_size", c.moe_shared_expert_intermediate_size)
            if not layout.expert_parallel:
                changes["moe_intermediate_size"] = part("moe_intermediate_size", c.moe_intermediate_size)
    if layout.expert_parallel and MOE in kinds and c.n_routed_experts < layout.ep_size:
        raise ValueError(f"n_routed_experts={c.n_routed_experts} is fewer than the {layout.ep_size} "
                         "expert-parallel ranks")
    return c.replace(**changes)


def expert_range(config: ModelConfig, layout: ParallelLayout) -> tuple[int, int]:
    """[e0, e1) of the routed experts this rank owns (all of them without expert parallelism)."""
    return split_range(config.n_routed_experts, layout.ep_size, layout.ep_rank)


# ---- per-parameter shards ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """A rank's tensor cut from the full one: along `dim`, the concatenation of `ranges` ([lo, hi) pairs);
    ranges None: the whole tensor (replicated). zeros: a tensor of zeros of the full shape, for the bias
    of a row-parallel layer, which must be added once: rank 0 holds it, the others hold zeros."""

    dim: int = 0
    ranges: tuple[tuple[int, int], ...] | None = None
    zeros: bool = False

    def local_shape(self, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.ranges is None or self.zeros:
            return tuple(full_shape)
        shape = list(full_shape)
        shape[self.dim] = sum(hi - lo for lo, hi in self.ranges)
        return tuple(shape)


REPLICATED = Shard()


def _rows(*ranges: tuple[int, int]) -> Shard:
    return Shard(0, tuple(ranges))


def _cols(*ranges: tuple[int, int]) -> Shard:
    return Shard(1, tuple(ranges))


_LAYER = re.compile(r"^(model|mtp)\.layers\.(\d+)\.mixer\.(.+)$")


def shard_spec(name: str, config: ModelConfig, layout: ParallelLayout) -> Shard:
    """The shard of parameter `name` (hylm's names: `model.` prefix, routed experts stacked as
    `experts.up_proj` [E, I, D_in] and `experts.down_proj` [E, D_in, I]) that this rank holds."""
    tp, r = layout.tp_size, layout.tp_rank
    m = _LAYER.match(name)
    if m is None:
        if tp > 1 and name in ("model.embeddings.weight", "lm_head.weight"):
            return _rows(split_range(config.vocab_size, tp, r))
        return REPLICATED  # norms, MTP's eh_proj
    pattern = config.pattern if m.group(1) == "model" else config.mtp_pattern
    kind, param = pattern[int(m.group(2))], m.group(3)
    row_parallel_bias = Shard(zeros=r != 0) if tp > 1 else REPLICATED

    if kind == MOE:
        if param.startswith("experts."):
            if layout.expert_parallel:
                return _rows(expert_range(config, layout))
            if tp == 1:
                return REPLICATED
            inter = split_range(config.moe_intermediate_size, tp, r)
            return Shard(1, (inter,)) if param == "experts.up_proj" else Shard(2, (inter,))
        if param.startswith("shared_experts."):
            param = param[len("shared_experts."):]
            return _mlp_spec(param, config.moe_shared_expert_intermediate_size, tp, r, row_parallel_bias)
        if param == "fc2_latent_proj.bias" and tp > 1:
            return row_parallel_bias  # fc2 runs on the rank's partial routed sum, before the all-reduce
        return REPLICATED  # router, correction bias, latent projections
    if tp == 1:
        return REPLICATED
    if kind == MLP:
        return _mlp_spec(param, config.intermediate_size, tp, r, row_parallel_bias)
    if kind == ATTENTION:
        hd = config.head_dim
        q0, q1 = r * config.num_attention_heads // tp, (r + 1) * config.num_attention_heads // tp
        k0, k1 = kv_heads(config, tp, r)
        if param.startswith("q_proj."):
            return _rows((q0 * hd, q1 * hd))
        if param.startswith(("k_proj.", "v_proj.")):
            return _rows((k0 * hd, k1 * hd))
        if param == "o_proj.weight":
            return _cols((q0 * hd, q1 * hd))
        if param == "o_proj.bias":
            return row_parallel_bias
    if kind == MAMBA:
        mp = mamba_part(config, tp, r)
        d, n, gn = config.mamba_d_inner, config.ssm_state_size, config.n_groups * config.ssm_state_size
        (c0, c1), (g0, g1), (h0, h1) = mp.channels, mp.groups, mp.heads
        b_rows, c_rows = (g0 * n, g1 * n), (gn + g0 * n, gn + g1 * n)  # within the B | C part of xBC
        if param.startswith("in_proj."):  # rows: z [d] | x [d] | B [G*N] | C [G*N] | dt [H]
            return _rows((c0, c1), (d + c0, d + c1), _shift(b_rows, 2 * d), _shift(c_rows, 2 * d),
                         (2 * d + 2 * gn + h0, 2 * d + 2 * gn + h1))
        if param.startswith("conv1d."):  # channels: x [d] | B [G*N] | C [G*N]
            return _rows((c0, c1), _shift(b_rows, d), _shift(c_rows, d))
        if param in ("dt_bias", "A_log", "D"):
            return _rows((h0, h1))
        if param == "norm.weight":
            return _rows((c0, c1))
        if param == "out_proj.weight":
            return _cols((c0, c1))
        if param == "out_proj.bias":
            return row_parallel_bias
    raise ValueError(f"no tensor-parallel rule for parameter {name}")


def _shift(r: tuple[int, int], by: int) -> tuple[int, int]:
    return r[0] + by, r[1] + by


def _mlp_spec(param: str, intermediate: int, tp: int, rank: int, row_parallel_bias: Shard) -> Shard:
    if tp == 1:
        return REPLICATED
    inter = split_range(intermediate, tp, rank)
    if param.startswith("up_proj."):
        return _rows(inter)  # column-parallel: the rank's intermediate channels
    if param == "down_proj.weight":
        return _cols(inter)  # row-parallel: a partial sum over them
    if param == "down_proj.bias":
        return row_parallel_bias
    raise ValueError(f"no tensor-parallel rule for MLP parameter {param}")


def apply_shard(full: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The rank's part of an in-memory full tensor (a new contiguous tensor)."""
    if shard.zeros:
        return torch.zeros_like(full, memory_format=torch.contiguous_format)
    if shard.ranges is None:
        return full.contiguous().clone()
    return torch.cat([full.narrow(shard.dim, lo, hi - lo) for lo, hi in shard.ranges], dim=shard.dim).contiguous()
