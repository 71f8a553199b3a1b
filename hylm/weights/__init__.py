"""Checkpoint formats -> model parameters. Only safetensors (and later GGUF): nothing is ever unpickled."""

from .errors import CheckpointError
from .hf_safetensors import load_hf_checkpoint
from .save import save_hf_checkpoint

__all__ = ["CheckpointError", "load_hf_checkpoint", "save_hf_checkpoint"]
