"""Model configs for training: `micro` (tests), `hylm-tiny` (the small Nemotron-3-shaped model hylm ships).

Both follow Nemotron 3 Super's shape in miniature: Mamba-2 (M) and LatentMoE (E) layers alternating, a few
attention layers (*) without positional encoding, sigmoid top-k routing with a correction bias, a shared
expert, squared-ReLU experts in a latent space, untied lm_head and one MTP block (`*E`).
`vocab_size` is the size the tokenizer is trained to (`hylm train` trains one when none is given).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import PRESETS, ConfigError, ModelConfig, preset

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # ~0.2M parameters with a 512-token vocabulary: for tests and smoke runs
    "micro": dict(
        vocab_size=512, hidden_size=32, pattern="ME*M", num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=32,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, moe_latent_size=16,
        moe_shared_expert_intermediate_size=64, routed_scaling_factor=1.0, intermediate_size=64,
        num_nextn_predict_layers=1, mtp_pattern="*E", max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    # 4.67M parameters (+0.67M MTP), 1.1M of them in embeddings / lm_head; ~2.0M active per token
    "hylm-tiny": dict(
        vocab_size=2048, hidden_size=192, pattern="MEM*EMEM*EME", num_attention_heads=4, num_key_value_heads=2,
        head_dim=48, mamba_num_heads=12, mamba_head_dim=32, ssm_state_size=32, n_groups=2, conv_kernel=4,
        chunk_size=64, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=192, moe_latent_size=96,
        moe_shared_expert_intermediate_size=384, routed_scaling_factor=2.0, intermediate_size=384,
        num_nextn_predict_layers=1, mtp_pattern="*E", max_position_embeddings=8192,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
}


def train_preset(name: str) -> ModelConfig:
    if name not in TRAIN_PRESETS:
        raise ConfigError(f"unknown training preset {name!r} (known: {', '.join(sorted(TRAIN_PRESETS))})")
    cfg = ModelConfig(**TRAIN_PRESETS[name])
    cfg.validate()
    return cfg


def resolve_model_config(spec: Any) -> ModelConfig:
    """A ModelConfig, a dict of config.json keys, a config.json path, a model directory, a training preset
    (`micro`, `hylm-tiny`) or an hylm preset name -> ModelConfig."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, dict):
        return ModelConfig.from_hf_dict(spec)
    path = Path(os.fspath(spec))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: no config.json in this directory")
        return ModelConfig.from_json(path / "config.json")
    if path.is_file():
        return ModelConfig.from_json(path)
    name = str(spec)
    if name in TRAIN_PRESETS:
        return train_preset(name)
    if name in PRESETS:
        return preset(name)
    raise ConfigError(f"{spec}: neither a config.json, a model directory nor a preset "
                      f"(presets: {', '.join(sorted(TRAIN_PRESETS) + sorted(PRESETS))})")
