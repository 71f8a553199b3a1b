"""Greedy MTP drafts in one native call (hylm/ops/csrc/mtp_draft.c) for an MTP block of one attention block and one
MoE block: the catch-up over the positions the MTP has not seen, then per draft the head's argmax, the next
draft's embedding, norms, input projection and both blocks, with the kernels the step-by-step path uses. The
reference is the MTP's PyTorch modules (hylm/engine/speculative.py drafts through them one position at a time);
tests compare the tokens and the last hidden state."""

from __future__ import annotations

import ctypes

import torch

from . import native
from .decode_blocks import NativeAttention
from .linear import NativeWeight, fp32_cpu, weight_layout
from .moe import NativeMoE


def mtp_greedy(tokens: torch.Tensor, hidden: torch.Tensor, offsets: list[int], starts: list[int], steps: int,
               embeddings: torch.Tensor, enorm: tuple[torch.Tensor, float], hnorm: tuple[torch.Tensor, float],
               eh_proj: torch.Tensor | NativeWeight, final_norm: tuple[torch.Tensor, float],
               head: torch.Tensor | NativeWeight,
               attention: NativeAttention, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
               block_size: int, moe: NativeMoE, prev_out: torch.Tensor | None = None,
               min_confidence: float = 0.0) -> torch.Tensor:
    """Draft tokens [A, k] int64 (and into prev_out [A, D], if given, the MTP's output the last drafts came from).
    k = steps, or with min_confidence > 0 fewer: drafting stops at the first draft s >= 1 at which every sequence's
    draft has a softmax probability below min_confidence, and that draft is dropped.
    The catch-up: N rows, sequence a's at offsets[a]..offsets[a+1]-1 for its positions starts[a].., each the
    target's hidden state hidden [N, D] and the token after it, tokens [N]; draft s > 0 of sequence a goes to the
    position s - 1 after its catch-up's last. tables [A, width] int64: each sequence's KV blocks (rows contiguous,
    covering every position written); caches [Hkv, rows, hd] fp32. embeddings [V, D]; norms (weight [D], eps);
    eh_proj [D, 2D], head [V, D] (row- or column-major, or as `linear.native_weight` prepared them). Check
    `native_mtp_greedy_ok` first."""
    n, d = hidden.shape
    a = len(offsets) - 1
    if prev_out is not None and (prev_out.shape != (a, d) or not prev_out.is_contiguous() or not fp32_cpu(prev_out)):
        raise ValueError(f"prev_out must be a contiguous fp32 CPU tensor [{a}, {d}]")
    if tables.dim() != 2 or tables.shape[0] != a or tables.dtype != torch.int64 or tables.stride(1) != 1:
        raise ValueError(f"tables must be int64 [{a}, width] with contiguous rows")
    eh_proj, head = (w if isinstance(w, NativeWeight) else NativeWeight(w, weight_layout(w)) for w in (eh_proj, head))
    tok = torch.empty(a, steps, dtype=torch.int64)  # [A, steps]
    drafted = ctypes.c_int64(0)
    longest = max(c + offsets[i + 1] - offsets[i] + steps - 1 for i, c in enumerate(starts))  # positions seen, at most
    cu_splits, splits = attention.splits(n, longest), attention.splits(a, longest)
    keep = (tokens.contiguous(), hidden.contiguous(), torch.tensor(offsets + starts, dtype=torch.int64),
            attention.work(1, max(n * cu_splits, a * splits)))  # alive until the call returns: it reads addresses
    tokens, hidden, offs_starts, work = keep
    rc = native.library().hylm_mtp_greedy(
        a, d, embeddings.shape[0], steps, n, offs_starts.data_ptr(), offs_starts.data_ptr() + 8 * (a + 1),
        tokens.data_ptr(), hidden.data_ptr(), embeddings.data_ptr(), enorm[0].data_ptr(), float(enorm[1]),
        hnorm[0].data_ptr(), float(hnorm[1]), eh_proj.tensor.data_ptr(), eh_proj.layout, final_norm[0].data_ptr(),
        float(final_norm[1]), head.tensor.data_ptr(), head.layout,
        *attention._weights, k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1],
        tables.data_ptr(), tables.stride(0), tables.shape[1], block_size, attention.scale, cu_splits, splits,
        work.data_ptr(), *moe._middle, float(min_confidence), tok.data_ptr(), ctypes.byref(drafted),
        prev_out.data_ptr() if prev_out is not None else None)
    if rc != 0:
        raise RuntimeError(f"native MTP draft loop refused {a} sequences x {steps} drafts (code {rc})")
    return tok[:, : drafted.value]  # [A, k]


def native_mtp_greedy_ok(hidden: torch.Tensor, embeddings: torch.Tensor, eh_proj: torch.Tensor, head: torch.Tensor,
                         norms: tuple[torch.Tensor, ...]) -> bool:
    """The tensors the loop reads outside its two blocks are fp32 CPU tensors it can address."""
    d = hidden.shape[-1]
    return (native.available() and hidden.dim() == 2 and fp32_cpu(hidden, embeddings, eh_proj, head, *norms)
            and embeddings.is_contiguous() and all(n.is_contiguous() and n.shape == (d,) for n in norms)
            and weight_layout(eh_proj) is not None and weight_layout(head) is not None
            and eh_proj.shape == (d, 2 * d) and head.shape[1] == d and embeddings.shape[1] == d)
