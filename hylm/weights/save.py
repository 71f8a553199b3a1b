"""Write a model as an HF-layout safetensors checkpoint (NVIDIA's naming by default)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_hf_checkpoint(model: torch.nn.Module, directory: str | os.PathLike, nvidia_layout: bool = True,
                       dtype: torch.dtype | None = None) -> None:
    """config.json + model.safetensors. nvidia_layout: `backbone.` prefix and one tensor per routed
    expert, as NVIDIA's releases; otherwise transformers v5's `model.` prefix and stacked experts."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if dtype is not None and t.is_floating_point() and not name.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        if nvidia_layout and name.startswith("model."):
            name = "backbone." + name[len("model."):]
        if nvidia_layout and name.endswith((".experts.up_proj", ".experts.down_proj")):
            base, kind = name.rsplit(".", 1)
            for e in range(t.shape[0]):
                tensors[f"{base}.{e}.{kind}.weight"] = t[e].contiguous()
            continue
        tensors[name] = t.contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_hf_dict()
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
