"""Which implementation an op runs: its Triton kernel on CUDA tensors when triton imports, torch otherwise.

Every op with a Triton kernel takes ``backend``: "auto" (the default), "torch" or "triton" (forced: the
Triton interpreter runs it on CPU tensors under TRITON_INTERPRET=1, which is how the tests check kernels
without a GPU). The kernels have no backward pass, so "auto" keeps anything autograd must differentiate
(training) on the torch path.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch

BACKENDS = ("auto", "torch", "triton")


@lru_cache(maxsize=None)
def triton_available(kernel_module: str) -> bool:
    """Whether hylm.ops.<kernel_module> (a Triton kernel module) imports."""
    try:
        importlib.import_module(f"{__package__}.{kernel_module}")
        return True
    except Exception:  # triton missing or unusable
        return False


def use_triton(backend: str, x: torch.Tensor, kernel_module: str) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available(kernel_module):
            raise RuntimeError("backend='triton' needs the triton package")
        return True
    if backend != "auto":
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return x.is_cuda and triton_available(kernel_module)
