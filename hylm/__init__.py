"""hylm: inference engine for hybrid Mamba-2 + (Latent)MoE + attention models (NVIDIA Nemotron-H / Nemotron 3)."""

from .config import ConfigError, ModelConfig

__version__ = "0.1.0"
__all__ = ["load_model", "ModelConfig", "ConfigError", "CheckpointError", "LLM", "SamplingParams"]


def __getattr__(name: str):
    # torch-heavy parts load on first use, so `hylm --help` and config tools start fast
    if name == "load_model":
        from .loader import load_model
        return load_model
    if name == "CheckpointError":
        from .weights import CheckpointError
        return CheckpointError
    if name == "LLM":
        from .engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from .engine.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'hylm' has no attribute {name!r}")
