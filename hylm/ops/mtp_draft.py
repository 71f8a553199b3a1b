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


def mtp_greedy(tokens: torch.Tensor, hidden: torch.Tensor, offsets: list[int], steps: int, embeddings: torch.Tensor,
               enorm: tuple[torch.Tensor, float], hnorm: tuple[torch.Tensor, float], eh_proj: torch.Tensor,
               final_norm: tuple[torch.Tensor, float], head: torch.Tensor, attention: NativeAttention,
               k_cache: torch.Tensor, v_cache: torch.Tensor, cu_rows: torch.Tensor, cu_tables: torch.Tensor,
               cu_lengths: torch.Tensor, new_rows: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
               block_size: int, longest: int, moe: NativeMoE, prev_out: torch.Tensor | None = None) -> torch.Tensor:
    """Draft tokens [A, steps] int64 (and into prev_out [A, D], if given, the MTP's output the last drafts came from). The catch-up: N rows, sequence a's at offsets[a]..offsets[a+1]-1, each the
    target's hidden state hidden [N, D] and the token after it, tokens [N], its key and value at cache row cu_rows[n],
    seeing cu_lengths[n] positions of the blocks cu_tables[n] ([N, width]). Draft s > 0 of sequence a goes to cache
    row new_rows[s - 1, a] and sees lengths[s - 1, a] positions of tables[a] ([A, width]); new_rows and lengths
    [steps - 1, A]. embeddings [V, D]; norms (weight [D], eps); eh_proj [D, 2D], head [V, D] (row- or column-major);
    caches [Hkv, rows, hd] fp32. Check `native_mtp_greedy_ok` first."""
    n, d = hidden.shape
    a = len(offsets) - 1
    if prev_out is not None and (prev_out.shape != (a, d) or not prev_out.is_contiguous() or not fp32_cpu(prev_out)):
        raise ValueError(f"prev_out must be a contiguous fp32 CPU tensor [{a}, {d}]")
    tok = torch.empty(a, steps, dtype=torch.int64)  # [A, steps]
    cu_splits, splits = attention.splits(n, longest), attention.splits(a, longest)
    work = attention.work(1, max(n * cu_splits, a * splits))  # scratch for either call
    if steps == 1:  # no later drafts: nothing of theirs is read
        new_rows = lengths = torch.zeros(1, a, dtype=torch.int64)
        tables = torch.zeros(a, 1, dtype=torch.int64)
    keep = (tokens.contiguous(), hidden.contiguous(), torch.tensor(offsets, dtype=torch.int64),
            cu_rows.contiguous(), _rows_contiguous(cu_tables), cu_lengths.contiguous(), new_rows.contiguous(),
            _rows_contiguous(tables), lengths.contiguous())  # alive until the call returns: it reads their addresses
    tokens, hidden, offs, cu_rows, cu_tables, cu_lengths, new_rows, tables, lengths = keep
    rc = native.library().hylm_mtp_greedy(
        a, d, embeddings.shape[0], steps, n, offs.data_ptr(), tokens.data_ptr(), hidden.data_ptr(), cu_rows.data_ptr(),
        cu_tables.data_ptr(), cu_tables.stride(0), cu_lengths.data_ptr(), cu_splits,
        embeddings.data_ptr(), enorm[0].data_ptr(), float(enorm[1]), hnorm[0].data_ptr(), float(hnorm[1]),
        eh_proj.data_ptr(), weight_layout(eh_proj), final_norm[0].data_ptr(), float(final_norm[1]), head.data_ptr(),
        weight_layout(head),
        *attention._weights, k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], new_rows.data_ptr(),
        tables.data_ptr(), tables.stride(0), lengths.data_ptr(), block_size, attention.scale, splits, work.data_ptr(),
        *moe._middle, tok.data_ptr(), prev_out.data_ptr() if prev_out is not None else None)
    if rc != 0:
        raise RuntimeError(f"native MTP draft loop refused {a} sequences x {steps} drafts (code {rc})")
    return tok


def _rows_contiguous(tables: torch.Tensor) -> torch.Tensor:
    """Block tables whose rows the kernel can read at tables + n * stride (one row expanded: stride 0)."""
    return tables if tables.stride(-1) == 1 else tables.contiguous()


def native_mtp_greedy_ok(hidden: torch.Tensor, embeddings: torch.Tensor, eh_proj: torch.Tensor, head: torch.Tensor,
                         norms: tuple[torch.Tensor, ...]) -> bool:
    """The tensors the loop reads outside its two blocks are fp32 CPU tensors it can address."""
    d = hidden.shape[-1]
    return (native.available() and hidden.dim() == 2 and fp32_cpu(hidden, embeddings, eh_proj, head, *norms)
            and embeddings.is_contiguous() and all(n.is_contiguous() and n.shape == (d,) for n in norms)
            and weight_layout(eh_proj) is not None and weight_layout(head) is not None
            and eh_proj.shape == (d, 2 * d) and head.shape[1] == d and embeddings.shape[1] == d)
