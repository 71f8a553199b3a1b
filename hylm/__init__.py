"""hylm: inference engine for hybrid Mamba-2 + (Latent)MoE + attention models."""
