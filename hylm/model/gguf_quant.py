"""Linear layers and routed experts that keep GGUF Q8_0 weights packed in memory and compute from them.

Q8_0 (llama.cpp / ggml): blocks of 32 consecutive elements of a row, each an fp16 scale `d` and 32 int8
values `q`; the weight is `W[i, 32 b + k] = float(d[i, b]) * q[i, 32 b + k]`. hylm keeps the two parts as
separate tensors (the file interleaves them as 34-byte blocks):
  Q8_0Linear:  qweight int8 [out, in], scales float16 [out, in/32]  (+ bias, in the model dtype)
  Q8_0Experts: per projection p in up_proj / down_proj, stacked over E experts:
               p_qweight int8 [E, out, in], p_scales float16 [E, out, in/32];
               or, for a projection the file does not store as Q8_0, p a dense [E, out, in] parameter.
That is 8.5 bits per weight in RAM. On CPU a bounded tile of rows is dequantised to fp32 at a time and
multiplied (as the NVFP4 / FP8 modules of hylm.model.quantized do), so the fp32 weight never exists whole.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ops import native
from ..ops.fp8 import tile_rows
from ..ops.nvfp4 import routed_expert_mlp
from .linear import Linear
from .moe import Experts

Q8_0_BLOCK = 32
Q8_0_BLOCK_BYTES = 2 + Q8_0_BLOCK  # fp16 scale + 32 int8 values
native_enabled = True  # tests and benchmarks flip this to compare with the tiled PyTorch path
NATIVE_MAX_ROWS = 64  # Q8_0_MAX_ROWS in hylm/ops/csrc/q8_0_rows.c


def q8_0_split_blocks(raw: np.ndarray, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes of a Q8_0 tensor (uint8 [..., in/32 * 34], ggml's layout) -> (qweight int8 [..., in],
    scales float16 [..., in/32]), both freshly allocated (the source may be a file mapping)."""
    if in_features % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 rows must hold a multiple of {Q8_0_BLOCK} elements, got {in_features}")
    nb = in_features // Q8_0_BLOCK
    lead = raw.shape[:-1]
    if raw.shape[-1] != nb * Q8_0_BLOCK_BYTES:
        raise ValueError(f"Q8_0 data: expected {nb * Q8_0_BLOCK_BYTES} bytes per row of {in_features}, "
                         f"got {raw.shape[-1]}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(*lead, nb, Q8_0_BLOCK_BYTES)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(*lead, nb)
    qweight = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(*lead, in_features)
    return torch.from_numpy(qweight.copy()), torch.from_numpy(scales.copy())


def dequantize_q8_0(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """qweight int8 [..., in], scales fp16 [..., in/32] -> W [..., in] in dtype (computed in fp32)."""
    blocks = qweight.float().unflatten(-1, (-1, Q8_0_BLOCK))  # [..., in/32, 32]
    return (blocks * scales.float().unsqueeze(-1)).flatten(-2).to(dtype)


def q8_0_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ dequantize_q8_0(qweight, scales).T + bias -> [..., out] in x's dtype, computed in fp32:
    for up to 64 rows on the CPU by hylm's native kernel from the packed weight (one read of 8.5 bits per
    element), else one dequantised row tile (about 2 MiB of fp32) at a time."""
    out_f, in_f = qweight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"q8_0_linear: input has {x.shape[-1]} features, the weight expects {in_f}")
    lead = x.shape[:-1]
    if _native_q8_0_ok(x, qweight, scales, bias):
        rows = x.reshape(-1, in_f).float().contiguous()  # [R, in]
        y = torch.empty(rows.shape[0], out_f, dtype=torch.float32)  # [R, out]
        b = bias.float().contiguous() if bias is not None else None
        if native.library().hylm_q8_0_rows(rows.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                                           b.data_ptr() if b is not None else None, y.data_ptr(), rows.shape[0],
                                           in_f, out_f) != 0:
            raise RuntimeError(f"native Q8_0 kernel refused rows={rows.shape[0]}, in={in_f}, out={out_f}")
        return y.reshape(*lead, out_f).to(x.dtype)
    xt = x.reshape(-1, in_f).float().t()  # [in, N]
    yt = torch.empty(out_f, xt.shape[1], dtype=torch.float32, device=x.device)  # y transposed: row tiles
    rows = tile_rows(in_f)
    for r in range(0, out_f, rows):
        tile = qweight[r: r + rows].to(torch.float32)  # scaled in place: one temporary per tile
        tile.view(tile.shape[0], -1, Q8_0_BLOCK).mul_(scales[r: r + rows].to(torch.float32).unsqueeze(-1))
        torch.mm(tile, xt, out=yt[r: r + rows])
    y = yt.view(1, -1) if yt.shape[1] == 1 else yt.t().contiguous()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, out_f).to(x.dtype)


def _native_rows_ok(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """x (and the other inputs given) can go to a native Q8_0 kernel: 1..NATIVE_MAX_ROWS rows on the CPU, a
    float dtype, nothing autograd must differentiate."""
    rows = x.numel() // max(1, x.shape[-1])
    tensors = [t for t in (x, *others) if t is not None]
    return (native_enabled and 1 <= rows <= NATIVE_MAX_ROWS
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and all(t.device.type == "cpu" for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and native.available())


def _native_q8_0_ok(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (qweight.dtype == torch.int8 and scales.dtype == torch.float16 and qweight.is_contiguous()
            and scales.is_contiguous() and _native_rows_ok(x, qweight, bias))


class Q8_0Linear(nn.Module):
    """nn.Linear's interface over a packed Q8_0 weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if in_features % Q8_0_BLOCK:
            raise ValueError(f"Q8_0Linear: in_features must be a multiple of {Q8_0_BLOCK}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, in_features // Q8_0_BLOCK, dtype=torch.float16,
                                                   device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return q8_0_linear(x, self.qweight, self.scales, self.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_q8_0(self.qweight, self.scales, dtype)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> Linear:
        """A dense nn.Linear holding the dequantised weight."""
        lin = Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.requires_grad_(False)


class Q8_0Experts(nn.Module):
    """Routed experts (the interface of hylm.model.moe.Experts) whose up / down projections are each Q8_0
    (packed, stacked over experts) or dense."""

    PROJECTIONS = ("up_proj", "down_proj")

    def __init__(self, num_experts: int, input_size: int, intermediate_size: int, up_q8_0: bool = True,
                 down_q8_0: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_experts, self.input_size, self.intermediate_size = num_experts, input_size, intermediate_size
        self.packed = {"up_proj": up_q8_0, "down_proj": down_q8_0}
        for proj, packed in self.packed.items():
            out_f, in_f = self.proj_shape(proj)
            if not packed:
                self.register_parameter(proj, nn.Parameter(
                    torch.zeros(num_experts, out_f, in_f, dtype=dtype, device=device), requires_grad=False))
                continue
            if in_f % Q8_0_BLOCK:
                raise ValueError(f"Q8_0Experts: {proj} input size must be a multiple of {Q8_0_BLOCK}, got {in_f}")
            self.register_buffer(f"{proj}_qweight", torch.zeros(num_experts, out_f, in_f, dtype=torch.int8,
                                                                device=device))
            self.register_buffer(f"{proj}_scales", torch.zeros(num_experts, out_f, in_f // Q8_0_BLOCK,
                                                               dtype=torch.float16, device=device))

    def proj_shape(self, proj: str) -> tuple[int, int]:
        return ((self.intermediate_size, self.input_size) if proj == "up_proj"
                else (self.input_size, self.intermediate_size))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, input_size={self.input_size}, "
                f"intermediate_size={self.intermediate_size}, q8_0={[p for p, q in self.packed.items() if q]}")

    def _linear(self, proj: str) -> Callable[[int, torch.Tensor], torch.Tensor]:
        if self.packed[proj]:
            q, s = getattr(self, f"{proj}_qweight"), getattr(self, f"{proj}_scales")
            return lambda e, h: q8_0_linear(h, q[e], s[e])
        w = getattr(self, proj)
        return lambda e, h: F.linear(h, w[e].float())

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self._native_ok(x, weights, ids):
            return self._native(x, weights, ids).to(x.dtype)
        out = routed_expert_mlp(x, weights, ids, self.num_experts, self._linear("up_proj"),
                                self._linear("down_proj"), self.input_size)
        return out.to(x.dtype)

    def _native_ok(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> bool:
        return (all(self.packed.values()) and x.dim() == 2 and ids.dtype == torch.int64
                and _native_rows_ok(x, weights, ids))

    def _native(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Decode batches (up to 64 tokens): every routed expert of every token in one native call that reads each
        chosen expert's packed rows once (hylm_q8_0_experts_rows); the PyTorch path loops over the experts."""
        rows, k = ids.shape
        xs = x.float().contiguous()  # [R, D]
        ids_c, w = ids.contiguous(), weights.float().contiguous()  # [R, k]
        h = torch.empty(rows * k, self.intermediate_size, dtype=torch.float32)  # [R*k, I]
        out = torch.empty(rows, self.input_size, dtype=torch.float32)  # [R, D]
        uq, us = self.up_proj_qweight, self.up_proj_scales
        dq, ds = self.down_proj_qweight, self.down_proj_scales
        rc = native.library().hylm_q8_0_experts_rows(
            xs.data_ptr(), ids_c.data_ptr(), w.data_ptr(), rows, k, uq.data_ptr(), us.data_ptr(), dq.data_ptr(),
            ds.data_ptr(), self.num_experts, self.intermediate_size, self.input_size, self.input_size, h.data_ptr(),
            out.data_ptr())
        if rc != 0:
            raise RuntimeError(f"native Q8_0 experts kernel refused {rows} rows x {k} experts (code {rc})")
        return out

    def dequantize(self, proj: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The projection's weights as a dense [E, out, in] tensor."""
        if not self.packed[proj]:
            return getattr(self, proj).to(dtype)
        return dequantize_q8_0(getattr(self, f"{proj}_qweight"), getattr(self, f"{proj}_scales"), dtype)

    def to_experts(self, dtype: torch.dtype = torch.float32) -> Experts:
        dense = Experts(self.num_experts, self.input_size, self.intermediate_size).to(dtype)
        with torch.no_grad():
            dense.up_proj.copy_(self.dequantize("up_proj", dtype))
            dense.down_proj.copy_(self.dequantize("down_proj", dtype))
        return dense.requires_grad_(False)


Q8_0_MODULES = (Q8_0Linear, Q8_0Experts)


def dequantize_q8_0_modules(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace, in place, every Q8_0 module by its dense dequantised equivalent. Returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Q8_0_MODULES):
            parent, _, child = name.rpartition(".")
            dense = module.to_linear(dtype) if isinstance(module, Q8_0Linear) else module.to_experts(dtype)
            setattr(model.get_submodule(parent) if parent else model, child, dense)
    return model


__all__ = ["Q8_0Linear", "Q8_0Experts", "Q8_0_MODULES", "q8_0_linear", "dequantize_q8_0", "q8_0_split_blocks",
           "dequantize_q8_0_modules", "Q8_0_BLOCK"]
