"""`load_model`: a checkpoint directory, a GGUF file or a preset name -> a ready NemotronHModel."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import PRESETS, ConfigError, ModelConfig, preset
from .model import NemotronHModel
from .model.init import init_weights
from .model.layout import use_column_major_linears
from .weights import CheckpointError, load_hf_checkpoint

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported (use fp32, bf16 or fp16)")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use fp32, bf16 or fp16)")
    return DTYPES[dtype]


def load_config(path_or_preset: str | os.PathLike) -> ModelConfig:
    from .weights.gguf_loader import find_gguf, read_gguf_config

    path = Path(path_or_preset)
    gguf_file = find_gguf(path)
    if gguf_file is not None:  # a .gguf file, or a directory holding one (and its tokenizer) instead of safetensors
        config = read_gguf_config(gguf_file)
        _merge_generation_eos(config, gguf_file.parent / "generation_config.json")
        return config
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ConfigError(f"{path}: no config.json")
        config = ModelConfig.from_json(cfg_file)
        _merge_generation_eos(config, path / "generation_config.json")
        return config
    if str(path_or_preset) in PRESETS:
        return preset(str(path_or_preset))
    raise ConfigError(f"{path_or_preset}: neither a model directory nor a preset "
                      f"(presets: {', '.join(sorted(PRESETS))})")


def _merge_generation_eos(config: ModelConfig, path: Path) -> None:
    """Generation stops at every end id of generation_config.json too (Nemotron: </s> and <|im_end|>),
    as transformers' generate and vLLM do."""
    import json

    if not path.exists():
        return
    try:
        extra = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        raise ConfigError(f"{path}: not a valid JSON object") from None
    ids = extra if isinstance(extra, list) else [extra] if isinstance(extra, int) else []
    merged = list(dict.fromkeys(config.eos_token_ids() + [i for i in ids if isinstance(i, int)]))
    if merged:
        config.eos_token_id = merged if len(merged) > 1 else merged[0]


def load_model(path_or_preset: str | os.PathLike | ModelConfig, dtype: str | torch.dtype = torch.float32,
               device: str | torch.device = "cpu", seed: int = 0) -> NemotronHModel:
    """Load a checkpoint directory (HF safetensors), a GGUF file (or a directory holding one), or build a
    preset/config with random weights.

    The model is built on the meta device, so no memory is spent before the weights arrive.
    """
    dtype = parse_dtype(dtype)
    config = path_or_preset if isinstance(path_or_preset, ModelConfig) else load_config(path_or_preset)
    with torch.device("meta"):
        model = NemotronHModel(config)
    from .weights.gguf_loader import find_gguf, load_gguf_checkpoint

    gguf_file = None if isinstance(path_or_preset, ModelConfig) else find_gguf(path_or_preset)
    if gguf_file is not None:
        load_gguf_checkpoint(model, gguf_file, dtype=dtype, device=device)
    elif isinstance(path_or_preset, ModelConfig) or not Path(path_or_preset).is_dir():
        model = model.to_empty(device=device)
        init_weights(model, config, seed=seed)
        model = model.to(dtype)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.data = buf.data.float()
    else:
        load_hf_checkpoint(model, path_or_preset, dtype=dtype, device=device)
    model.requires_grad_(False)
    if torch.device(device).type == "cpu":
        use_column_major_linears(model)
    return model.eval()


__all__ = ["load_model", "load_config", "parse_dtype", "CheckpointError", "ConfigError"]
