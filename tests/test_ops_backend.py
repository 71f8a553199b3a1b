"""Which implementation an op picks (hylm.ops.backend): Triton on CUDA when it imports, never under autograd."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hylm.ops import backend


def test_auto_picks_triton_only_for_cuda_tensors_outside_autograd(monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda module: True)
    cuda = SimpleNamespace(is_cuda=True, requires_grad=False)
    training = SimpleNamespace(is_cuda=True, requires_grad=True)
    assert backend.use_triton("auto", cuda, "triton_ssd")
    assert not backend.use_triton("auto", SimpleNamespace(is_cuda=False, requires_grad=False), "triton_ssd")
    assert not backend.use_triton("auto", training, "triton_ssd")  # the kernels have no backward pass
    with torch.no_grad():
        assert backend.use_triton("auto", training, "triton_ssd")
    assert not backend.use_triton("torch", cuda, "triton_ssd")
    assert backend.use_triton("triton", SimpleNamespace(is_cuda=False, requires_grad=True), "triton_ssd")
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton"):
        backend.use_triton("cuda", cuda, "triton_ssd")


def test_forcing_triton_without_it_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda module: False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        backend.use_triton("triton", torch.zeros(1), "triton_moe")
    assert not backend.use_triton("auto", torch.zeros(1), "triton_moe")
