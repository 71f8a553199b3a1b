"""Pure tensor operators (SSD scan, causal depthwise conv1d)."""
