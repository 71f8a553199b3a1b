"""Model configuration: parsing of HF `nemotron_h` config.json files, validation, presets.

A layer kind is one character, as in NVIDIA's `hybrid_override_pattern`:
  M = Mamba-2 mixer, * = attention (GQA, no positional encoding), E = (latent) MoE, - = dense MLP.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

MAMBA, ATTENTION, MOE, MLP = "M", "*", "E", "-"
LAYER_KINDS = (MAMBA, ATTENTION, MOE, MLP)
KIND_NAMES = {MAMBA: "mamba", ATTENTION: "attention", MOE: "moe", MLP: "mlp"}

# Names used for each kind by `layers_block_type` lists (newer transformers) and older spellings.
_NAME_TO_KIND = {
    "linear_attention": MAMBA,
    "mamba": MAMBA,
    "full_attention": ATTENTION,
    "attention": ATTENTION,
    "moe": MOE,
    "mlp": MLP,
}
_KIND_TO_HF_NAME = {MAMBA: "linear_attention", ATTENTION: "full_attention", MOE: "moe", MLP: "mlp"}

# Legacy spellings accepted on input (NVIDIA's original configs) -> our field name.
_LEGACY_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "rms_norm_eps": "layer_norm_epsilon",
    "num_local_experts": "n_routed_experts",
}


class ConfigError(ValueError):
    """A model configuration that cannot describe a valid model; the message names the field."""


@dataclass
class ModelConfig:
    vocab_size: int = 131072
    hidden_size: int = 4096
    pattern: str = "M*E-"
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    # dense MLP
    intermediate_size: int = 21504
    mlp_bias: bool = False
    # Mamba-2
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    use_conv_bias: bool = True
    use_bias: bool = False  # in_proj / out_proj bias
    chunk_size: int = 128
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    # Applied to softplus(dt + dt_bias) in every path (prefill and decode alike), as NVIDIA's reference
    # and mamba_ssm do. transformers clamps at time_step_min in its prefill path only.
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # MoE
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    n_shared_experts: int = 1
    moe_latent_size: int | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    # multi-token prediction
    num_nextn_predict_layers: int = 0
    mtp_pattern: str = ""
    # misc
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    mlp_hidden_act: str = "relu2"
    mamba_hidden_act: str = "silu"
    # keys we don't interpret, kept so that a round trip loses nothing
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_size(self) -> int:
        return self.mamba_d_inner + self.mamba_conv_dim + self.mamba_num_heads

    @property
    def moe_input_size(self) -> int:
        return self.moe_latent_size if self.moe_latent_size else self.hidden_size

    def layer_indices(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.pattern) if k == kind]

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        n_attn = self.pattern.count(ATTENTION)
        return n_attn * 2 * self.num_key_value_heads * self.head_dim * dtype_bytes

    def ssm_state_bytes_per_sequence(self, conv_dtype_bytes: int = 2) -> int:
        """fp32 SSM state plus the conv window (in the activation dtype) of every Mamba layer."""
        n_mamba = self.pattern.count(MAMBA)
        ssm = self.mamba_num_heads * self.mamba_head_dim * self.ssm_state_size * 4
        conv = (self.conv_kernel - 1) * self.mamba_conv_dim * conv_dtype_bytes
        return n_mamba * (ssm + conv)

    # ---- parsing ---------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        d = dict(raw)
        for legacy, name in _LEGACY_KEYS.items():
            if legacy in d:
                value = d.pop(legacy)
                d.setdefault(name, value)
        if "mamba_expand" in d:  # expand is implied by mamba_num_heads * mamba_head_dim
            d.setdefault("expand", d.pop("mamba_expand"))

        pattern = _parse_layers(d, "hybrid_override_pattern", "layers_block_type", "layer_types")
        mtp = _parse_layers(d, "mtp_hybrid_override_pattern", "mtp_layers_block_type", None)
        d.pop("num_hidden_layers", None)

        names = {f.name for f in dataclasses.fields(cls)} - {"pattern", "mtp_pattern", "extra"}
        kwargs: dict[str, Any] = {k: d.pop(k) for k in list(d) if k in names}
        if "time_step_limit" in kwargs and kwargs["time_step_limit"] is not None:
            try:
                lo, hi = kwargs["time_step_limit"]
                kwargs["time_step_limit"] = (_json_float(lo), _json_float(hi))
            except (TypeError, ValueError):
                raise ConfigError(f"time_step_limit: expected [min, max], got {kwargs['time_step_limit']!r}") from None
        elif "time_step_limit" in kwargs:
            kwargs.pop("time_step_limit")
        if pattern is not None:
            kwargs["pattern"] = pattern
        n_mtp = int(kwargs.get("num_nextn_predict_layers", 0) or 0)
        if mtp is not None and n_mtp > 0:  # transformers writes an MTP pattern even without MTP layers
            kwargs["mtp_pattern"] = mtp
        elif n_mtp > 0:
            kwargs["mtp_pattern"] = ATTENTION + MOE  # transformers' default MTP block
        if kwargs.get("moe_latent_size") in (0,):
            kwargs["moe_latent_size"] = None
        cfg = cls(**kwargs, extra=d)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        model_type = raw.get("model_type", "nemotron_h")
        if model_type != "nemotron_h":
            raise ConfigError(f"model_type: expected 'nemotron_h', got {model_type!r}")
        return cls.from_hf_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that both hylm and transformers' NemotronHConfig read."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("pattern", "mtp_pattern", "extra"):
                continue
            value = getattr(self, f.name)
            if f.name == "time_step_limit":
                value = list(value)
            out[f.name] = value
        out["model_type"] = "nemotron_h"
        out["architectures"] = ["NemotronHForCausalLM"]
        out["layers_block_type"] = [_KIND_TO_HF_NAME[k] for k in self.pattern]
        out["hybrid_override_pattern"] = self.pattern
        out["num_hidden_layers"] = self.num_hidden_layers
        if self.mtp_pattern:
            out["mtp_layers_block_type"] = [_KIND_TO_HF_NAME[k] for k in self.mtp_pattern]
        out["expand"] = self.mamba_d_inner // self.hidden_size if self.mamba_d_inner % self.hidden_size == 0 else 2
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    # ---- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, field_name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{field_name}: {msg}")

        if not self.pattern:
            raise ConfigError("hybrid_override_pattern: the model has no layers")
        for i, k in enumerate(self.pattern):
            need(k in LAYER_KINDS, "hybrid_override_pattern",
                 f"unknown layer character {k!r} at position {i} (expected one of M * E -)")
        for i, k in enumerate(self.mtp_pattern):
            need(k in LAYER_KINDS, "mtp_hybrid_override_pattern", f"unknown layer character {k!r} at position {i}")
        for name in ("vocab_size", "hidden_size"):
            need(_is_pos_int(getattr(self, name)), name, f"must be a positive integer, got {getattr(self, name)!r}")
        need(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "must be > 0")
        kinds = set(self.pattern) | set(self.mtp_pattern)
        if ATTENTION in kinds:
            for name in ("num_attention_heads", "num_key_value_heads", "head_dim"):
                need(_is_pos_int(getattr(self, name)), name, f"must be a positive integer, got {getattr(self, name)!r}")
            need(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
                 f"{self.num_attention_heads} is not divisible by num_key_value_heads={self.num_key_value_heads}")
        if MAMBA in kinds:
            for name in ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size"):
                need(_is_pos_int(getattr(self, name)), name, f"must be a positive integer, got {getattr(self, name)!r}")
            need(self.mamba_num_heads % self.n_groups == 0, "mamba_num_heads",
                 f"{self.mamba_num_heads} is not divisible by n_groups={self.n_groups}")
            lo, hi = self.time_step_limit
            need(0 <= lo <= hi, "time_step_limit", f"expected 0 <= min <= max, got {self.time_step_limit}")
        if MLP in kinds:
            need(_is_pos_int(self.intermediate_size), "intermediate_size", "must be a positive integer")
        if MOE in kinds:
            for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
                need(_is_pos_int(getattr(self, name)), name, f"must be a positive integer, got {getattr(self, name)!r}")
            need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"{self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}")
            need(self.n_routed_experts % self.n_group == 0, "n_routed_experts",
                 f"{self.n_routed_experts} experts are not divisible by n_group={self.n_group}")
            need(self.topk_group <= self.n_group, "topk_group", f"{self.topk_group} exceeds n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1:
                need(per_group >= 2, "n_group", "each expert group needs at least 2 experts (groups are ranked by top-2 sum)")
            need(self.topk_group * per_group >= self.num_experts_per_tok, "num_experts_per_tok",
                 f"{self.num_experts_per_tok} exceeds the {self.topk_group * per_group} experts of the topk_group groups")
            need(self.moe_shared_expert_intermediate_size is None or self.moe_shared_expert_intermediate_size >= 0,
                 "moe_shared_expert_intermediate_size", "must be >= 0")
            if self.moe_latent_size is not None:
                need(_is_pos_int(self.moe_latent_size), "moe_latent_size", "must be a positive integer or null")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        if self.num_nextn_predict_layers > 0:
            need(bool(self.mtp_pattern), "mtp_hybrid_override_pattern", "required when num_nextn_predict_layers > 0")
        need(self.mlp_hidden_act == "relu2", "mlp_hidden_act", f"only 'relu2' is supported, got {self.mlp_hidden_act!r}")
        need(self.mamba_hidden_act == "silu", "mamba_hidden_act", f"only 'silu' is supported, got {self.mamba_hidden_act!r}")

    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]


def _json_float(v: Any) -> float:
    """A number as JSON may spell it: plain, a string like "inf", or transformers' {"__float__": "Infinity"}."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    if isinstance(v, bool):
        raise TypeError("bool is not a number")
    return float(v)


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _parse_layers(d: dict[str, Any], pattern_key: str, list_key: str, alt_list_key: str | None) -> str | None:
    """Read a layer pattern from a pattern string or a list of layer-type names; None when absent."""
    pattern = d.pop(pattern_key, None)
    names = d.pop(list_key, None)
    if alt_list_key is not None:
        alt = d.pop(alt_list_key, None)
        names = names if names is not None else alt
    if names is not None:
        if not isinstance(names, list):
            raise ConfigError(f"{list_key}: expected a list of layer type names, got {type(names).__name__}")
        chars = []
        for i, n in enumerate(names):
            if n not in _NAME_TO_KIND:
                raise ConfigError(f"{list_key}: unknown layer type {n!r} at position {i} "
                                  f"(expected one of {sorted(set(_NAME_TO_KIND))})")
            chars.append(_NAME_TO_KIND[n])
        from_list = "".join(chars)
        if pattern is not None and pattern != from_list:
            raise ConfigError(f"{pattern_key}: {pattern!r} disagrees with {list_key} ({from_list!r})")
        return from_list
    if pattern is not None:
        if not isinstance(pattern, str):
            raise ConfigError(f"{pattern_key}: expected a string, got {type(pattern).__name__}")
        return pattern
    return None


