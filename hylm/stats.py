"""Model statistics (parameter counts, cache and weight sizes) computed from a ModelConfig.

The model is built on the meta device, so the numbers come from the real module tree (the same one that
loads checkpoints) without allocating any weight memory.

Conventions (they reproduce NVIDIA's published Nemotron 3 numbers, which were computed with transformers
on the meta device):
- `total_params` counts the parameters of the main model: embeddings, every layer, norm_f and lm_head.
  Multi-token-prediction (MTP) layers are excluded (transformers ignores them); they are reported apart as
  `mtp_params`. Buffers (the fp32 router `e_score_correction_bias`) are not parameters and are excluded.
- `active_params` is the per-token count: `total_params` minus the routed experts a token does not use.
  Each MoE layer runs num_experts_per_tok of its n_routed_experts experts; its router, shared expert and
  latent projections always run. The embedding table counts in full as active, as in the published
  numbers: counting only the one row a token reads would give Super 12.233e9 / Nano 3.228e9 instead of
  the published 12.770e9 / 3.580e9.
- `params_by_kind`: for each layer kind, the parameters of the mixers of that kind (a Mamba mixer's own
  gated norm included); "norms" holds the pre-norm of every layer plus norm_f. The values sum to
  `total_params`.
- "1M tokens" is 2**20 tokens (Super's KV cache is then exactly 8 GiB in bf16).
"""

from __future__ import annotations

import torch

from .config import KIND_NAMES, LAYER_KINDS, ModelConfig
from .loader import parse_dtype
from .model import NemotronHModel

ONE_M_TOKENS = 1 << 20

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def model_stats(config: ModelConfig, dtype: torch.dtype | str = torch.bfloat16) -> dict:
    """Parameter counts, per-token KV cache and per-sequence SSM state sizes, weight bytes (see module doc)."""
    dtype = parse_dtype(dtype)
    dname = DTYPE_NAMES[dtype]
    nbytes = _dtype_bytes(dtype)
    with torch.device("meta"):
        model = NemotronHModel(config)

    c = config
    by_kind = {KIND_NAMES[k]: 0 for k in LAYER_KINDS}
    by_kind.update(embeddings=0, lm_head=0, norms=0)
    routed = 0  # routed-expert parameters, main model only
    total = mtp = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("mtp."):
            mtp += n
            continue
        total += n
        if name.startswith("model.embeddings."):
            by_kind["embeddings"] += n
        elif name.startswith("lm_head."):
            by_kind["lm_head"] += n
        elif name.startswith("model.norm_f."):
            by_kind["norms"] += n
        elif name.startswith("model.layers."):
            i = int(name.split(".")[2])
            if name.startswith(f"model.layers.{i}.norm."):
                by_kind["norms"] += n
            else:
                by_kind[KIND_NAMES[c.pattern[i]]] += n
                if ".mixer.experts." in name:
                    routed += n
        else:  # a parameter this module does not know about: fail loudly rather than miscount
            raise RuntimeError(f"model_stats: unexpected parameter {name}")
    if sum(by_kind.values()) != total:
        raise RuntimeError("model_stats: params_by_kind does not add up to total_params")

    # fp32 buffers (router score-correction biases) are stored in fp32 whatever the model dtype.
    buf_main = sum(b.numel() for name, b in model.named_buffers() if not name.startswith("mtp."))
    buf_mtp = sum(b.numel() for name, b in model.named_buffers() if name.startswith("mtp."))

    n_moe = c.pattern.count("E")
    inactive = 0
    if n_moe:
        inactive = routed * (c.n_routed_experts - c.num_experts_per_tok) // c.n_routed_experts
    active = total - inactive

    weight_bytes: dict[str, int] = {dname: total * nbytes}
    weight_bytes["fp32"] = weight_bytes.get("fp32", 0) + buf_main * 4
    kv = c.kv_cache_bytes_per_token(nbytes)
    return {
        "dtype": dname,
        "total_params": total,
        "active_params": active,
        "mtp_params": mtp,
        "routed_expert_params": routed,
        "layers": {KIND_NAMES[k]: c.pattern.count(k) for k in LAYER_KINDS},
        "mtp_layers": {KIND_NAMES[k]: c.mtp_pattern.count(k) for k in LAYER_KINDS} if mtp else {},
        "params_by_kind": by_kind,
        "kv_cache_bytes_per_token": kv,
        "kv_cache_bytes_1m_tokens": kv * ONE_M_TOKENS,
        "ssm_state_bytes_per_sequence": c.ssm_state_bytes_per_sequence(nbytes),
        "weight_bytes": weight_bytes,
        "weight_bytes_total": sum(weight_bytes.values()),
        "mtp_weight_bytes": mtp * nbytes + buf_mtp * 4,
        "config": {
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "pattern": c.pattern,
            "mtp_pattern": c.mtp_pattern,
            "vocab_size": c.vocab_size,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "mamba_num_heads": c.mamba_num_heads,
            "mamba_head_dim": c.mamba_head_dim,
            "ssm_state_size": c.ssm_state_size,
            "n_groups": c.n_groups,
            "conv_kernel": c.conv_kernel,
            "intermediate_size": c.intermediate_size,
            "n_routed_experts": c.n_routed_experts,
            "num_experts_per_tok": c.num_experts_per_tok,
            "moe_intermediate_size": c.moe_intermediate_size,
            "moe_latent_size": c.moe_latent_size,
            "moe_shared_expert_intermediate_size": c.moe_shared_expert_intermediate_size,
            "num_nextn_predict_layers": c.num_nextn_predict_layers,
            "max_position_embeddings": c.max_position_embeddings,
        },
    }


__all__ = ["model_stats", "ONE_M_TOKENS"]
