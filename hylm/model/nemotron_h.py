"""The assembled Nemotron-H model: embeddings -> blocks (M / * / E / -) -> norm_f -> untied lm_head."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .batch import Batch, State
from .block import Block
from .cache import ContiguousCache
from .fused import NativeStack
from .linear import Linear
from .mtp import MTP
from .norm import RMSNorm


class NemotronHModel(nn.Module):
    """Parameter names mirror NVIDIA's checkpoints with the `backbone.` prefix renamed `model.`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.model = nn.Module()
        self.model.embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(Block(c, kind, i) for i, kind in enumerate(c.pattern))
        self.model.norm_f = RMSNorm(c.hidden_size, c.layer_norm_epsilon)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        self.mtp = MTP(c, first_layer_id=c.num_hidden_layers) if c.num_nextn_predict_layers > 0 else None
        self._native_layers = NativeStack()

    @property
    def dtype(self) -> torch.dtype:
        """The model's activation and state dtype: its (dense) lm_head's, or its embeddings' where the head is
        kept packed (a GGUF Q8_0 head)."""
        return self._dense_weight().dtype

    @property
    def device(self) -> torch.device:
        return self._dense_weight().device

    def _dense_weight(self) -> torch.Tensor:
        w = getattr(self.lm_head, "weight", None)
        return w if isinstance(w, torch.Tensor) else self.model.embeddings.weight

    # ---- packed path: what the engine calls --------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, batch: Batch, state: State | None = None) -> torch.Tensor:
        """input_ids [N] packed -> final hidden states [N, D] after norm_f."""
        x = self.model.embeddings(input_ids)  # [N, D]
        x = self._native_layers(self.model.layers, x, batch, state)  # a few tokens: all blocks' kernels in a row
        return self.model.norm_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def forward_packed(self, input_ids: torch.Tensor, batch: Batch, state: State | None = None,
                       rows: list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(rows), V] fp32 for the selected packed rows (all rows when None)."""
        hidden = self.hidden_states(input_ids, batch, state)
        if rows is not None:
            hidden = hidden[rows]
        return self.logits(hidden)

    # ---- dense path: full sequences, or a ContiguousCache for prefill + decode -----------------------
    def forward(self, input_ids: torch.Tensor, cache: ContiguousCache | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] fp32. With a cache, continues each sequence from it."""
        b, t = input_ids.shape
        if cache is None:
            batch = Batch.uniform(b, t)
        else:
            if cache.batch_size != b:
                raise ValueError(f"cache holds {cache.batch_size} sequences but input_ids has {b}")
            batch = Batch([t] * b, list(cache.lengths), list(range(b)))
        logits = self.forward_packed(input_ids.reshape(-1), batch, cache)  # [B*T, V]
        if cache is not None:
            cache.lengths = [n + t for n in cache.lengths]
        return logits.view(b, t, -1)

    def new_cache(self, batch_size: int) -> ContiguousCache:
        return ContiguousCache(self.config, batch_size, dtype=self.dtype, device=self.device)