# ---- presets: the published Nemotron 3 dimensions (see shared REFERENCE.md) ------------------------
SUPER_PATTERN = "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME"
NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"

_COMMON = dict(
    vocab_size=131072, max_position_embeddings=262144, num_attention_heads=32, num_key_value_heads=2,
    head_dim=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
    n_group=1, topk_group=1, norm_topk_prob=True, layer_norm_epsilon=1e-5, bos_token_id=1,
    eos_token_id=2, pad_token_id=0, use_conv_bias=True,
)

PRESETS: dict[str, dict[str, Any]] = {
    "nemotron-3-super-120b-a12b": dict(
        _COMMON, hidden_size=4096, pattern=SUPER_PATTERN, mamba_num_heads=128, n_routed_experts=512,
        num_experts_per_tok=22, moe_intermediate_size=2688, moe_latent_size=1024,
        moe_shared_expert_intermediate_size=5376, routed_scaling_factor=5.0, intermediate_size=5376,
        num_nextn_predict_layers=1, mtp_pattern="*E",
    ),
    "nemotron-3-nano-30b-a3b": dict(
        _COMMON, hidden_size=2688, pattern=NANO_PATTERN, mamba_num_heads=64, n_routed_experts=128,
        num_experts_per_tok=6, moe_intermediate_size=1856, moe_latent_size=None,
        moe_shared_expert_intermediate_size=3712, routed_scaling_factor=2.5, intermediate_size=3712,
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    cfg = ModelConfig(**PRESETS[name])
    cfg.validate()
    return cfg
