"""y = x @ W^T + b for every dense product of the model, on the fastest kernel measured for the case.

On CPU in fp32, `F.linear` goes to MKL's sgemm, which on AMD processors (this project's machines) runs
skinny and large products at a fraction of the hardware: measured on 2 cores, a [32, 512] x [512, 32000]
product took 13.4 ms in MKL and 7.6 ms in oneDNN, a 4-row one over a [4736, 512] weight 0.94 vs 0.16 ms, a
4096-row one over [512, 1024] 50 vs 24 ms. oneDNN's matmul (`mkldnn._linear_pointwise`, the op
torch.compile's CPU backend emits for linears) shares PyTorch's OpenMP pool and computes in full fp32
(rel. error vs float64 ~1e-6, as MKL). Its fixed cost per call (~20 us) loses on small weights with few
rows, so those stay on `F.linear`. GPUs, other dtypes and anything autograd must differentiate take
`F.linear` unchanged.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import native

# Weights of at least this many elements take oneDNN whatever the row count; smaller ones from this many
# rows on (prefill chunks), when the weight is not tiny (below that, neither kernel is memory-bound).
ONEDNN_MIN_WEIGHT = 1 << 20
ONEDNN_MIN_ROWS = 128
ONEDNN_MIN_WEIGHT_BATCHED = 1 << 16
# oneDNN keeps a primitive (and its generated code) per input shape it has seen, up to 1,024 of them: prompts of
# every length would each add a few of ~0.5 MB that stay. Row counts above one bucket are padded to a multiple of
# it, so a server meets at most max_num_batched_tokens / 64 shapes per weight. Measured with bench_cpu.py's model,
# 240 prompts of 50-4000 tokens: resident memory 624 -> 643 MB (flat after the first hundred) instead of
# 636 -> 707 MB after 120 and still rising; at most 63 extra rows of work per call.
ONEDNN_ROW_BUCKET = 64

try:
    _ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
except (AttributeError, RuntimeError):  # a build without oneDNN
    _ONEDNN_LINEAR = None

# Up to NATIVE_MAX_ROWS rows over a cache-resident weight (NATIVE_MIN_WEIGHT <= elements < NATIVE_MAX_WEIGHT)
# take hylm's native kernels (hylm/ops/csrc/linear_rows.c), for row-major or column-major weights: MKL takes
# 2-3x longer for two rows than for one on such products, and its one-row product is slower too (measured
# with the loader's column-major weights, [r, 192] x [192, 1664]: MKL 35 / 71 / 79 us for 1 / 2 / 6 rows,
# native 17 / 27 / 49 us). Decode steps, small decode batches and speculative verification are made of these.
# Tiny weights stay on MKL (its fixed cost is lower), large row-major ones on oneDNN.
NATIVE_MAX_ROWS = 8
NATIVE_MIN_WEIGHT = 1 << 15
NATIVE_MAX_WEIGHT = 1 << 20
# Column-major weights of any larger size take the native kernels too: for up to 8 rows those kernels read such a
# weight in streaming order (rows.h), which holds DRAM bandwidth where oneDNN does not (an lm_head, [1, 512] x
# [512, 32000]: 1.9 vs 2.6 ms here; in an engine decode step of benchmarks/bench_cpu.py's model 5.7 vs 6.3 ms per
# token).

# The few-row kernels read a column-major weight fastest packed in panels of 16 outputs (rows.h, ROWS_PANELS: each
# weight byte once and in order, whatever the rows; 1.7-2.3x the streaming order on 1-4 rows with the weights in
# L3, the same sums bit for bit). The panels are a copy kept beside the parameter (which PyTorch's paths, prefill
# and training, go on reading), made once per weight and storage version: so only weights up to PACK_MAX_ELEMENTS
# (16 MB) are packed, those a small model's decode reads from the caches; a large model's stay single.
PANEL = 16
PANELS = 2  # the kernels' layout code for packed panels
PACK_MAX_ELEMENTS = 1 << 22

enabled = True  # benchmarks flip this to measure the difference in one process


def weight_layout(w: torch.Tensor | None) -> int | None:
    """How hylm's native kernels read a 2D weight [out, in]: 0 row-major (contiguous), 1 column-major (a contiguous
    [in, out] viewed transposed: hylm's CPU layout, see hylm/model/layout.py), None neither. None in, 0 out."""
    if w is None or w.is_contiguous():
        return 0
    return 1 if w.dim() == 2 and w.t().is_contiguous() else None


class NativeWeight(NamedTuple):
    """A weight as the native kernels take it: the tensor they read and its layout code (0 row-major, 1 column-major,
    PANELS packed)."""
    tensor: torch.Tensor
    layout: int


