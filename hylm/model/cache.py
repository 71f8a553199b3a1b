"""A simple per-sequence cache for the model's own cached path (prefill, then one token at a time).

The engine replaces it with its state pool (fixed slots + paged KV); the model sees the same two
methods either way (see `batch.State`).
"""

from __future__ import annotations

import torch

from ..config import ATTENTION, MAMBA, ModelConfig


class ContiguousCache:
    def __init__(self, config: ModelConfig, batch_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", initial_capacity: int = 256):
        self.config = config
        self.batch_size = batch_size
        self.dtype = dtype
        self.lengths = [0] * batch_size
        c = config
        self._mamba = {
            i: (torch.zeros(batch_size, c.mamba_conv_dim, c.conv_kernel - 1, dtype=dtype, device=device),
                # the SSM state stays fp32 whatever the weight dtype
                torch.zeros(batch_size, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size,
                            dtype=torch.float32, device=device))
            for i in c.layer_indices(MAMBA)
        }
        shape = (batch_size, initial_capacity, c.num_key_value_heads, c.head_dim)
        self._kv = {i: [torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)]
                    for i in c.layer_indices(ATTENTION)}

    def mamba(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._mamba[layer]

    def kv_write(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        kv = self._kv[layer]
        end = start + k.shape[0]
        if end > kv[0].shape[1]:  # grow by doubling so appends stay amortised O(1)
            cap = max(end, 2 * kv[0].shape[1])
            for j in range(2):
                grown = kv[j].new_zeros(kv[j].shape[0], cap, *kv[j].shape[2:])
                grown[:, : kv[j].shape[1]] = kv[j]
                kv[j] = grown
        kv[0][slot, start:end] = k
        kv[1][slot, start:end] = v

    def kv_read(self, layer: int, slot: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self._kv[layer]
        return kv[0][slot, lo:hi], kv[1][slot, lo:hi]

    def kv_append(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        self.kv_write(layer, slot, start, k, v)
        return self.kv_read(layer, slot, 0, start + k.shape[0])
