"""Packed variable-length batches: one row of T tokens holding n sequences, sequence i owning tokens
cu_seqlens[i]:cu_seqlens[i+1] (cu_seqlens [n + 1], rising from 0 to T)."""

from __future__ import annotations

from typing import Optional

import torch


def num_sequences(batch: int, cu_seqlens: Optional[torch.Tensor]) -> int:
    """The sequences of a call: the batch rows, or with cu_seqlens the packed sequences of its one row."""
    if cu_seqlens is None:
        return batch
    if batch != 1:
        raise ValueError("with cu_seqlens the batch must be one packed row (B = 1)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError("cu_seqlens must be a 1-D integer tensor [num_seqs + 1]")
    return cu_seqlens.numel() - 1


def host_bounds(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    """cu_seqlens as a checked Python list (a host sync: for the torch reference paths)."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(lo > hi for lo, hi in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={total}, got {bounds}")
    return bounds
