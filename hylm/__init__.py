"""hylm: inference engine for hybrid Mamba-2 + (Latent)MoE + attention models (NVIDIA Nemotron-H / Nemotron 3)."""

from .config import ConfigError, ModelConfig
from .loader import load_model
from .weights import CheckpointError

__version__ = "0.1.0"
__all__ = ["load_model", "ModelConfig", "ConfigError", "CheckpointError"]
