"""Greedy MTP drafts in one native call (hylm/ops/csrc/mtp_draft.c) for an MTP block of one attention block and one
MoE block: the head's argmax, the next draft's embedding, norms, input projection and both blocks, K times, with
the kernels the step-by-step path uses. The reference is that path (hylm/engine/speculative.py drafts token by
token through the model's PyTorch modules); tests compare the tokens."""

from __future__ import annotations

import torch

from . import native
from .decode_blocks import NativeAttention
from .linear import fp32_cpu, weight_layout
from .moe import NativeMoE


def mtp_greedy(prev: torch.Tensor, steps: int, embeddings: torch.Tensor, enorm: tuple[torch.Tensor, float],
               hnorm: tuple[torch.Tensor, float], eh_proj: torch.Tensor, final_norm: tuple[torch.Tensor, float],
               head: torch.Tensor, attention: NativeAttention, k_cache: torch.Tensor, v_cache: torch.Tensor,
               new_rows: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, block_size: int, longest: int,
               moe: NativeMoE) -> torch.Tensor:
    """Draft tokens [A, steps] int64 from the MTP's final-normed outputs prev [A, D] at each sequence's last position.
    embeddings [V, D]; norms (weight [D], eps); eh_proj [D, 2D], head [V, D] (row- or column-major); new_rows and
    lengths [steps - 1, A] int64 (draft s > 0 is fed at cache row new_rows[s - 1, a] and sees lengths[s - 1, a]
    positions), tables [A, width] int64; caches [Hkv, rows, hd] fp32. Check `native_mtp_greedy_ok` first."""
    a, d = prev.shape
    v = embeddings.shape[0]
    prev = prev.contiguous().clone()  # [A, D], overwritten by the kernel
    tok = torch.empty(a, steps, dtype=torch.int64)  # [A, steps]
    splits = attention.splits(a, longest)
    work = attention.work(a, splits)
    none = torch.empty(0, dtype=torch.int64)
    rows, lens = (new_rows.contiguous(), lengths.contiguous()) if steps > 1 else (none, none)
    tables = tables.contiguous() if steps > 1 else torch.zeros(a, 1, dtype=torch.int64)
    rc = native.library().hylm_mtp_greedy(
        a, d, v, steps, prev.data_ptr(), embeddings.data_ptr(), enorm[0].data_ptr(), float(enorm[1]),
        hnorm[0].data_ptr(), float(hnorm[1]), eh_proj.data_ptr(), weight_layout(eh_proj), final_norm[0].data_ptr(),
        float(final_norm[1]), head.data_ptr(), weight_layout(head),
        *attention._weights, k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], rows.data_ptr(),
        tables.data_ptr(), tables.shape[1], lens.data_ptr(), block_size, attention.scale, splits, work.data_ptr(),
        *moe._middle, tok.data_ptr())
    if rc != 0:
        raise RuntimeError(f"native MTP draft loop refused {a} sequences x {steps} drafts (code {rc})")
    return tok


def native_mtp_greedy_ok(prev: torch.Tensor, embeddings: torch.Tensor, eh_proj: torch.Tensor, head: torch.Tensor,
                         norms: tuple[torch.Tensor, ...]) -> bool:
    """The tensors the loop reads outside its two blocks are fp32 CPU tensors it can address."""
    return (native.available() and prev.dim() == 2 and fp32_cpu(prev, embeddings, eh_proj, head, *norms)
            and embeddings.is_contiguous() and all(n.is_contiguous() and n.shape == prev.shape[1:] for n in norms)
            and weight_layout(eh_proj) is not None and weight_layout(head) is not None
            and eh_proj.shape == (prev.shape[1], 2 * prev.shape[1]) and head.shape[1] == prev.shape[1]
            and embeddings.shape[1] == prev.shape[1])