def packed_weight(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] (any layout) -> its panels [ceil(N / 16), K, 16] fp32: panel p holds columns 16p..16p+15 of w^T,
    zero past N."""
    n, k = w.shape
    panels = -(-n // PANEL)
    with torch.no_grad():
        wt = torch.zeros(k, panels * PANEL, dtype=torch.float32)  # [K, N padded]
        wt[:, :n] = w.t()
        return wt.view(k, panels, PANEL).permute(1, 0, 2).contiguous()  # [panels, K, 16]


_packed: dict[int, tuple] = {}  # id(weight) -> (a weak reference to it, its storage and version, its panels)


def native_weight(w: torch.Tensor | NativeWeight | None) -> NativeWeight | None:
    """How the native kernels should read w: a column-major fp32 CPU weight of at most PACK_MAX_ELEMENTS packed in
    panels, anything else as it is (its layout may be None: not readable). None stays None. The panels are made once
    per weight, storage and version and shared by every caller (the plans, `linear`) while the weight lives: keep
    the NativeWeight while its address is in use."""
    if w is None or isinstance(w, NativeWeight):
        return w
    layout = weight_layout(w)
    if not (layout == 1 and w.numel() <= PACK_MAX_ELEMENTS and fp32_cpu(w)):
        return NativeWeight(w, layout)
    key = (w.data_ptr(), -1 if w.is_inference() else w._version)
    hit = _packed.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == key:
        return hit[2]
    packed = NativeWeight(packed_weight(w), PANELS)
    _packed[id(w)] = (weakref.ref(w, _forget(id(w))), key, packed)  # only the copy is held, only while w lives
    return packed


def _forget(ident: int):
    def drop(ref: weakref.ref) -> None:
        if _packed.get(ident, (None,))[0] is ref:
            del _packed[ident]
    return drop


def fp32_cpu(*tensors: torch.Tensor | None) -> bool:
    """Every tensor given (None skipped) is fp32 on the CPU: what the native kernels read."""
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in tensors)


def _cpu_fp32_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> int:
    """Rows of x when the product may leave F.linear (fp32 on the CPU, a 2D weight, nothing for autograd to
    differentiate, an fp32 bias if any), else 0."""
    if not enabled or x.device.type != "cpu" or weight.dim() != 2:
        return 0
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
        return 0
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return 0
    return x.numel() // max(1, x.shape[-1])


def _onednn_ok(rows: int, weight: torch.Tensor) -> bool:
    return _ONEDNN_LINEAR is not None and rows > 0 and (
        weight.numel() >= ONEDNN_MIN_WEIGHT or (rows >= ONEDNN_MIN_ROWS and weight.numel() >= ONEDNN_MIN_WEIGHT_BATCHED))


def _native_ok(rows: int, weight: torch.Tensor) -> bool:
    if not 1 <= rows <= NATIVE_MAX_ROWS:
        return False
    layout, size = weight_layout(weight), weight.numel()
    cached = NATIVE_MIN_WEIGHT <= size < NATIVE_MAX_WEIGHT and layout is not None
    streamed = size >= NATIVE_MAX_WEIGHT and layout == 1
    return (cached or streamed) and native.available()


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    rows = _cpu_fp32_rows(x, weight, bias)
    return _onednn_ok(rows, weight) and not _native_ok(rows, weight)


def uses_native_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    return _native_ok(_cpu_fp32_rows(x, weight, bias), weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in]^T + bias -> [..., out]."""
    rows = _cpu_fp32_rows(x, weight, bias)
    if _native_ok(rows, weight):
        return _native_rows(x, weight, bias)
    if not _onednn_ok(rows, weight):
        return F.linear(x, weight, bias)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # [rows, in]
    pad = -rows % ONEDNN_ROW_BUCKET if rows > ONEDNN_ROW_BUCKET else 0
    if pad:  # zero rows up to the bucket: their outputs are dropped, the others' do not depend on them
        x2 = torch.cat([x2, x2.new_zeros(pad, k)])  # [rows + pad, in]
    y = _ONEDNN_LINEAR(x2.contiguous(), weight, bias, "none", [], "")  # [rows + pad, out]
    if pad:
        y = y[:rows]
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _native_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: input has {x.shape[-1]} features, weight expects {k}")
    rows = x.reshape(-1, k).contiguous()  # [R, in]
    out = torch.empty(rows.shape[0], n, dtype=torch.float32)  # [R, out]
    b = bias.contiguous() if bias is not None else None
    lib = native.library()
    w = native_weight(weight)
    kernel = (lib.hylm_linear_rows, lib.hylm_linear_rows_t, lib.hylm_linear_rows_panels)[w.layout]
    if kernel(rows.data_ptr(), w.tensor.data_ptr(), b.data_ptr() if b is not None else None, out.data_ptr(),
              rows.shape[0], k, n) != 0:
        raise RuntimeError(f"native linear kernel refused rows={rows.shape[0]}, in={k}, out={n}")
    return out.view(*x.shape[:-1], n)
